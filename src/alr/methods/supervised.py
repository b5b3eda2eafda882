"""The method protocol: what the trainer calls, and the one-network methods built on it.

The trainer knows no method by name. It builds ``cfg.method.module`` (a :class:`Method`) and calls, in order:

1. ``setup(facts)`` once, before any checkpoint is loaded: the run's :class:`RunFacts` (training-set size,
   epochs, steps per epoch, seed, rank, device), so a method can size its state;
2. per epoch ``start_epoch(epoch)`` (not when a mid-epoch checkpoint resumes that epoch), then
   ``train_step(model, batch, update, autocast)`` per :class:`~alr.data.Batch`, then, on every rank,
   ``end_epoch(epoch, world)`` before the epoch's evaluation and checkpoint;
3. ``predictions(model, inputs)`` to score it, and ``snapshots()`` every ``trainer.snapshot_every`` epochs.

State: parameters and persistent buffers are ``state_dict()`` (rank 0's, in ``last.pt``: keep them equal on
every rank). Tensors that each rank adds to during an epoch and ``end_epoch`` reduces are named by
``partial_sums()`` (non-persistent buffers): a mid-epoch checkpoint saves each rank's own, and a resume gives
each rank its own back (on another process count rank 0 gets their sum, the others zeros). Extra parameters
(ALR's ``S``, a peer network) go to the optimizer through ``parameters()``, in a group of their own with
``cfg.method.weight_decay``; one that carries an ``lr_multiplier`` attribute trains at the run's learning rate
times it. How a method joins: docs/development.md#how-a-method-joins.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alr.data.batches import Batch

if TYPE_CHECKING:
    from alr.distributed import World


class StepOutput(NamedTuple):
    loss: Tensor
    logits: Tensor
    terms: dict[str, Tensor]


@dataclass(frozen=True)
class RunFacts:
    """What the trainer tells a method before training (:meth:`Method.setup`).

    ``num_train`` counts the training split over all ranks; ``indexed``: whether its batches carry
    ``Batch.index``; ``steps_per_epoch`` is what one epoch trains (after ``trainer.limit_train_batches``).
    """

    num_classes: int
    num_train: int
    indexed: bool
    epochs: int
    steps_per_epoch: int
    seed: int
    device: torch.device
    rank: int = 0
    world_size: int = 1


class EpochHooks:
    """The hooks a method (and a criterion inside :class:`Supervised`) may override; each does nothing here."""

    def setup(self, facts: RunFacts) -> None:
        """Called once, after the module is on its device and before a checkpoint is loaded into it."""

    def start_epoch(self, epoch: int) -> None:
        """Called before training epoch ``epoch`` (0-based); not when a mid-epoch checkpoint resumes it."""

    def end_epoch(self, epoch: int, world: World) -> None:
        """Called on every rank after epoch ``epoch``'s last step: reduce :meth:`partial_sums` here."""

    def partial_sums(self) -> dict[str, Tensor]:
        """This rank's running sums of the current epoch, by name (saved per rank in a mid-epoch checkpoint)."""
        return {}

    def snapshots(self) -> dict[str, Tensor]:
        """Matrices the trainer saves every ``trainer.snapshot_every`` epochs, by name."""
        return {}


class Criterion(EpochHooks, nn.Module):
    """A loss of one network's logits: ``loss = criterion(logits, targets)``; the terms to log in ``last_terms``."""

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, Tensor] = {}


class CrossEntropy(Criterion):
    """Cross entropy with optional label smoothing (``baseline``: ε = 0; ``slr``: ε = 0.1).

    Computed in float32 whatever the autocast dtype; ``label_smoothing`` has torch's semantics,
    ``(1 − ε)·onehot(y) + ε/K``.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        self.last_terms = {"L_hard": loss.detach()}
        return loss


# ``update(loss)``: back-propagate a loss and step the run's optimizer (the trainer's, with its loss scaling).
Update = Callable[[Tensor], None]


class Method(EpochHooks, nn.Module):
    """The interface the trainer calls; subclasses implement ``forward`` and override what they need."""

    def forward(self, model: nn.Module, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def train_step(
        self,
        model: nn.Module,
        batch: Batch,
        update: Update,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput:
        """One training step: one forward pass under ``autocast`` and one ``update`` of every parameter.

        A method that updates its networks in turn (DML) overrides this and calls ``update`` once per
        network; ``update`` leaves alone the parameters its loss does not reach.
        """
        with autocast():
            out = self(model, batch)
        update(out.loss)
        return out

    def networks(self) -> dict[str, nn.Module]:
        """The networks this method trains beside the backbone (DML's peer), by name.

        The suite runs a method that has one in a single process only: DistributedDataParallel keeps the
        backbone equal on every rank, but not a network the method owns (its batch-norm statistics would
        differ from rank to rank, and each rank would score its own).
        """
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
    """One network trained by a criterion on its own logits: ``baseline``, ``slr``, the ALR family and the
    label regularizers that are a loss of the logits and the labels. Every hook is the criterion's."""

    def __init__(self, criterion: Criterion) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.inputs)
        loss = self.criterion(logits, batch.targets)
        return StepOutput(loss, logits, self.criterion.last_terms)

    def setup(self, facts: RunFacts) -> None:
        self.criterion.setup(facts)

    def start_epoch(self, epoch: int) -> None:
        self.criterion.start_epoch(epoch)

    def end_epoch(self, epoch: int, world: World) -> None:
        self.criterion.end_epoch(epoch, world)

    def partial_sums(self) -> dict[str, Tensor]:
        return self.criterion.partial_sums()

    def snapshots(self) -> dict[str, Tensor]:
        return self.criterion.snapshots()
