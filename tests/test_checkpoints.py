"""What a checkpoint may hold and where it is read to: data only, to the CPU, RNG states that restore anywhere."""

from __future__ import annotations

import gc
import os
import random
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from alr import trainer
from alr.checkpoint import load_checkpoint
from alr.errors import CheckpointError
from conftest import compose, run_train
from faults import faulty

FAST = ["debug=fast", "trainer.batch_size=32", "method=alr", *faulty("alr.ALRLoss")]


class _MakesAFolder:
    """Unpickling it calls ``os.mkdir``: a stand-in for any code a shared checkpoint could carry."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return (os.mkdir, (str(self.folder),))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run folder whose last.pt was written mid-epoch (SIGTERM at step 2 of epoch 1)."""
    out = tmp_path_factory.mktemp("stopped")
    proc = run_train(*FAST, out=out, check=False, env={"ALR_FAULT": "term@1:1"})
    run_dir = out / "default" / "digits-digits_cnn-alr-s0"
    assert (run_dir / "last.pt").exists(), proc.stderr
    return run_dir


def test_every_part_of_a_checkpoint_loads_as_data(stopped: Path):
    ckpt = torch.load(stopped / "last.pt", map_location="cpu", weights_only=True)  # raises on any other object
    assert ckpt["step"] == 2 and isinstance(ckpt["rng"], list) and isinstance(ckpt["partial"], list)


def test_a_checkpoint_carrying_a_callable_is_refused_and_nothing_runs(stopped: Path, tmp_path: Path):
    ckpt = torch.load(stopped / "last.pt", weights_only=True)
    marker = tmp_path / "the-checkpoint-ran-code"
    ckpt["model"]["extra"] = _MakesAFolder(marker)
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "last.pt")
    assert not marker.exists()
    message = str(e.value)
    assert "\n" not in message and "mkdir" in message and "could run code" in message


def test_a_checkpoint_of_alr_0_1_0_with_numpy_arrays_still_loads(stopped: Path, tmp_path: Path):
    """Older checkpoints hold numpy's RNG state as numpy's own tuple (an array inside) and CUDA states as a list."""
    ckpt = torch.load(stopped / "last.pt", weights_only=True)
    np.random.seed(7)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": []}
    ckpt["rng"], ckpt["partial"] = old, ckpt["partial"][0]
    torch.save(ckpt, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    expected = np.random.random(3)
    np.random.seed(0)
    trainer.set_rng_state(loaded["rng"], torch.device("cpu"), tmp_path / "last.pt")
    assert np.array_equal(np.random.random(3), expected)


def test_rng_states_restore_from_a_data_only_checkpoint(tmp_path: Path):
    torch.save(trainer.rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    draws = (random.random(), np.random.random(), torch.rand(2))
    trainer.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"), tmp_path)
    again = (random.random(), np.random.random(), torch.rand(2))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_an_rng_state_on_another_device_is_a_one_line_checkpoint_error(stopped: Path):
    """What a checkpoint loaded to its training device would hand torch.set_rng_state (a TypeError before)."""
    ckpt = torch.load(stopped / "last.pt", map_location="meta", weights_only=True)
    with pytest.raises(CheckpointError) as e:
        trainer.set_rng_state(ckpt["rng"][0], torch.device("cpu"), stopped / "last.pt")
    assert "\n" not in str(e.value) and "numpy RNG state is a torch.int64 tensor on meta" in str(e.value)


class _Stop(BaseException):  # not an Exception: load_checkpoint would wrap it
    pass


def test_resume_reads_the_checkpoint_to_the_cpu_whatever_the_training_device(stopped: Path, monkeypatch):
    """The run's device is set to a GPU after set-up (none is needed: the load is stopped as it starts)."""
    cfg = compose(*FAST, f"paths.output_dir={stopped.parents[1]}")
    build = trainer.Parts.__init__

    def on_a_gpu(self, cfg, world) -> None:
        build(self, cfg, world)
        self.device = torch.device("cuda", 3)

    targets = []

    def spy(path, *args, map_location=None, **kwargs):
        targets.append(map_location)
        raise _Stop

    monkeypatch.setattr(trainer.Parts, "__init__", on_a_gpu)
    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(_Stop):
        trainer.fit(cfg, stopped)
    assert targets == ["cpu"]


def test_a_mid_epoch_checkpoint_of_alr_0_1_0_resumes_to_the_end(stopped: Path, tmp_path: Path):
    """alr 0.1.0 saved one RNG state (rank 0's, numpy's as its own tuple) and the epoch's sums over all ranks."""
    run_dir = tmp_path / stopped.name
    shutil.copytree(stopped, run_dir)
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    ckpt["rng"], ckpt["partial"] = old_rng, ckpt["partial"][0]
    ckpt.pop("world_size")
    torch.save(ckpt, run_dir / "last.pt")
    result = trainer.fit(compose(*FAST, f"paths.output_dir={tmp_path}"), run_dir)
    assert result["status"] == "finished" and [
        m["epoch"] for m in trainer.run_folder.read_metrics(run_dir / "metrics.jsonl")
    ] == [1, 2]


def test_the_loaded_checkpoint_is_freed_once_restored(stopped: Path, tmp_path: Path, monkeypatch):
    """Weights, optimizer state and every rank's partial sums are not kept in host memory for the whole run."""
    run_dir = tmp_path / stopped.name
    shutil.copytree(stopped, run_dir)

    class Tracked(dict):  # a dict that can be watched with a weak reference
        pass

    loaded: list[weakref.ref] = []

    def tracked_load(path: Path) -> Tracked:
        ckpt = Tracked(load_checkpoint(path))
        loaded.append(weakref.ref(ckpt))
        return ckpt

    alive_at_epoch_end: list[bool] = []
    write_epoch = trainer.write_epoch

    def spy(*args, **kwargs):
        gc.collect()
        alive_at_epoch_end.append(loaded[0]() is not None)
        return write_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "load_checkpoint", tracked_load)
    monkeypatch.setattr(trainer, "write_epoch", spy)
    assert trainer.fit(compose(*FAST, f"paths.output_dir={tmp_path}"), run_dir)["status"] == "finished"
    assert len(loaded) == 1 and alive_at_epoch_end == [False, False]
