"""Online label smoothing against a transcription of its authors' CIFAR loop (docs/deviations.md#ols)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alr.distributed import World
from alr.methods import OnlineLabelSmoothing, Supervised
from alr.trainer import fit
from conftest import compose
from golden_values import check_golden
from test_gpu import host_sync_is_an_error

K, B = 5, 8
WORLD = World(torch.device("cpu"))


def _epoch(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches of logits and labels; no sample of class 4 is ever classified correctly."""
    g = torch.Generator().manual_seed(100 + epoch)
    batches = []
    for _ in range(3):
        z = 3 * torch.randn(B, K, generator=g)
        y = torch.randint(0, K, (B,), generator=g)
        y[0] = 4
        z[y == 4, 4] = -10.0
        batches.append((z, y))
    return batches


class AuthorsOLS:
    """The ``ols`` branch of ``Solver.train`` in the authors' CIFAR script, written out with their loops."""

    def __init__(self) -> None:
        self.loss_lams = torch.zeros(K, K)

    def start_epoch(self) -> None:
        self.cur_epoch_lams = torch.zeros(K, K)
        self.cur_epoch_cnt = torch.zeros(K)

    def step(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # update_loss_lams
            probs = torch.softmax(output, dim=1)
            sort_args = torch.argsort(probs, dim=1, descending=True)
            for k in range(output.shape[0]):
                if target[k] != sort_args[k, 0]:
                    continue
                self.cur_epoch_lams[target[k]] += probs[k]
                self.cur_epoch_cnt[target[k]] += 1
        target_prob = torch.zeros_like(output)  # soft_cross_entropy
        for k in range(output.shape[0]):
            target_prob[k] = self.loss_lams[target[k]]
        soft = torch.sum(-torch.nn.functional.log_softmax(output, dim=1) * target_prob) / output.shape[0]
        return 0.5 * torch.nn.functional.cross_entropy(output, target) + 0.5 * soft

    def end_epoch(self) -> None:
        for cls in range(K):
            if self.cur_epoch_cnt[cls].max() < 0.5:
                self.loss_lams[cls] = 1.0 / K
            else:
                self.loss_lams[cls] = self.cur_epoch_lams[cls] / self.cur_epoch_cnt[cls]


def test_two_epochs_of_three_steps_match_the_authors_loop():
    """Loss and ∂L/∂z at every step, and S after each epoch: the first epoch's zeros, class 4's uniform row."""
    ours, theirs = OnlineLabelSmoothing(K), AuthorsOLS()
    for epoch in range(2):
        ours.start_epoch(epoch)
        theirs.start_epoch()
        for z, y in _epoch(epoch):
            z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
            loss = ours(z1, y)
            expected = theirs.step(z2, y)
            loss.backward()
            expected.backward()
            torch.testing.assert_close(loss, expected)
            torch.testing.assert_close(z1.grad, z2.grad)
            if epoch == 0:
                assert ours.last_terms["L_soft"].item() == 0.0  # S starts at zeros: α·CE alone
        ours.end_epoch(epoch, WORLD)
        theirs.end_epoch()
        torch.testing.assert_close(ours.soft_labels, theirs.loss_lams)
        torch.testing.assert_close(ours.soft_labels[4], torch.full((K,), 1 / K))  # no correct sample of class 4
        torch.testing.assert_close(ours.soft_labels.sum(1), torch.ones(K))
        assert not ours.class_sums.any() and not ours.class_counts.any()


def test_terms_and_gradient_in_closed_form():
    """∂L/∂z = (p − α·onehot(y) − (1−α)·S[y]) / B, since S's rows sum to 1; the terms are the two cross entropies."""
    crit = OnlineLabelSmoothing(K, alpha=0.3)
    crit.soft_labels.copy_(torch.randn(K, K, generator=torch.Generator().manual_seed(1)).softmax(1))
    z, y = _epoch(0)[0]
    z = z.requires_grad_()
    loss = crit(z, y)
    loss.backward()
    p, onehot, s = z.detach().softmax(1), torch.eye(K)[y], crit.soft_labels[y]
    torch.testing.assert_close(z.grad, (p - 0.3 * onehot - 0.7 * s) / B)
    log_p = z.detach().log_softmax(1)
    torch.testing.assert_close(crit.last_terms["L_hard"], -(onehot * log_p).sum(1).mean())
    torch.testing.assert_close(crit.last_terms["L_soft"], -(s * log_p).sum(1).mean())
    torch.testing.assert_close(loss.detach(), 0.3 * crit.last_terms["L_hard"] + 0.7 * crit.last_terms["L_soft"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_in_float32_under_autocast(dtype: torch.dtype):
    crit = OnlineLabelSmoothing(K)
    z, y = _epoch(0)[0]
    with torch.autocast("cpu", dtype=dtype):
        loss = crit(z.to(dtype), y)
    assert loss.dtype == torch.float32 and crit.class_sums.dtype == torch.float32


def test_eval_mode_adds_nothing_to_the_sums():
    crit = OnlineLabelSmoothing(K).eval()
    crit(*_epoch(0)[0])
    assert not crit.class_sums.any() and not crit.class_counts.any()


def test_golden_values():
    crit = OnlineLabelSmoothing(K)
    losses = []
    for epoch in range(2):
        crit.start_epoch(epoch)
        losses += [crit(z, y) for z, y in _epoch(epoch)]
        crit.end_epoch(epoch, WORLD)
    check_golden("ols", {"losses": torch.stack(losses), "soft_labels": crit.soft_labels})


def test_state_dict_holds_S_and_not_the_sums():
    crit = OnlineLabelSmoothing(K)
    crit.start_epoch(0)
    for z, y in _epoch(0):
        crit(z, y)
    crit.end_epoch(0, WORLD)
    assert set(crit.state_dict()) == {"soft_labels"} and set(crit.partial_sums()) == {"class_sums", "class_counts"}
    other = OnlineLabelSmoothing(K)
    other.load_state_dict(crit.state_dict())
    assert torch.equal(other.soft_labels, crit.soft_labels)
    assert set(Supervised(crit).state_dict()) == {"criterion.soft_labels"}


def test_a_restored_epoch_and_sums_split_over_ranks_give_the_same_S():
    """Resumed after step 2 with its own sums: bit-identical S. Steps split over two "ranks" and restored by
    one process (rank 0 takes their total): the same S up to the order of float additions."""
    batches = _epoch(0)
    straight = OnlineLabelSmoothing(K)
    straight.start_epoch(0)
    for z, y in batches:
        straight(z, y)
    straight.end_epoch(0, WORLD)

    first = OnlineLabelSmoothing(K)
    first.start_epoch(0)
    for z, y in batches[:2]:
        first(z, y)
    saved = {k: v.clone() for k, v in first.partial_sums().items()}
    resumed = OnlineLabelSmoothing(K)
    resumed.load_state_dict(first.state_dict())
    assert WORLD.restore_sums(resumed.partial_sums(), [saved]) is True
    resumed(*batches[2])
    resumed.end_epoch(0, WORLD)
    assert torch.equal(resumed.soft_labels, straight.soft_labels)

    rank1 = OnlineLabelSmoothing(K)
    rank1.start_epoch(0)
    rank1(*batches[2])
    merged = OnlineLabelSmoothing(K)
    assert WORLD.restore_sums(merged.partial_sums(), [saved, rank1.partial_sums()]) is False
    merged.end_epoch(0, WORLD)
    torch.testing.assert_close(merged.soft_labels, straight.soft_labels)


def test_trains_through_the_trainer_and_logs_its_terms(tmp_path: Path):
    cfg = compose("debug=fast", "trainer.batch_size=32", "method=ols", f"paths.output_dir={tmp_path}")
    run_dir = tmp_path / "run"
    result = fit(cfg, run_dir)
    assert result["status"] == "finished"
    metrics = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[0]["train/L_soft"] == 0.0 and metrics[1]["train/L_soft"] > 0  # zeros in epoch 1, then S
    assert all("train/L_hard" in m for m in metrics)
    snapshot = (run_dir / "soft_labels" / "epoch_002.npy").is_file()
    state = torch.load(run_dir / "last.pt", weights_only=True)["method"]
    assert snapshot and set(state) == {"criterion.soft_labels"}
    torch.testing.assert_close(state["criterion.soft_labels"].sum(1), torch.ones(10))


@pytest.mark.gpu
def test_a_training_step_on_cuda_waits_for_no_host_sync():
    crit = OnlineLabelSmoothing(100).cuda()
    crit.start_epoch(0)
    z = torch.randn(4, 64, 100, device="cuda", requires_grad=True)
    y = torch.randint(0, 100, (4, 64), device="cuda")
    for i in range(3):  # warm-up
        crit(z[i], y[i]).backward()
    with host_sync_is_an_error():
        crit(z[3], y[3]).backward()
    assert int(crit.class_counts.sum()) <= 4 * 64
