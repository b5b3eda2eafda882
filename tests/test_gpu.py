"""The CUDA paths: on-device CIFAR batches, CUDA autocast with a GradScaler, channels_last, a resume after
SIGTERM, and every method's training step in DDP without a host sync. Skipped without a GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from alr import ALRLoss
from alr.checkpoint import load_checkpoint
from alr.data import cifar, samples
from alr.run_folder import read_metrics
from conftest import ROOT, run_train
from ddp_steps import (
    EXCLUDED,
    METHODS,
    PRECISIONS,
    STEPS,
    assert_no_host_sync,
    check_for,
    host_sync_is_an_error,
    overrides,
    train,
)
from faults import faulty

pytestmark = pytest.mark.gpu


def test_cifar_batches_are_made_on_the_gpu(tmp_path: Path):
    samples.write_cifar(tmp_path, "cifar10", n_train=64, n_test=16)
    data = cifar.build(16, "cuda", name="cifar10", data_dir=tmp_path)
    x, y, _ = next(iter(data.train.epoch(0)))
    assert x.is_cuda and y.is_cuda and x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    again, *_ = next(iter(data.train.epoch(0)))
    assert torch.equal(x, again)  # the epoch's generator lives on the device and is reseeded per epoch
    x_test, *_ = next(iter(data.test.epoch(0)))
    raw = torch.from_numpy(cifar.load_arrays("cifar10", tmp_path)["x_test"][:16]).cuda().float() / 255
    mean = torch.tensor(cifar.LAYOUTS["cifar10"].mean, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(cifar.LAYOUTS["cifar10"].std, device="cuda").view(1, 3, 1, 1)
    torch.testing.assert_close(x_test, (raw - mean) / std)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda(tmp_path: Path, precision: str):
    data = tmp_path / "data"
    samples.write_cifar(data, "cifar100", n_train=64, n_test=16)
    run_train(
        "experiment=table1",
        "dataset=cifar100",
        "method=alr_s",
        "trainer.device=cuda",
        f"trainer.precision={precision}",
        "trainer.epochs=2",
        "trainer.batch_size=16",
        "trainer.progress=false",
        "trainer.channels_last=true",
        f"dataset.data_dir={data}",
        out=tmp_path,
    )
    run = tmp_path / "table1" / "cifar100-preact_resnet18-alr_s-s0"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["precision"] == precision
    assert result["device"] != "cpu"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics)


# --- resume on CUDA ----------------------------------------------------------------------------------------

TIMING = {"seconds", "train/images_per_s"}  # wall-clock figures: the only fields a resume may change


def _cuda_resume_run(data: Path, out: Path, env: dict[str, str] | None = None, check: bool = True):
    """Two epochs of 4 steps of Table 1's cell (``alr``) on CUDA, deterministic, through the disarmed fault wrapper."""
    return run_train(
        "experiment=table1",
        "dataset=cifar10",
        "model=preact_resnet18",
        "method=alr",
        *faulty("alr.ALRLoss"),
        "trainer.device=cuda",
        "trainer.deterministic=true",
        "trainer.epochs=2",
        "trainer.batch_size=32",
        "trainer.progress=false",
        f"dataset.data_dir={data}",
        out=out,
        env=env,
        check=check,
    )


def test_resume_on_cuda_is_bit_identical(tmp_path: Path):
    """SIGTERM mid-epoch on CUDA, the same command again: weights and metrics equal a run never stopped.

    The rerun sees only the first visible GPU: on a node with several, the checkpoint then comes from a
    process that saw more GPUs than the one resuming it, as after a requeue onto a smaller allocation.
    """
    data = tmp_path / "data"
    samples.write_cifar(data, "cifar10", n_train=128, n_test=32)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _cuda_resume_run(data, straight)

    proc = _cuda_resume_run(data, stopped, env={"ALR_FAULT": "term@2:1"}, check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "stopped by SIGTERM after step 2 of epoch 2" in proc.stderr and "Traceback" not in proc.stderr
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    proc = _cuda_resume_run(data, stopped, env={"CUDA_VISIBLE_DEVICES": first_gpu})
    assert "resuming" in proc.stdout and "after step 2 of epoch 2" in proc.stdout

    a_dir, b_dir = (out / "table1" / "cifar10-preact_resnet18-alr-s0" for out in (straight, stopped))
    a, b = load_checkpoint(a_dir / "last.pt"), load_checkpoint(b_dir / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys(), part
        for name, tensor in a[part].items():
            assert tensor.dtype == b[part][name].dtype and torch.equal(tensor, b[part][name]), f"{part}.{name}"
    metrics = [
        [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(d / "metrics.jsonl")]
        for d in (a_dir, b_dir)
    ]
    assert [m["epoch"] for m in metrics[1]] == [1, 2] and metrics[0] == metrics[1]


# --- no host sync in a training step under DDP ----------------------------------------------------------


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[torch.device]:
    """A one-process NCCL group on the first GPU, for this module: the trainer joins it and trains as each of
    several processes does (the backbone in DDP, the method's gradients and ALR's counts all-reduced), with no
    second GPU. Also checks that the guard catches a sync on this machine."""
    if not dist.is_nccl_available():
        pytest.skip("this torch is built without NCCL")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    with host_sync_is_an_error(), pytest.raises(RuntimeError, match="synchroniz"):
        torch.ones(1, device=device).item()
    store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    yield device
    dist.destroy_process_group()


@pytest.fixture
def one_process(nccl_group: torch.device, monkeypatch: pytest.MonkeyPatch) -> Iterator[torch.device]:
    """The group, without a launcher's variables (this process is rank 0 of 1, on ``cuda:0``), and without
    deterministic algorithms, the trainer's default, whatever an earlier test in this process set."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield nccl_group
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_alr_step_without_host_sync_under_ddp(one_process: torch.device, precision: str):
    """Forward, backward and an SGD step of ALR's loss on a linear head queue without waiting for the GPU,
    its accuracy counts all-reduced over the group. (The trainer's steps, fp16 included, are checked below.)"""
    torch.manual_seed(0)
    batch, features, classes = 64, 32, 100
    head, criterion = nn.Linear(features, classes).to(one_process), ALRLoss(classes).to(one_process)
    params = [*head.parameters(), *criterion.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(4, batch, features, device=one_process)
    y = torch.randint(0, classes, (4, batch), device=one_process)

    def step(i: int) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = criterion(head(x[i]), y[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for i in range(3):  # warm-up: the first steps create cuBLAS handles and momentum buffers
        step(i)
    with host_sync_is_an_error():
        loss = step(3)
    assert dist.is_initialized() and torch.isfinite(loss)
    assert int(criterion.seen) == 4 * batch


METHOD_PARAMS = [pytest.param(m, marks=pytest.mark.skip(reason=EXCLUDED[m])) if m in EXCLUDED else m for m in METHODS]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHOD_PARAMS)
def test_trainer_step_without_host_sync_under_ddp(one_process: torch.device, tmp_path: Path, method, precision):
    """Every method's training step through the trainer (``alr.trainer.fit``, in DDP over the group), after 4
    warm-up steps: from the draw of its batch to the end of its optimizer step and the epoch's running sums, no
    host sync (fp32, bf16: CUDA's sync debug mode ``error``), or under fp16 only the GradScaler's read-back of the
    gradients' finiteness (mode ``warn``, each sync's Python line recorded). The runs: tests/ddp_steps.py."""
    checked = train(overrides(method, precision, "cuda", tmp_path), tmp_path / "run", check_for(precision))
    assert_no_host_sync(checked, precision)
    assert checked.ddp_forwards == STEPS and checked.result["identical_on_all_ranks"] is True


def test_trainer_steps_without_host_sync_in_two_processes(tmp_path: Path):
    """The same runs once more in two processes under torchrun (NCCL between two GPUs, each rank its own share of
    every batch): every method in every precision, both ranks' steps checked (tests/ddp_steps.py's ``main``)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU visible: the two-process check (torchrun --nproc_per_node=2) needs two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "tests" / "ddp_steps.py"), str(tmp_path)]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    checked = [line for line in proc.stdout.splitlines() if line.startswith("checked ")]
    assert checked == [f"checked {m} {p}" for m in METHODS if m not in EXCLUDED for p in PRECISIONS]
