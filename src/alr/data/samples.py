"""Tiny data sets in the real on-disk formats: for smoke runs of a table's grid.

A smoke run (``make reproduce-table1 SMOKE=1``) must read its data through the real loaders, so these
writers produce byte-for-byte the layouts the loaders expect. Images are real digits that ship with
scikit-learn (nothing is downloaded): each 8×8 digit is scaled up to 32×32 and repeated over three
channels. The digit is the label, so CIFAR-100's files use classes 0–9 of its 100. Fashion-MNIST and
MNIST get their four gzipped IDX files in torchvision's layout, the digits scaled up to 28×28 (the
clothes' class names then label digits). ImageNet gets an
ImageFolder tree of JPEG files, ten class folders named like WordNet ids (``n00000000``…``n00000009``),
the digits scaled up to 64×80 (run it with ``dataset.num_classes=10``). Texts (AG News, Yahoo! Answers,
Yelp) are sentences composed here from a few words per class, with the release's quirks (every field
quoted, ``""`` inside quotes, commas, ``\\n`` escapes, non-ASCII UTF-8).

    python -m alr.data.samples --out runs/smoke/data cifar10 cifar100 fashion_mnist mnist imagenet ag_news \
        yahoo_answers yelp_full
"""

from __future__ import annotations

import argparse
import csv
import gzip
import pickle
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from alr.data import mnist
from alr.data.cifar import LAYOUTS
from alr.data.text import RELEASES


def digit_images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digits as ``uint8 n×3×size×size`` images (nearest-neighbour upscaling) and their labels."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))[:n]
    if len(order) < n:
        raise ValueError(f"scikit-learn's digits hold {len(digits.target)} images; asked for {n}")
    small = (digits.images[order] * (255.0 / 16.0)).round().astype(np.uint8)
    scale = -(-size // 8)
    big = small.repeat(scale, axis=1).repeat(scale, axis=2)[:, :size, :size]
    return np.repeat(big[:, None], 3, axis=1), digits.target[order].astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root: str | Path, name: str, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """Write ``name`` (cifar10 or cifar100) under ``root`` in torchvision's layout; return its folder.

    CIFAR-10 gets five ``data_batch_*`` files, a ``test_batch`` and ``batches.meta``; CIFAR-100 gets
    ``train``, ``test`` and ``meta`` with fine and coarse labels, as in the official python release.
    """
    layout = LAYOUTS[name]
    folder = Path(root) / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    x, y = digit_images(n_train + n_test, seed=seed)
    x = x.reshape(len(x), -1)
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    names = [f"digit {d}" for d in range(10)] + [f"unused {k}" for k in range(10, layout.num_classes)]
    if name == "cifar10":
        bounds = np.linspace(0, n_train, len(layout.train_files) + 1).astype(int)
        for i, file in enumerate(layout.train_files):
            rows = slice(bounds[i], bounds[i + 1])
            _dump(
                folder / file,
                {b"batch_label": file.encode(), b"labels": y_train[rows].tolist(), b"data": x_train[rows]},
            )
        _dump(folder / "test_batch", {b"batch_label": b"test_batch", b"labels": y_test.tolist(), b"data": x_test})
        _dump(folder / layout.meta_file, {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    else:
        for file, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
            _dump(folder / file, {b"fine_labels": ys.tolist(), b"coarse_labels": (ys // 5).tolist(), b"data": xs})
        coarse = [f"group {k}" for k in range(20)]
        _dump(
            folder / layout.meta_file, {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": coarse}
        )
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a ``uint8`` array as an IDX file (magic ``0x000008dd``, big-endian dimensions), gzipped if ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def write_mnist(root: str | Path, name: str, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """Write ``name`` (fashion_mnist or mnist) as four gzipped IDX files in torchvision's layout; return its folder."""
    folder = Path(root) / mnist.RELEASES[name].torchvision_class / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = digit_images(n_train + n_test, size=28, seed=seed)
    for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        images, labels = mnist.FILES[split]
        write_idx(folder / f"{images}.gz", x[rows, 0])
        write_idx(folder / f"{labels}.gz", y[rows].astype(np.uint8))
    return folder


def write_imagenet(
    root: str | Path, name: str = "imagenet", n_train: int = 200, n_test: int = 50, seed: int = 0
) -> Path:
    """Write an ImageFolder tree ``root/imagenet/{train,val}/<wnid>/*.JPEG`` of digits; return its folder.

    Images are 64 high and 80 wide (not square, so resizing and cropping do something), saved as JPEG.
    """
    from PIL import Image

    folder = Path(root) / name
    x, y = digit_images(n_train + n_test, size=80, seed=seed)
    # Validation takes the classes in turn from each one's second image on, so that both splits hold every
    # class folder (given n_test >= 10 and two images of each class).
    rank_in_class = np.array([(y[:i] == label).sum() for i, label in enumerate(y)])
    is_val = np.zeros(len(y), dtype=bool)
    is_val[np.lexsort((y, rank_in_class, rank_in_class == 0))[:n_test]] = True
    for i, (image, label) in enumerate(zip(x, y)):
        split = "val" if is_val[i] else "train"
        path = folder / split / f"n{label:08d}" / f"{split}_{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)[8:72]).save(path, quality=90)
    return folder


_FILLER = ("the", "a", "this", "report", "says", "that", "today", "we", "were", "told", "about", "it", "and", "of")
_QUIRKS = (', said "{w}"', "\\n{w} again", " — café {w}", ", {w}, {w}")


def text_rows(name: str, n: int, seed: int = 0) -> list[list[str]]:
    """``n`` rows ``[class from 1, *text columns]`` of ``name``'s layout; each class has its own topic words."""
    release = RELEASES[name]
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = i % release.num_classes
        topic = [f"topic{k}word{j}" for j in range(4)]
        columns = []
        for _ in range(release.text_columns):
            words = [str(rng.choice(topic if rng.random() < 0.5 else _FILLER)) for _ in range(int(rng.integers(3, 12)))]
            text = " ".join(words).capitalize()
            if rng.random() < 0.5:
                text += str(rng.choice(_QUIRKS)).format(w=topic[0])
            columns.append(text + ".")
        rows.append([str(k + 1), *columns])
    return rows


def write_text_csv(root: str | Path, name: str, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """Write ``name``'s ``train.csv``, ``test.csv`` and, where the release has one, ``classes.txt``."""
    release = RELEASES[name]
    folder = Path(root) / release.folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = text_rows(name, n_train + n_test, seed)
    for file, part in (("train.csv", rows[:n_train]), ("test.csv", rows[n_train:])):
        with (folder / file).open("w", newline="", encoding="utf-8") as f:
            csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(part)
    if name != "yelp_full":  # the Yelp release has no classes.txt
        (folder / "classes.txt").write_text("".join(f"{c}\n" for c in release.class_names))
    return folder


WRITERS = {
    "cifar10": write_cifar,
    "cifar100": write_cifar,
    "fashion_mnist": write_mnist,
    "mnist": write_mnist,
    "imagenet": write_imagenet,
    **{name: write_text_csv for name in RELEASES},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alr.data.samples", description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="+", choices=sorted(WRITERS))
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (dataset.data_dir)")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=50)
    args = parser.parse_args(argv)
    for name in args.datasets:
        folder = WRITERS[name](args.out, name, args.n_train, args.n_test)
        print(f"wrote {args.n_train} + {args.n_test} samples as {name} into {folder}")


if __name__ == "__main__":
    main()
