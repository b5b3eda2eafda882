"""CIFAR-10 and CIFAR-100 from torchvision's on-disk layout (docs/deviations.md#data).

The pickled batches (``cifar-10-batches-py/`` or ``cifar-100-python/`` under ``data_dir``) are read
with numpy; torchvision is used only to download them when asked. Training augmentation is the
paper's (§4.1, Table 1): random crop 32 with 4 pixels of zero padding, then a random horizontal
flip, then per-channel normalisation.

Two loaders give the same batches in distribution:

- ``gpu`` (default): the training set lives on the device as one ``uint8`` tensor ``N×3×32×32``;
  crops, flips and normalisation run batched there, driven by the epoch's generator, so an epoch's
  order *and* augmentation are a function of ``(seed, epoch)``.
- ``torchvision``: a per-sample ``DataLoader`` with ``transforms.v2``, kept to compare speed against.
  Its order is a function of ``(seed, epoch)``; so is its augmentation when ``num_workers > 0``
  (each worker's RNG is seeded from the loader's generator); with ``num_workers=0`` the transforms
  draw from the global torch RNG.

The normalisation constants are each training set's per-channel pixel mean and standard deviation
(the true standard deviation, not the widely copied ``(0.2023, 0.1994, 0.2010)``).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from alr.data.batches import Batch, DataBundle, TensorBatches
from alr.data.download import announce, fetch
from alr.errors import RunError

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Layout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    meta_file: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str
    archive_mb: int


LAYOUTS = {
    "cifar10": _Layout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        meta_file="batches.meta",
        names_key="label_names",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        torchvision_class="CIFAR10",
        archive_mb=163,
    ),
    "cifar100": _Layout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        meta_file="meta",
        names_key="fine_label_names",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        torchvision_class="CIFAR100",
        archive_mb=161,
    ),
}


def _layout(name: str) -> _Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown CIFAR data set {name!r}; choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def _how_to_get(name: str, data_dir: Path) -> str:
    return (
        f"Get {name} with dataset.download=true (torchvision downloads it into {data_dir}), or download "
        f"the python version from {URL}, unpack it there, or point dataset.data_dir=... at the folder "
        f"that holds {LAYOUTS[name].folder}/."
    )


def _unpickle(path: Path, name: str, data_dir: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: missing file {path}. {_how_to_get(name, data_dir)}")
    try:
        with path.open("rb") as f:
            # latin1, as torchvision does: the official files are Python 2 pickles.
            raw = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(
            f"{name}: {path} is not a readable CIFAR pickle ({e!r}); the file may be truncated. "
            f"{_how_to_get(name, data_dir)}"
        ) from e
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: {path} holds a {type(raw).__name__}, not a dict. {_how_to_get(name, data_dir)}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _read_batch(path: Path, name: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``images`` as ``uint8 N×3×32×32`` and ``labels`` as ``int64 N`` from one pickled batch."""
    layout = LAYOUTS[name]
    batch = _unpickle(path, name, data_dir)

    def corrupt(problem: str) -> ValueError:
        return ValueError(f"{name}: {path} is incomplete or corrupt: {problem}. {_how_to_get(name, data_dir)}")

    missing = [k for k in ("data", layout.label_key) if k not in batch]
    if missing:
        raise corrupt(f"keys {missing} missing")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise corrupt(f"data is {data.dtype} of shape {data.shape}, expected uint8 N×{PIXELS}")
    if labels.shape != (len(data),):
        raise corrupt(f"{len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise corrupt(f"labels span [{labels.min()}, {labels.max()}], outside [0, {layout.num_classes})")
    return data.reshape(-1, 3, 32, 32), labels


def _read_split(files: tuple[str, ...], name: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = data_dir / LAYOUTS[name].folder
    parts = [_read_batch(folder / f, name, data_dir) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_arrays(name: str, data_dir: str | Path) -> dict[str, Any]:
    """Read a CIFAR data set: ``x_train, y_train, x_test, y_test`` and ``class_names``.

    Images are ``uint8 N×3×32×32``, labels ``int64``. Missing or inconsistent files raise
    ``FileNotFoundError`` or ``ValueError`` naming the path and how to get the data.
    """
    layout = _layout(name)
    data_dir = Path(data_dir)
    folder = data_dir / layout.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: no folder {folder}. {_how_to_get(name, data_dir)}")
    x_train, y_train = _read_split(layout.train_files, name, data_dir)
    x_test, y_test = _read_split(layout.test_files, name, data_dir)
    meta = _unpickle(folder / layout.meta_file, name, data_dir)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(layout.names_key, [])]
    if len(names) != layout.num_classes:
        raise ValueError(
            f"{name}: {folder / layout.meta_file} lists {len(names)} {layout.names_key}, expected "
            f"{layout.num_classes}. {_how_to_get(name, data_dir)}"
        )
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names)


def download_cifar(name: str, data_dir: str | Path, timeout_s: float = 60.0) -> None:
    """Download and unpack ``name`` into ``data_dir`` with torchvision, unless its files are there and intact.

    Files that are there but fail torchvision's checksum are never downloaded over: the error says so
    and what to do. The download says what it fetches and where before it starts, shows a progress
    bar, gives up after ``timeout_s`` seconds without data, and fails with one line naming the URL,
    the folder and how to put the files there by hand.
    """
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    layout, data_dir = _layout(name), Path(data_dir)
    tv = getattr(datasets, layout.torchvision_class)
    files = [(data_dir / tv.base_folder / f, md5) for f, md5 in tv.train_list + tv.test_list]
    bad = [path for path, md5 in files if not check_integrity(str(path), md5)]
    if not bad:
        return
    present = [path for path in bad if path.is_file()]
    if present:
        raise RunError(
            f"{name}: {present[0]}{f' and {len(present) - 1} more file(s)' if len(present) > 1 else ''} fail "
            f"torchvision's checksum, so dataset.download=true would replace them. Move {data_dir / tv.base_folder} "
            "away (or delete it) to download afresh, or drop dataset.download=true to train on the files as they are."
        )
    announce(name, tv.url, layout.archive_mb, data_dir, timeout_s)
    manual = (
        f"Without a network, fetch {tv.filename} on a machine that has one, unpack it there (tar xzf {tv.filename} "
        f"-C {data_dir} makes {tv.base_folder}/), and rerun without dataset.download=true."
    )
    fetch(name, [tv.url], data_dir, tv.filename, tv.tgz_md5, timeout_s, manual)


class Normalize:
    """``uint8`` images to float, normalised per channel: ``(x / 255 − mean) / std``, in one fused step."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str) -> None:
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, device=device).view(1, -1, 1, 1) / std_t

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)


class CropFlipNormalize:
    """Batched random crop (zero padding), random horizontal flip (unless ``flip=False``) and normalisation,
    on the batch's device.

    Every sample gets its own offsets and flip, drawn from ``generator``. Instead of looping over
    samples, the batch is padded once and each sample's crop is gathered by advanced indexing with
    per-sample row and column indices; a flip is the same gather with the column indices reversed.
    """

    def __init__(self, normalize: Normalize, size: int = 32, padding: int = 4, flip: bool = True) -> None:
        self.normalize, self.size, self.padding, self.flip = normalize, size, padding, flip

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, c, dev, p = len(x), x.shape[1], x.device, self.padding
        padded = F.pad(x, (p, p, p, p))
        top = torch.randint(0, padded.shape[2] - self.size + 1, (b, 1), device=dev, generator=generator)
        left = torch.randint(0, padded.shape[3] - self.size + 1, (b, 1), device=dev, generator=generator)
        offsets = torch.arange(self.size, device=dev)
        rows = top + offsets
        cols = left + offsets
        if self.flip:
            flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
            cols = left + torch.where(flip, offsets.flip(0), offsets)
        crops = padded[
            torch.arange(b, device=dev).view(b, 1, 1, 1),
            torch.arange(c, device=dev).view(1, c, 1, 1),
            rows.view(b, 1, self.size, 1),
            cols.view(b, 1, 1, self.size),
        ]
        return self.normalize(crops)


class _ArrayDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: v2.Transform) -> None:
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.transform(self.images[i]), self.labels[i], i


class LoaderBatches:
    """The ``Batches`` protocol over a ``DataLoader``; ``epoch(e)`` reseeds it from ``(seed, e)``."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        device: torch.device | str,
        seed: int = 0,
        num_workers: int = 4,
    ) -> None:
        self.device, self.seed = torch.device(device), seed
        self.num_samples, self.indexed = len(dataset), True
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self.generator,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Yield the batches of epoch ``epoch`` (0-based), moved to the device."""
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        for batch in self.loader:
            yield Batch(*(t.to(self.device, non_blocking=True) for t in batch))


def build(
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    name: str = "cifar10",
    data_dir: str | Path = "data",
    loader: str = "gpu",
    download: bool = False,
    eval_batch_size: int = 1000,
    num_workers: int = 4,
    download_timeout_s: float = 60.0,
) -> DataBundle:
    """CIFAR-10 or CIFAR-100 (``name``) from ``data_dir`` as training and test batches on ``device``."""
    if loader not in ("gpu", "torchvision"):
        raise ValueError(f"loader must be 'gpu' or 'torchvision', not {loader!r}")
    layout = _layout(name)
    if download:
        download_cifar(name, data_dir, download_timeout_s)
    arrays = load_arrays(name, data_dir)
    if loader == "gpu":
        normalize = Normalize(layout.mean, layout.std, device)

        def on_device(key: str) -> Tensor:
            return torch.from_numpy(arrays[key]).to(device)

        train = TensorBatches(
            on_device("x_train"),
            on_device("y_train"),
            batch_size,
            shuffle=True,
            seed=seed,
            transform=CropFlipNormalize(normalize),
        )
        test = TensorBatches(
            on_device("x_test"), on_device("y_test"), eval_batch_size, shuffle=False, transform=normalize
        )
    else:
        to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(layout.mean, layout.std)]
        augment = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *to_float])
        train = LoaderBatches(
            _ArrayDataset(arrays["x_train"], arrays["y_train"], augment),
            batch_size,
            shuffle=True,
            device=device,
            seed=seed,
            num_workers=num_workers,
        )
        test = LoaderBatches(
            _ArrayDataset(arrays["x_test"], arrays["y_test"], v2.Compose(to_float)),
            eval_batch_size,
            shuffle=False,
            device=device,
            num_workers=num_workers,
        )
    return DataBundle(train=train, test=test, num_classes=layout.num_classes, class_names=arrays["class_names"])
