"""Shared test helpers: no network, no GPU, W&B offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def pytest_collection_modifyitems(config, items):
    import torch

    # The end-to-end runs first: pytest-xdist hands them out in turn (make test: --maxschedchunk=1), and the
    # short tests fill in around them (started last, one would run alone at the end). A stable sort.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def run_train(
    *overrides: str, out: Path, multirun: bool = False, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real entry point ``python -m alr.train`` in a subprocess, writing runs under ``out``.

    ``env`` adds environment variables (``ALR_FAULT``, see ``tests/faults.py``, which is importable there).
    """
    cmd = [sys.executable, "-m", "alr.train", *(["-m"] if multirun else []), f"paths.output_dir={out}", *overrides]
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900
    )  # a hang, not a slow machine
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def compose(*overrides: str):
    """Compose ``configs/train.yaml`` as the entry point would, with Hydra's runtime values set."""
    from alr.config import compose as compose_config

    return compose_config(overrides)
