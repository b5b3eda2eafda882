"""A method that is not part of the suite: the Brier score (Brier 1950) as a training loss.

``tests/test_open_methods.py`` adds it from here alone (this module and ``tests/toy_configs/``, through
Hydra's search path) and trains, reports and prices it with ``src/`` untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alr.methods import Criterion


class Brier(Criterion):
    """``mean_i Σ_k (softmax(z_i)_k − onehot(y_i)_k)²``, in float32; it counts the epochs it has started."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("epochs_started", torch.zeros((), dtype=torch.long))

    def start_epoch(self, epoch: int) -> None:
        self.epochs_started += 1

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            p = torch.softmax(logits.float(), dim=1)
            onehot = torch.nn.functional.one_hot(targets, self.num_classes).float()
            loss = (p - onehot).pow(2).sum(dim=1).mean()
        self.last_terms = {"L_brier": loss.detach()}
        return loss
