"""A criterion that makes each training step take longer: a tiny run lasts long enough to be signalled,
pre-empted or timed out by SLURM half-way (``make test-slurm``)."""

from __future__ import annotations

import time

from torch import Tensor

from faults import Faulty


class Paced(Faulty):
    """``inner`` (a class path), ``seconds`` slower per call."""

    def __init__(self, inner: str, seconds: float, **kwargs) -> None:
        super().__init__(inner, **kwargs)
        self.seconds = seconds

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        time.sleep(self.seconds)
        return super().forward(logits, targets)
