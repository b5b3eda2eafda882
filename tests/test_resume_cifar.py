"""Resuming CIFAR runs as the docs tell users to: data moved, download and workers changed, singly and in a sweep.

The CIFAR configs copy ``dataset.{data_dir,download,num_workers}`` into ``dataset.build`` by interpolation;
those copies may change with the keys they copy, while a key that matters is still refused.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from alr.data.samples import write_cifar
from conftest import run_train
from faults import faulty

# One smoke-sized Table 1 cell; the fault wrapper is disarmed unless ALR_FAULT is set.
CELL = ["experiment=table1", "debug=smoke", "dataset=cifar10", "model=preact_resnet18", "method=alr"]
COMMON = [*CELL, *faulty("alr.ALRLoss")]


def _run_dir(out: Path, seed: int) -> Path:
    return out / "table1" / f"cifar10-preact_resnet18-alr-s{seed}"


def _status(out: Path, seed: int) -> str:
    return json.loads((_run_dir(out, seed) / "result.json").read_text())["status"]


def _first_runs(tmp_path: Path, interrupted: list[int]) -> tuple[Path, Path]:
    """Seed 0 finished and ``interrupted`` seeds stopped after their first step, as `make reproduce-table1
    ARGS=dataset.download=true` leaves them (their config says download=true); then the data moves."""
    data, out = tmp_path / "data", tmp_path / "runs"
    write_cifar(data, "cifar10")
    run_train(*COMMON, "seed=0", f"dataset.data_dir={data}", out=out)
    for seed in interrupted:
        proc = run_train(
            *COMMON, f"seed={seed}", f"dataset.data_dir={data}", out=out, check=False, env={"ALR_FAULT": "term@1:0"}
        )
        assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
        assert "stopped by SIGTERM after step 1 of epoch 1" in proc.stderr
    for seed in [0, *interrupted]:  # the first command downloaded (sample files cannot be: they fail the checksum)
        path = _run_dir(out, seed) / "config.yaml"
        cfg = yaml.safe_load(path.read_text())
        cfg["dataset"]["download"] = cfg["dataset"]["build"]["download"] = True
        path.write_text(yaml.safe_dump(cfg))
    moved = tmp_path / "moved"
    data.rename(moved)
    return out, moved


@pytest.mark.slow
def test_runs_resume_singly_with_the_data_moved_and_loader_keys_changed(tmp_path):
    out, data = _first_runs(tmp_path, interrupted=[1])
    proc = run_train(*COMMON, "seed=1", f"dataset.data_dir={data}", "dataset.num_workers=2", out=out)
    assert "resuming" in proc.stdout and "after step 1 of epoch 1" in proc.stdout
    assert _status(out, 1) == "finished"
    # A finished run is skipped whatever download and num_workers say now, wherever the data went.
    proc = run_train(*COMMON, "seed=0", f"dataset.data_dir={data}", "dataset.download=true", out=out)
    assert "has finished already: skipping" in proc.stdout
    proc = run_train(*COMMON, "seed=0", "dataset.num_workers=1", out=out, env={"ALR_DATA_DIR": str(data)})
    assert "has finished already: skipping" in proc.stdout

    # A key that matters is still refused, and nothing in the folder changes.
    before = {p.name: p.read_bytes() for p in _run_dir(out, 1).iterdir() if p.is_file()}
    proc = run_train(
        *COMMON, "seed=1", f"dataset.data_dir={data}", "dataset.build.eval_batch_size=4", out=out, check=False
    )
    assert proc.returncode == 1
    assert "holds a run of another config: dataset.build.eval_batch_size (2 -> 4)" in proc.stderr
    assert "data_dir" not in proc.stderr and "download" not in proc.stderr and "num_workers" not in proc.stderr
    assert before == {p.name: p.read_bytes() for p in _run_dir(out, 1).iterdir() if p.is_file()}


@pytest.mark.slow
def test_a_sweep_resumes_past_changed_loader_keys_and_goes_on_past_a_refused_folder(tmp_path):
    out, data = _first_runs(tmp_path, interrupted=[1])
    proc = run_train("seed=0,1", *COMMON, f"dataset.data_dir={data}", "dataset.num_workers=2", out=out, multirun=True)
    assert "has finished already: skipping" in proc.stdout and "after step 1 of epoch 1" in proc.stdout
    assert _status(out, 0) == _status(out, 1) == "finished"

    # eval_batch_size matters: seed 0's folder is refused, seed 2 (new) still trains, then the sweep exits 1.
    proc = run_train(
        "seed=0,2",
        *COMMON,
        f"dataset.data_dir={data}",
        "dataset.build.eval_batch_size=4",
        out=out,
        multirun=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert _status(out, 2) == "finished"
    assert "error: 1 run(s) of this sweep were refused, the others went on:" in proc.stderr
    assert f"{_run_dir(out, 0)} holds a run of another config: dataset.build.eval_batch_size" in proc.stderr


def test_copies_of_resumable_keys_are_found_from_the_interpolations():
    from alr.run_folder import resumable_keys
    from conftest import compose

    keys = resumable_keys(compose("dataset=cifar100", "model=resnet32", "method=kd"))
    copies = {f"dataset.build.{k}" for k in ("data_dir", "download", "num_workers", "download_timeout_s")}
    assert copies | {"method.teacher_run", "method.module.teacher_run"} <= keys
    assert not {"dataset.build.eval_batch_size", "dataset.build.loader", "dataset.build.name", "model_name"} & keys
