"""Scoring a run on its test set: accuracy, the test loss (NLL), calibration (ECE) and the confusion matrix.

Every count is a sum kept on the device and, under several processes, summed over the ranks once at the end,
so each test image counts once and the metrics are the same on every rank. The batches run without a host sync
(every sum has a fixed size: ``index_add_``, never ``bincount``, whose CUDA kernel reads its input's maximum back
to size its output); the totals are read back once, in :func:`_read_back`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alr.distributed import all_reduce_sum

#: Equal-width confidence bins of the expected calibration error (Guo et al. 2017, §2 "Expected Calibration
#: Error"): 15 bins, the definition most papers on label regularizers report.
ECE_BINS = 15


def calibration_bins(logits: Tensor, targets: Tensor, bins: int = ECE_BINS) -> Tensor:
    """Per confidence bin: how many samples, their summed confidence, how many were right (``bins×3``, float64).

    The confidence is the top softmax probability; bin ``b`` holds confidences in ``(b/bins, (b+1)/bins]``
    (a confidence of exactly 0 cannot occur with K ≥ 2 classes, the first bin's lower edge is open anyway).
    """
    confidence, predicted = torch.softmax(logits.float(), dim=1).max(dim=1)
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    out = torch.zeros(bins, 3, dtype=torch.float64, device=logits.device)
    out[:, 0].index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
    out[:, 1].index_add_(0, index, confidence.double())
    out[:, 2].index_add_(0, index, (predicted == targets).double())
    return out


def expected_calibration_error(bins: Tensor) -> float:
    """``Σ_b (n_b / N)·|accuracy_b − confidence_b|`` from :func:`calibration_bins`, in percent."""
    count, confidence, correct = bins.double().unbind(dim=1)
    n = float(count.sum())
    return 100.0 * float((confidence - correct).abs().sum()) / n if n else float("nan")


@dataclass
class Evaluation:
    """``metrics``: one epoch's ``test/...`` values; ``confusion``: per network, true class × predicted (counts)."""

    metrics: dict[str, float]
    confusion: dict[str, np.ndarray]


@torch.no_grad()
def evaluate(
    model: nn.Module, method: nn.Module, batches, limit: int | None, autocast, num_classes: int, device: torch.device
) -> Evaluation:
    """Top-1 (and top-5 where K > 5) accuracy in percent, the mean cross entropy (NLL), the 15-bin ECE in
    percent, and the confusion matrix.

    Under several processes each rank evaluates its own shard and the counts are summed over ranks, so
    every test image counts once (``limit`` caps the batches of each rank). That sum is one model's score
    because every rank holds the same one: the backbone's weights are DDP's, its batch-norm statistics rank
    0's (broadcast before this call), and a method that trains a network of its own (``Method.networks``)
    is refused under several processes. A method scored by several networks (DML, in one process) gets
    each one's metrics as ``test/<name>/...`` and, as ``test/...``, their mean.
    """
    model.eval()
    method.eval()
    K = num_classes
    names: list[str] = []
    sums = torch.zeros(1, 3, dtype=torch.float64, device=device)  # per network: top-1, top-5 correct, loss sum
    bins = torch.zeros(1, ECE_BINS, 3, dtype=torch.float64, device=device)
    confusion = torch.zeros(1, K * K, dtype=torch.long, device=device)
    images = torch.zeros(1, dtype=torch.float64, device=device)
    for batch in islice(batches.epoch(0), limit):
        x, y = batch.inputs, batch.targets
        with autocast():
            outputs = method.predictions(model, x)
        if not names:  # (a rank with an empty shard keeps one row: several networks run in one process only)
            names = list(outputs)
            sums, bins, confusion = (t.new_zeros(len(names), *t.shape[1:]) for t in (sums, bins, confusion))
        for i, logits in enumerate(outputs.values()):
            logits = logits.float()
            top = logits.topk(min(5, K), dim=1).indices
            sums[i] += torch.stack(
                [
                    (top[:, 0] == y).sum(),
                    (top == y[:, None]).any(dim=1).sum(),
                    F.cross_entropy(logits, y, reduction="sum"),
                ]
            ).double()
            bins[i] += calibration_bins(logits, y)
            confusion[i].index_add_(0, y * K + top[:, 0], torch.ones_like(y))
        images += len(y)
    return _read_back(names or ["net"], sums, bins, confusion, images, K)


def _read_back(names: list[str], sums: Tensor, bins: Tensor, confusion: Tensor, images: Tensor, K: int) -> Evaluation:
    """The device totals of :func:`evaluate`, summed over the ranks and read back: an evaluation's one host sync."""
    n = int(all_reduce_sum(images).item())
    bins, confusion = all_reduce_sum(bins).cpu(), all_reduce_sum(confusion).view(-1, K, K).cpu().numpy()
    per = {
        name: {"acc": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss / n, "ece": expected_calibration_error(b)}
        for name, (c1, c5, loss), b in zip(names, all_reduce_sum(sums).tolist(), bins)
    }
    keys = ("acc", "loss", "ece", "acc5") if K > 5 else ("acc", "loss", "ece")
    out = {f"test/{k}": sum(m[k] for m in per.values()) / len(per) for k in keys}
    out["test/images"] = n
    if len(per) > 1:
        out.update({f"test/{name}/{k}": m[k] for name, m in per.items() for k in keys})
    return Evaluation(out, dict(zip(names, confusion)))
