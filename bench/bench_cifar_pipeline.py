"""Images per second of augmented CIFAR training batches: on-device augmentation against a DataLoader.

Writes synthetic files in CIFAR-10's on-disk format to a temporary folder, builds both loaders of
``alr.data.cifar`` on one device (CUDA if available), and times full epochs of batches, the two
variants interleaved so that drift on a shared machine hits both alike. Reports medians.

    python bench/bench_cifar_pipeline.py            # 50,000 images, 5 repeats
    python bench/bench_cifar_pipeline.py --quick    # 2,000 images, 2 repeats, 2 workers
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
from pathlib import Path

import benchutil  # (also puts this checkout's src/ first on sys.path)
import numpy as np
import torch

from alr.data import cifar


def write_synthetic_cifar10(root: Path, n: int, n_test: int = 1000, seed: int = 0) -> None:
    """Random uint8 images and labels in the layout of ``cifar-10-batches-py`` (5 training batches)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    bounds = np.linspace(0, n, 6).astype(int)
    files = [(f"data_batch_{i + 1}", bounds[i + 1] - bounds[i]) for i in range(5)] + [("test_batch", n_test)]
    for file, size in files:
        batch = {
            b"data": rng.integers(0, 256, (size, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, size).tolist(),
        }
        with (folder / file).open("wb") as f:
            pickle.dump(batch, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="training images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers (torchvision loader)")
    parser.add_argument("--quick", action="store_true", help="n=2000, 2 repeats, 2 workers")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.num_workers = 2_000, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_cifar10(Path(tmp), args.n)
        loaders = {
            loader: cifar.build(
                args.batch_size,
                device,
                name="cifar10",
                data_dir=tmp,
                loader=loader,
                num_workers=args.num_workers,
            ).train
            for loader in ("gpu", "torchvision")
        }
        for batches in loaders.values():  # warm-up: CUDA context, kernels, first worker start
            next(iter(batches.epoch(0)))
        rates: dict[str, list[float]] = {loader: [] for loader in loaders}
        for repeat in range(args.repeats):
            for loader, batches in loaders.items():
                rates[loader].append(benchutil.time_epoch(batches, repeat, device))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, wall time")
    print(f"{args.n} images, batch {args.batch_size}, {args.repeats} repeats, {args.num_workers} workers")
    print(f"{'loader':<12} {'median img/s':>14} {'min':>12} {'max':>12}")
    for loader, values in rates.items():
        print(f"{loader:<12} {statistics.median(values):>14,.0f} {min(values):>12,.0f} {max(values):>12,.0f}")
    ratio = statistics.median(rates["gpu"]) / statistics.median(rates["torchvision"])
    print(f"gpu / torchvision: {ratio:.1f}x")


if __name__ == "__main__":
    main()
