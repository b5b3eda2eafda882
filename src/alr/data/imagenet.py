"""ImageNet-1k (ILSVRC-2012) from a local ImageFolder tree, read by NVIDIA DALI or by torchvision.

The tree is ``<data_dir>/<folder>/train/<wnid>/*.JPEG`` and ``.../val/<wnid>/*.JPEG`` (the validation
images sorted into class folders, as the usual ``valprep.sh`` does). Both splits are scanned once
into a sorted file list with labels (the sorted class folders, as ``torchvision.datasets.ImageFolder``
numbers them); both loaders read that one list, so they give the same labels in the same order.

Transforms (Table 2; docs/deviations.md#table-2-imagenet): training takes a random-resized-crop of
``image_size`` (area 0.08-1, aspect 3/4-4/3) and a random horizontal flip; validation resizes the
shorter side to ``resize_size`` and takes the centre ``image_size`` crop. Both normalise with the
ImageNet channel mean and std.

- ``loader=dali``: DALI reads the files and decodes them on the GPU (``device="mixed"``: nvJPEG), or
  on the CPU where no GPU is used (``trainer.device=cpu``: the same pipeline on DALI's CPU operators).
  The crop is fused into decoding (only the crop's pixels are decoded); the batch leaves DALI as float
  ``HWC``, which is an ``NCHW`` tensor in ``channels_last`` memory format for free.
- ``loader=torchvision``: ``torchvision.io`` decoding and ``transforms.v2`` in a ``DataLoader`` with
  workers, pinned memory and persistent workers: the fallback where DALI or a GPU is missing.

Order and sharding, the same for both loaders: an epoch's order is a permutation of the whole training
set drawn from ``(seed, epoch)``, cut into global batches of ``batch_size × world_size`` (the last
partial one dropped); rank ``r`` takes slice ``r`` of each global batch. So the images of each global
step do not depend on the number of processes, and a run resumed on another number of GPUs with the
same global batch sees the same images. (The file lists are given to DALI's reader already sharded,
instead of its ``shard_id``/``num_shards``, whose shuffling is not a function of the epoch.) The
torchvision loader draws each image's augmentation from ``(seed, epoch, index)``, so it is reproducible
whatever the worker count; DALI's draws come from its pipeline seed ``(seed, epoch, rank)``.
Validation is split ``files[rank::world_size]`` without padding: every image is counted exactly once.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from alr.data.batches import Batch, DataBundle

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")


def _has_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return False


def _how_to_get(root: Path) -> str:
    return (
        f"Put the ILSVRC-2012 images at {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (the validation "
        "images sorted into class folders), or point dataset.data_dir=... (and dataset.folder=...) at that tree "
        "(docs/table2-imagenet.md)."
    )


def scan_split(root: Path, split: str) -> tuple[list[str], list[str], list[int]]:
    """The class folders of ``root/split`` (sorted) and its image files with their labels, in sorted order.

    Raises ``FileNotFoundError`` for a missing split and ``ValueError`` for an empty class folder or a
    file that is not an image (by extension), each naming the path and what to do.
    """
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"imagenet: no folder {folder}. {_how_to_get(root)}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise ValueError(f"imagenet: {folder} holds no class folders (<wnid>/). {_how_to_get(root)}")
    files: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(classes):
        names = sorted(e.name for e in os.scandir(folder / wnid) if e.is_file())
        if not names:
            raise ValueError(
                f"imagenet: the class folder {folder / wnid} is empty. Fill it, or remove it from both train/ and val/ "
                "(and set dataset.num_classes to the classes left)."
            )
        for name in names:
            if not name.lower().endswith(EXTENSIONS):
                raise ValueError(
                    f"imagenet: {folder / wnid / name} is not an image ({', '.join(EXTENSIONS)}). "
                    "Move it out of the tree."
                )
        files += [str(folder / wnid / n) for n in names]
        labels += [label] * len(names)
    return classes, files, labels


def scan_tree(root: str | Path, num_classes: int) -> dict[str, tuple[list[str], list[int]]]:
    """Both splits of the tree at ``root``; checks that they share one class set of ``num_classes`` classes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet: no folder {root}. {_how_to_get(root)}")
    scanned = {split: scan_split(root, split) for split in SPLITS}
    train_classes, val_classes = scanned["train"][0], scanned["val"][0]
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:3]
        only_val = sorted(set(val_classes) - set(train_classes))[:3]
        raise ValueError(
            f"imagenet: {root}/train and {root}/val hold different class folders (only in train: {only_train or '-'}, "
            f"only in val: {only_val or '-'}). Give both splits the same <wnid>/ folders."
        )
    if len(train_classes) != num_classes:
        raise ValueError(
            f"imagenet: {root} has {len(train_classes)} classes but dataset.num_classes is {num_classes}. Set "
            f"dataset.num_classes={len(train_classes)} (a smaller tree for trials), or complete the tree."
        )
    return {"classes": train_classes, **{s: (scanned[s][1], scanned[s][2]) for s in SPLITS}}


def epoch_indices(n: int, seed: int, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Training epoch ``epoch``'s sample indices for ``rank``: whole per-rank batches of ``batch_size``.

    A permutation of ``n`` drawn from ``(seed, epoch)``, cut into global batches of ``batch_size × world_size``
    (the last partial one dropped); rank ``r`` takes the ``r``-th slice of each.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    steps = n // (batch_size * world_size)
    order = torch.randperm(n, generator=g)[: steps * batch_size * world_size]
    return order.view(steps, world_size, batch_size)[:, rank].reshape(-1)


class ImageFiles(Dataset):
    """``(image, label)`` for ``files[i]``: torchvision decoding, then ``transform``.

    Indexed by ``(i, draw_seed)`` from :class:`_EpochSampler`: the transform's random draws come from
    ``draw_seed`` in a forked RNG, so they depend neither on the worker nor on the process's RNG.
    """

    def __init__(self, files: list[str], labels: list[int], transform: v2.Transform) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        i, draw_seed = key
        image = decode_image(read_file(self.files[i]), mode=ImageReadMode.RGB)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed)
            return self.transform(image), self.labels[i]


class _EpochSampler(Sampler):
    """Yields ``(index, draw_seed)`` for the indices :meth:`set_epoch` chose."""

    def __init__(self, seed: int) -> None:
        self.seed, self.indices, self.epoch = seed, torch.zeros(0, dtype=torch.long), 0

    def set_epoch(self, epoch: int, indices: Tensor) -> None:
        self.epoch, self.indices = epoch, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return iter((i, base + i) for i in self.indices.tolist())


class TorchvisionBatches:
    """The ``Batches`` protocol over a ``DataLoader`` of :class:`ImageFiles` (``indices(epoch)`` picks the samples)."""

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        transform: v2.Transform,
        batch_size: int,
        indices,
        device: torch.device,
        seed: int,
        num_workers: int,
    ) -> None:
        self.device, self.indices, self.batch_size = device, indices, batch_size
        self.num_samples, self.indexed = len(files), True
        self.sampler = _EpochSampler(seed)
        self.loader = DataLoader(
            ImageFiles(files, labels, transform),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def __len__(self) -> int:
        return -(-len(self.indices(0)) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        order = self.indices(epoch)
        self.sampler.set_epoch(epoch, order)
        if not len(self.sampler):
            return
        for start, (x, y) in zip(range(0, len(order), self.batch_size), self.loader):  # the loader keeps the order
            index = order[start : start + len(y)].to(self.device, non_blocking=True)
            yield Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), index)


class DaliBatches:
    """The ``Batches`` protocol over DALI pipelines: one per epoch, reading that epoch's files in order.

    ``device.type == "cuda"``: decoding on the GPU (``mixed``) and the rest there; otherwise DALI's CPU
    operators (``device_id=None``). A last partial batch is cut to its real samples.
    """

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        train: bool,
        batch_size: int,
        indices,
        device: torch.device,
        seed: int,
        rank: int,
        num_threads: int,
        image_size: int,
        resize_size: int,
    ) -> None:
        self.files, self.labels, self.train, self.batch_size = files, labels, train, batch_size
        self.indices, self.device, self.seed, self.rank = indices, device, seed, rank
        self.num_threads, self.image_size, self.resize_size = max(1, num_threads), image_size, resize_size
        self.num_samples, self.indexed = len(files), True

    def __len__(self) -> int:
        return -(-len(self.indices(0)) // self.batch_size)

    def _pipeline(self, files: list[str], labels: list[int], seed: int):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        decoder = "mixed" if gpu else "cpu"
        size = self.image_size

        @pipeline_def(enable_conditionals=False)
        def pipeline():
            jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True)
            if self.train:
                images = fn.decoders.image_random_crop(
                    jpegs,
                    device=decoder,
                    output_type=types.RGB,
                    random_area=[0.08, 1.0],
                    random_aspect_ratio=[0.75, 4 / 3],
                )
                images = fn.resize(images, resize_x=size, resize_y=size)
                mirror = fn.random.coin_flip(probability=0.5)
            else:
                images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
                images = fn.resize(images, resize_shorter=self.resize_size)
                mirror = 0
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="HWC",
                crop=(size, size),
                mean=[255 * m for m in MEAN],
                std=[255 * s for s in STD],
                mirror=mirror,
            )
            return images, label.gpu() if gpu else label

        device_id = (self.device.index or 0) if gpu else None
        pipe = pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id, seed=seed)
        pipe.build()
        return pipe

    def epoch(self, epoch: int) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        indices = self.indices(epoch)
        order = indices.tolist()
        if not order:  # an empty shard (more processes than validation images)
            return
        seed = (self.seed * 1_000_003 + epoch) * 1_009 + self.rank
        pipe = self._pipeline([self.files[i] for i in order], [self.labels[i] for i in order], seed % 2**31)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            for start in range(0, len(order), self.batch_size):
                images, labels = (out.as_tensor() for out in pipe.run())
                x = torch.empty(images.shape(), dtype=torch.float32, device=self.device)
                y = torch.empty(labels.shape(), dtype=torch.int32, device=self.device)
                feed_ndarray(images, x, cuda_stream=stream)
                feed_ndarray(labels, y, cuda_stream=stream)
                n = min(self.batch_size, len(order) - start)
                index = indices[start : start + n].to(self.device, non_blocking=True)
                yield Batch(x[:n].permute(0, 3, 1, 2), y[:n].view(-1).long(), index)
        finally:
            del pipe


def build(
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    data_dir: str | Path = "data",
    folder: str = "imagenet",
    num_classes: int = 1000,
    loader: str = "dali",
    image_size: int = 224,
    resize_size: int = 256,
    eval_batch_size: int = 250,
    num_workers: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> DataBundle:
    """ImageNet from ``data_dir/folder``: this process's (``rank`` of ``world_size``) training and validation batches.

    ``batch_size`` is the global batch; each process gets ``batch_size // world_size`` images per step.
    ``num_workers`` is the DataLoader's worker count or DALI's CPU thread count.
    """
    if loader not in ("dali", "torchvision"):
        raise ValueError(f"dataset.loader must be 'dali' or 'torchvision', not {loader!r}")
    if loader == "dali" and not _has_dali():
        raise ValueError(
            "dataset.loader=dali needs NVIDIA DALI, which is not installed: pip install -e '.[dali]' "
            "(nvidia-dali-cuda130), or set dataset.loader=torchvision."
        )
    device = torch.device(device)
    tree = scan_tree(Path(data_dir) / folder, num_classes)
    per_rank = batch_size // world_size
    train_files, train_labels = tree["train"]
    val_files, val_labels = tree["val"]

    def train_indices(epoch: int) -> Tensor:
        return epoch_indices(len(train_files), seed, epoch, per_rank, rank, world_size)

    val_shard = torch.arange(rank, len(val_files), world_size)

    def val_indices(epoch: int) -> Tensor:
        return val_shard

    if not len(train_indices(0)):
        raise ValueError(
            f"imagenet: {Path(data_dir) / folder}/train holds {len(train_files)} images, fewer than one global "
            f"batch of {per_rank * world_size}. Lower trainer.batch_size or add images."
        )
    if loader == "dali":
        common = dict(device=device, seed=seed, rank=rank, num_threads=num_workers, image_size=image_size)
        train = DaliBatches(train_files, train_labels, True, per_rank, train_indices, resize_size=resize_size, **common)
        test = DaliBatches(
            val_files, val_labels, False, eval_batch_size, val_indices, resize_size=resize_size, **common
        )
    else:
        normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        augment = v2.Compose(
            [v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)), v2.RandomHorizontalFlip()]
            + normalize
        )
        center = v2.Compose([v2.Resize(resize_size), v2.CenterCrop(image_size), *normalize])
        common = dict(device=device, seed=seed, num_workers=num_workers)
        train = TorchvisionBatches(train_files, train_labels, augment, per_rank, train_indices, **common)
        test = TorchvisionBatches(val_files, val_labels, center, eval_batch_size, val_indices, **common)
    return DataBundle(train=train, test=test, num_classes=len(tree["classes"]), class_names=tree["classes"])
