"""PS-KD against a transcription of its authors' training loop (docs/deviations.md#ps-kd)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from alr.data import Batch
from alr.distributed import World
from alr.errors import RunError
from alr.methods import ProgressiveSelfKD, RunFacts
from alr.trainer import fit
from conftest import compose
from golden_values import check_golden
from test_gpu import host_sync_is_an_error

N, K, B, EPOCHS = 12, 5, 4, 4
WORLD = World(torch.device("cpu"))
LABELS = torch.arange(N) % K


def _facts(
    num_train: int = N, num_classes: int = K, indexed: bool = True, epochs: int = EPOCHS, device: str = "cpu"
) -> RunFacts:
    return RunFacts(
        num_classes=num_classes,
        num_train=num_train,
        indexed=indexed,
        epochs=epochs,
        steps_per_epoch=N // B,
        seed=0,
        device=torch.device(device),
    )


def _method(**kwargs) -> ProgressiveSelfKD:
    method = ProgressiveSelfKD(**kwargs)
    method.setup(_facts())
    return method


def _epoch(epoch: int, steps: int = N // B) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of (logits, sample indices): a permutation of the N samples, new logits every epoch."""
    g = torch.Generator().manual_seed(10 + epoch)
    order = torch.randperm(N, generator=g)
    logits = 2 * torch.randn(N, K, generator=g)
    return [(logits[order[s * B : (s + 1) * B]], order[s * B : (s + 1) * B]) for s in range(steps)]


def _step(method: ProgressiveSelfKD, z: torch.Tensor, index: torch.Tensor):
    """One forward of ``method`` whose "network" returns its input: the logits ``z`` (a leaf, for ∂L/∂z)."""
    z = z.clone().requires_grad_()
    out = method(nn.Identity(), Batch(z, LABELS[index], index))
    out.loss.backward()
    return out, z.grad


class AuthorsPSKD:
    """``main_worker``'s α schedule and ``train`` of the authors' main.py, one process, with their in-place table."""

    def __init__(self, alpha_T: float = 0.8) -> None:
        self.alpha_T = alpha_T
        self.all_predictions = torch.zeros(N, K, dtype=torch.float32)

    def step(self, epoch: int, outputs: torch.Tensor, input_indices: torch.Tensor) -> torch.Tensor:
        alpha_t = max(0, self.alpha_T * ((epoch + 1) / EPOCHS))
        targets_one_hot = torch.eye(K)[LABELS[input_indices].numpy()]
        if epoch == 0:
            self.all_predictions[input_indices] = targets_one_hot
        soft_targets = ((1 - alpha_t) * targets_one_hot) + (alpha_t * self.all_predictions[input_indices])
        log_probs = nn.LogSoftmax(dim=1)(outputs)
        loss = (-soft_targets * log_probs).mean(0).sum()  # Custom_CrossEntropy_PSKD
        self.all_predictions[input_indices] = torch.softmax(outputs, dim=1).detach()
        return loss


def test_epochs_of_three_steps_match_the_authors_loop():
    """Loss and ∂L/∂z at every step of 3 epochs, and the table after each, against the authors' in-place table."""
    ours, theirs = _method(), AuthorsPSKD()
    for epoch in range(3):
        ours.start_epoch(epoch)
        for z, index in _epoch(epoch):
            out, grad = _step(ours, z, index)
            z2 = z.clone().requires_grad_()
            expected = theirs.step(epoch, z2, index)
            expected.backward()
            torch.testing.assert_close(out.loss, expected)
            torch.testing.assert_close(grad, z2.grad)
            torch.testing.assert_close(out.terms["alpha"], torch.tensor(0.8 * (epoch + 1) / EPOCHS))
        ours.end_epoch(epoch, WORLD)
        torch.testing.assert_close(ours.previous, theirs.all_predictions)
        assert not ours.current.any() and not ours.written.any()


def test_first_epoch_is_cross_entropy_and_the_terms_are_logged():
    method = _method()
    method.start_epoch(0)
    z, index = _epoch(0)[0]
    out, grad = _step(method, z, index)
    ce = nn.functional.cross_entropy(z, LABELS[index])
    torch.testing.assert_close(out.loss, ce)
    torch.testing.assert_close(out.terms["L_hard"], ce)
    torch.testing.assert_close(grad, (z.softmax(1) - torch.eye(K)[LABELS[index]]) / B)
    assert set(out.terms) == {"L_soft", "L_hard", "alpha"} and all(t.dim() == 0 for t in out.terms.values())


def test_alpha_grows_linearly_to_alpha_T_in_the_last_epoch():
    method = _method()
    assert [method.alpha_t(e) for e in range(EPOCHS)] == [0.8 * (e + 1) / EPOCHS for e in range(EPOCHS)]
    assert method.alpha_t(EPOCHS - 1) == pytest.approx(0.8)


def test_a_sample_not_seen_this_epoch_keeps_its_row_and_an_unseen_one_gets_its_label():
    """trainer.limit_train_batches: an epoch of 2 of 3 batches. Rows it did not write keep last epoch's;
    a sample never trained on reads as its one-hot label (the authors' zero row would give (1−α)·onehot)."""
    method = _method()
    method.start_epoch(0)
    first = _epoch(0, steps=2)
    for z, index in first:
        _step(method, z, index)
    method.end_epoch(0, WORLD)
    seen = torch.cat([index for _, index in first])
    unseen = torch.tensor(sorted(set(range(N)) - set(seen.tolist())))
    assert not method.previous[unseen].any()
    torch.testing.assert_close(method.previous[seen], torch.cat([z for z, _ in first]).softmax(1))

    before = method.previous.clone()
    method.start_epoch(1)
    z = torch.zeros(len(unseen), K)
    out, _ = _step(method, z, unseen)  # uniform logits: L = −log(1/K) for any target that sums to 1
    torch.testing.assert_close(out.loss, torch.tensor(K).log())
    method.end_epoch(1, WORLD)
    torch.testing.assert_close(method.previous[seen], before[seen])
    torch.testing.assert_close(method.previous[unseen], torch.full((len(unseen), K), 1 / K))


def test_golden_values():
    method, losses = _method(), []
    for epoch in range(2):
        method.start_epoch(epoch)
        losses += [_step(method, z, index)[0].loss for z, index in _epoch(epoch)]
        method.end_epoch(epoch, WORLD)
    check_golden("pskd", {"losses": torch.stack(losses), "previous_first_rows": method.previous[:3]})


def test_state_dict_round_trip_holds_the_table_and_the_epoch():
    method = _method()
    method.start_epoch(2)
    for z, index in _epoch(2):
        _step(method, z, index)
    method.end_epoch(2, WORLD)
    state = method.state_dict()
    assert set(state) == {"previous", "_extra_state"} and state["_extra_state"] == {"epoch": 2}
    assert set(method.partial_sums()) == {"current", "written"}
    other = _method()
    other.load_state_dict(state)
    assert torch.equal(other.previous, method.previous) and other.epoch == 2


def test_a_mid_epoch_resume_and_sums_split_over_ranks_give_the_same_table():
    """Resumed after step 2 (state_dict and its own partial sums; start_epoch not called): the same loss at
    step 3 and a bit-identical table. Split over two "ranks" and restored by one process: the same table."""
    straight = _method()
    straight.start_epoch(0)
    straight.end_epoch(0, WORLD)
    straight.start_epoch(1)
    losses = [_step(straight, z, index)[0].loss for z, index in _epoch(1)]
    straight.end_epoch(1, WORLD)

    first = _method()
    first.start_epoch(0)
    first.end_epoch(0, WORLD)
    first.start_epoch(1)
    for z, index in _epoch(1)[:2]:
        _step(first, z, index)
    saved = {k: v.clone() for k, v in first.partial_sums().items()}
    resumed = _method()
    resumed.load_state_dict(first.state_dict())
    assert WORLD.restore_sums(resumed.partial_sums(), [saved]) is True
    out, _ = _step(resumed, *_epoch(1)[2])
    assert resumed.epoch == 1 and torch.equal(out.loss, losses[2])
    resumed.end_epoch(1, WORLD)
    assert torch.equal(resumed.previous, straight.previous)

    rank1 = _method()
    rank1.load_state_dict(first.state_dict())
    rank1.start_epoch(1)
    _step(rank1, *_epoch(1)[2])
    merged = _method()
    merged.load_state_dict(first.state_dict())
    assert WORLD.restore_sums(merged.partial_sums(), [saved, rank1.partial_sums()]) is False
    merged.end_epoch(1, WORLD)
    torch.testing.assert_close(merged.previous, straight.previous)


def test_refuses_a_data_set_without_indices():
    with pytest.raises(ValueError, match=r"^PS-KD keeps each training sample's last prediction by its index") as e:
        ProgressiveSelfKD().setup(_facts(indexed=False))
    assert "\n" not in str(e.value)


def test_refuses_imagenet_with_what_it_would_need_and_fits_cifar100():
    with pytest.raises(ValueError) as e:
        ProgressiveSelfKD().setup(_facts(num_train=1_281_167, num_classes=1000))
    message = str(e.value)
    assert "\n" not in message
    assert "1,281,167 samples × 1,000 classes need 9,779 MB, over method.max_state_mb=512" in message
    assert "Raise method.max_state_mb" in message
    cifar100 = ProgressiveSelfKD()
    cifar100.setup(_facts(num_train=50_000, num_classes=100))
    assert cifar100.previous.shape == (50_000, 100) and ProgressiveSelfKD.state_bytes(50_000, 100) / 2**20 < 40
    with pytest.raises(ValueError, match="need 38 MB, over method.max_state_mb=10"):
        ProgressiveSelfKD(max_state_mb=10).setup(_facts(num_train=50_000, num_classes=100))


def test_trains_through_the_trainer_and_logs_its_terms(tmp_path: Path):
    cfg = compose("debug=fast", "trainer.batch_size=32", "method=pskd", f"paths.output_dir={tmp_path}")
    run_dir = tmp_path / "run"
    assert fit(cfg, run_dir)["status"] == "finished"
    metrics = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["train/alpha"] for m in metrics] == pytest.approx([0.4, 0.8])
    assert metrics[0]["train/L_soft"] == pytest.approx(metrics[0]["train/L_hard"])  # the first epoch: plain CE
    state = torch.load(run_dir / "last.pt", weights_only=True)["method"]
    assert state["previous"].shape == (1437, 10) and state["_extra_state"] == {"epoch": 1}
    assert 3 * 32 <= int((state["previous"].sum(1) > 0).sum()) <= 2 * 3 * 32  # debug=fast: 3 batches of 32


def test_the_trainer_reports_the_refusal_in_one_line(tmp_path: Path):
    cfg = compose("debug=fast", "method=pskd", "method.max_state_mb=0.01", f"paths.output_dir={tmp_path}")
    with pytest.raises(RunError, match=r"^method 'pskd': PS-KD keeps two tables .* over method.max_state_mb=0.01"):
        fit(cfg, tmp_path / "run")


@pytest.mark.gpu
def test_a_training_step_on_cuda_waits_for_no_host_sync():
    method = ProgressiveSelfKD()
    method.setup(_facts(num_train=256, num_classes=100, device="cuda"))
    method.start_epoch(1)
    z = torch.randn(4, 64, 100, device="cuda", requires_grad=True)
    y = torch.randint(0, 100, (4, 64), device="cuda")
    index = torch.randperm(256, device="cuda").view(4, 64)
    for i in range(3):  # warm-up
        method(nn.Identity(), Batch(z[i], y[i], index[i])).loss.backward()
    with host_sync_is_an_error():
        method(nn.Identity(), Batch(z[3], y[3], index[3])).loss.backward()
    assert int(method.written.sum()) == 256
