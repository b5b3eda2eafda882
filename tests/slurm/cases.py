"""``make test-slurm``: the cluster path on a real one-node SLURM cluster (``tests/slurm/cluster.py``).

Not part of ``make test`` (pytest collects ``test_*.py`` only): it needs root, Debian's SLURM packages (installed
when missing) and its daemons. The cluster starts once for the session and its daemons are stopped at the end,
whatever happened. Each case submits tiny CPU runs through ``python -m alr.train -m hydra/launcher=slurm``
from a subprocess, as a user would, and checks the run folder: every epoch in ``metrics.jsonl`` once and in
order, ``result.json`` finished with the expected process count and identical ranks, and SLURM's own account
of the job (``sacct``: requeued, pre-empted, never failed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import Cluster

from alr.distributed import TORCHRUN_VARIABLES as TORCH_KEYS
from conftest import ROOT
from test_distributed import TWO_PROCESS_RUN
from test_imagenet import write_tree

LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=main",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=5",
]
DIGITS = ["debug=fast"]  # 3 steps an epoch


def paced(seconds: float) -> list[str]:
    """Overrides that make every training step ``seconds`` longer (``tests/slurm/pace.py``): time to signal."""
    return [
        "method.module.criterion._target_=pace.Paced",
        "+method.module.criterion.inner=alr.ALRLoss",
        f"+method.module.criterion.seconds={seconds}",
    ]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    """One cluster for the session; its daemons stopped at the end, also on failure, Ctrl-C or SIGTERM."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt  # pytest then runs the fixtures' teardown

    previous = signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    slurm = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        slurm.start()
        print(f"\n[slurm] cluster up in {time.monotonic() - started:.0f} s: {slurm.conf}")
        yield slurm
    finally:
        slurm.stop()
        signal.signal(signal.SIGTERM, previous)


SUBMITTERS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_submitter_left(cluster):
    """A case that failed half-way leaves no submitter, nor job, behind it for the next case."""
    yield
    while SUBMITTERS:
        SUBMITTERS.pop().kill()
    cluster.cancel_jobs()


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_tree(root / "imagenet")
    return root


class Sweep:
    """One ``python -m alr.train -m hydra/launcher=slurm ...`` submitter process and its run folder."""

    def __init__(self, cluster: Cluster, out: Path, *overrides: str, env: dict[str, str] | None = None) -> None:
        self.cluster, self.out = cluster, out
        path = os.pathsep.join(str(ROOT / p) for p in ("src", "tests", "tests/slurm"))
        base = {k: v for k, v in os.environ.items() if k not in TORCH_KEYS}
        self.env = {**base, **cluster.env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
        self.env.update(env or {})
        cmd = [sys.executable, "-m", "alr.train", "-m", *LAUNCHER, f"paths.output_dir={out}", *overrides]
        self.log = out.parent / f"{out.name}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        SUBMITTERS.append(self.proc)

    def wait(self, timeout_s: float = 300) -> str:
        """Wait for the submitter (it returns once its job has ended); its output, checked for exit status 0."""
        try:
            self.proc.wait(timeout=timeout_s)
        finally:
            self.proc.kill()
        text = self.log.read_text()
        assert self.proc.returncode == 0, f"submitter exited {self.proc.returncode}:\n{text[-3000:]}\n{self.logs()}"
        return text

    @property
    def run(self) -> Path:
        (folder,) = [p for p in (self.out / "default").iterdir() if p.is_dir() and not p.name.startswith(".")]
        return folder

    @property
    def job(self) -> str:
        """The SLURM job id (submitit's folder for the job is named after it)."""
        folder, deadline = self.out / "default" / ".submitit", time.monotonic() + 60
        while not (folder.is_dir() and any(folder.iterdir())):
            assert time.monotonic() < deadline and self.proc.poll() is None, "no job submitted"
            time.sleep(0.5)
        (job,) = [p.name for p in folder.iterdir() if p.is_dir()]
        return job

    def logs(self) -> str:
        """Every task's stdout and stderr, of every time the job ran."""
        files = sorted((self.out / "default" / ".submitit").glob("*/*_log.*"))
        return "".join(f"--- {p.name}\n{p.read_text()}" for p in files)

    def epochs(self) -> list[int]:
        path = next((self.out / "default").glob("*/metrics.jsonl"), None)
        return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path else []

    def wait_for_epoch(self, epoch: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.epochs()) < epoch:
            assert self.proc.poll() is None, f"the submitter ended before epoch {epoch}:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"no epoch {epoch} after {timeout_s:.0f} s"
            time.sleep(0.5)

    def states(self) -> list[str]:
        """The job's states in SLURM's accounting, one per time it ran (``sacct --duplicates``), oldest first."""
        cmd = ["sacct", "--duplicates", "--allocations", "--noheader", "--parsable2", "-o", "State", "-j", self.job]
        deadline = time.monotonic() + 30
        while True:  # slurmctld hands the final state to slurmdbd a moment after the job ends
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=True).stdout.split()
            if out and out[-1] not in ("RUNNING", "PENDING", "COMPLETING") or time.monotonic() > deadline:
                return out
            time.sleep(1)

    def check(self, epochs: int, processes: int) -> dict:
        """The run folder of a run that ended: each epoch once and in order, finished, ``processes`` ranks agreeing."""
        assert self.epochs() == list(range(1, epochs + 1)), self.logs()
        result = json.loads((self.run / "result.json").read_text())
        assert result["status"] == "finished" and result["epochs"] == epochs
        assert result["processes"] == processes
        if processes > 1:
            assert result["identical_on_all_ranks"] is True
        return result


def scancel(sweep: Sweep, *args: str) -> None:
    subprocess.run(["scancel", *args, sweep.job], env=sweep.env, check=True)


def test_a_one_task_job(cluster, tmp_path):
    sweep = Sweep(cluster, tmp_path / "out", *DIGITS)
    sweep.wait()
    sweep.check(epochs=2, processes=1)
    assert sweep.states() == ["COMPLETED"]


def test_a_two_task_job_is_one_run_of_two_processes(cluster, tmp_path, data):
    sweep = Sweep(
        cluster, tmp_path / "out", *TWO_PROCESS_RUN, f"dataset.data_dir={data}", "hydra.launcher.tasks_per_node=2"
    )
    sweep.wait()
    sweep.check(epochs=2, processes=2)
    metrics = [json.loads(line) for line in (sweep.run / "metrics.jsonl").read_text().splitlines()]
    assert [m["test/images"] for m in metrics] == [9, 9]  # each validation image counted once
    assert sweep.states() == ["COMPLETED"]


def test_a_master_port_from_the_submitting_shell_does_not_split_the_run(cluster, tmp_path, data):
    """SLURM hands the shell's MASTER_PORT on to every task: submitit then refused to export its variables, and
    each task trained the whole run alone, into the same folder."""
    overrides = [*TWO_PROCESS_RUN, f"dataset.data_dir={data}", "hydra.launcher.tasks_per_node=2"]
    sweep = Sweep(cluster, tmp_path / "out", *overrides, env={"MASTER_PORT": "29555"})
    sweep.wait()
    sweep.check(epochs=2, processes=2)
    assert "ignoring MASTER_PORT=29555 (from the submitting shell)" in sweep.logs()


def test_scancel_usr2_mid_run_checkpoints_requeues_and_resumes_to_the_end(cluster, tmp_path):
    sweep = Sweep(cluster, tmp_path / "out", *DIGITS, *paced(0.5), "trainer.epochs=8")
    sweep.wait_for_epoch(2)
    scancel(sweep, "--signal=USR2")
    sweep.wait()
    sweep.check(epochs=8, processes=1)
    assert sweep.states() == ["REQUEUED", "COMPLETED"]
    logs = sweep.logs()
    assert "stopped by SIGUSR2 after" in logs and "Requeued job" in logs and "resuming" in logs


def test_a_real_time_limit_requeues_with_the_usr2_lead_until_the_run_is_done(cluster, tmp_path):
    """A one-minute limit (SLURM's shortest) and USR2 30 s ahead: each job trains for a while, checkpoints,
    requeues; the run of about 40 s of training needs at least one requeue."""
    limit = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30"]
    sweep = Sweep(cluster, tmp_path / "out", *DIGITS, *paced(0.5), "trainer.epochs=24", *limit)
    sweep.wait(timeout_s=480)
    sweep.check(epochs=24, processes=1)
    states = sweep.states()
    assert states[-1] == "COMPLETED" and len(states) >= 2 and set(states[:-1]) == {"REQUEUED"}, states
    assert sweep.logs().count("stopped by SIGUSR2") == len(states) - 1


def test_a_two_task_job_preempted_by_the_high_priority_partition_is_requeued_and_resumed(cluster, tmp_path, data):
    """Partition ``high`` pre-empts ``main``: SIGTERM, 20 s of grace, then SLURM requeues the job. Both ranks
    write the checkpoint and wait; a rank that exited at once would end the job FAILED, never requeued."""
    overrides = [*TWO_PROCESS_RUN, f"dataset.data_dir={data}", "hydra.launcher.tasks_per_node=2", *paced(0.3)]
    sweep = Sweep(cluster, tmp_path / "out", *overrides, "trainer.epochs=12")
    sweep.wait_for_epoch(2)
    high = ["sbatch", "--partition=high", "--ntasks=4", f"--output={tmp_path / 'high.out'}", "--wrap=sleep 3"]
    subprocess.run(high, env=sweep.env, check=True, capture_output=True)  # needs every CPU of the node
    sweep.wait()
    sweep.check(epochs=12, processes=2)
    assert sweep.states() == ["PREEMPTED", "COMPLETED"]
    assert "stopped by SIGTERM after" in sweep.logs() and "resuming" in sweep.logs()


def test_a_slow_requeue_of_two_tasks_with_kill_on_bad_exit_ends_requeued_and_finished(cluster, tmp_path, data):
    """KillOnBadExit=1 and a requeue that takes 2 s (a slow ``scontrol``): rank 1 must not exit before rank 0
    has requeued, or srun kills rank 0 first and the job ends FAILED."""
    slow = tmp_path / "bin"
    slow.mkdir()
    real = subprocess.run(["which", "scontrol"], env=cluster.env, capture_output=True, text=True).stdout.strip()
    (slow / "scontrol").write_text(f'#!/bin/sh\nsleep 2\nexec {real} "$@"\n')
    (slow / "scontrol").chmod(0o755)
    overrides = [*TWO_PROCESS_RUN, f"dataset.data_dir={data}", "hydra.launcher.tasks_per_node=2", *paced(0.3)]
    path = f"{slow}{os.pathsep}{cluster.env['PATH']}"
    sweep = Sweep(cluster, tmp_path / "out", *overrides, "trainer.epochs=8", env={"PATH": path})
    sweep.wait_for_epoch(2)
    scancel(sweep, "--signal=USR2")
    sweep.wait()
    sweep.check(epochs=8, processes=2)
    assert sweep.states() == ["REQUEUED", "COMPLETED"]
    assert "waiting up to 120 s for SLURM to end the job step" in sweep.logs()
