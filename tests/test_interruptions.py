"""Crashes, pre-emption and divergence: nothing is lost, a rerun picks up where the run stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra.utils import instantiate

from alr.checkpoint import stale_temporaries
from alr.preempt import Interrupted
from alr.reporting.runs import load_runs
from alr.reporting.tables import collect, format_acc
from conftest import ROOT, compose, run_train
from faults import faulty

FAST = ["debug=fast", "trainer.batch_size=32"]
ALR = ["method=alr", *FAST, *faulty("alr.ALRLoss")]

WRITER = """
import sys, torch
from alr.checkpoint import save_checkpoint
path = sys.argv[1]
for version in range(1, 1000):
    save_checkpoint({"version": version, "data": torch.full((8_000_000,), float(version))}, path)
    print(version, flush=True)
"""


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    cmd = [sys.executable, "-c", WRITER, str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT / "src")})
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
        deadline = time.monotonic() + 60
        while not stale_temporaries(path):  # the next one is being written
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    done = [int(v) for v in ["1", *proc.stdout.read().split()]]
    ckpt = torch.load(path, weights_only=True)  # still loads: the half-written file is elsewhere
    assert ckpt["version"] in (done[-1], done[-1] + 1)  # the last complete save (or one renamed just now)
    assert torch.equal(ckpt["data"], torch.full((8_000_000,), float(ckpt["version"])))
    assert all(p.name.startswith(".last.pt.") and p.suffix == ".tmp" for p in stale_temporaries(path))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["last.pt"]


def test_interrupted_hands_the_signal_over_to_the_handler_it_displaced():
    calls = []
    with pytest.raises(SystemExit) as caught:
        Interrupted(signal.SIGUSR2, "epoch 1", lambda signum, frame: calls.append(signum)).hand_over()
    assert calls == [signal.SIGUSR2] and caught.value.code == 128 + signal.SIGUSR2
    with pytest.raises(SystemExit) as caught:
        Interrupted(signal.SIGTERM, "epoch 1", signal.SIG_DFL).hand_over()
    assert caught.value.code == 128 + signal.SIGTERM


def test_submitit_preemption_checkpoints_requeues_and_resumes(tmp_path):
    """Hydra's submitit launcher (local executor): USR2 mid-epoch, checkpoint, requeue, resume, finish."""
    once = tmp_path / "signalled"
    run_train(
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        *ALR,
        out=tmp_path,
        multirun=True,
        env={"ALR_FAULT": "usr2@2:1", "ALR_FAULT_ONCE": str(once)},
    )
    assert once.exists()
    run_dir = tmp_path / "default" / "digits-digits_cnn-alr-s0"
    text = "".join(p.read_text() for p in sorted((tmp_path / "default" / ".submitit").glob("*/*_log.*")))
    assert "stopped by SIGUSR2 after step 2 of epoch 2 (checkpoint written)" in text
    assert "Requeued job" in text and "resuming" in text and "after step 2 of epoch 2" in text
    assert json.loads((run_dir / "result.json").read_text())["status"] == "finished"
    assert [json.loads(s)["epoch"] for s in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_divergence_stops_the_run_keeps_the_last_good_checkpoint_and_the_sweep_goes_on(tmp_path):
    env = {"ALR_FAULT": "nan@2:1", "ALR_FAULT_ONCE": str(tmp_path / "diverged")}  # the first job only
    proc = run_train(*ALR, "seed=0,1", out=tmp_path, multirun=True, env=env)  # exit 0: the sweep went on
    bad = tmp_path / "default" / "digits-digits_cnn-alr-s0"
    assert f"error: {bad}: non-finite loss at epoch 2, step 2 (loss=nan)" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads((bad / "result.json").read_text())
    assert result["status"] == "failed" and "epoch 2, step 2" in result["error"]
    ckpt = torch.load(bad / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)  # nothing from the diverged epoch was saved
    assert [json.loads(s)["epoch"] for s in (bad / "metrics.jsonl").read_text().splitlines()] == [1]

    runs = {r.seed: r for r in load_runs(tmp_path / "default")}
    assert runs[0].status == "failed" and runs[1].status == "finished"
    (cell,) = collect(list(runs.values())).values()
    assert format_acc(cell).endswith("(1 failed)")
    (only_failed,) = collect([runs[0]]).values()
    assert format_acc(only_failed) == "failed (1)"


def test_slurm_launcher_config_requeues_on_timeout_and_is_checkpointable():
    import submitit
    from hydra.core.hydra_config import HydraConfig

    compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    conf = HydraConfig.get().launcher
    assert conf._target_.endswith("SlurmLauncher") and conf.partition == "gpu"
    assert conf.max_num_timeout > 0 and 60 <= conf.signal_delay_s < conf.timeout_min * 60
    launcher = instantiate(conf, submitit_folder="submitit", name="alr")  # both interpolate hydra.*
    # submitit's USR2 handler calls this, pickles the result and requeues it: the same task, run again.
    delayed = launcher.checkpoint(["seed=1"], "hydra.sweep.dir", 0, "job_id_for_0", {})
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is launcher
    assert delayed.args[0] == ["seed=1"]


def test_a_single_diverged_run_exits_1_with_the_step_and_terms(tmp_path):
    proc = run_train("method=alr", *FAST, "optim.optimizer.lr=1e20", out=tmp_path, check=False)
    run_dir = tmp_path / "default" / "digits-digits_cnn-alr-s0"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
    assert line.startswith(f"error: {run_dir}: non-finite loss at epoch 1, step ") and "L_hard=" in line
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"
    assert not (run_dir / "last.pt").exists()  # it diverged in the first epoch: there is no good state
