"""DisturbLabel: the draw (distribution, seeded per rank and step), the loss (docs/deviations.md#disturblabel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alr.methods import DisturbLabel, RunFacts, Supervised
from alr.trainer import fit
from conftest import compose
from golden_values import check_golden
from test_gpu import host_sync_is_an_error

K, B = 10, 16


def _facts(seed: int = 0, rank: int = 0, device: str = "cpu") -> RunFacts:
    return RunFacts(
        num_classes=K,
        num_train=100,
        indexed=True,
        epochs=1,
        steps_per_epoch=3,
        seed=seed,
        device=torch.device(device),
        rank=rank,
        world_size=2,
    )


def _criterion(alpha: float = 0.1, seed: int = 0, rank: int = 0) -> DisturbLabel:
    crit = DisturbLabel(K, alpha=alpha)
    crit.setup(_facts(seed, rank))
    return crit


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return 3 * torch.randn(B, K, generator=g), torch.randint(0, K, (B,), generator=g)


def _authors_labels(target: torch.Tensor, alpha: float, seed: int, rank: int, step: int) -> torch.Tensor:
    """The authors' per-sample loop (``DisturbLabel.forward`` of loss_all_methods.py), its two draws per batch
    taken from the generator the suite seeds for ``(seed, rank, step)``: change with probability (K−1)/K·α to
    the class ``r`` places after the label, ``r`` uniform in 1…K−1 (their redraw until it differs)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]))
    r, shift = torch.rand(len(target), generator=g), torch.randint(1, K, (len(target),), generator=g)
    bound = (K - 1.0) / float(K) * alpha
    new_target = target.clone()
    for kk in range(len(target)):
        if r[kk] < bound:
            new_target[kk] = (int(target[kk]) + int(shift[kk])) % K
    return new_target


def test_three_steps_match_the_authors_draw_loss_and_gradient():
    crit = _criterion(alpha=0.5)
    for step in range(3):
        z, y = _batch(step)
        z = z.requires_grad_()
        loss = crit(z, y)
        loss.backward()
        y_new = _authors_labels(y, 0.5, seed=0, rank=0, step=step)
        p = z.detach().softmax(1)
        expected = -sum(p[i, y_new[i]].log() for i in range(B)) / B
        torch.testing.assert_close(loss.detach(), expected)
        torch.testing.assert_close(z.grad, (p - torch.eye(K)[y_new]) / B)
        torch.testing.assert_close(crit.last_terms["changed"], (y_new != y).float().mean())
        torch.testing.assert_close(crit.last_terms["L_disturbed"], expected)
    assert crit.step == 3 and crit.state_dict() == {"_extra_state": {"step": 3}}


def test_the_draw_has_the_papers_distribution():
    """P(ỹ = y) = 1 − α + α/K and P(ỹ = j) = α/K for j ≠ y: over 300 steps of 1,000 labels, each within 4.5 std."""
    steps, n = 300, 1000
    for alpha in (0.1, 1.0):
        crit = _criterion(alpha=alpha, seed=7)
        y = torch.arange(n) % K
        offsets = torch.stack([(crit.disturb(y, step) - y) % K for step in range(steps)]).flatten()
        counts = torch.bincount(offsets, minlength=K).double()
        expected = torch.full((K,), alpha / K) + torch.eye(K)[0] * (1 - alpha)
        total = steps * n
        std = (expected * (1 - expected) / total).sqrt()
        assert torch.all((counts / total - expected).abs() < 4.5 * std), (alpha, counts / total)


def test_draws_are_a_function_of_seed_rank_and_step_and_leave_the_global_generator_alone():
    y = torch.arange(64) % K
    state = torch.get_rng_state()
    a = _criterion(alpha=0.5, seed=3, rank=1).disturb(y, 5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, _criterion(alpha=0.5, seed=3, rank=1).disturb(y, 5))
    for other in (_criterion(0.5, 4, 1).disturb(y, 5), _criterion(0.5, 3, 0).disturb(y, 5)):
        assert not torch.equal(a, other)
    assert not torch.equal(a, _criterion(0.5, 3, 1).disturb(y, 6))


def test_a_resumed_criterion_draws_what_the_uninterrupted_one_draws():
    straight = _criterion(alpha=0.5)
    losses = [straight(*_batch(step)).detach() for step in range(5)]
    first = _criterion(alpha=0.5)
    for step in range(2):
        first(*_batch(step))
    resumed = Supervised(DisturbLabel(K, alpha=0.5))
    resumed.setup(_facts())
    resumed.load_state_dict(Supervised(first).state_dict())
    assert resumed.criterion.step == 2 and resumed.partial_sums() == {}
    for step in range(2, 5):
        torch.testing.assert_close(resumed.criterion(*_batch(step)), losses[step], rtol=0, atol=0)


def test_eval_mode_leaves_labels_and_the_counter_alone():
    crit = _criterion(alpha=1.0).eval()
    z, y = _batch(0)
    torch.testing.assert_close(crit(z, y), torch.nn.functional.cross_entropy(z, y))
    assert crit.step == 0 and crit.last_terms["changed"].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_in_float32_under_autocast(dtype: torch.dtype):
    z, y = _batch(0)
    with torch.autocast("cpu", dtype=dtype):
        assert _criterion()(z.to(dtype), y).dtype == torch.float32


def test_golden_values():
    crit, y = _criterion(alpha=0.5), torch.arange(B) % K
    labels = torch.stack([crit.disturb(y, step) for step in range(3)])
    z, _ = _batch(0)
    check_golden("disturblabel", {"labels": labels.double(), "loss": crit(z, y)})


def test_trains_through_the_trainer_and_logs_its_terms(tmp_path: Path):
    cfg = compose("debug=fast", "trainer.batch_size=32", "method=disturblabel", f"paths.output_dir={tmp_path}")
    run_dir = tmp_path / "run"
    assert fit(cfg, run_dir)["status"] == "finished"
    metrics = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(0 <= m["train/changed"] < 0.5 and m["train/L_disturbed"] > 0 for m in metrics)
    state = torch.load(run_dir / "last.pt", weights_only=True)["method"]
    assert state == {"criterion._extra_state": {"step": 6}}  # debug=fast: 2 epochs of 3 steps


@pytest.mark.gpu
def test_a_training_step_on_cuda_waits_for_no_host_sync():
    crit = DisturbLabel(100, alpha=0.5)
    crit.setup(_facts(device="cuda"))
    z = torch.randn(4, 64, 100, device="cuda", requires_grad=True)
    y = torch.randint(0, 100, (4, 64), device="cuda")
    for i in range(3):  # warm-up: the generator on the device is made at the first step
        crit(z[i], y[i]).backward()
    with host_sync_is_an_error():
        crit(z[3], y[3]).backward()
    assert crit.step == 4 and crit.last_terms["changed"].is_cuda
