"""SLURM job steps of several tasks: each task's rank from SLURM's own variables, and a requeue on every rank.

The environments here are faked (``tests/slurm/`` runs the same paths on a real one-node SLURM cluster).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import submitit
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import JobPaths
from submitit.slurm.slurm import SlurmJobEnvironment, _parse_node_list

from alr.distributed import TORCHRUN_VARIABLES as TORCH_KEYS
from alr.distributed import _export_slurm_environment, expand_hostlist, setup
from alr.errors import RunError
from alr.loggers import NoLogger, WandbLogger
from alr.preempt import FINISH_TIMEOUT_S, Interrupted
from conftest import compose
from faults import faulty

SLURM_KEYS = ("SUBMITIT_EXECUTOR", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def env(monkeypatch) -> dict[str, str]:
    """``os.environ`` as a copy without torch's, submitit's and SLURM's variables (nothing leaks to other tests)."""
    clean = {k: v for k, v in os.environ.items() if k not in TORCH_KEYS + SLURM_KEYS and not k.startswith("SLURM_")}
    monkeypatch.setattr(os, "environ", clean)
    return clean


def srun(procid: int, tasks: int = 2, **extra: str) -> dict[str, str]:
    """What SLURM sets in task ``procid`` of ``srun -n <tasks>`` in job 4242 on nodes node[3-4]."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid),
        "SLURM_JOB_NODELIST": "node[3-4]",
        "SLURM_STEP_NODELIST": "node[3-4]",
        **extra,
    }


def test_a_plain_srun_of_two_tasks_makes_one_two_process_run(env):
    ports = set()
    for procid in (0, 1):
        env.clear()
        env.update(srun(procid))
        _export_slurm_environment()
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == (str(procid), "2", str(procid))
        assert env["MASTER_ADDR"] == "node3"
        ports.add(env["MASTER_PORT"])
    assert len(ports) == 1 and 20000 <= int(ports.pop()) < 60000  # both tasks meet at one address


@pytest.mark.parametrize(
    "stale",
    [
        {"MASTER_PORT": "29555"},
        {"RANK": "1"},
        {"WORLD_SIZE": "4"},
        {"MASTER_ADDR": "login1", "MASTER_PORT": "29555", "RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"},
    ],
    ids=["MASTER_PORT", "RANK", "WORLD_SIZE", "all"],
)
def test_torch_variables_from_the_submitting_shell_give_way_to_slurms(env, stale, capsys):
    """SLURM passes the submitting shell's environment on: what it held for another run must not count."""
    seen = []
    for procid in (0, 1):
        env.clear()
        env.update(srun(procid, SUBMITIT_EXECUTOR="slurm", **stale))
        _export_slurm_environment()
        seen.append(tuple(env.get(k) for k in TORCH_KEYS))
    port = seen[0][-1]
    assert seen == [("0", "2", "0", None, "node3", port), ("1", "2", "1", None, "node3", port)]
    assert port != "29555"
    said = capsys.readouterr().out  # rank 0 names what it ignores
    assert said.count("\n") == 1 and said.startswith("[alr] SLURM job step of 2 tasks: ignoring ")
    assert all(f"{k}={v}" in said for k, v in stale.items() if v != dict(zip(TORCH_KEYS, seen[0])).get(k))


def test_torchrun_under_srun_keeps_torchruns_variables(env):
    """``srun -N2 torchrun --nproc_per_node=4 ...``: torchrun, not SLURM, numbers the processes."""
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "node3", "MASTER_PORT": "1"}
    env.update(srun(1, **torchrun))
    _export_slurm_environment()
    assert {k: env[k] for k in torchrun} == torchrun


HOSTLISTS = {
    "dgx-a[012-013]": ["dgx-a012", "dgx-a013"],  # zero padding kept
    "gpu[7-8,10],cpu01": ["gpu7", "gpu8", "gpu10", "cpu01"],
    "node3": ["node3"],
    "login1,login2": ["login1", "login2"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],  # the padding of the first number, past its width
    "x[9-11]": ["x9", "x10", "x11"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],  # two groups: left to right
    "a[1,3]b,c[2]": ["a1b", "a3b", "c2"],
    "gpu-[5]-ib": ["gpu-5-ib"],
}


@pytest.mark.parametrize("hostlist", HOSTLISTS)
def test_slurms_host_lists_expand_as_submitit_expands_them(hostlist):
    assert expand_hostlist(hostlist) == HOSTLISTS[hostlist]
    assert expand_hostlist(hostlist) == _parse_node_list(hostlist)  # submitit's parser, in this process


@pytest.mark.parametrize("hostlist", ["", "node[1-2", "node]1", "a,,b", "n[3-1]", "n[1-]", "n[a-b]", "n[]", "n[1,]"])
def test_what_is_not_a_host_list_is_refused(hostlist):
    with pytest.raises(ValueError, match="is not a"):
        expand_hostlist(hostlist)


def test_a_step_of_16_tasks_on_two_nodes_needs_no_submitit(env, monkeypatch):
    """``srun -N2 -n16 python -m alr.train ...`` on a node whose Python has torch but not submitit."""
    for name in [m for m in sys.modules if m == "submitit" or m.startswith("submitit.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import submitit` now raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError):
        import submitit.slurm.slurm  # noqa: F401
    step = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3"}
    step |= {"SLURM_JOB_NODELIST": "dgx-a[012-013]", "SLURM_STEP_NODELIST": "dgx-a[012-013]"}
    env.update(srun(11, tasks=16, **step))
    _export_slurm_environment()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("11", "16", "3", "dgx-a012")


def test_a_node_list_slurm_would_not_write_is_refused_in_one_line(env):
    env.update(srun(0, SLURM_STEP_NODELIST="node[3-4"))
    with pytest.raises(RunError) as err:
        _export_slurm_environment()
    text = str(err.value)
    assert text.startswith("SLURM's node list: 'node[3-4' is not a SLURM host list") and "\n" not in text


def test_a_one_process_batch_script_of_several_tasks_stays_one_process(env):
    """``sbatch --ntasks=2`` runs its script once: SLURM_NTASKS=2, but no job step of two tasks."""
    env.update({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "node3"})
    _export_slurm_environment()
    assert not any(k in env for k in TORCH_KEYS)
    assert setup("cpu").size == 1


def test_a_stale_world_size_in_a_one_task_step_is_refused_in_one_line(env):
    env.update(srun(0, tasks=1, WORLD_SIZE="2", RANK="0"))
    with pytest.raises(RunError) as err:
        setup("cpu")
    text = str(err.value)
    assert text.startswith("WORLD_SIZE=2 is set, but this process is the only task") and "\n" not in text
    assert "tasks_per_node" in text


def test_a_world_size_without_rank_is_refused_in_one_line(env):
    env["WORLD_SIZE"] = "2"
    with pytest.raises(RunError) as err:
        setup("cpu")
    assert str(err.value).startswith("WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not: start")


# --- a requeue on every rank: submitit's own handler, with the requeue itself recorded ---


class Task(submitit.helpers.Checkpointable):
    def __call__(self) -> None:
        pass


class RecordingSlurm(SlurmJobEnvironment):
    events: list = []

    def _requeue(self, countdown: int) -> None:  # instead of `scontrol requeue`
        self.events.append("requeue")


class RecordingLogger(NoLogger):
    def __init__(self, events: list) -> None:
        self.events = events

    def finish(self, exit_code: int = 0, timeout_s: float | None = None) -> bool:
        self.events.append(("finish", exit_code, timeout_s))
        return True


def submitit_handler(tmp_path, events: list):
    """The handler submitit installs for USR2 in a SLURM job (``checkpoint_and_try_requeue``)."""
    delayed = submitit.helpers.DelayedSubmission(Task())
    delayed.set_timeout(1, 3)
    RecordingSlurm.events = events
    return SignalHandler(RecordingSlurm(), JobPaths(tmp_path, job_id="4242"), delayed).checkpoint_and_try_requeue


def test_rank_0_requeues_first_then_finishes_the_logger_within_the_time_limit(env, tmp_path, monkeypatch):
    env.update(srun(0, SUBMITIT_EXECUTOR="slurm"))
    events: list = []
    stop = Interrupted(signal.SIGUSR2, "epoch 1", submitit_handler(tmp_path, events))
    stop.logger = RecordingLogger(events)
    with pytest.raises(SystemExit):
        stop.hand_over(lead_s=60)
    assert events == ["requeue", ("finish", 128 + signal.SIGUSR2, FINISH_TIMEOUT_S)]
    assert (tmp_path / "4242_submitted.pkl").exists()  # the resubmission submitit requeues


def test_other_ranks_wait_for_slurm_to_end_the_step_instead_of_exiting(env, tmp_path):
    """submitit's handler returns at once on rank 1 ("it might kill the master task"); exiting anyway would make
    srun (KillOnBadExit=1) kill rank 0 before it has requeued the job."""
    env.update(srun(1, SUBMITIT_EXECUTOR="slurm"))
    events: list = []
    stop = Interrupted(signal.SIGUSR2, "epoch 1", submitit_handler(tmp_path, events))
    start = time.monotonic()
    with pytest.raises(SystemExit) as caught:
        stop.hand_over(lead_s=1.5)
    assert time.monotonic() - start >= 1.5  # still there when SLURM ends the step (here: the lead time is up)
    assert events == [] and caught.value.code == 128 + signal.SIGUSR2  # only rank 0 requeues

    start = time.monotonic()  # without submitit (torchrun, a plain kill) every rank exits at once
    with pytest.raises(SystemExit):
        Interrupted(signal.SIGTERM, "epoch 1", signal.SIG_DFL).hand_over(lead_s=60)
    assert time.monotonic() - start < 1


def test_a_preempted_job_waits_on_rank_0_too_for_slurm_to_requeue_it(env, tmp_path):
    """Pre-emption with a grace time: SIGTERM, which submitit leaves to SLURM (a job that ends by itself during
    the grace time ends FAILED, and is not requeued). The logger is finished before the wait."""
    env.update(srun(0, SUBMITIT_EXECUTOR="slurm"))
    events: list = []
    bypass = submitit_handler(tmp_path, events).__self__.bypass  # what submitit installs for SIGTERM
    stop = Interrupted(signal.SIGTERM, "epoch 1", bypass)
    stop.logger = RecordingLogger(events)
    start = time.monotonic()
    with pytest.raises(SystemExit) as caught:
        stop.hand_over(lead_s=1.5)
    assert time.monotonic() - start >= 1.5 and caught.value.code == 128 + signal.SIGTERM
    assert events == [("finish", 128 + signal.SIGTERM, FINISH_TIMEOUT_S)]  # no requeue: SLURM's own


def test_fit_leaves_the_logger_open_for_hand_over_when_interrupted(tmp_path, monkeypatch):
    events: list = []
    monkeypatch.setattr("alr.trainer.build_logger", lambda cfg, run_dir: RecordingLogger(events))
    monkeypatch.setenv("ALR_FAULT", "term@1:1")
    from alr.trainer import fit

    cfg = compose("method=alr", "debug=fast", "trainer.batch_size=32", *faulty("alr.ALRLoss"))
    with pytest.raises(Interrupted) as caught:
        fit(cfg, tmp_path / "run")
    assert events == [] and isinstance(caught.value.logger, RecordingLogger)
    with pytest.raises(SystemExit):
        caught.value.hand_over()
    assert events == [("finish", 128 + signal.SIGTERM, FINISH_TIMEOUT_S)]

    monkeypatch.delenv("ALR_FAULT")
    fit(cfg, tmp_path / "run")  # resumed to the end: fit finishes the logger itself, without a time limit
    assert events[1:] == [("finish", 0, None)]


class HangingRun:
    """A W&B run whose upload never ends (a network that accepts the connection but never answers)."""

    dir = "/runs/x/wandb/run-1-abc/files"

    def finish(self, exit_code: int = 0) -> None:
        time.sleep(60)


def test_a_wandb_upload_that_hangs_is_left_after_the_time_limit(capsys):
    logger = WandbLogger.__new__(WandbLogger)
    logger.run = HangingRun()
    start = time.monotonic()
    assert logger.finish(143, timeout_s=1) is False
    assert time.monotonic() - start < 5
    assert "W&B had not finished after 1 s; what it did not upload stays in /runs/x/wandb/run-1-abc" in (
        capsys.readouterr().err
    )
