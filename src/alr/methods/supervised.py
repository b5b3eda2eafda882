"""A method is an ``nn.Module`` that turns a batch into a loss and the terms to log.

The trainer knows nothing about any particular method: it calls ``method(model, inputs, targets)``
and gets a :class:`StepOutput`. Extra parameters (ALR's ``S``, a peer network) belong to the
method, so the optimizer and the checkpoint pick them up through ``method.parameters()`` and
``method.state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StepOutput(NamedTuple):
    loss: Tensor
    logits: Tensor
    terms: dict[str, Tensor]


class CrossEntropy(nn.Module):
    """Cross entropy with optional label smoothing (``baseline``: ε = 0; ``slr``: ε = 0.1).

    Computed in float32 whatever the autocast dtype; ``label_smoothing`` has torch's semantics,
    ``(1 − ε)·onehot(y) + ε/K``.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        self.last_terms = {"L_hard": loss.detach()}
        return loss


# ``update(loss)``: back-propagate a loss and step the run's optimizer (the trainer's, with its loss scaling).
Update = Callable[[Tensor], None]


class Method(nn.Module):
    """The interface the trainer calls; subclasses implement ``forward`` and override what they need."""

    def forward(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> StepOutput:
        raise NotImplementedError

    def train_step(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        update: Update,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput:
        """One training step: one forward pass under ``autocast`` and one ``update`` of every parameter.

        A method that updates its networks in turn (DML) overrides this and calls ``update`` once per
        network; ``update`` leaves alone the parameters its loss does not reach.
        """
        with autocast():
            out = self(model, inputs, targets)
        update(out.loss)
        return out

    def start_epoch(self) -> None:
        """Called by the trainer before each training epoch."""

    def networks(self) -> dict[str, nn.Module]:
        """The networks this method trains beside the backbone (DML's peer), by name.

        The suite runs a method that has one in a single process only: DistributedDataParallel keeps the
        backbone equal on every rank, but not a network the method owns (its batch-norm statistics would
        differ from rank to rank, and each rank would score its own).
        """
        return {}

    def snapshots(self) -> dict[str, Tensor]:
        """Matrices the trainer saves every ``trainer.snapshot_every`` epochs, by name."""
        return {}

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """Logits used for evaluation: the backbone's."""
        return model(inputs)

    @torch.no_grad()
    def predictions(self, model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
        """The logits of every network the run is scored by, by name; the trainer reports each one's
        metrics and, as the run's own, their mean. One network (``predict``) unless a method has several."""
        return {"": self.predict(model, inputs)}


class Supervised(Method):
    """One network trained by a criterion on its own logits: ``baseline``, ``slr``, ``alr``, ``alr_s``."""

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> StepOutput:
        logits = model(inputs)
        loss = self.criterion(logits, targets)
        return StepOutput(loss, logits, self.criterion.last_terms)

    def start_epoch(self) -> None:
        if hasattr(self.criterion, "reset_epoch"):
            self.criterion.reset_epoch()

    def snapshots(self) -> dict[str, Tensor]:
        """ALR: ``softmax(S)`` as K×K (Figure 3); nothing for plain cross entropy."""
        if hasattr(self.criterion, "residual_labels"):
            return {"residual_labels": self.criterion.residual_labels()}
        return {}
