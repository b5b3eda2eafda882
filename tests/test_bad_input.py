"""Bad input: each case stops with one message naming the file or key and what to do, and overwrites nothing."""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import alr.checkpoint
from alr.config_check import ConfigError, validate
from alr.errors import CheckpointError, DiskFullError, RunError
from alr.trainer import fit
from conftest import compose, run_train
from test_cifar_data import write_cifar

FAST = ["debug=fast", "trainer.batch_size=32"]


def fit_in(run_dir: Path, *overrides: str) -> dict:
    """The trainer in this process (the entry point's own errors are tested by the CLI cases below)."""
    return fit(compose(*FAST, *overrides), run_dir)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _nondeterministic_after():
    yield
    torch.use_deterministic_algorithms(False)  # debug=fast turns it on for the whole process


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch baseline run: the earlier output the cases must leave intact."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    fit_in(run_dir, "method=baseline", "trainer.epochs=1")
    return run_dir


@pytest.fixture
def stopped(tmp_path, finished) -> Path:
    """The same run folder as a crash leaves it: ``result.json`` still says running."""
    run_dir = shutil.copytree(finished, tmp_path / "run")
    (run_dir / "result.json").write_text(json.dumps({"status": "running"}))
    return run_dir


def refused(run_dir: Path, error: type[Exception], *overrides: str) -> str:
    """Run into ``run_dir``, expect ``error``, check no file changed there; return the message."""
    before = files(run_dir) if run_dir.exists() else {}
    with pytest.raises(error) as caught:
        fit_in(run_dir, *overrides)
    after = files(run_dir) if run_dir.exists() else {}
    assert after == before, "a refused run changed its folder"
    return str(caught.value)


def test_rerun_of_a_finished_run_is_skipped_and_changes_nothing(finished):
    before = files(finished)
    assert fit_in(finished, "method=baseline", "trainer.epochs=1")["status"] == "finished"
    assert files(finished) == before


def test_stale_temporary_files_are_removed_when_a_run_resumes(stopped):
    stale = stopped / ".last.pt.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert fit_in(stopped, "method=baseline", "trainer.epochs=1")["status"] == "finished"
    assert not stale.exists()
    assert (stopped / "last.pt").stat().st_mode & 0o044, "written private to its writer"


# --- data --------------------------------------------------------------------------------------


def test_missing_data_set(tmp_path):
    msg = refused(tmp_path / "run", RunError, "dataset=cifar10", f"dataset.data_dir={tmp_path / 'nowhere'}")
    assert f"no folder {tmp_path / 'nowhere' / 'cifar-10-batches-py'}" in msg and "dataset.download=true" in msg


def test_incomplete_data_set(tmp_path):
    write_cifar(tmp_path / "data", "cifar10")
    missing = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_4"
    missing.unlink()
    msg = refused(tmp_path / "run", RunError, "dataset=cifar10", f"dataset.data_dir={tmp_path / 'data'}")
    assert f"missing file {missing}" in msg and "dataset.data_dir" in msg


def test_labels_out_of_range(tmp_path):
    write_cifar(tmp_path / "data", "cifar10")
    path = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes())
    batch[b"labels"][0] = 12
    path.write_bytes(pickle.dumps(batch))
    msg = refused(tmp_path / "run", RunError, "dataset=cifar10", f"dataset.data_dir={tmp_path / 'data'}")
    assert str(path) in msg and re.search(r"labels span \[\d+, 12\], outside \[0, 10\)", msg)


def test_class_count_that_disagrees_with_the_data(tmp_path):
    write_cifar(tmp_path / "data", "cifar10")
    overrides = ["dataset=cifar10", f"dataset.data_dir={tmp_path / 'data'}", "dataset.num_classes=100"]
    msg = refused(tmp_path / "run", RunError, *overrides)
    assert "'dataset.num_classes' is 100 but the cifar10 data has 10 classes" in msg
    assert "Remove the override" in msg


# --- checkpoints and run folders ----------------------------------------------------------------


def test_truncated_checkpoint(stopped):
    ckpt = stopped / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    msg = refused(stopped, CheckpointError, "method=baseline", "trainer.epochs=1")
    assert f"{ckpt} is not a readable checkpoint" in msg and "truncated" in msg and "trainer.resume=false" in msg


def test_foreign_checkpoint_a_dict_of_tensors(stopped):
    torch.save({"state_dict": {"w": torch.ones(3)}}, stopped / "last.pt")
    msg = refused(stopped, CheckpointError, "method=baseline", "trainer.epochs=1")
    assert "is not a checkpoint of this suite (missing model, method" in msg and "trainer.resume=false" in msg


def test_foreign_checkpoint_not_a_torch_file(stopped):
    (stopped / "last.pt").write_text("these are not the weights you are looking for\n")
    msg = refused(stopped, CheckpointError, "method=baseline", "trainer.epochs=1")
    assert f"{stopped / 'last.pt'} is not a readable checkpoint" in msg


def test_checkpoint_from_another_version_of_the_suite(stopped):
    ckpt = torch.load(stopped / "last.pt", weights_only=True)
    ckpt["config"]["config_version"], ckpt["alr_version"] = 0, "0.0.1"
    torch.save(ckpt, stopped / "last.pt")
    msg = refused(stopped, CheckpointError, "method=baseline", "trainer.epochs=1")
    assert "written by alr 0.0.1 with config version 0; this suite reads version 1" in msg
    assert "start fresh in another folder" in msg


def test_checkpoint_of_another_model(stopped):
    ckpt = torch.load(stopped / "last.pt", weights_only=True)
    ckpt["model"] = {k: v[..., :1] if v.dim() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, stopped / "last.pt")
    msg = refused(stopped, CheckpointError, "method=baseline", "trainer.epochs=1")
    assert "does not fit this run's model" in msg and "size mismatch" in msg


def test_run_folder_config_from_another_version_of_the_suite(stopped):
    saved = yaml.safe_load((stopped / "config.yaml").read_text())
    saved["config_version"] = 0
    (stopped / "config.yaml").write_text(yaml.safe_dump(saved))
    msg = refused(stopped, RunError, "method=baseline", "trainer.epochs=1")
    assert f"{stopped / 'config.yaml'} is config version 0" in msg and "another version of the suite" in msg


def test_command_config_from_another_version_of_the_suite():
    with pytest.raises(ConfigError, match=r"config key 'config_version'.*Recompose the run"):
        validate(compose("config_version=0"))


@pytest.mark.parametrize("finished_run", [False, True], ids=["stopped", "finished"])
def test_run_folder_of_another_config(finished, stopped, finished_run: bool):
    run_dir = finished if finished_run else stopped
    msg = refused(run_dir, RunError, "method=baseline", "trainer.epochs=1", "optim.optimizer.lr=0.05", "seed=0")
    assert f"{run_dir} holds a run of another config: optim.optimizer.lr (0.1 -> 0.05)." in msg
    assert "trainer.resume=false" in msg and "hydra.run.dir" in msg


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    msg = refused(blocker / "run", RunError, "method=baseline")
    assert f"cannot write the run folder {blocker / 'run'}" in msg and "paths.output_dir" in msg
    assert blocker.read_text() == "not a folder\n"


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_dir, saved = tmp_path / "run", {}
    real_save = torch.save

    def save_until_the_disk_fills(state, f):
        if state["epoch"] == 2:  # the second checkpoint: half written, then ENOSPC
            saved["before"] = (run_dir / "last.pt").read_bytes()
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, f)

    monkeypatch.setattr(alr.checkpoint.torch, "save", save_until_the_disk_fills)
    with pytest.raises(DiskFullError) as caught:
        fit_in(run_dir, "method=alr")
    msg = str(caught.value)
    assert f"disk full while writing {run_dir / 'last.pt'}" in msg and "the previous last.pt is intact" in msg
    assert "Free some space" in msg and "rerun the same command to resume" in msg
    assert (run_dir / "last.pt").read_bytes() == saved["before"]
    assert not list(run_dir.glob(".last.pt.*")), "the temporary file was left behind"

    monkeypatch.setattr(alr.checkpoint.torch, "save", real_save)
    assert fit_in(run_dir, "method=alr")["status"] == "finished"  # the space is back: it resumes
    assert [json.loads(s)["epoch"] for s in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# --- the KD teacher ------------------------------------------------------------------------------


def test_teacher_run_that_does_not_exist(tmp_path):
    msg = refused(tmp_path / "run", RunError, "method=kd", f"method.teacher_run={tmp_path / 'no-teacher'}")
    assert f"'method.teacher_run': no run folder at {tmp_path / 'no-teacher'}" in msg
    assert "Train the teacher first" in msg


def test_teacher_run_that_has_not_finished(tmp_path, stopped):
    msg = refused(tmp_path / "student", RunError, "method=kd", f"method.teacher_run={stopped}")
    assert f"the teacher run {stopped} has not finished (status 'running'" in msg and "rerunning its command" in msg


def test_teacher_of_another_class_count(tmp_path, stopped):
    (stopped / "result.json").write_text(json.dumps({"status": "finished"}))
    saved = yaml.safe_load((stopped / "config.yaml").read_text())
    saved["dataset"].update(name="cifar100", num_classes=100)
    (stopped / "config.yaml").write_text(yaml.safe_dump(saved))
    msg = refused(tmp_path / "student", RunError, "method=kd", f"method.teacher_run={stopped}")
    assert "was trained on cifar100 with 100 classes, this run is digits with 10" in msg


def test_teacher_with_a_truncated_checkpoint(tmp_path, stopped):
    (stopped / "result.json").write_text(json.dumps({"status": "finished"}))
    (stopped / "last.pt").write_bytes(b"PK\x03\x04")
    msg = refused(tmp_path / "student", CheckpointError, "method=kd", f"method.teacher_run={stopped}")
    assert f"{stopped / 'last.pt'} is not a readable checkpoint" in msg


# --- the entry point: one line, no traceback, non-zero exit ------------------------------------


def test_cli_unknown_config_option(tmp_path):
    proc = run_train("trainer.epoch=3", *FAST, out=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not override 'trainer.epoch'" in proc.stderr and "Key 'epoch' is not in struct" in proc.stderr
    assert not tmp_path.exists() or not list(tmp_path.rglob("*.pt"))


def test_cli_run_error_is_one_line_and_writes_nothing(tmp_path):
    teacher = tmp_path / "no-teacher"
    proc = run_train("method=kd", f"method.teacher_run={teacher}", *FAST, out=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and str(teacher) in errors[0]
    hydra_own = {".hydra", "train.log"}  # Hydra's record of each invocation, written before the task runs
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not hydra_own & set(p.parts)]


def test_cli_unwritable_output_folder(tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = run_train(*FAST, out=tmp_path / "a-file", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    run_dir = tmp_path / "a-file" / "default" / "digits-digits_cnn-alr-s0"
    assert proc.stderr.strip() == f"error: cannot write the run folder {run_dir} (Not a directory). " + (
        "Point paths.output_dir (or hydra.run.dir) at a folder you can write to."
    )
