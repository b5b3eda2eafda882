"""Fault injection for the reliability tests: a criterion that misbehaves at one training step.

Wrap a run's criterion with ``*faulty("alr.ALRLoss")`` (overrides), or a whole method with
:func:`wrap_method` (a composed config), and put
``ALR_FAULT=<what>@<epoch>:<step>`` in the environment of the run to disturb (``epoch``: the epoch-th epoch
this process starts, from 1, so a resumed process counts from its first epoch; ``step`` from 0):

- ``kill``: SIGKILL this process (a crash: nothing after the last checkpoint survives);
- ``term``: SIGTERM (``kill``, ``scancel``: the trainer checkpoints between two steps and exits);
- ``usr2``: SIGUSR2, submitit's pre-emption/time-out signal (checkpoint, then requeue);
- ``nan``: return a NaN loss (divergence).

With ``ALR_FAULT_ONCE=<file>`` the fault fires only while that file does not exist, and creates it,
so a requeued job runs clean. Without ``ALR_FAULT`` the wrapper changes nothing, so an undisturbed run
with the same overrides is the reference a disturbed-and-resumed run must equal bit for bit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from hydra.utils import get_class
from torch import Tensor

from alr.methods import Criterion, Method

SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr2": signal.SIGUSR2}


def faulty(criterion: str) -> list[str]:
    """Overrides that wrap ``method.module.criterion`` (a class path) in :class:`Faulty`."""
    return ["method.module.criterion._target_=faults.Faulty", f"+method.module.criterion.inner={criterion}"]


class Faulty(Criterion):
    def __init__(self, inner: str, **kwargs) -> None:
        super().__init__()
        self.criterion = get_class(inner)(**kwargs)
        self.epoch, self.step = 0, 0
        self.fault, self.at = self._fault_from_env()

    @staticmethod
    def _fault_from_env() -> tuple[str, tuple[int, int]]:
        what, _, when = os.environ.get("ALR_FAULT", "none@0:0").partition("@")
        epoch, step = when.split(":")
        return what, (int(epoch), int(step))

    def __getattr__(self, name: str):
        """Everything else (ALR's ``residual_labels``, ``S``...) is the wrapped criterion's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("criterion"), name)

    def setup(self, facts) -> None:
        self.criterion.setup(facts)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step = self.epoch + 1, 0
        self.criterion.start_epoch(epoch)

    def end_epoch(self, epoch: int, world) -> None:
        self.criterion.end_epoch(epoch, world)

    def partial_sums(self) -> dict[str, Tensor]:
        return self.criterion.partial_sums()

    def snapshots(self) -> dict[str, Tensor]:
        return self.criterion.snapshots()

    def _fires(self) -> bool:
        if self.fault == "none" or (self.epoch, self.step) != self.at:
            return False
        once = os.environ.get("ALR_FAULT_ONCE")
        if once:
            if Path(once).exists():
                return False
            Path(once).touch()
        return True

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss = self.criterion(logits, targets)
        self.last_terms = self.criterion.last_terms
        if self._fires():
            if self.fault == "nan":
                loss = loss * torch.tensor(float("nan"))
            else:
                os.kill(os.getpid(), SIGNALS[self.fault])
        self.step += 1
        return loss


def wrap_method(cfg) -> None:
    """Wrap ``cfg.method.module`` (any method, its arguments kept) in :class:`FaultyMethod`, in place."""
    from omegaconf import open_dict

    with open_dict(cfg):
        inner = cfg.method.module._target_
        cfg.method.module._target_ = "faults.FaultyMethod"
        cfg.method.module.inner = inner


class FaultyMethod(Method):
    """Any method, with the fault of ``ALR_FAULT`` fired after its training step ``step`` of epoch ``epoch``.

    Every hook is the wrapped method's; its state is under ``method.`` in ``state_dict()``.
    """

    def __init__(self, inner: str, **kwargs) -> None:
        super().__init__()
        self.method = get_class(inner)(**kwargs)
        self.fault = Faulty._fault_from_env()
        self.epoch, self.step = 0, 0

    def forward(self, model, batch):
        return self.method(model, batch)

    def train_step(self, model, batch, update, autocast):
        out = self.method.train_step(model, batch, update, autocast)
        if self.fault[0] != "none" and (self.epoch, self.step) == self.fault[1]:
            os.kill(os.getpid(), SIGNALS[self.fault[0]])
        self.step += 1
        return out

    def setup(self, facts) -> None:
        self.method.setup(facts)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step = self.epoch + 1, 0
        self.method.start_epoch(epoch)

    def end_epoch(self, epoch: int, world) -> None:
        self.method.end_epoch(epoch, world)

    def partial_sums(self) -> dict[str, Tensor]:
        return self.method.partial_sums()

    def snapshots(self) -> dict[str, Tensor]:
        return self.method.snapshots()

    def networks(self):
        return self.method.networks()

    def predictions(self, model, inputs):
        return self.method.predictions(model, inputs)
