"""Helpers shared by the bench scripts: interleaved timing, medians and spreads, the machine's description.

Importing it puts this checkout's ``src/`` first on ``sys.path``, so the benches time this checkout's
code whatever ``.venv`` has installed (as pytest's ``pythonpath`` does for the tests).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

# The clock every timing here reads: wall time, or this process's CPU time (see ``setup``).
clock: Callable[[], float] = time.perf_counter
CLOCK_NAME = "wall"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto: cuda if present, else cpu")
    parser.add_argument(
        "--threads", type=int, default=-1, help="torch CPU threads; -1: 1 on a CPU device, torch's default on CUDA"
    )
    parser.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="auto: the process's CPU time for a single-threaded CPU run, wall time otherwise",
    )


def setup(args: argparse.Namespace) -> torch.device:
    """The device to run on; sets torch's thread count and the clock.

    On a CPU shared with other jobs, wall time mostly measures the neighbours. A single-threaded
    run timed by its own CPU clock (``time.process_time``) is not slowed by them and equals the wall
    time of the same run on a quiet machine; it is the default on a CPU device. With several
    threads the CPU clock would add up every thread's time (spin-waits included), so wall time is used.
    """
    global clock, CLOCK_NAME
    device = pick_device(args.device)
    threads = args.threads if args.threads >= 0 else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    use_cpu = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu" and torch.get_num_threads() == 1)
    clock, CLOCK_NAME = (time.process_time, "process CPU time") if use_cpu else (time.perf_counter, "wall time")
    return device


def describe(device: torch.device) -> str:
    return f"{device}, {torch.get_num_threads()} torch thread(s), timed by {CLOCK_NAME}"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, over ``n`` calls, the device synchronised before and after."""
    sync(device)
    start = clock()
    for _ in range(n):
        fn()
    sync(device)
    return (clock() - start) / n


def calibrated(fn: Callable[[], object], sample_s: float, device: torch.device) -> Callable[[], list[float]]:
    """A sampler timing as many calls of ``fn`` as last about ``sample_s`` seconds (after 3 warm-up calls).

    Samples of equal duration let the variants being compared meet a busy machine's preemptions alike:
    a 1 ms sample usually runs unpreempted while a 10 ms one rarely does, which would bias the ratio.
    """
    n = max(1, round(sample_s / time_calls(fn, 3, device)))
    return lambda: [time_calls(fn, n, device)]


def interleave(variants: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[list[float]]]:
    """Run every variant once per round, the order rotated each round; ``out[name][round]`` = its samples.

    Interleaving makes a slow spell of a shared machine hit every variant alike; rotating the order
    keeps any variant from always following the same one.
    """
    names = list(variants)
    out: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(variants[name]())
    return out


def flat(rounds: list[list[float]]) -> list[float]:
    return [v for samples in rounds for v in samples]


def median(values: list[float]) -> float:
    return statistics.median(values)


def iqr(values: list[float]) -> tuple[float, float]:
    """First and third quartiles (the values themselves when there are fewer than 4)."""
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def ratio_with_spread(num: list[list[float]], den: list[list[float]]) -> tuple[float, float, float]:
    """Ratio of the pooled medians, and the min and max of the per-round ratios of medians."""
    per_round = [median(a) / median(b) for a, b in zip(num, den)]
    return median(flat(num)) / median(flat(den)), min(per_round), max(per_round)


def machine() -> dict[str, str]:
    """CPU model, cores, torch version and the device the benches run on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = pick_device()
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical cores",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (no CUDA device)",
    }


def time_epoch(batches, epoch: int, device: torch.device) -> float:
    """Images per second over one full epoch of ``batches`` (the ``Batches`` protocol), the device synchronised
    before and after (wall clock: a loader's workers are other processes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, images = time.perf_counter(), 0
    for x, *_ in batches.epoch(epoch):
        images += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)
