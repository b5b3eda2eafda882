"""Resume is exact: a run stopped and resumed ends bit-identical to one trained straight through."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

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


def _alr(name: str, label: str | None = None, **criterion) -> dict:
    """A saved config's method node of ALR (``label``: its saved ``method.label``, absent before labels)."""
    node = {"_target_": "alr.ALRLoss", "num_classes": 10, **criterion}
    return {"method": {"name": name, **({"label": label} if label else {}), "module": {"criterion": node}}}


def test_alr_runs_saved_with_the_normalisation_booleans_read_as_the_form_they_hold():
    """class_mean and residual_mean became normalisation when eq. 4–5's average became method=alr's default: an
    old alr (or alr_s) without either boolean set is the summed form, alr_sum; an old alr_mean is today's alr."""
    from alr.run_folder import config_differences, upgrade_saved_config

    summed = _alr("alr", class_mean=False)  # before residual_mean and labels: the first ALR runs
    assert upgrade_saved_config(summed) == _alr("alr_sum", normalisation="sum")
    assert summed == _alr("alr", class_mean=False)  # the saved dict itself is left alone
    # A renamed run's saved label was its old config's: dropped, alr_s_sum's config names it now.
    assert upgrade_saved_config(_alr("alr_s", "ALR-S", residual_mean=False, class_mean=False)) == _alr(
        "alr_s_sum", normalisation="sum"
    )
    assert upgrade_saved_config(_alr("alr_mean", "ALR, averaged", residual_mean=True, class_mean=False)) == _alr(
        "alr", normalisation="mean"
    )
    assert upgrade_saved_config(_alr("alr_batch_acc", "ALR, batch accuracy", residual_mean=False)) == _alr(
        "alr_batch_acc", "ALR, batch accuracy (summed)", normalisation="sum"
    )
    assert upgrade_saved_config(_alr("alr", "ALR", class_mean=True)) == _alr("alr", "ALR", normalisation="class_mean")
    today = _alr("alr", "ALR", normalisation="mean")
    assert upgrade_saved_config(today) == today and upgrade_saved_config({"method": {"name": "baseline"}}) == {
        "method": {"name": "baseline"}
    }
    assert config_differences(summed, _alr("alr_sum", normalisation="sum")) == []
    assert config_differences(summed, _alr("alr", normalisation="mean")) == [
        "method.module.criterion.normalisation ('sum' -> 'mean')",
        "method.name ('alr_sum' -> 'alr')",
    ]


@pytest.fixture(scope="module")
def summed_alr_before_the_key(tmp_path_factory) -> Path:
    """A finished one-epoch ALR run folder as the suite wrote it when the summed form was method=alr: a run of
    today's alr_sum, its saved config put back in the old keys and name (result.json names the method too)."""
    from alr.trainer import fit
    from conftest import compose

    run_dir = tmp_path_factory.mktemp("old") / "digits-digits_cnn-alr-s0"
    fit(compose("method=alr_sum", *FAST, "trainer.epochs=1"), run_dir)
    torch.use_deterministic_algorithms(False)  # debug=fast turns it on for the whole process
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["run_name"], config["method"]["name"], config["method"]["label"] = run_dir.name, "alr", "ALR"
    criterion = config["method"]["module"]["criterion"]
    del criterion["normalisation"]
    criterion.update(class_mean=False, residual_mean=False)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = json.loads((run_dir / "result.json").read_text())
    (run_dir / "result.json").write_text(json.dumps({**result, "method": "alr"}))
    return run_dir


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "stopped"])
def test_method_alr_refuses_a_folder_holding_the_summed_form_in_one_line(summed_alr_before_the_key, tmp_path, finished):
    from alr.errors import RunFolderConflict
    from alr.trainer import fit
    from conftest import compose

    run_dir = shutil.copytree(summed_alr_before_the_key, tmp_path / summed_alr_before_the_key.name)
    if not finished:
        result = json.loads((run_dir / "result.json").read_text())
        (run_dir / "result.json").write_text(json.dumps({**result, "status": "running"}))
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    try:
        with pytest.raises(RunFolderConflict) as caught:
            fit(compose("method=alr", *FAST, "trainer.epochs=1"), run_dir)
    finally:
        torch.use_deterministic_algorithms(False)
    assert str(caught.value) == (
        f"{run_dir} holds ALR's summed form (method=alr before eq. 4–5's average became its default): "
        "rerun it as method=alr_sum, or move it."
    )
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_reports_read_an_alr_folder_from_before_the_key_as_the_summed_form(summed_alr_before_the_key):
    from alr.reporting.grid import method_labels, run_label
    from alr.reporting.runs import load_run
    from alr.reporting.tables import collect

    run = load_run(summed_alr_before_the_key)
    assert run.key == ("digits", "digits_cnn", "alr_sum") and run_label(run) == "ALR (summed)"
    assert run.config["method"]["module"]["criterion"]["normalisation"] == "sum"
    assert method_labels(None, [run]) == {"alr_sum": "ALR (summed)"}
    assert list(collect([run])) == [("digits", "digits_cnn", "alr_sum")]
    assert "label" not in run.config["method"]  # its saved "ALR" named the old config: alr_sum's config names it
