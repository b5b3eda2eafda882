"""Training steps of every method through the trainer under a process group, one step of each run checked.

The ``gpu`` tests (tests/test_gpu.py) check a step for host syncs in a one-process NCCL group and, on a node with
two GPUs or more, in two processes under torchrun, which runs this file; tests/test_distributed.py runs the same
runs on the CPU in a gloo group. pytest does not collect this file (``test_*.py`` only).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from alr.data import DataBundle, synthetic
from alr.trainer import _EpochTotals, fit
from conftest import CONFIGS, compose

PRECISIONS = ("fp32", "bf16", "fp16")
# Every method config whose training step is the backbone's alone, and why the others are left out.
EXCLUDED = {
    "dml": "trains a peer network beside the backbone, which the trainer refuses under a process group",
    "kd": "needs a finished teacher run (a wrn28_10 baseline) and runs that second network beside the backbone",
}
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))
STEPS, CHECKED = 6, 4  # one epoch of 6 steps; step 4 (0-based) is checked, after 4 warm-up steps
BATCH = 32
GRAD_SCALER = str(Path(torch.amp.grad_scaler.__file__))


def overrides(method: str, precision: str, device: str, out: Path, data: str = "alr.data.synthetic.build") -> list[str]:
    """A run of ``method`` in seconds: one epoch of :data:`STEPS` batches of 32 random 8×8 images (made on the
    device) through debug=fast's small CNN. ``trainer.log_every`` is beyond the epoch, so only its last step reads
    the loss on the host (a sync by design, as every ``log_every`` steps)."""
    return [
        "dataset=synthetic",
        f"dataset.build._target_={data}",
        "dataset.image_size=8",
        f"dataset.build.n_train={STEPS * BATCH}",
        f"dataset.build.n_test={BATCH}",
        f"dataset.build.eval_batch_size={BATCH}",
        "model=digits_cnn",
        "+model.in_channels=3",
        "model.width=8",
        f"method={method}",
        f"trainer.batch_size={BATCH}",
        "trainer.epochs=1",
        "trainer.log_every=1000",
        f"trainer.device={device}",
        f"trainer.precision={precision}",
        "trainer.deterministic=false",  # the trainer's default: the step a run takes
        "trainer.progress=false",
        "trainer.keep_checkpoint=false",
        "logger=none",
        f"paths.output_dir={out}",
    ]


def per_rank_synthetic(
    batch_size: int, device: torch.device, seed: int, n_train: int, rank: int = 0, world_size: int = 1, **kw: Any
) -> DataBundle:
    """``alr.data.synthetic`` (read by one process only) for several: each rank its own ``n_train / world_size``
    random images, ``batch_size / world_size`` a step, so every rank takes the steps one process takes."""
    return synthetic.build(batch_size // world_size, device, seed + rank, n_train=n_train // world_size, **kw)


@dataclass
class Checked:
    """What a run showed: the value ``check()`` gave, whether the checked step ended, the training forwards
    through ``DistributedDataParallel``, and the run's ``result.json``."""

    value: Any = None
    ended: bool = False
    ddp_forwards: int = 0
    result: dict[str, Any] = field(default_factory=dict)


def train(args: list[str], run_dir: Path, check: Callable[[], AbstractContextManager] = nullcontext) -> Checked:
    """``alr.trainer.fit`` with training step :data:`CHECKED` under ``check()``: from just after the step before
    it adds to the epoch's running sums (so the draw and augmentation of its batch) to just after it has added
    its own (forward through DDP, loss, backward, gradient averaging, optimizer step)."""
    checked, stack = Checked(), ExitStack()
    add, forward = _EpochTotals.add, DistributedDataParallel.forward

    def add_and_check(totals: _EpochTotals, step: int, out: Any, targets: torch.Tensor) -> None:
        add(totals, step, out, targets)
        if step == CHECKED - 1:
            checked.value = stack.enter_context(check())
        elif step == CHECKED:
            stack.close()
            checked.ended = True

    def counted_forward(ddp: DistributedDataParallel, *args: Any, **kwargs: Any) -> Any:
        checked.ddp_forwards += 1
        return forward(ddp, *args, **kwargs)

    with (
        stack,  # a step that fails inside the check leaves it too
        mock.patch.object(_EpochTotals, "add", add_and_check),
        mock.patch.object(DistributedDataParallel, "forward", counted_forward),
    ):
        checked.result = fit(compose(*args), run_dir)
    return checked


@contextmanager
def host_sync_is_an_error() -> Iterator[None]:
    """Inside, a CUDA operation that makes the host wait for the device raises ``RuntimeError``."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextmanager
def host_syncs_recorded() -> Iterator[list[str]]:
    """Inside, every host sync is recorded (CUDA's sync debug mode ``warn``): the list yielded gets, on leaving,
    the ``file:line`` of the Python code that made each one (a sync in the backward pass: where it was called)."""
    syncs: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")
            syncs += [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


# Ops that on a GPU make the host wait: a read back (``.item()``, ``int()``, ``bool()``, a comparison to a Python
# bool), a tensor made from host data, an output whose size depends on the data (indexing with a boolean mask too).
READ_BACKS = {
    "aten._local_scalar_dense",
    "aten.is_nonzero",
    "aten.equal",
    "aten.allclose",
    "aten.lift_fresh",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
}
MASKABLE = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
DISPATCH_FRAMES = ("/torch/_dynamo/", "/torch/_compile.py", "/torch/utils/_python_dispatch.py")


def _reads_back(func: Any, args: tuple) -> bool:
    name = str(func.overloadpacket)
    if name in MASKABLE:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return name in READ_BACKS


class _ReadBacks(TorchDispatchMode):
    """Records where each op of :func:`_reads_back` ran: the Python line, past the dispatch mode's own frames."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _reads_back(func, args):
            frame = sys._getframe(1)
            while frame.f_back is not None and any(f in frame.f_code.co_filename for f in DISPATCH_FRAMES):
                frame = frame.f_back
            self.syncs.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


@contextmanager
def read_backs_recorded() -> Iterator[list[str]]:
    """The CPU's stand-in for :func:`host_syncs_recorded`: each op inside that would make the host wait on a GPU,
    as the ``file:line`` of the Python code that ran it."""
    with _ReadBacks() as mode:
        yield mode.syncs


def check_for(precision: str) -> Callable[[], AbstractContextManager]:
    """fp32 and bf16: no host sync at all. fp16: syncs recorded, to allow the GradScaler's one read-back of the
    gradients' finiteness (``GradScaler.step`` skips the update on inf/NaN: a host decision, by design)."""
    return host_syncs_recorded if precision == "fp16" else host_sync_is_an_error


def assert_no_host_sync(checked: Checked, precision: str) -> None:
    """The checked step ended, and the syncs recorded in it (none where a sync is an error) are at most, under
    fp16, the GradScaler's own."""
    assert checked.ended and checked.result["status"] == "finished"
    if checked.value is None:
        return
    scaler = [s for s in checked.value if s.startswith(f"{GRAD_SCALER}:")] if precision == "fp16" else []
    assert checked.value == scaler, f"host syncs in a training step ({precision}): {checked.value}"
    if precision == "fp16":
        assert scaler, "no sync recorded, not even the GradScaler's read-back: the record misses them"


def main(out: str) -> None:
    """One rank of ``torchrun --nproc_per_node=2 tests/ddp_steps.py OUT``: every method in every precision,
    step :data:`CHECKED` of each run checked; a line per run on rank 0, and the first failure ends the process."""
    data = "ddp_steps.per_rank_synthetic"
    for method in (m for m in METHODS if m not in EXCLUDED):
        for precision in PRECISIONS:
            run = Path(out) / f"{method}-{precision}"
            try:
                checked = train(overrides(method, precision, "cuda", run, data), run, check_for(precision))
                assert_no_host_sync(checked, precision)
                assert checked.ddp_forwards == STEPS and checked.result["processes"] == 2
                assert checked.result["identical_on_all_ranks"] is True
            except BaseException as e:
                print(f"FAILED {method} {precision}: {type(e).__name__}: {e}", flush=True)
                raise
            if dist.get_rank() == 0:
                print(f"checked {method} {precision}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
