"""``make gpu-check``: is this GPU machine ready for the suite, how fast does it train, how long will each table take.

    python -m alr.gpu_check                    # under 15 minutes on one GPU, no network
    python -m alr.gpu_check --budget 1200      # measure more throughput cells (see --help)

Steps, each written into ``results/gpu/<gpu>.json`` and ``.md`` as soon as it is done (so a check
stopped half-way still leaves its report):

1. the machine: GPU, memory, driver, CUDA, cuDNN, torch, the suite, which optional parts import;
2. the tests marked ``gpu`` (``pytest -m gpu``), with a line each for those of :data:`NAMED_CHECKS`: a run
   stopped by SIGTERM on CUDA resumes bit-identically, and ALR's training step under a process group
   queues its work without a host sync. A test pytest skips (no DALI, one GPU) is listed with its reason
   and fails nothing; a step that cannot run (no pytest) fails the check;
3. Table 1's composition (``preact_resnet18``, ``alr``) trained end to end by ``python -m alr.train``
   on sample CIFAR-10 files in fp32, bf16 and fp16: each must finish with finite losses and a result.json;
4. training throughput through :func:`alr.trainer.fit` on synthetic on-device images
   (``dataset=synthetic``) for every backbone of Tables 1, 2 and 4 × precision × ``channels_last`` ×
   ``torch.compile``, the baseline and ALR-S side by side;
5. the GPU-hours of each table's grid (:mod:`alr.reporting.gpu`).

Each step has a share of the time budget (:data:`STEP_BUDGET_S`), the shares adding up to the promise,
:data:`PROMISE_MINUTES`. The clock starts with the launcher; steps 2 and 3 stop at their share (a test
session or a run still going fails); the throughput cells get what the steps before them left of
``--budget`` (default: the promise), less the report's share (:func:`throughput_seconds`).
Throughput cells run in order of use until the time budget is spent, every backbone at one setting
before the next setting: the eager ones first (fp32 with ``channels_last``, the trainer's default,
then bf16 and fp16, then the same without ``channels_last``), then compiled ones at bf16 with
``channels_last`` (the likeliest fastest), then the other compiled cells; those the budget leaves out
are listed as skipped. Each cell trains one warm-up epoch and
``--epochs`` measured epochs; the first cell of each backbone sets the steps per epoch so that a
measured epoch of that backbone in fp32 lasts about ``--epoch-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

import alr
from alr.config import CONFIG_DIR, compose
from alr.config_check import validate
from alr.flops import peak_tflops, training_flops_per_image
from alr.reporting.gpu import (
    fastest_settings,
    overhead,
    predict,
    render,
    setting_label,
    table_recipes,
)
from alr.run_folder import read_metrics
from alr.trainer import fit

ROOT = Path(CONFIG_DIR).parent
# Optional parts: imported only here, inside a try, never by the check's own code paths.
OPTIONAL = {
    "DALI (ImageNet input on the GPU, Table 2)": "nvidia.dali",
    "W&B (logger=wandb)": "wandb",
    "submitit (SLURM launcher)": "submitit",
    "timm (ResNet-50/101/152, Table 2)": "timm",
}
PRECISIONS = ("fp32", "bf16", "fp16")
# The methods timed side by side, so the two meet the machine in the same state: the reference (its fastest
# setting is each backbone's), then ALR-S, whose overhead per image over it the report gives. Every method
# config's cost.like names one of them (docs/gpu-check.md).
METHODS = ("baseline", "alr_s")
# GPU tests the report names on a line of their own (test function: what it proves), beside the summary.
NAMED_CHECKS = {
    "test_resume_on_cuda_is_bit_identical": "CUDA resume bit-identical",
    "test_alr_step_without_host_sync_under_ddp": "ALR step without host sync under DDP",
    "test_trainer_step_without_host_sync_under_ddp": "Trainer step (ALR) without host sync under DDP",
}
# The check's promise: `make gpu-check` ends within this many minutes (docs/gpu-check.md, the Makefile's help).
PROMISE_MINUTES = 15
# Each step's share of the promise in seconds, the shares adding up to it (docs/gpu-check.md, "The time
# budget", says where each figure comes from). Steps 2 and 3 stop at theirs: a test session or a run still
# going then fails. Step 1 and the report are timed, not cut. The throughput's share is what it gets when the
# steps before it keep to theirs; it gets whatever they leave.
STEP_BUDGET_S = {
    "machine": 30,  # start-up imports, the facts, the optional parts, every experiment's config composed
    "tests": 480,  # pytest -m gpu: 6 short training runs, a compilation, every method's step in 3 precisions
    "end_to_end": 120,  # the sample files and three short runs of python -m alr.train
    "throughput": 255,  # the 48 eager cells at about 5 s each, then compiled ones if time is left
    "report": 15,  # the last writing of the report and its predictions
}


def throughput_seconds(budget: float, elapsed: float) -> float:
    """Step 4's share: what ``elapsed`` seconds of the steps before it leave of ``budget``, less the report's."""
    return max(0.0, budget - elapsed - STEP_BUDGET_S["report"])


@dataclass(frozen=True)
class Backbone:
    """A backbone as a table trains it: the measurement's image size, class count and batch size."""

    model: str
    image_size: int
    num_classes: int
    batch_size: int
    eval_batch_size: int


# The K and batch of the table that trains each backbone (docs/deviations.md#recipes-and-reporting); CIFAR
# backbones at K=100, the dearer of the two for ALR's loss. ResNet-50 stands for Table 2's family (101/152
# are not timed).
BACKBONES = (
    Backbone("preact_resnet18", 32, 100, 128, 1000),  # Table 1
    Backbone("wrn28_10", 32, 100, 128, 1000),  # Tables 1 and 4
    Backbone("resnet32", 32, 100, 64, 1000),  # Table 4
    Backbone("resnet50", 224, 1000, 256, 250),  # Table 2
)


def say(text: str) -> None:
    print(f"[gpu-check] {text}", flush=True)


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``: the report's file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _run(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env.setdefault("WANDB_MODE", "offline")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def _one_line(text: str, limit: int = 200) -> str:
    """The line of a command's output that says what went wrong: its ``error:`` line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    errors = [line for line in lines if line.startswith("error:")]
    return ((errors or lines)[-1] if lines else "no output")[:limit]


def _failure_line(message: str) -> str:
    """What a failed test's JUnit message says went wrong: the assertion's own text (pytest's ``assert ...``
    explanation and diff follow it), else :func:`_one_line`'s pick (the last error of a failed subprocess)."""
    head = re.split(r"^assert ", message, maxsplit=1, flags=re.MULTILINE)[0]
    return _one_line(head) if head.strip() else _one_line(message.strip().split("\n", 1)[0])


# --- 1. the machine ----------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    driver = "unknown (no nvidia-smi)"
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"]
            driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or driver
    commit = "no git checkout"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = proc.stdout.strip() or commit
    name = torch.cuda.get_device_name(device)
    return {
        "gpu": name,
        "memory_gib": props.total_memory / 2**30,
        "capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "version": alr.__version__,  # the suite's
        "commit": commit,
        "peak_tflops": peak_tflops(name),
        "bf16": props.major >= 8,  # bf16 tensor cores from Ampere on (V100 and T4 have none)
        "fp32_matmul": "TF32" if torch.backends.cuda.matmul.allow_tf32 else "IEEE fp32",
        "fp32_conv": "TF32" if torch.backends.cudnn.allow_tf32 else "IEEE fp32",
    }


def optional_parts() -> dict[str, str]:
    """Which optional parts import here; one line each for those skipped."""
    out = {}
    for label, module in OPTIONAL.items():
        try:
            mod = importlib.import_module(module)
            out[label] = f"imports ({getattr(mod, '__version__', 'version unknown')})"
        except Exception as e:  # an installed package can fail to import for reasons of its own
            out[label] = f"skipped: {type(e).__name__}: {_one_line(str(e), 120)}"
    return out


# --- 2. the GPU tests --------------------------------------------------------------------------


def named_checks(outcomes: dict[str, list[str]]) -> list[dict[str, str]]:
    """One line per test of :data:`NAMED_CHECKS`, from each test function's outcomes (one per parametrisation).

    ``passed`` when every one passed; else the first failure, or the skip reason when all were skipped.
    A named test pytest did not report (renamed, or its file did not import) is a failure.
    """
    lines = []
    for test, label in NAMED_CHECKS.items():
        results = outcomes.get(test, [])
        bad = [r for r in results if r.startswith("FAILED")]
        if not results:
            result = f"FAILED: pytest -m gpu did not report {test}"
        elif bad:
            result = bad[0]
        elif all(r.startswith("skipped") for r in results):
            result = results[0]
        else:
            result = "passed"
        lines.append({"check": label, "test": test, "result": result})
    return lines


def _not_run(why: str) -> dict[str, Any]:
    """Step 2 when the environment keeps pytest from running: a failure of the check, each named check not run."""
    result = f"FAILED: not run: {why}"
    checks = [{"check": label, "test": test, "result": result} for test, label in NAMED_CHECKS.items()]
    return {"summary": f"FAILED: {why}", "failures": [], "skips": [], "checks": checks}


def _skipped_line(skips: list[tuple[str, str]]) -> str:
    """The skipped tests of a run, one entry per test function and reason: `` (skipped: `name`: reason; ...)``."""
    entries = dict.fromkeys(f"`{name.split('::')[-1].split('[')[0]}`: {why}" for name, why in skips)
    return f" (skipped: {'; '.join(entries)})" if entries else ""


def gpu_tests(timeout: float, files: list[Path] | None = None) -> dict[str, Any]:
    """``pytest -m gpu`` over ``files`` (default: the test files that hold such tests); per-test outcomes
    from a JUnit XML file, and a line for each of :data:`NAMED_CHECKS`.

    A test pytest skipped is an expected gap (no DALI, one GPU): listed with its reason in the summary, not a
    failure. No pytest, or no test to run, is a broken environment: the summary starts with ``FAILED``.
    """
    tests = ROOT / "tests"
    if files is None:
        files = sorted(p for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text()) if tests.is_dir() else []
    if not files:
        return _not_run(f"no test files with gpu tests under {tests}: run the check from a checkout of the suite")
    if importlib.util.find_spec("pytest") is None:
        install = "python -m pip install 'pytest>=8'; without a network: make gpu-wheels"
        return _not_run(f"pytest is not installed ({install})")
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        start = time.perf_counter()
        try:
            proc = _run([*cmd, *map(str, files)], timeout)
        except subprocess.TimeoutExpired:
            summary = f"FAILED: pytest -m gpu ran past its {timeout:.0f} s share of the time budget"
            return {"summary": summary, "failures": [], "skips": [], "checks": named_checks({})}
        seconds = time.perf_counter() - start
        if not xml.exists():
            summary = f"FAILED: pytest did not run ({_one_line(proc.stdout + proc.stderr)})"
            return {"summary": summary, "failures": [], "skips": [], "checks": named_checks({})}
        cases = ET.parse(xml).getroot().iter("testcase")
        counts, failures, skips, outcomes = {"passed": 0, "failed": 0, "skipped": 0}, [], [], {}
        for case in cases:
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            if bad is not None:
                counts["failed"] += 1
                failures.append((f"{case.get('classname')}::{case.get('name')}", _failure_line(bad.get("message", ""))))
                outcome = f"FAILED: {failures[-1][1]}"
            elif skipped is not None:
                counts["skipped"] += 1
                skips.append((f"{case.get('classname')}::{case.get('name')}", _one_line(skipped.get("message", ""))))
                outcome = f"skipped: {skips[-1][1]}"
            else:
                counts["passed"] += 1
                outcome = "passed"
            outcomes.setdefault(case.get("name", "").split("[")[0], []).append(outcome)
    checks = named_checks(outcomes)
    ok = proc.returncode == 0 and counts["passed"] and not any(c["result"].startswith("FAILED") for c in checks)
    summary = f"{'passed' if ok else 'FAILED'}: {counts['passed']} passed, {counts['failed']} failed, "
    summary += f"{counts['skipped']} skipped in {seconds:.0f} s{_skipped_line(skips)}"
    return {"summary": summary, "failures": failures, "skips": skips, "checks": checks, **counts}


# --- 3. Table 1's composition end to end ------------------------------------------------------


def end_to_end(work: Path, precisions: list[str], epochs: int, seconds: float) -> list[dict[str, Any]]:
    """``python -m alr.train`` of Table 1's ``preact_resnet18`` / ``alr`` on sample CIFAR-10 files, per precision.

    The sample files and every run share ``seconds``, the step's budget: a run still going when it is spent
    fails, and the runs after it are not started.
    """
    deadline = time.perf_counter() + seconds
    spent = f"step 3's {seconds:.0f} s budget"
    data = work / "data"
    cmd = [sys.executable, "-m", "alr.data.samples", "--out", str(data), "--n-train", "1024", "cifar10"]
    try:
        proc = _run(cmd, seconds)
    except subprocess.TimeoutExpired:
        return [{"precision": p, "status": f"failed: the sample files took all of {spent}"} for p in precisions]
    if proc.returncode != 0:
        return [{"precision": p, "status": f"failed: samples: {_one_line(proc.stderr)}"} for p in precisions]
    results = []
    for precision in precisions:
        left = deadline - time.perf_counter()
        if left <= 0:
            results.append({"precision": precision, "status": f"failed: not started, {spent} was spent"})
            continue
        overrides = [
            "experiment=table1",
            "dataset=cifar10",
            "model=preact_resnet18",
            "method=alr",
            "trainer.device=cuda",
            f"trainer.precision={precision}",
            f"trainer.epochs={epochs}",
            "trainer.progress=false",
            f"dataset.data_dir={data}",
            f"paths.output_dir={work / 'runs'}",
            f"experiment_name=gpu_check_{precision}",
        ]
        start = time.perf_counter()
        try:
            proc = _run([sys.executable, "-m", "alr.train", *overrides], left)
        except subprocess.TimeoutExpired:
            results.append({"precision": precision, "status": f"failed: still running when {spent} ran out"})
            continue
        run = work / "runs" / f"gpu_check_{precision}" / "cifar10-preact_resnet18-alr-s0"
        entry: dict[str, Any] = {"precision": precision, "seconds": time.perf_counter() - start}
        result = json.loads((run / "result.json").read_text()) if (run / "result.json").exists() else {}
        losses = [m["train/loss"] for m in read_metrics(run / "metrics.jsonl")]
        if proc.returncode != 0 or result.get("status") != "finished":
            entry["status"] = f"failed: {_one_line(proc.stderr or proc.stdout)}"
        elif len(losses) != epochs or not all(math.isfinite(v) for v in losses):
            entry["status"] = f"failed: train losses {losses}"
        else:
            entry.update(status="ok", final_loss=losses[-1], test_acc=result["final_test_acc"])
        results.append(entry)
        say(f"end to end, {precision}: {entry['status']}")
    return results


# --- 4. throughput through the trainer ---------------------------------------------------------


@dataclass
class Cell:
    backbone: Backbone
    method: str
    precision: str
    channels_last: bool
    compile: bool


def plan(backbones: list[Backbone], precisions: list[str]) -> list[Cell]:
    """Every cell, in the order they are measured (see the module's docstring).

    Settings are the outer loop, so a budget that runs out leaves every backbone measured at the
    settings before it: fp32 with ``channels_last`` (the trainer's default, measured first, which also
    sets each backbone's steps per epoch), then the other eager settings, then the compiled ones.
    """
    favourite = "bf16" if "bf16" in precisions else precisions[-1]
    eager = [(p, cl, False) for cl in (True, False) for p in precisions]
    compiled = [(favourite, True, True)] + [(p, cl, True) for cl in (True, False) for p in precisions]
    settings = list(dict.fromkeys(eager + compiled))
    return [Cell(b, m, p, cl, comp) for p, cl, comp in settings for b in backbones for m in METHODS]


def measure(cell: Cell, steps: int, epochs: int, work: Path, device: str = "cuda") -> dict[str, Any]:
    """Train ``cell`` through :func:`alr.trainer.fit` for a warm-up epoch and ``epochs`` measured ones."""
    b = cell.backbone
    overrides = [
        "dataset=synthetic",
        f"model={b.model}",
        f"method={cell.method}",
        f"dataset.num_classes={b.num_classes}",
        f"dataset.image_size={b.image_size}",
        f"dataset.build.n_train={steps * b.batch_size}",
        f"dataset.build.n_test={b.eval_batch_size}",
        f"dataset.build.eval_batch_size={b.eval_batch_size}",
        f"trainer.batch_size={b.batch_size}",
        f"trainer.epochs={1 + epochs}",
        f"trainer.device={device}",
        f"trainer.precision={cell.precision}",
        f"trainer.channels_last={str(cell.channels_last).lower()}",
        f"trainer.compile={str(cell.compile).lower()}",
        "trainer.progress=false",
        "trainer.resume=false",
        "trainer.deterministic=false",
        "logger=none",
        f"paths.output_dir={work}",
        "experiment_name=throughput",
    ]
    cfg = compose(overrides)
    validate(cfg)
    run_dir = work / "throughput" / "run"
    fit(cfg, run_dir)
    measured = read_metrics(run_dir / "metrics.jsonl")[1:]
    shutil.rmtree(run_dir)
    train = [m["train/images_per_s"] for m in measured]
    seen = steps * b.batch_size
    eval_s = [m["seconds"] - seen / m["train/images_per_s"] for m in measured]
    if not all(math.isfinite(m["train/loss"]) for m in measured):
        return {"status": "failed: non-finite loss"}
    return {
        "status": "ok",
        "train_images_per_s": sum(train) / len(train),
        "range": [min(train), max(train)],
        "eval_images_per_s": b.eval_batch_size * len(eval_s) / sum(eval_s),
        "steps_per_epoch": steps,
    }


def throughput(
    cells: list[Cell],
    work: Path,
    epochs: int,
    epoch_seconds: float,
    deadline: float,
    on_cell: Callable[[list[dict[str, Any]]], None],
    device: str = "cuda",
) -> list[dict[str, Any]]:
    """Measure ``cells`` in order until ``deadline`` (a ``time.perf_counter`` value); the rest are skipped."""
    steps: dict[str, int] = {}
    cost: dict[tuple[str, bool], float] = {}  # last wall seconds of a cell of this backbone, eager or compiled
    out = []
    for i, cell in enumerate(cells, start=1):
        b = cell.backbone
        record = {
            "model": b.model,
            "image_size": b.image_size,
            "num_classes": b.num_classes,
            "batch_size": b.batch_size,
            "method": cell.method,
            "precision": cell.precision,
            "channels_last": cell.channels_last,
            "compile": cell.compile,
        }
        guess = cost.get((b.model, cell.compile), cost.get((b.model, False), 20.0) + (60.0 if cell.compile else 0))
        if time.perf_counter() + guess > deadline:
            record["status"] = "skipped (time budget)"
            out.append(record)
            continue
        start = time.perf_counter()
        try:
            record.update(measure(cell, steps.get(b.model, 20), epochs, work, device))
        except torch.cuda.OutOfMemoryError:
            record["status"] = "failed: out of GPU memory"
        except Exception as e:  # a backbone or mode that fails here must not stop the other measurements
            record["status"] = f"failed: {type(e).__name__}: {_one_line(str(e), 160)}"
        finally:
            if cell.compile:
                torch._dynamo.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        cost[(b.model, cell.compile)] = time.perf_counter() - start
        if record["status"] == "ok" and b.model not in steps:  # the first cell (fp32) sets the epoch's length
            per_epoch = epoch_seconds * record["train_images_per_s"] / b.batch_size
            steps[b.model] = max(10, min(500, round(per_epoch)))
        out.append(record)
        rate = f"{record['train_images_per_s']:,.0f} images/s" if record["status"] == "ok" else record["status"]
        say(f"[{i}/{len(cells)}] {b.model} {cell.method} {setting_label(record)}: {rate}")
        on_cell(out)
    return out


def flops_per_image(backbones: list[Backbone], device: torch.device) -> dict[str, float]:
    out = {}
    for b in backbones:
        try:
            cfg = compose([f"model={b.model}", f"dataset.num_classes={b.num_classes}"])
            model = instantiate(cfg.model)
            out[b.model] = training_flops_per_image(model, b.image_size, b.num_classes, device=device)
        except Exception as e:  # e.g. timm missing for resnet50: that row has no fraction of peak
            say(f"FLOPs of {b.model} not counted: {type(e).__name__}: {_one_line(str(e), 120)}")
    return out


# --- 5. predictions, and the report ------------------------------------------------------------


def table_plans() -> tuple[list, list[str]]:
    """The recipes of every experiment that trains on a GPU, and a line for each one left out."""
    recipes, skipped = [], []
    for path in sorted(Path(CONFIG_DIR, "experiment").glob("*.yaml")):
        device = str(compose([f"experiment={path.stem}"]).trainer.device)
        if device == "cpu":
            skipped.append(f"{path.stem} (trains on the CPU: trainer.device=cpu)")
            continue
        recipes += table_recipes(path.stem)
    return recipes, skipped


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """``out_dir/<gpu>.json`` (the measurements) and ``.md`` (rendered from them); return the ``.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / slug(report["machine"]["gpu"])
    report["predictions"] = predict(report["recipe_objects"], report["throughput"], METHODS[0])
    plain = {k: v for k, v in report.items() if k != "recipe_objects"}
    base.with_suffix(".json").write_text(json.dumps(plain, indent=1) + "\n")
    base.with_suffix(".md").write_text(render(plain))
    return base.with_suffix(".md")


def exit_status(report: dict[str, Any]) -> int:
    """1 when a GPU test or an end-to-end run failed or could not run (no pytest), else 0; skipped tests count
    as neither (their reasons are in the summary)."""
    failed = report["tests"]["summary"].startswith("FAILED") or any(e["status"] != "ok" for e in report["end_to_end"])
    return 1 if failed else 0


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The check; ``started`` is the ``time.perf_counter()`` at which the launcher began (the budget's clock)."""
    parser = argparse.ArgumentParser(
        prog="python -m alr.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu", help="folder for <gpu>.md and .json")
    promise = 60.0 * PROMISE_MINUTES
    help_budget = f"seconds for the whole check (default {promise:.0f}); beyond steps 1-3 it goes to the throughput"
    parser.add_argument("--budget", type=float, default=promise, help=help_budget)
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs per throughput cell (after 1 warm-up)")
    parser.add_argument("--epoch-seconds", type=float, default=0.5, help="length of a measured fp32 epoch")
    parser.add_argument("--models", default=",".join(b.model for b in BACKBONES), help="backbones to time")
    parser.add_argument("--skip-tests", action="store_true", help="skip step 2 (pytest -m gpu)")
    args = parser.parse_args(argv)
    start = time.perf_counter() if started is None else started
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(
            f"error: no CUDA device is visible (torch {torch.__version__}, {built}): the GPU check needs one. "
            "Run it on a GPU node (make gpu-check); docs/gpu-check.md says how.",
            file=sys.stderr,
        )
        return 1
    device = torch.device("cuda")
    models = args.models.split(",")
    backbones = [b for b in BACKBONES if b.model in models]
    if len(backbones) != len(models):
        print(f"error: --models takes some of {', '.join(b.model for b in BACKBONES)}", file=sys.stderr)
        return 2
    command = "python -m alr.gpu_check" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    info = machine(device)
    precisions = [p for p in PRECISIONS if p != "bf16" or info["bf16"]]
    recipes, skipped = table_plans()
    report: dict[str, Any] = {
        "command": command.rstrip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": 0.0,
        "machine": info,
        "optional": optional_parts(),
        "tests": {"summary": "not run yet", "failures": [], "checks": []},
        "end_to_end": [],
        "methods": {m: str(compose([f"method={m}"]).method.label) for m in METHODS},  # name -> label
        "throughput": [],
        "flops_per_image": {},
        "recipes": [asdict(r) for r in recipes],
        "recipe_objects": recipes,
        "skipped_experiments": skipped,
        "settings": {
            "budget_s": args.budget,
            "step_budgets_s": STEP_BUDGET_S,
            "epochs": args.epochs,
            "epoch_seconds": args.epoch_seconds,
        },
        "steps_s": {},  # seconds each step took, as the budget was spent
    }

    def save() -> Path:
        report["elapsed_s"] = time.perf_counter() - start
        return write_report(report, args.out)

    say(f"{info['gpu']}, {info['memory_gib']:.0f} GiB, driver {info['driver']}, CUDA {info['cuda']}")
    shares = ", ".join(f"{step} {seconds} s" for step, seconds in STEP_BUDGET_S.items())
    say(f"time budget {args.budget:.0f} s: {shares} (the throughput gets what the steps before it leave)")
    for label, state in report["optional"].items():
        say(f"{label}: {state}")
    save()
    steps_s = report["steps_s"]
    mark = time.perf_counter()
    steps_s["machine"] = mark - start
    if args.skip_tests:
        checks = [
            {"check": label, "test": test, "result": "not run (--skip-tests)"} for test, label in NAMED_CHECKS.items()
        ]
        report["tests"] = {"summary": "skipped (--skip-tests)", "failures": [], "skips": [], "checks": checks}
    else:
        say("running pytest -m gpu ...")
        report["tests"] = gpu_tests(timeout=STEP_BUDGET_S["tests"])
    say(f"gpu tests: {report['tests']['summary']}")
    for check in report["tests"]["checks"]:
        say(f"  {check['check']}: {check['result']}")
    steps_s["tests"], mark = time.perf_counter() - mark, time.perf_counter()
    save()
    with tempfile.TemporaryDirectory(prefix="alr-gpu-check-") as tmp:
        report["end_to_end"] = end_to_end(Path(tmp) / "e2e", precisions, epochs=3, seconds=STEP_BUDGET_S["end_to_end"])
        steps_s["end_to_end"], mark = time.perf_counter() - mark, time.perf_counter()  # step 4: FLOPs, then cells
        save()
        report["flops_per_image"] = flops_per_image(backbones, device)
        # What the steps before took comes out of the throughput's share, never out of the budget.
        share = throughput_seconds(args.budget, time.perf_counter() - start)
        deadline = time.perf_counter() + share
        cells = plan(backbones, precisions)
        say(f"timing up to {len(cells)} throughput cells, {share:.0f} s left in the budget")

        def progress(done: list[dict[str, Any]]) -> None:
            report["throughput"] = done
            steps_s["throughput"] = time.perf_counter() - mark
            save()

        report["throughput"] = throughput(cells, Path(tmp), args.epochs, args.epoch_seconds, deadline, progress)
        steps_s["throughput"] = time.perf_counter() - mark
    md = save()
    ok = sum(c["status"] == "ok" for c in report["throughput"])
    skipped = sum(c["status"].startswith("skipped") for c in report["throughput"])
    say(f"{ok} of {len(report['throughput'])} throughput cells measured, {skipped} skipped by the time budget")
    for model, cell in fastest_settings(report["throughput"], METHODS[0]).items():
        extra = overhead(report["throughput"], cell, METHODS[1], METHODS[0])
        alr_text = f"ALR-S {extra:+.1f} % per image" if extra is not None else "ALR-S not measured there"
        say(f"fastest {model}: {setting_label(cell)}, {cell['train_images_per_s']:,.0f} images/s ({alr_text})")
    for name, p in report["predictions"].items():
        hours = [f"{p[k]['hours']:,.1f}" if p[k]["hours"] else "not measured" for k in ("configured", "fastest")]
        partial = " (some cells not measured: see the report)" if p["configured"]["missing"] else ""
        say(
            f"{name}: {p['runs']} runs, GPU-hours {hours[0]} as configured, {hours[1]} at the fastest settings{partial}"
        )
    say(f"report: {md} and {md.with_suffix('.json')}")
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
