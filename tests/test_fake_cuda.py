"""A GPU run's structure, checked on every CPU: each method's training epochs, evaluation and snapshots run on fake
CUDA tensors in fp32, bf16 and fp16, and sync the host with the device only where the trainer says it does.

``FakeTensorMode`` gives every tensor a device, a dtype and a shape but no values, and runs each op's shape rules
instead of its kernel, so a CUDA run's ops (autocast on ``device_type="cuda"``, the GradScaler, channels_last, the
optimizer's foreach kernels) run on a machine without a GPU. Fake mode refuses a CPU tensor in a CUDA op (a 0-dim
one aside, as CUDA itself allows), and cannot give what a sync would give. :class:`HostSyncs` fails on each host sync
outside :data:`ALLOWED`, naming the op and the line that made it. Every option of the ``method`` config group runs,
KD (its teacher a baseline run the test trains on the CPU, loaded onto fake CUDA by its ``setup``) and DML (its
peer a second fake network) included. What counts as a sync:

- a read-back (``aten._local_scalar_dense``: ``item()``, ``float()``, ``int()``, ``bool()``, ``tolist()``);
- an op whose output's shape depends on the values (``bincount``, ``nonzero``, ``unique``, ``masked_select``,
  boolean indexing): on CUDA each one reads a count back to size its output; fake mode raises on them;
- a copy between host and device (``.cpu()``, ``.to("cuda")`` of a host tensor: torch waits for the copy);
- ``torch.cuda.synchronize``.

Where the run needs a GPU the test stands in, each named here:

- **the autograd engine.** Before a backward pass torch's C++ engine asks the CUDA driver whether each device has
  a primary context, which needs a GPU. :func:`backward` walks the same graph in Python and calls each node's own
  backward (torch's derivative formulas, ALR's closed-form ``_ALRFunction.backward``), reducing and casting each
  gradient to its input's shape and dtype as the engine does; ``test_the_stand_in_backward_is_autograds`` checks
  its gradients against ``torch.autograd.grad`` on the CPU.
- **CUDA generators** (``torch.Generator(device="cuda")`` needs a driver): the data's shuffle and DisturbLabel's
  draws take a CPU generator (fake mode draws nothing, so which generator a draw names changes no shape or device).
- **the CUDA runtime checks**: autocast and the GradScaler are told CUDA is there (they switch themselves off
  otherwise), and ``torch.cuda.synchronize`` becomes a sync :class:`HostSyncs` checks against :data:`ALLOWED`.
- **moving fake parameters** (``model.to(device)``, channels_last): fake mode memoises each new tensor behind a weak
  reference, which ``nn.Module._apply``'s tensor swap refuses; the memo of fresh outputs is switched off.
- **the optimizer's kernels**: SGD takes its foreach kernels, as on a GPU, for fake parameters too (torch picks
  them only for plain tensors).
- **the read-backs** that :data:`ALLOWED` lets through get stand-in values (-1 for the first non-finite step: none;
  zeros for a copy to the host).

Not run, because it needs values, not shapes: ``last.pt`` (its CUDA random state asks the driver); it is written at
the epoch's end, where the host waits anyway. :func:`write_epoch` runs, on the stand-in values.
A method's ``setup`` runs on fake CUDA (``Parts``), but once per run, so it is not held to the per-step rule.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from functools import cache
from inspect import unwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorConverter,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.autograd.function import BackwardCFunction
from torch.optim import optimizer as torch_optimizer
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from alr import ALRLoss, trainer
from alr.data import digits
from alr.distributed import World
from alr.loggers import NoLogger
from alr.methods import RunFacts
from alr.preempt import StopOnSignal
from alr.run_folder import write_epoch
from conftest import CONFIGS, compose

# The syncs a GPU run makes on purpose, by the function that makes them: (module, function) -> (the value a read-back
# gets here, why). A sync anywhere else fails the test; a sync inside torch is charged to the innermost frame of the
# suite's code below it, unless a torch function on the way is named here.
ALLOWED = {
    ("alr.trainer", "check_finite"): (-1, "the non-finite-loss check, every log_every steps and at the epoch's end"),
    ("alr.trainer", "_train_epoch"): (1, "the progress bar's loss at those steps; cuda.synchronize at the epoch's end"),
    ("alr.trainer", "_record"): (1, "the epoch's training averages for metrics.jsonl"),
    ("alr.evaluation", "_read_back"): (1, "the evaluation's totals, read back once after its last batch"),
    ("alr.run_folder", "write_epoch"): (1, "the method's snapshots, copied to the host every snapshot_every epochs"),
    ("torch.amp.grad_scaler", "_maybe_opt_step"): (0, "fp16: GradScaler reads found_inf back to step a non-fused SGD"),
}
PRECISIONS = ["fp32", "bf16", "fp16"]
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten._copy_from.default}
# debug=fast on the digits CNN, batches of 8: 2 steps an epoch (the first as most steps of a run, the second a log
# step), 2 epochs (the second runs what the first one's end_epoch set up: OLS's and PS-KD's soft targets, ALR's
# running mean), one test batch.
TINY = ["debug=fast", "trainer.batch_size=8", "trainer.limit_train_batches=2", "trainer.limit_test_batches=1"]


def method_configs() -> list[str]:
    """Every option of the ``method`` config group."""
    return sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))


class HostSync(AssertionError):
    """A host sync outside :data:`ALLOWED`."""


class HostSyncs(TorchDispatchMode):
    """Fails on every host sync outside :data:`ALLOWED` (see the module's docstring); counts the allowed ones."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed: Counter[tuple[str, str]] = Counter()

    def sync(self, what: str) -> tuple[str, str]:
        """The allowed place that makes the sync ``what``, or :class:`HostSync` naming where it happened."""
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            place = (frame.f_globals.get("__name__", ""), code.co_name)
            if place in ALLOWED:
                self.allowed[place] += 1
                return place
            inner = code.co_name in ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")  # its function's, below
            if not (inner or code in _STAND_INS or place[0].startswith("torch")):
                where = f"{place[0]}.{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})"
                raise HostSync(f"host sync in {where}: {what}")
            frame = frame.f_back
        raise HostSync(f"host sync outside the suite's code: {what}")

    def synchronize(self, device=None) -> None:
        """``torch.cuda.synchronize``'s stand-in."""
        self.sync("torch.cuda.synchronize")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))]
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():  # host values an allowed read-back gave: computed for real
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            place = self.sync(f"{func} of a {args[0].device} tensor (item(), float(), int(), bool(), tolist())")
            dtype = args[0].dtype
            return (bool if dtype == torch.bool else float if dtype.is_floating_point else int)(ALLOWED[place][0])
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            self.sync(f"{func} (its output's shape or value depends on the values: the host reads them first)")
            raise  # allowed or not, fake mode has no shape to give
        if func in COPIES and {t.device.type for t in (*tensors, out)} >= {"cpu", "cuda"}:
            self.sync(f"{func} (a copy between host and device)")
            if out.device.type == "cpu":  # an allowed read-back: host values (zeros) that numpy can take
                with unset_fake_temporarily():
                    return torch.zeros(out.shape, dtype=out.dtype)
        return out


def _call(node, grads: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    """``node``'s gradients for its next functions, in their order."""
    if not isinstance(node, BackwardCFunction):
        out = node(*grads)
        return out if isinstance(out, tuple) else (out,)
    # A custom Function: undefined gradients as zeros (its default), its backward's outputs per forward argument,
    # of which the next functions hold those that require a gradient.
    metadata = node._input_metadata
    grads = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g for g, m in zip(grads, metadata)]
    out = node.apply(*grads)
    wanted = iter(g for g, need in zip(out if isinstance(out, tuple) else (out,), node.needs_input_grad) if need)
    return tuple(None if fn is None else next(wanted) for fn, _ in node.next_functions)


def backward(self: torch.Tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None) -> None:
    """``self.backward()`` without torch's C++ engine: each node of the graph once all its gradients are in."""
    root = self.grad_fn
    waiting, stack, seen = defaultdict(int), [root], {root}
    while stack:
        for fn, _ in stack.pop().next_functions:
            if fn is not None:
                waiting[fn] += 1
                if fn not in seen:
                    seen.add(fn)
                    stack.append(fn)
    grads = {root: [None] * len(root._input_metadata)}
    grads[root][self.output_nr] = torch.ones_like(self) if gradient is None else gradient
    ready = [root]
    while ready:
        node = ready.pop()
        try:
            out = _call(node, grads.pop(node))
        except HostSync as e:
            raise HostSync(f"{e}, in the backward of {node.name()}") from None
        for (fn, nr), grad in zip(node.next_functions, out):
            if fn is None:
                continue
            slots = grads.setdefault(fn, [None] * len(fn._input_metadata))
            if grad is not None:  # reduced and cast to the input's shape and dtype, as the engine's validate_outputs
                meta = fn._input_metadata[nr]
                grad = grad.sum_to_size(meta.shape) if grad.shape != meta.shape else grad
                grad = grad.to(meta.dtype) if grad.dtype != meta.dtype else grad
                slots[nr] = grad if slots[nr] is None else slots[nr] + grad
            waiting[fn] -= 1
            if not waiting[fn]:
                ready.append(fn)


# Frames of this file's stand-ins: a sync is charged to the code that called them.
_STAND_INS = {unwrap(f).__code__ for f in (HostSyncs.__torch_dispatch__, HostSyncs.synchronize, _call, backward)}


class _HostGenerator(torch.Generator):
    """A CPU generator wherever a CUDA one is asked for (creating a CUDA generator needs a driver)."""

    def __new__(cls, device=None):
        return super().__new__(cls)

    def __init__(self, device=None) -> None:
        super().__init__()


_digits_split = cache(digits.load_split)


@contextmanager
def fake_cuda():
    """Fake mode and the stand-ins of the module's docstring. Yields the sync checker, which a test enters on its
    own: building the run is not held to it."""
    syncs = HostSyncs()
    foreach = [*torch_optimizer._foreach_supported_types, FakeTensor]
    with ExitStack() as stack:
        for target, value in [
            ("torch.cuda.amp.common.amp_definitely_not_available", lambda: False),
            ("torch.cuda.is_bf16_supported", lambda *a, **k: True),
            ("torch.cuda.synchronize", syncs.synchronize),
            ("torch.Generator", _HostGenerator),
        ]:
            stack.enter_context(mock.patch(target, value))
        stack.enter_context(mock.patch.object(torch_optimizer, "_foreach_supported_types", foreach))
        stack.enter_context(mock.patch.object(FakeTensorConverter, "set_tensor_memo", lambda self, t, v: None))
        stack.enter_context(mock.patch.object(torch.Tensor, "backward", backward))
        stack.enter_context(mock.patch.object(digits, "load_split", _digits_split))  # not the point: read once
        stack.enter_context(FakeTensorMode())
        yield syncs


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A finished baseline run on the digits: KD's teacher."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    trainer.fit(compose("method=baseline", *TINY, "trainer.epochs=1"), run_dir)
    torch.use_deterministic_algorithms(False)  # debug=fast turns it on for the whole process
    return run_dir


@cache
def _config(method: str, teacher: Path | None):
    return compose(*TINY, f"method={method}", *([f"method.teacher_run={teacher}"] if teacher else []))


def _no_checkpoint(epoch: int, step: int, totals) -> None:
    raise AssertionError("no stop signal was sent, yet the trainer wrote a mid-epoch checkpoint")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", method_configs())
def test_a_gpu_run_syncs_the_host_only_where_the_trainer_says(method: str, precision: str, request, tmp_path):
    """Two epochs of every method config through the trainer's own code on fake CUDA: ``Parts`` (the method's
    ``setup``), ``_train_epoch`` (``start_epoch``, ``train_step`` with ``Parts.update`` under ``Parts.autocast``,
    the log step, ``end_epoch``), ``_record`` (``evaluate``) and ``write_epoch`` (``snapshots``)."""
    teacher = request.getfixturevalue("teacher") if method == "kd" else None  # KD distils a finished run
    cfg = OmegaConf.merge(_config(method, teacher), {"trainer": {"precision": precision}})
    with fake_cuda() as syncs:
        parts = trainer.Parts(cfg, World(torch.device("cuda", 0)))
        assert parts.scaler.is_enabled() == (precision == "fp16") and parts.channels_last
        logits = set()
        parts.model.register_forward_hook(lambda module, inputs, output: logits.add((output.device.type, output.dtype)))
        with syncs:
            for epoch in range(cfg.trainer.epochs):
                lr = parts.optimizer.param_groups[0]["lr"]
                run = (trainer.Progress(), epoch, parts.steps, StopOnSignal(), tqdm(disable=True), _no_checkpoint)
                totals = trainer._train_epoch(cfg, parts, *run)
                record, confusion = trainer._record(cfg, parts, epoch, parts.steps, lr, totals)
                write_epoch(tmp_path, cfg, parts.method, parts.data.class_names, record, confusion, NoLogger())
            snapshots = parts.method.snapshots()
    assert logits == {("cuda", trainer.DTYPES[precision])}  # autocast on CUDA, in training and evaluation
    assert {m.device.type for m in snapshots.values()} <= {"cuda"}
    assert {"test/acc", "test/loss", "test/ece", "train/loss", "train/acc"} <= set(record)
    # The allowed syncs come at the log step and the epoch's end, whatever the method; under fp16 the GradScaler's
    # once per optimizer step.
    epochs, steps = cfg.trainer.epochs, parts.steps
    assert steps == 2 and cfg.trainer.log_every > 1  # the first step of each epoch is no log step
    assert syncs.allowed[("alr.trainer", "check_finite")] == epochs
    assert syncs.allowed[("alr.trainer", "_train_epoch")] == 2 * epochs  # the progress bar, torch.cuda.synchronize
    updates = 2 if cfg.method.get("update") == "alternate" else 1  # DML steps its two networks in turn
    assert syncs.allowed[("torch.amp.grad_scaler", "_maybe_opt_step")] == (
        epochs * steps * updates if precision == "fp16" else 0
    )


def test_the_stand_in_backward_is_autograds():
    """:func:`backward` gives the gradients ``torch.autograd.grad`` gives, through batch norm, broadcasting, a custom
    Function with a non-differentiable output (ALR's), bfloat16 activations under autocast and a gradient scale."""
    g = torch.Generator().manual_seed(0)
    K = 5
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, K))
    alr = ALRLoss(num_classes=K)
    alr.setup(RunFacts(K, num_train=100, indexed=True, epochs=2, steps_per_epoch=3, seed=0, device=torch.device("cpu")))
    params = [*net.parameters(), *alr.parameters()]
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, K, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    loss = alr(logits, y) * 128.0
    expected = torch.autograd.grad(loss, params, retain_graph=True)
    backward(loss)
    for p, grad in zip(params, expected):
        torch.testing.assert_close(p.grad, grad)


class _ReadsBackInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float(grad.sum())


def test_a_sync_is_named_with_the_line_that_made_it():
    """The checker itself: a read-back, a value-shaped op, a copy to the host and a read-back in a backward each fail
    naming their function and line, a host tensor in a CUDA op fails; the trainer's non-finite check passes, counted."""

    def loss_with_a_read_back(z: torch.Tensor) -> torch.Tensor:
        return z.sum() * float(z.max())

    line = r" \(test_fake_cuda.py:\d+\)"
    with fake_cuda() as syncs:
        z = torch.randn(4, 3, device="cuda")
        with syncs, pytest.raises(HostSync, match=f"loss_with_a_read_back{line}: aten._local_scalar_dense"):
            loss_with_a_read_back(z)
        with syncs, pytest.raises(HostSync, match=r"aten.index.Tensor \(its output's shape or value depends"):
            z[z > 0].sum()
        with syncs, pytest.raises(HostSync, match=f"made_it{line}: aten._to_copy.default \\(a copy between host"):
            z.cpu()
        with syncs, pytest.raises(HostSync, match=f"backward{line}: .*, in the backward of _ReadsBackInBackward"):
            _ReadsBackInBackward.apply(z.requires_grad_()).sum().backward()
        with syncs, pytest.raises(RuntimeError, match="found at least two devices, cuda:0 and cpu"):
            z + torch.ones(4, 3, device="cpu")  # fake mode's own check
        with syncs:
            totals = trainer._EpochTotals(torch.device("cuda", 0))
            totals.check_finite(0, World(torch.device("cuda", 0)))
    assert syncs.allowed == {("alr.trainer", "check_finite"): 1}
