"""Several processes: a 2-process torchrun (gloo, CPU) run on a tiny ImageNet tree, stopped and resumed; a
process group of one, which trains as each of several processes does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from ddp_steps import EXCLUDED, METHODS, STEPS, assert_no_host_sync, overrides, read_backs_recorded, train
from faults import faulty
from test_imagenet import write_tree

# A run of two processes in seconds on write_tree's images (12 training images: 3 global batches of 4; 9 for
# validation): a small CNN keeps the processes' start-up (imports) the main cost. Also make test-slurm's.
TWO_PROCESS_RUN = [
    "dataset=imagenet",
    "dataset.num_classes=3",
    "dataset.image_size=32",
    "dataset.resize_size=36",
    "dataset.num_workers=1",
    "dataset.build.eval_batch_size=2",
    "model=digits_cnn",
    "+model.in_channels=3",
    "model.width=8",
    "debug=fast",
    "trainer.limit_train_batches=null",
    "trainer.limit_test_batches=null",
    "trainer.batch_size=4",
    "trainer.log_every=1",
]
OVERRIDES = [*TWO_PROCESS_RUN, "method=alr", *faulty("alr.ALRLoss")]


def torchrun(out: Path, data: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "alr.train"]
    cmd += [f"paths.output_dir={out}", f"dataset.data_dir={data}", *OVERRIDES]
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_agree_count_validation_once_and_resume_bit_identically(tmp_path: Path):
    data = tmp_path / "data"
    write_tree(data / "imagenet", train_per_class=4, val_per_class=3)  # 12 images: 3 global batches of 4

    full = torchrun(tmp_path / "full", data)
    assert full.returncode == 0, full.stdout + full.stderr
    run = tmp_path / "full" / "default" / "imagenet-digits_cnn-alr-s0"
    result = json.loads((run / "result.json").read_text())
    assert result["processes"] == 2 and result["identical_on_all_ranks"] is True  # backbone and S on both ranks
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["test/images"] for m in metrics] == [9, 9]  # 5 + 4 images, each counted once
    assert [m["epoch"] for m in metrics] == [1, 2]  # one process wrote
    assert sorted(p.name for p in run.glob("*.pt")) == ["last.pt"]

    # One process gets SIGTERM in epoch 1's second step: both stop after it, last.pt is written once, both exit.
    env = {"ALR_FAULT": "term@1:1", "ALR_FAULT_ONCE": str(tmp_path / "fired")}
    stopped = torchrun(tmp_path / "resumed", data, env)
    assert stopped.returncode != 0 and (tmp_path / "fired").exists()
    assert stopped.stderr.count("stopped by SIGTERM after step 2 of epoch 1 (checkpoint written)") == 2
    again = torchrun(tmp_path / "resumed", data)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in again.stdout and "after step 2 of epoch 1" in again.stdout

    a = torch.load(run / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "default" / run.name / "last.pt", weights_only=True)
    for part in ("model", "method"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "default" / run.name / "metrics.jsonl").open()]
    assert resumed == [
        {**m, "seconds": r["seconds"], "train/images_per_s": r["train/images_per_s"]} for m, r in zip(metrics, resumed)
    ]


def test_a_slurm_task_started_by_submitit_finds_its_rank_and_the_master(monkeypatch):
    """`hydra/launcher=slurm` with tasks_per_node=N: submitit's environment becomes torch's (env://)."""
    from alr.distributed import TORCHRUN_VARIABLES as torch_keys
    from alr.distributed import _export_slurm_environment

    # A copy of the environment, so that what the export writes does not reach the other tests of this process.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in torch_keys})
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
        "SLURM_NODEID": "1",
    }
    os.environ.update(slurm)
    _export_slurm_environment()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("11", "16", "3")
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) >= 20000


def _partial_sums_worker(rank: int, size: int, folder: str) -> None:
    """Rank ``rank`` of a gloo group: 5 steps of running sums, saved as the trainer saves them, then read back."""
    import torch.distributed as dist

    from alr.distributed import World
    from alr.methods.supervised import StepOutput
    from alr.trainer import _EpochTotals

    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank, world_size=size)
    try:
        world = World(torch.device("cpu"), rank, size)
        totals = _EpochTotals(world.device, size)
        g = torch.Generator().manual_seed(rank)  # each rank's own losses: their sums differ in every bit
        for step in range(5):
            terms = {"L_hard": torch.rand((), generator=g), "w": torch.rand((), generator=g)}
            out = StepOutput(torch.rand((), generator=g), torch.randn(4, 3, generator=g), terms)
            totals.add(step, out, torch.randint(0, 3, (4,), generator=g))
        shares = world.gather(totals.state_dict())
        if world.main:
            torch.save({"partial": shares}, f"{folder}/last.pt")
        world.barrier()
        resumed = _EpochTotals(world.device, size)
        exact = resumed.load_state_dict(torch.load(f"{folder}/last.pt", weights_only=True)["partial"], world)
        torch.save(
            {"exact": exact, "before": totals.state_dict(), "after": resumed.state_dict()}, f"{folder}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_each_rank_resumes_its_own_partial_sums_bit_for_bit(tmp_path: Path):
    """By construction, not by luck: at the stop step every rank's running sums come back as they were, so a
    resumed epoch makes the same float additions as an uninterrupted one on any CPU. Another process count
    takes their total on rank 0 (and says it is not exact)."""
    import torch.multiprocessing as mp

    from alr.distributed import World
    from alr.trainer import _EpochTotals

    mp.spawn(_partial_sums_worker, args=(2, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert rank["exact"] is True
        for key, value in rank["before"].items():
            same = (
                torch.equal(value, rank["after"][key])
                if isinstance(value, torch.Tensor)
                else value == rank["after"][key]
            )
            assert same, key
    assert not torch.equal(ranks[0]["before"]["sums"], ranks[1]["before"]["sums"])  # not all-reduced totals

    shares = torch.load(tmp_path / "last.pt", weights_only=True)["partial"]
    one = _EpochTotals(torch.device("cpu"))
    assert one.load_state_dict(shares, World(torch.device("cpu"))) is False  # 2 processes saved, 1 resumes
    assert torch.equal(one.sums, shares[0]["sums"] + shares[1]["sums"]) and one.seen == 40


# --- a process group of one: the path several processes take, in one ---------------------------------------


@pytest.fixture
def gloo_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group in this process, as a caller (a test, a notebook) initialises one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_process_group_of_one_trains_in_ddp_and_reduces_over_the_group(gloo_group, tmp_path: Path, monkeypatch):
    """Under an initialised group, even of one process, the trainer takes the several-process path: the backbone
    in DistributedDataParallel, the method's gradients averaged over the group, stop and finiteness flags
    agreed over it. The data set (digits, read by one process only) is read whole."""
    from alr.distributed import World

    calls: list[tuple[str, bool]] = []
    average, any_rank = World.average_gradients, World.any

    def averaged(world: World, params: list) -> None:
        calls.append(("average_gradients", world.distributed and any(p.grad is not None for p in params)))
        average(world, params)

    def agreed(world: World, flag: bool) -> bool:
        calls.append(("any", world.distributed))
        return any_rank(world, flag)

    monkeypatch.setattr(World, "average_gradients", averaged)
    monkeypatch.setattr(World, "any", agreed)
    out = tmp_path / "runs"
    checked = train(["method=alr", "debug=fast", "trainer.batch_size=32", f"paths.output_dir={out}"], out / "run")
    assert checked.ddp_forwards == 6  # 2 epochs of 3 steps, each through DDP
    assert [c for c in calls if c[0] == "average_gradients"] == [("average_gradients", True)] * 6  # ALR's S
    assert ("any", True) in calls and ("any", False) not in calls
    assert checked.result["processes"] == 1 and checked.result["identical_on_all_ranks"] is True


def test_the_read_back_record_sees_what_makes_a_gpu_wait():
    """The CPU stand-in's own check, as the ``gpu`` fixture checks CUDA's: each read back is seen, and where."""
    x = torch.randn(6)
    mask, rows = x > 0, torch.tensor([0, 2])
    with read_backs_recorded() as syncs:
        x.sum().item(), bool(x[0] > 0), x[mask], torch.nonzero(mask), torch.equal(x, x), torch.tensor([1.0])
    assert len(syncs) == 6 and {s.rsplit(":", 1)[0] for s in syncs} == {__file__}
    with read_backs_recorded() as syncs:
        x[rows], torch.where(mask, x, 0.0), x.clone().index_put_((rows,), torch.zeros(2)), torch.cat([x, x])
    assert syncs == []


STEP_CHECKS = [(m, "fp32") for m in METHODS if m not in EXCLUDED] + [("alr", "bf16"), ("alr", "fp16")]


@pytest.mark.parametrize(("method", "precision"), STEP_CHECKS, ids=[f"{m}-{p}" for m, p in STEP_CHECKS])
def test_every_methods_step_in_a_group_of_one_reads_nothing_back(gloo_group, tmp_path: Path, method, precision):
    """The CPU's stand-in for the ``gpu`` test of each method's step without a host sync (tests/test_gpu.py): the
    same runs, through DDP in a gloo group of one, the same step checked for the ops that on a GPU make the
    host wait (under fp16, the GradScaler's read-back alone)."""
    checked = train(overrides(method, precision, "cpu", tmp_path), tmp_path / "run", read_backs_recorded)
    assert_no_host_sync(checked, precision)
    assert checked.ddp_forwards == STEPS and checked.result["identical_on_all_ranks"] is True
