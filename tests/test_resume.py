"""Resume is exact: a run stopped and resumed ends bit-identical to one trained straight through."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from conftest import run_train
from faults import faulty

FAST = ["debug=fast", "trainer.batch_size=32"]
CRITERIA = {"baseline": "alr.methods.CrossEntropy", "alr": "alr.ALRLoss"}
TIMING = {"seconds", "train/images_per_s"}


def _run_dir(out: Path, method: str) -> Path:
    return out / "default" / f"digits-digits_cnn-{method}-s0"


def _metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING} for m in lines]


def _assert_same_state(a: dict, b: dict, where: str = "") -> None:
    """Every tensor equal (torch.equal), every other value equal, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_bit_identical(straight: Path, resumed: Path) -> None:
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    for key in ("model", "method", "optimizer", "scheduler", "scaler", "epoch", "step", "best"):
        _assert_same_state(a[key], b[key], key)
    assert _metrics(straight) == _metrics(resumed)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (straight, resumed))
    assert ra["status"] == rb["status"] == "finished"
    assert ra["final_test_acc"] == rb["final_test_acc"] and ra["best_epoch"] == rb["best_epoch"]


def _straight(out: Path, method: str) -> Path:
    """The reference: 2 epochs without interruption, through the same (disarmed) fault wrapper."""
    run_train(f"method={method}", *FAST, *faulty(CRITERIA[method]), out=out)
    return _run_dir(out, method)


def test_baseline_killed_after_epoch_1_then_resumed_is_bit_identical(tmp_path):
    straight = _straight(tmp_path / "straight", "baseline")
    out, overrides = tmp_path / "killed", ["method=baseline", *FAST, *faulty(CRITERIA["baseline"])]
    proc = run_train(*overrides, out=out, check=False, env={"ALR_FAULT": "kill@2:0"})
    assert proc.returncode == -signal.SIGKILL
    run_dir = _run_dir(out, "baseline")
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert [m["epoch"] for m in _metrics(run_dir)] == [1]

    proc = run_train(*overrides, out=out)
    assert "resuming" in proc.stdout and "after epoch 1" in proc.stdout
    assert [m["epoch"] for m in _metrics(run_dir)] == [1, 2]  # appended, no duplicate
    _assert_bit_identical(straight, run_dir)


@pytest.mark.slow
def test_alr_killed_after_epoch_1_then_stopped_mid_epoch_2_then_resumed_is_bit_identical(tmp_path):
    straight = _straight(tmp_path / "straight", "alr")
    out, overrides = tmp_path / "disturbed", ["method=alr", *FAST, *faulty(CRITERIA["alr"])]
    run_dir = _run_dir(out, "alr")
    proc = run_train(*overrides, out=out, check=False, env={"ALR_FAULT": "kill@2:0"})
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1

    # Resumed, then SIGTERM at step 2 of epoch 2 (the first epoch this process trains): the trainer
    # finishes the step, writes last.pt with the step and the epoch's running sums, and exits.
    proc = run_train(*overrides, out=out, check=False, env={"ALR_FAULT": "term@1:1"})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "stopped by SIGTERM after step 2 of epoch 2" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2) and ckpt["partial"][0]["seen"] == 64
    assert json.loads((run_dir / "result.json").read_text())["status"] == "running"
    assert [m["epoch"] for m in _metrics(run_dir)] == [1]

    proc = run_train(*overrides, out=out)
    assert "resuming" in proc.stdout and "after step 2 of epoch 2" in proc.stdout  # one count in both messages
    assert [m["epoch"] for m in _metrics(run_dir)] == [1, 2]
    _assert_bit_identical(straight, run_dir)


def test_a_run_folder_made_before_a_key_was_added_compares_as_its_old_value():
    """residual_mean came after the first ALR runs: their folders (without it) equal residual_mean=false."""
    from alr.run_folder import config_differences

    old = {"method": {"name": "alr", "module": {"criterion": {"class_mean": False}}}}
    assert (
        config_differences(
            old, {"method": {"name": "alr", "module": {"criterion": {"class_mean": False, "residual_mean": False}}}}
        )
        == []
    )
    assert config_differences(
        old, {"method": {"name": "alr", "module": {"criterion": {"class_mean": False, "residual_mean": True}}}}
    ) == ["method.module.criterion.residual_mean (False -> True)"]
