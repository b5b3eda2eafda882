"""The CUDA paths: on-device CIFAR batches, CUDA autocast with a GradScaler, channels_last, a resume after
SIGTERM, and ALR's training step under a process group without a host sync. Skipped without a GPU."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
from hydra.utils import get_class
from torch import Tensor, nn

from alr import ALRLoss
from alr.checkpoint import load_checkpoint
from alr.data import cifar, samples
from alr.methods import Criterion
from alr.run_folder import read_metrics
from alr.trainer import fit
from conftest import compose, run_train
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


# --- no host sync in a training step under a process group ------------------------------------------------


@contextmanager
def host_sync_is_an_error() -> Iterator[None]:
    """Inside, a CUDA operation that makes the host wait for the device raises ``RuntimeError``."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture
def nccl_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[torch.device]:
    """A one-process NCCL group on the first GPU: ALR then takes the branch it takes under DDP (its counts
    all-reduced), with no second GPU. Also checks that the guard above catches a sync on this machine."""
    if not dist.is_nccl_available():
        pytest.skip("this torch is built without NCCL")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the trainer's own set-up must see one process
        monkeypatch.delenv(key, raising=False)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    with host_sync_is_an_error(), pytest.raises(RuntimeError, match="synchroniz"):
        torch.ones(1, device=device).item()
    # The trainer's default (trainer.deterministic=false), whatever an earlier test in this process set:
    # seed_everything turns deterministic algorithms on, never off.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    store = dist.FileStore(str(tmp_path / "nccl-store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    yield device
    dist.destroy_process_group()
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_alr_step_without_host_sync_under_ddp(nccl_group: torch.device, precision: str):
    """Forward, backward and an SGD step of ALR's loss on a linear head queue without waiting for the GPU.

    (fp16 is left out: its GradScaler reads the gradients' finiteness on the host by design.)
    """
    torch.manual_seed(0)
    batch, features, classes = 64, 32, 100
    head, criterion = nn.Linear(features, classes).to(nccl_group), ALRLoss(classes).to(nccl_group)
    params = [*head.parameters(), *criterion.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(4, batch, features, device=nccl_group)
    y = torch.randint(0, classes, (4, batch), device=nccl_group)

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


class SyncCheckedStep(Criterion):
    """A criterion (``inner``, built with ``kwargs``) that makes one whole training step fail on a host sync.

    CUDA's sync check is an error from its call at step ``step`` (0-based) to its next call: in between,
    the trainer computes the loss, back-propagates, steps the optimizer, adds the step to the epoch's sums,
    draws and augments the next batch and runs the backbone on it.
    """

    checked: ClassVar[list[int]] = []  # the steps whose check ran to its end

    def __init__(self, inner: str, step: int, **kwargs) -> None:
        super().__init__()
        self.criterion = get_class(inner)(**kwargs)
        self.at, self.calls = step, 0

    def start_epoch(self, epoch: int) -> None:
        self.criterion.start_epoch(epoch)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.calls == self.at:
            torch.cuda.set_sync_debug_mode("error")
        elif self.calls == self.at + 1:
            torch.cuda.set_sync_debug_mode("default")
            self.checked.append(self.at)
        self.calls += 1
        loss = self.criterion(logits, targets)
        self.last_terms = self.criterion.last_terms
        return loss


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_step_without_host_sync_under_ddp(nccl_group: torch.device, tmp_path: Path, precision: str):
    """The trainer's own step (``alr.trainer.fit``, ALR on ``resnet32``) after 3 warm-up steps: no host sync.

    One epoch of 5 steps; ``trainer.log_every`` beyond it, so only the last step checks the loss (a sync by
    design) and the checked step 3 is not a log step.
    """
    SyncCheckedStep.checked.clear()
    cfg = compose(
        "dataset=synthetic",
        "dataset.num_classes=100",
        "dataset.build.n_train=320",
        "dataset.build.n_test=64",
        "dataset.build.eval_batch_size=64",
        "model=resnet32",
        "method=alr",
        f"method.module.criterion._target_={__name__}.SyncCheckedStep",
        "+method.module.criterion.inner=alr.ALRLoss",
        "+method.module.criterion.step=3",
        "trainer.batch_size=64",
        "trainer.epochs=1",
        "trainer.log_every=1000",
        "trainer.device=cuda",
        f"trainer.precision={precision}",
        "trainer.deterministic=false",
        "trainer.progress=false",
        "logger=none",
        f"paths.output_dir={tmp_path}",
    )
    try:
        result = fit(cfg, tmp_path / "run")
    finally:  # a sync inside the checked step leaves the check on: later tests must not inherit it
        torch.cuda.set_sync_debug_mode("default")
    assert result["status"] == "finished" and SyncCheckedStep.checked == [3]
    assert dist.is_initialized()
