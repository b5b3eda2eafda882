"""Batches drawn from tensors that already live on the training device.

No CPU worker stands between the accelerator and the next batch: shuffling, augmentation and
normalisation run batched on the device. The order of an epoch is a function of ``(seed, epoch)``
alone, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

# ``transform(images, generator) -> images``, applied to each training batch on its device.
BatchTransform = Callable[[Tensor, torch.Generator], Tensor]


class Batch(NamedTuple):
    """One mini-batch on the training device.

    ``index``: each sample's row in its split (``0 … num_samples − 1``, int64, on the device), so a method can
    keep per-sample state (PS-KD's previous predictions); ``None`` where a data set cannot say.
    """

    inputs: Tensor
    targets: Tensor
    index: Tensor | None = None


class Batches(Protocol):
    """Anything the trainer can draw an epoch of :class:`Batch` es from.

    ``num_samples``: the size of the split (all ranks together); ``indexed``: whether its batches carry
    ``index``.
    """

    num_samples: int
    indexed: bool

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


class TensorBatches:
    """Mini-batches of ``(inputs[i], targets[i])`` from two device tensors."""

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        transform: BatchTransform | None = None,
    ) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.transform = drop_last, transform
        self.num_samples, self.indexed = len(targets), True

    def __len__(self) -> int:
        n = len(self.targets)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self, epoch: int) -> torch.Generator:
        g = torch.Generator(device=self.inputs.device)
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return g

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Yield the batches of training epoch ``epoch`` (0-based)."""
        g = self._generator(epoch)
        n = len(self.targets)
        order = (
            torch.randperm(n, device=self.inputs.device, generator=g)
            if self.shuffle
            else torch.arange(n, device=self.inputs.device)
        )
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.inputs[idx]
            if self.transform is not None:
                x = self.transform(x, g)
            yield Batch(x, self.targets[idx], idx)


@dataclass
class DataBundle:
    """What the trainer needs from a data set: training and test batches and the class names.

    ``info``: facts about the data worth keeping with the run (rows skipped, vocabulary size, cache file);
    the trainer writes them into ``result.json`` as ``data``.
    """

    train: Batches
    test: Batches
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
