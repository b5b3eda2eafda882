"""Calibration (ECE) and the confusion matrix of an evaluation, against examples computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from alr.data import Batch
from alr.evaluation import ECE_BINS, calibration_bins, evaluate, expected_calibration_error
from alr.methods import CrossEntropy, Supervised
from golden_values import RecordOps


def _two_class_logits(confidences: list[float], predicted: list[int]) -> torch.Tensor:
    """Logits whose softmax gives class ``predicted[i]`` probability ``confidences[i]``."""
    rows = []
    for c, k in zip(confidences, predicted):
        z = [0.0, 0.0]
        z[k] = math.log(c / (1 - c))
        rows.append(z)
    return torch.tensor(rows)


def test_ece_of_a_hand_computed_15_bin_example():
    # Confidences 0.75, 0.75, 0.9, 0.55: bins (11/15, 12/15], (13/15, 14/15], (8/15, 9/15] (0-based 11, 13, 8).
    logits = _two_class_logits([0.75, 0.75, 0.9, 0.55], [1, 1, 1, 0])
    targets = torch.tensor([1, 0, 1, 0])  # the second is wrong
    bins = calibration_bins(logits, targets)
    assert bins.shape == (ECE_BINS, 3)
    filled = [b for b in range(ECE_BINS) if bins[b, 0]]
    assert filled == [8, 11, 13]
    assert bins[filled].flatten().tolist() == pytest.approx([1, 0.55, 1, 2, 1.5, 1, 1, 0.9, 1])
    # (2·|0.5 − 0.75| + 1·|1 − 0.9| + 1·|1 − 0.55|) / 4 = 1.05 / 4, in percent
    assert expected_calibration_error(bins) == pytest.approx(26.25)


def test_a_confidence_on_a_bin_edge_goes_to_the_lower_bin_and_one_to_the_last():
    bins = calibration_bins(torch.tensor([[0.0, 0.0], [0.0, 80.0]]), torch.tensor([0, 1]))  # 0.5, then ~1.0
    assert bins[7, 0] == 1 and bins[ECE_BINS - 1, 0] == 1  # 0.5·15 = 7.5 -> (7/15, 8/15]; 1.0 -> the last bin


def test_evaluate_reports_accuracy_nll_ece_and_the_confusion_matrix():
    class Table:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def epoch(self, epoch):
            yield Batch(self.x[:3], self.y[:3])
            yield Batch(self.x[3:], self.y[3:])

    logits = _two_class_logits([0.75, 0.75, 0.9, 0.55], [1, 1, 1, 0])
    targets = torch.tensor([1, 0, 1, 0])
    model = torch.nn.Identity()  # the "inputs" are the logits
    scores = evaluate(model, Supervised(CrossEntropy()), Table(logits, targets), None, torch.no_grad, 2, "cpu")
    m = scores.metrics
    assert m["test/acc"] == 75.0 and m["test/images"] == 4 and m["test/ece"] == pytest.approx(26.25)
    nll = -(math.log(0.75) + math.log(0.25) + math.log(0.9) + math.log(0.55)) / 4
    assert m["test/loss"] == pytest.approx(nll)
    assert scores.confusion[""].tolist() == [[1, 1], [0, 2]]  # row: true class, column: predicted


# Ops whose output's shape or value the host must read from the device: on CUDA each one waits for the GPU (bincount
# reads its input's maximum back to size its output, nonzero and masked_select their count, item the value).
READS_BACK = {
    "aten._local_scalar_dense",
    "aten.item",
    "aten.is_nonzero",
    "aten.equal",
    "aten.allclose",
    "aten.bincount",
    "aten.histc",
    "aten.nonzero",
    "aten.argwhere",
    "aten.masked_select",
    "aten.repeat_interleave",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.unique_dim_consecutive",
}


def _ops_of_evaluate(n_batches: int) -> tuple[list[str], list[str]]:
    """The ops :func:`evaluate` runs while its batches are drawn and after the last one, for ``n_batches`` batches
    of 8 samples, K = 10 (the batches mark the boundary in the record as they are drawn)."""
    g = torch.Generator().manual_seed(0)
    K, B = 10, 8
    ops = RecordOps()

    class Table:
        def epoch(self, epoch):
            for _ in range(n_batches):
                yield Batch(torch.randn(B, K, generator=g), torch.randint(0, K, (B,), generator=g))
            ops.names.append("<last batch done>")

    with ops:
        evaluate(torch.nn.Identity(), Supervised(CrossEntropy()), Table(), None, torch.no_grad, K, "cpu")
    end = ops.names.index("<last batch done>")
    return ops.names[:end], ops.names[end + 1 :]


@pytest.mark.parametrize("n_batches", [1, 3])
def test_evaluate_reads_nothing_back_until_its_last_batch(n_batches: int):
    """The batch loop holds no op that reads from the device (no ``bincount`` for the confusion matrix: a fixed-size
    ``index_add_``); the totals are read back once, after the last batch (``evaluation._read_back``), by the same
    ops whatever the number of batches."""
    during, after = _ops_of_evaluate(n_batches)
    assert not READS_BACK & set(during), sorted(READS_BACK & set(during))
    assert "aten._local_scalar_dense" in after  # the read-back the code names: its totals, once at the end
    assert after == _ops_of_evaluate(1)[1]


def test_the_confusion_matrix_counts_every_pair_as_bincount_does():
    g = torch.Generator().manual_seed(1)
    K, N = 7, 200
    logits, targets = torch.randn(N, K, generator=g), torch.randint(0, K, (N,), generator=g)

    class Table:
        def epoch(self, epoch):
            yield from (Batch(logits[i : i + 64], targets[i : i + 64]) for i in range(0, N, 64))

    scores = evaluate(torch.nn.Identity(), Supervised(CrossEntropy()), Table(), None, torch.no_grad, K, "cpu")
    expected = torch.bincount(targets * K + logits.argmax(dim=1), minlength=K * K).view(K, K)
    assert scores.confusion[""].dtype == expected.numpy().dtype and (scores.confusion[""] == expected.numpy()).all()
