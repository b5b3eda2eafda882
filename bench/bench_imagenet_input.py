"""Training images per second of the ImageNet input paths: DALI against a torchvision DataLoader.

Writes a synthetic ImageFolder tree of JPEG files at ImageNet's typical size (500×375, smooth random
content, quality 90) to a temporary folder, builds ``alr.data.imagenet``'s loaders on it and times full
training epochs (decode, random-resized-crop 224, flip, normalise, batches of 64), the variants
interleaved so that drift on a shared machine hits all alike. Reports medians and the ratio DALI /
torchvision at the same CPU thread count:

- ``dali-cpu``: DALI's CPU operators with N threads (``trainer.device=cpu``);
- ``torchvision``: ``torchvision.io`` decoding and ``transforms.v2`` in a DataLoader with N workers;
- ``dali-mixed``, where a GPU exists: nvJPEG decoding on the GPU (``device="mixed"``), the default there.

    python bench/bench_imagenet_input.py                 # 2,048 images, 3 repeats, 2 threads/workers
    python bench/bench_imagenet_input.py --quick         # 128 images of 160×120, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import benchutil  # (also puts this checkout's src/ first on sys.path)
import numpy as np
import torch
from PIL import Image

from alr.data import imagenet


def write_tree(root: Path, n: int, size: tuple[int, int], classes: int = 8, seed: int = 0) -> None:
    """``n`` JPEG files of ``size`` (width, height) in ``classes`` class folders, for train/ and (one each) val/."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n + classes):
        split, label = ("train", i % classes) if i < n else ("val", i - n)
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        folder = root / split / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.JPEG", quality=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048, help="training images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DALI CPU threads and DataLoader workers")
    parser.add_argument("--quick", action="store_true", help="128 images of 160×120, 1 repeat")
    args = parser.parse_args(argv)
    size, crop = ((160, 120), 112) if args.quick else ((500, 375), 224)
    if args.quick:
        args.n, args.repeats = 128, 1

    variants = {"dali-cpu": ("dali", torch.device("cpu")), "torchvision": ("torchvision", torch.device("cpu"))}
    if torch.cuda.is_available():
        variants["dali-mixed"] = ("dali", torch.device("cuda"))
    with tempfile.TemporaryDirectory() as tmp:
        write_tree(Path(tmp) / "imagenet", args.n, size)
        loaders = {
            name: imagenet.build(
                args.batch_size,
                device,
                data_dir=tmp,
                num_classes=8,
                loader=loader,
                image_size=crop,
                resize_size=crop * 8 // 7,
                num_workers=args.workers,
            ).train
            for name, (loader, device) in variants.items()
        }
        for batches in loaders.values():  # warm-up: worker start, DALI's first pipeline, CUDA context
            next(iter(batches.epoch(0)))
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for repeat in range(args.repeats):
            names = list(loaders)[repeat % len(loaders) :] + list(loaders)[: repeat % len(loaders)]
            for name in names:
                rates[name].append(benchutil.time_epoch(loaders[name], repeat + 1, variants[name][1]))

    print(f"torch {torch.__version__}, {args.workers} DALI threads / DataLoader workers, wall time")
    print(f"{args.n} JPEG files of {size[0]}×{size[1]}, crop {crop}, batch {args.batch_size}, {args.repeats} repeats")
    print(f"{'input path':<12} {'median img/s':>14} {'min':>12} {'max':>12}")
    for name, values in rates.items():
        print(f"{name:<12} {statistics.median(values):>14,.0f} {min(values):>12,.0f} {max(values):>12,.0f}")
    tv = statistics.median(rates["torchvision"])
    print(f"dali-cpu / torchvision: {statistics.median(rates['dali-cpu']) / tv:.2f}x (same CPU threads)")
    if "dali-mixed" in rates:
        print(f"dali-mixed / torchvision: {statistics.median(rates['dali-mixed']) / tv:.2f}x")


if __name__ == "__main__":
    main()
