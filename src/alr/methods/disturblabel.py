"""DisturbLabel: cross entropy on labels of which a random share is replaced by a random class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from alr.methods.supervised import Criterion, RunFacts


class DisturbLabel(Criterion):
    r"""DisturbLabel (Xie et al., "DisturbLabel: Regularizing CNN on the Loss Layer", CVPR 2016).

    Follows the implementation in zhangchbin/OnlineLabelSmoothing ``cifar/scripts/loss_all_methods.py``
    (class ``DisturbLabel``): each training label is changed with probability ``(K−1)/K·α`` to a class drawn
    uniformly from the other K−1, then ``L_disturbed = CE(z, ỹ)``. That is the paper's draw (with
    probability α the label is replaced by one drawn uniformly from all K classes, which may be the label
    itself): ``P(ỹ = y) = 1 − α + α/K`` and ``P(ỹ = j) = α/K`` for every ``j ≠ y``. ``α = 0.1``: their
    ``noisy_rate``, the same for every data set, CIFAR-100 included.

    Where the suite does something else (also in docs/deviations.md#disturblabel): the authors draw with
    ``torch.rand(1)`` per sample from the global generator, redrawing ``torch.randint`` until the new label
    differs; here one ``torch.rand`` and one ``torch.randint(1, K)`` per batch (``ỹ = (y + r) mod K``, the
    same distribution) come from a generator of this module on the training device, reseeded at every
    training step from ``(seed, rank, step)`` (numpy's ``SeedSequence``). ``step`` counts this run's
    training steps, is a Python int and is kept in the state (``get_extra_state``), so a resumed run draws
    the same labels and no step waits for the device. The cross entropy is computed in float32 with
    autocast disabled. Terms logged: ``L_disturbed`` (the loss) and ``changed`` (the share of the batch's
    labels that differ from the true ones). In eval mode the labels are left alone.
    """

    def __init__(self, num_classes: int, alpha: float = 0.1) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DisturbLabel needs num_classes >= 2, got {num_classes}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"config key 'method.module.criterion.alpha' must be in [0, 1], got {alpha}")
        self.num_classes, self.alpha = num_classes, alpha
        self.change = (num_classes - 1) / num_classes * alpha  # the authors' ``bound``
        self.seed, self.rank, self.step = 0, 0, 0
        self._generator: torch.Generator | None = None

    def setup(self, facts: RunFacts) -> None:
        self.seed, self.rank = facts.seed, facts.rank

    def get_extra_state(self) -> dict[str, int]:
        """The number of training steps drawn so far: a resumed run continues the same sequence of draws."""
        return {"step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def generator(self, device: torch.device, step: int) -> torch.Generator:
        """This module's generator on ``device``, seeded for training step ``step`` of this rank."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        seed = np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1, np.uint64)[0]
        return self._generator.manual_seed(int(seed))

    def disturb(self, targets: Tensor, step: int) -> Tensor:
        """The labels of training step ``step``: each changed with probability ``(K−1)/K·α`` to another class."""
        g = self.generator(targets.device, step)
        change = torch.rand(targets.shape, generator=g, device=targets.device) < self.change
        shift = torch.randint(1, self.num_classes, targets.shape, generator=g, device=targets.device)
        return torch.where(change, (targets + shift) % self.num_classes, targets)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.training:
            disturbed = self.disturb(targets, self.step)
            self.step += 1
        else:
            disturbed = targets
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = F.cross_entropy(logits.float(), disturbed)
        changed = (disturbed != targets).float().mean()
        self.last_terms = {"L_disturbed": loss.detach(), "changed": changed}
        return loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}"
