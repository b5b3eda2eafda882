"""The text loader's tokenised rows per second, and training samples per second per text model.

Section 7 of ``results/bench.md`` (``make bench``).

Loader: an AG News-layout CSV of ``--rows`` training rows (sentences of :mod:`alr.data.samples`, every
quirk of the release) plus a tenth as many test rows, read by :func:`alr.data.text.load_encoded`: the
first build (read, vocabulary, encode, write the cache) and the cached load, for word ids and characters,
on the benchutil clock (on a single-threaded CPU run the process's CPU time, system time for the file
reads and writes included).

Training: each Table 3 model as ``experiment=table3`` composes it, with ALR-S, Adam, batch ``--batch``
of that data on the device; ``--steps`` timed steps after one warm-up, forward, backward and optimizer
step, the benchutil clock.

    python bench/bench_text.py            # 100,000 rows, batch 128, 5 steps per model
    python bench/bench_text.py --quick    # 2,000 rows, batch 16, 2 steps, FastText with 1,000 buckets
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import benchutil
import torch
from benchutil import add_common_args, describe, setup, sync
from hydra.utils import instantiate

from alr.config import compose
from alr.data.batches import TensorBatches
from alr.data.samples import write_text_csv
from alr.data.text import load_encoded

MODELS = ("fasttext", "textrnn", "textrcnn", "charcnn", "transformer")


def loader_speeds(data_dir: Path, rows: int) -> dict[str, float]:
    """Rows per second of the first build and of the cached load, per encoding."""
    total = rows + rows // 10
    speeds = {}
    for encoding in ("word", "char"):
        for phase in ("first build", "cached load"):
            t0 = benchutil.clock()
            load_encoded("ag_news", data_dir, data_dir / "cache", encoding=encoding, progress=False)
            speeds[f"{encoding}, {phase}"] = total / (benchutil.clock() - t0)
    return speeds


def train_speed(model_name: str, data_dir: Path, batch: int, steps: int, device: torch.device, extra: list[str]):
    """Samples per second of ALR-S training steps of ``model_name``, and its parameter count."""
    overrides = ["experiment=table3", f"model={model_name}", "method=alr_s", f"dataset.data_dir={data_dir}", *extra]
    cfg = compose(overrides)
    data = load_encoded("ag_news", data_dir, data_dir / "cache", encoding=cfg.dataset.encoding, progress=False)
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device)
    method = instantiate(cfg.method.module).to(device)
    params = [*model.parameters(), *method.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    batches = TensorBatches(data["x_train"].to(device), data["y_train"].to(device), batch, shuffle=True)
    it = batches.epoch(0)
    model.train()
    method.start_epoch(0)

    def step() -> None:
        out = method(model, next(it))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    step()  # warm-up: allocations, kernel selection
    sync(device)
    t0 = benchutil.clock()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (benchutil.clock() - t0), sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    add_common_args(parser)
    parser.add_argument("--quick", action="store_true", help="2,000 rows, batch 16, 2 steps, small FastText tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.batch, args.steps = 2_000, 16, 2
    device = setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        write_text_csv(data_dir, "ag_news", n_train=args.rows, n_test=args.rows // 10)
        print(f"text loader: AG News layout, {args.rows:,} + {args.rows // 10:,} rows, {benchutil.CLOCK_NAME}")
        for what, speed in loader_speeds(data_dir, args.rows).items():
            print(f"  {what:<18} {speed:>12,.0f} rows/s")
        print()
        print(f"training ALR-S, Adam, batch {args.batch}, {args.steps} steps after a warm-up, on {describe(device)}")
        print(f"  {'model':<12} {'params':>13} {'samples/s':>11}")
        for name in MODELS:
            extra = ["model.buckets=1000"] if args.quick and name == "fasttext" else []
            speed, n_params = train_speed(name, data_dir, args.batch, args.steps, device, extra)
            note = " (buckets=1000)" if extra else ""
            print(f"  {name:<12} {n_params:>13,} {speed:>11,.0f}{note}")


if __name__ == "__main__":
    main()
