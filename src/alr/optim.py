"""Optimizer and schedule of the ImageNet recipe (Table 2): the linear scaling rule and warm-up.

As docs/deviations.md#table-2-imagenet sets it: SGD with momentum 0.9, learning rate 0.1 for a global
batch of 256 images, scaled to ``0.1 · B / 256`` for a global batch ``B``; a batch larger than 256 adds
5 linear warm-up epochs (Goyal et al. 2017), after which the rate drops ×0.1 at epochs 30, 60 and 80.
The trainer steps the schedule once per epoch, so the warm-up rises per epoch (``(e + 1) / warmup`` of
the rate in epoch ``e``), not per step as Goyal et al. do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


def scaled_sgd(
    params: Iterable[Any],
    lr: float,
    batch_size: int,
    reference_batch: int = 256,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.SGD:
    """SGD at ``lr · batch_size / reference_batch`` (``lr`` is the rate for ``reference_batch`` images)."""
    return torch.optim.SGD(params, lr=lr * batch_size / reference_batch, momentum=momentum, nesterov=nesterov)


class WarmupMultiStep:
    """The factor of epoch ``e``: ``(e + 1) / warmup_epochs`` during warm-up, then ``gamma`` per milestone passed.

    A callable object rather than a lambda, so ``LambdaLR.state_dict()`` saves it into ``last.pt``.
    """

    def __init__(self, warmup_epochs: int, milestones: list[int], gamma: float) -> None:
        self.warmup_epochs, self.milestones, self.gamma = warmup_epochs, list(milestones), gamma

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / self.warmup_epochs
        return self.gamma ** sum(epoch >= m for m in self.milestones)


def warmup_multistep(
    optimizer: torch.optim.Optimizer,
    milestones: list[int],
    gamma: float = 0.1,
    warmup_epochs: int = 5,
    batch_size: int = 256,
    reference_batch: int = 256,
) -> LambdaLR:
    """Multi-step decay, after ``warmup_epochs`` of linear warm-up when ``batch_size > reference_batch``."""
    warmup = warmup_epochs if batch_size > reference_batch else 0
    return LambdaLR(optimizer, WarmupMultiStep(warmup, milestones, gamma))
