"""MNIST and Fashion-MNIST from their four IDX files (LeCun et al. 1998; Xiao et al. 2017, arXiv:1708.07747).

The files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each as it is or gzipped) are read from torchvision's layout,
``<data_dir>/FashionMNIST/raw/`` (``MNIST/raw/``), or from ``data_dir`` itself when it holds them (Debian's
``dataset-fashion-mnist`` package installs them in ``/usr/share/datasets/fashion-mnist``). The IDX format
(a magic number ``0x000008dd``: unsigned bytes in ``dd`` dimensions, then each dimension as a big-endian
int32, then the bytes) is read here with numpy, so that every fault names its file; torchvision is used
to download the files when asked, as its ``MNIST`` and ``FashionMNIST`` classes do.

Training batches are CIFAR's on-device ones (:mod:`alr.data.cifar`): the ``uint8`` images live on the
device, each batch is cropped at random from the images zero-padded by ``padding`` pixels, flipped
horizontally at random where ``flip`` says so (clothes mirrored are the same clothes; digits are not),
and normalised by the pixel mean and standard deviation of the whole training split.
``train_subset=n`` trains on n of the training images, stratified by class and drawn with
``split_seed`` alone, so every method and seed sees the same n images.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor

from alr.data.batches import DataBundle, TensorBatches
from alr.data.cifar import CropFlipNormalize, Normalize
from alr.data.download import announce, fetch
from alr.errors import RunError

# Each split's (images, labels) files, named as in both releases.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only type these releases use


@dataclass(frozen=True)
class _Release:
    torchvision_class: str  # also the folder of torchvision's layout: <data_dir>/<class>/raw
    home: str
    files_mb: tuple[float, ...]  # download sizes of the gzipped files, in the order of torchvision's resources


RELEASES = {
    "fashion_mnist": _Release(
        "FashionMNIST", "https://github.com/zalandoresearch/fashion-mnist", (26.4, 0.03, 4.4, 0.01)
    ),
    "mnist": _Release("MNIST", "https://yann.lecun.com/exdb/mnist/", (9.9, 0.03, 1.6, 0.01)),
}


def _release(name: str) -> _Release:
    if name not in RELEASES:
        raise ValueError(f"unknown IDX data set {name!r}; choose one of {sorted(RELEASES)}")
    return RELEASES[name]


def _torchvision_class(name: str) -> Any:
    from torchvision import datasets

    return getattr(datasets, _release(name).torchvision_class)


def class_names(name: str) -> list[str]:
    """The class names torchvision gives the release (Fashion-MNIST's clothes, MNIST's ``0 - zero``...)."""
    return list(_torchvision_class(name).classes)


def _all_files() -> list[str]:
    return [f for pair in FILES.values() for f in pair]


def _holds_any(folder: Path) -> bool:
    return any((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in _all_files())


def find_folder(name: str, data_dir: str | Path) -> Path | None:
    """The folder holding ``name``'s files: torchvision's ``<data_dir>/<Class>/raw``, else ``data_dir`` itself.

    A folder counts when it holds any of the four files, as they are or gzipped; ``None`` when neither does.
    """
    data_dir = Path(data_dir)
    for folder in (data_dir / _release(name).torchvision_class / "raw", data_dir):
        if _holds_any(folder):
            return folder
    return None


def _how_to_get(name: str, data_dir: Path) -> str:
    debian = " (or dataset.data_dir=/usr/share/datasets/fashion-mnist after apt-get install dataset-fashion-mnist)"
    return (
        f"Get {name} with dataset.download=true (torchvision downloads it into "
        f"{data_dir / _release(name).torchvision_class / 'raw'}), or put the four files from "
        f"{_release(name).home} there or in dataset.data_dir itself{debian if name == 'fashion_mnist' else ''}."
    )


def _replace(name: str, *paths: Path) -> str:
    """How to replace bad files: a download never writes over files that are there."""
    files = " and ".join(str(p.name) for p in paths)
    return (
        f"Delete {files} and rerun with dataset.download=true to fetch {'them' if len(paths) > 1 else 'it'} "
        f"again, or put an intact copy from {_release(name).home} there."
    )


def read_idx(path: Path, ndim: int, fix: str = "") -> np.ndarray:
    """The ``uint8`` array in IDX file ``path`` (gunzipped when its name ends in ``.gz``), of ``ndim`` dimensions.

    A file that cannot be read, is truncated, has bytes past its data, or has another magic number
    raises a one-line :class:`RunError` naming it, then ``fix``.
    """

    def bad(problem: str) -> RunError:
        return RunError(f"{path}: {problem}. {fix}".rstrip())

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # unreadable, not gzip (BadGzipFile), cut short (EOFError)
        raise bad(f"cannot be read ({type(e).__name__}: {e}); the file may be truncated or corrupt") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad(f"holds {len(raw)} bytes, fewer than an IDX header of {header}; the file is truncated")
    magic = int.from_bytes(raw[:4], "big")
    if raw[:2] == b"\x1f\x8b":
        raise bad(f"is gzipped; name it {path.name}.gz (or gunzip it)")
    if magic != (IDX_UBYTE << 8) | ndim:
        raise bad(
            f"magic number 0x{magic:08x} is not 0x{(IDX_UBYTE << 8) | ndim:08x} (IDX, unsigned bytes, {ndim}-d); "
            "it is not this file of the release"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size, body = math.prod(shape), len(raw) - header
    if body != size:
        shown = "×".join(map(str, shape))
        end = "the file is truncated" if body < size else "the file is corrupt"
        raise bad(f"holds {body} bytes of data where its header announces {shown} = {size}; {end}")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(shape).copy()


def _idx_path(folder: Path, file: str, name: str, data_dir: Path) -> Path:
    """``file`` in ``folder``, as it is or else gzipped; a RunError naming both when neither is there."""
    for path in (folder / file, folder / f"{file}.gz"):
        if path.is_file():
            return path
    raise RunError(f"{name}: missing file {folder / file} (or {file}.gz). {_how_to_get(name, data_dir)}")


def _read_split(folder: Path, split: str, name: str, data_dir: Path, num_classes: int) -> tuple[np.ndarray, ...]:
    images_path, labels_path = (_idx_path(folder, f, name, data_dir) for f in FILES[split])
    images = read_idx(images_path, 3, f"{name}: {_replace(name, images_path)}")
    labels = read_idx(labels_path, 1, f"{name}: {_replace(name, labels_path)}")
    if not len(images):
        raise RunError(f"{name}: {images_path} holds no images. {_replace(name, images_path)}")
    if len(images) != len(labels):
        raise RunError(
            f"{name}: {images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            f"one of the two is cut short or from another release. {_replace(name, images_path, labels_path)}"
        )
    if labels.max() >= num_classes:
        raise RunError(
            f"{name}: {labels_path} holds label {labels.max()}, outside [0, {num_classes}). "
            f"{_replace(name, labels_path)}"
        )
    return images[:, None], labels.astype(np.int64)


def load_arrays(name: str, data_dir: str | Path) -> dict[str, Any]:
    """Read ``name``'s files: ``x_train, y_train, x_test, y_test`` (``uint8 N×1×H×W``, ``int64``), ``class_names``
    and ``folder`` (where they were found). Any fault raises a one-line :class:`RunError` naming the file."""
    data_dir = Path(data_dir)
    folder = find_folder(name, data_dir)
    if folder is None:
        raw = data_dir / _release(name).torchvision_class / "raw"
        raise RunError(f"{name}: no IDX files in {raw} nor in {data_dir}. {_how_to_get(name, data_dir)}")
    names = class_names(name)
    x_train, y_train = _read_split(folder, "train", name, data_dir, len(names))
    x_test, y_test = _read_split(folder, "test", name, data_dir, len(names))
    if x_train.shape[2:] != x_test.shape[2:] or x_train.shape[2] != x_train.shape[3]:
        raise RunError(
            f"{name}: the images in {folder} are {'×'.join(map(str, x_train.shape[2:]))} for training and "
            f"{'×'.join(map(str, x_test.shape[2:]))} for testing; both splits need the same square size. "
            f"{_replace(name, *(_idx_path(folder, FILES[s][0], name, data_dir) for s in FILES))}"
        )
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names, folder=folder)


def download_idx(name: str, data_dir: str | Path, timeout_s: float = 60.0) -> None:
    """Download those of ``name``'s four files that are missing, as torchvision does (every mirror in turn,
    each file checked against torchvision's md5, then gunzipped beside it).

    Files already there, as they are or gzipped, are never downloaded over, and are not held to
    torchvision's checksums: Debian recompresses the same images, so its ``.gz`` files differ byte for
    byte. The loader checks every file's structure instead. They go where the loader looks: the folder
    that already holds some of the files, else torchvision's ``<data_dir>/<Class>/raw``.
    """
    tv, data_dir = _torchvision_class(name), Path(data_dir)
    folder = find_folder(name, data_dir) or data_dir / _release(name).torchvision_class / "raw"
    missing = [
        (gz, md5, mb)
        for (gz, md5), mb in zip(tv.resources, _release(name).files_mb, strict=True)
        if not ((folder / gz).is_file() or (folder / gz.removesuffix(".gz")).is_file())
    ]
    if not missing:
        return
    names = ", ".join(gz for gz, _, _ in missing)
    announce(name, f"{names} from {tv.mirrors[0]}", sum(mb for _, _, mb in missing), folder, timeout_s)
    folder.mkdir(parents=True, exist_ok=True)
    for gz, md5, _ in missing:
        manual = (
            f"Without a network, fetch {gz} from {_release(name).home} on a machine that has one, put it in "
            f"{folder} (gzipped or not), and rerun without dataset.download=true."
        )
        fetch(name, [mirror + gz for mirror in tv.mirrors], folder, gz, md5, timeout_s, manual)


def _pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of ``uint8`` pixels in [0, 1], exactly, from their histogram."""
    flat = images.reshape(-1)
    chunk = 1 << 23  # bincount widens to int64: count a few MB at a time
    counts = sum((np.bincount(flat[i : i + chunk], minlength=256) for i in range(0, len(flat), chunk)), np.zeros(256))
    values = np.arange(256) / 255.0
    n = counts.sum()
    mean = float(counts @ values / n)
    return mean, float(np.sqrt(counts @ (values - mean) ** 2 / n))


def stratified_subset(labels: np.ndarray, n: int, split_seed: int, what: str = "dataset.train_subset") -> np.ndarray:
    """Sorted indices of ``n`` of ``labels``, each class in proportion to its share, drawn with ``split_seed``."""
    total, classes = len(labels), len(np.unique(labels))
    if isinstance(n, bool) or not isinstance(n, int) or not classes <= n <= total:
        raise RunError(
            f"config key '{what}' is {n!r}, but it must be a whole number of training images from {classes} "
            f"(one per class) to {total} (the whole split). Set {what}=N in that range, or null for all of them."
        )
    if n == total:
        return np.arange(total)
    try:
        keep, _ = train_test_split(np.arange(total), train_size=n, stratify=labels, random_state=split_seed)
    except ValueError as e:  # a class too small to split
        raise RunError(f"config key '{what}': cannot draw {n} images stratified by class ({e}).") from None
    return np.sort(keep)


def build(
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    name: str = "fashion_mnist",
    data_dir: str | Path = "data",
    download: bool = False,
    download_timeout_s: float = 60.0,
    train_subset: int | None = None,
    split_seed: int = 0,
    padding: int = 4,
    flip: bool = True,
    eval_batch_size: int = 1000,
) -> DataBundle:
    """Fashion-MNIST or MNIST (``name``) from ``data_dir`` as training and test batches on ``device``."""
    _release(name)
    if download:
        download_idx(name, data_dir, download_timeout_s)
    arrays = load_arrays(name, data_dir)
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    mean, std = _pixel_stats(x_train)  # the whole split's, with or without a subset
    if train_subset is not None:
        keep = stratified_subset(y_train, train_subset, split_seed)
        x_train, y_train = x_train[keep], y_train[keep]

    def on_device(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device)

    normalize = Normalize((mean,), (std,), device)
    augment = CropFlipNormalize(normalize, size=x_train.shape[-1], padding=padding, flip=flip)
    return DataBundle(
        train=TensorBatches(
            on_device(x_train), on_device(y_train), batch_size, shuffle=True, seed=seed, transform=augment
        ),
        test=TensorBatches(
            on_device(arrays["x_test"]),
            on_device(arrays["y_test"]),
            eval_batch_size,
            shuffle=False,
            transform=normalize,
        ),
        num_classes=len(arrays["class_names"]),
        class_names=arrays["class_names"],
        info={"train_images": len(y_train), "pixel_mean": mean, "pixel_std": std},
    )
