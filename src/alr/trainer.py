"""The training loop: one for every data set, backbone and method.

Read top to bottom: checks of the run folder, set-up (device, data, model, method, optimizer),
resume from ``last.pt``, then per epoch: train, evaluate, write ``metrics.jsonl`` / snapshots /
``last.pt``; finally ``result.json``. The loop knows nothing about any method: it calls the hooks of the
method protocol (:mod:`alr.methods.supervised`: ``setup``, ``start_epoch``, ``train_step`` per batch,
``end_epoch``, ``partial_sums``), and a step returns the loss, the logits and the terms to log. What the
run folder holds and how a resume is checked against it is :mod:`alr.run_folder`; scoring is
:mod:`alr.evaluation`.

Reliability (docs/reliability.md):

- Everything that can refuse a run (the folder, the config it holds, the data, the method, the
  checkpoint) is checked before anything is written, so a refused run changes no file.
- ``last.pt`` is written atomically at the end of every epoch and, on a stop signal, between two
  steps (:mod:`alr.preempt`); it holds the step reached and the epoch's running sums, and since an
  epoch's batches are a function of ``(seed, epoch)`` a resumed run replays the same batches.
- The loss is checked for NaN/inf every ``log_every`` steps and at the end of every epoch, on the
  device: the first bad step and its terms are recorded without a host sync, and no checkpoint is
  ever written from an epoch with a non-finite loss.
- A finished run keeps ``last.pt`` (its weights: KD teachers, analysis) unless
  ``trainer.keep_checkpoint=false`` (the smoke grids): then it is deleted once ``result.json`` is written,
  and the run is still skipped as finished on resume.

Several processes (``torchrun``, SLURM tasks; :mod:`alr.distributed`): every rank runs this same loop on
its shard of each global batch; only rank 0 writes files, and the sums it writes are over all ranks.
"""

from __future__ import annotations

import copy
import inspect
import os
import random
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

import alr
from alr import run_folder
from alr.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from alr.distributed import World, all_reduce_sum, setup
from alr.errors import CheckpointError, RunError
from alr.evaluation import evaluate
from alr.loggers import NoLogger, build_logger
from alr.methods import RunFacts
from alr.preempt import Interrupted, StopOnSignal
from alr.run_folder import prepare_run_dir, resumable_keys, skip_if_finished, start_run_folder, write_epoch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch, step and term."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Both ways: a process that trains several runs (a local multirun, a test) must not keep a previous
    # run's setting.
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def state_bytes(method: nn.Module) -> int:
    """The bytes of state a method keeps beside the backbone: its ``state_dict`` (ALR's ``S``, a peer network,
    per-class or per-sample tables) and its per-rank ``partial_sums``."""
    tensors = [*method.state_dict().values(), *method.partial_sums().values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators, in types ``torch.load(weights_only=True)`` reads.

    Python's state is a tuple of ints; numpy's key array becomes an int64 tensor; torch's CPU state is a CPU
    byte tensor, and so is the CUDA state of this process's own device (``torch.cuda.get_rng_state(device)``,
    not every visible GPU's: a resume may see fewer GPUs, or be another device's process).
    """
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device, path: Path) -> None:
    """Restore :func:`rng_state` (or a checkpoint of alr 0.1.0's form). Every state is checked before any is
    set: one that is not a CPU tensor of the right type is a one-line :class:`CheckpointError` naming it."""

    def on_cpu(name: str, value: Any, dtype: torch.dtype) -> torch.Tensor:
        if not (isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype == dtype):
            what = (
                f"a {value.dtype} tensor on {value.device}" if isinstance(value, torch.Tensor) else type(value).__name__
            )
            raise CheckpointError(
                f"{path}: its {name} RNG state is {what}, not a CPU {dtype} tensor (was the file loaded to another "
                "device and saved again?). Move it away to train from scratch, or set trainer.resume=false."
            )
        return value

    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = on_cpu("numpy", numpy_state["key"], torch.int64).numpy().astype(np.uint32)
        numpy_state = (numpy_state["kind"], key, *(numpy_state[k] for k in ("pos", "has_gauss", "cached_gaussian")))
    cpu = on_cpu("torch", state["torch"], torch.uint8)
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # alr 0.1.0 saved every visible GPU's state: take this device's, if it was saved
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if device.type != "cuda":  # a GPU run resumed on the CPU: the CUDA state has no generator to go to
        cuda = None
    cuda = None if cuda is None else on_cpu("cuda", cuda, torch.uint8)
    random.setstate(state["python"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def channels_last_on(setting: Any, device: torch.device) -> bool:
    """``trainer.channels_last``: ``cuda`` (the default) on CUDA devices only, ``true`` on every device, ``false``
    never. On a CPU it pays for some backbones and not others (Fashion-MNIST's ResNet-8 trains 1.15× faster in it
    on one thread, about 1.3× on two: ``make bench``, section 8), so a CPU experiment asks for it."""
    if setting == "cuda":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise RunError(f"trainer.channels_last must be cuda, true or false; got {setting!r}")


def _build(node: DictConfig, what: str | None, **kwargs: Any) -> Any:
    """``instantiate`` with the errors a user can fix (missing files, bad data) as one-line :class:`RunError`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, RunError):
            raise cause from None
        if isinstance(cause, (OSError, ValueError)):
            raise RunError(f"{what}: {cause}" if what else str(cause)) from e
        raise


class _EpochTotals:
    """The running sums of one training epoch, kept on the device (no host sync per step).

    Also records the first step whose loss is not finite and that step's terms, so the error names
    them exactly however many steps pass before the check.
    """

    def __init__(self, device: torch.device, world_size: int = 1) -> None:
        self.world_size = world_size
        self.names: list[str] | None = None
        self.sums = self.bad_terms = torch.zeros(0, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.seen, self.seconds = 0, 0.0

    def add(self, step: int, out: Any, targets: torch.Tensor) -> None:
        vec = torch.stack([out.loss.detach().float(), *(v.float() for v in out.terms.values())])
        if self.names is None:
            self.names, self.sums, self.bad_terms = ["loss", *out.terms], torch.zeros_like(vec), torch.zeros_like(vec)
        self.sums += vec / self.world_size  # each rank's share of the global batch's mean: the sum over ranks
        self.correct += (out.logits.detach().argmax(dim=1) == targets).sum()
        self.seen += len(targets)
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(vec[0])
        self.first_bad = torch.where(newly_bad, step, self.first_bad)
        self.bad_terms = torch.where(newly_bad, vec, self.bad_terms)

    def check_finite(self, epoch: int, world: World) -> None:
        """Raise :class:`NonFiniteLossError` naming the first bad step of ``epoch`` (0-based) and its terms.

        On every rank when any rank's loss is not finite, so that no rank waits for the others.
        """
        step = int(self.first_bad)
        if not world.any(step >= 0):
            return
        if step < 0:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1} in another process. No checkpoint was written after it. "
                "Lower the learning rate (under fp16, try bf16 or fp32) and rerun with trainer.resume=false."
            )
        values = dict(zip(self.names, self.bad_terms.tolist()))
        bad = [f"{n}={v}" for n, v in values.items() if n != "loss" and not np.isfinite(v)] or [
            f"loss={values['loss']}"
        ]
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch + 1}, step {step + 1} ({', '.join(bad)}). No checkpoint was "
            "written after it: last.pt, if there is one, holds the last good state. Lower the learning rate "
            "(under fp16, try bf16 or fp32) and rerun with trainer.resume=false."
        )

    def reduced(self) -> _EpochTotals:
        """These totals summed over the ranks (a copy; itself in a single process)."""
        if self.world_size == 1:
            return self
        out = copy.copy(self)
        out.sums, out.correct = all_reduce_sum(self.sums.clone()), all_reduce_sum(self.correct.clone())
        out.seen = int(all_reduce_sum(torch.tensor(self.seen, device=self.sums.device)))
        return out

    FIELDS = ("names", "sums", "bad_terms", "correct", "first_bad", "seen", "seconds")

    def state_dict(self) -> dict[str, Any]:
        """This rank's own running sums, on the CPU (a checkpoint gathers one per rank: :meth:`World.gather`)."""
        return {
            k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in ((k, getattr(self, k)) for k in self.FIELDS)
        }

    def load_state_dict(self, shares: list[dict[str, Any]], world: World) -> bool:
        """Resume from a checkpoint's per-rank sums; whether this rank continues bit for bit.

        With the process count that saved them, each rank takes its own share: every later float32 addition
        is then the one the uninterrupted run makes, on any CPU or GPU. With another count (allowed: the
        global batch is the same), rank 0 takes the shares' total and the others start from zero, so the
        epoch's logged averages may differ from an uninterrupted run's in the last bits.
        """
        own = world.own_share(shares)
        state = own if own is not None else shares[0]
        for key in self.FIELDS:  # copies: restore_sums below writes into them, not into the checkpoint's shares
            value = state[key]
            setattr(self, key, value.to(self.sums.device, copy=True) if isinstance(value, torch.Tensor) else value)
        if own is None:  # rank 0 the total, the others zero (World.restore_sums), the images seen alike
            world.restore_sums({"sums": self.sums, "correct": self.correct}, shares)
            self.seen = sum(share["seen"] for share in shares) if world.main else 0
        return own is not None


def where(epoch: int, step: int) -> str:
    """A point of training as the stop and the resume messages both name it: ``epoch`` whole epochs done,
    then ``step`` steps of the next one."""
    return f"step {step} of epoch {epoch + 1}" if step else f"epoch {epoch}"


def _shard(cfg: DictConfig, world: World) -> dict[str, int]:
    """The data set's ``rank``/``world_size`` arguments under several processes; refuses what cannot be split."""
    if not world.distributed:
        return {}
    if cfg.trainer.batch_size % world.size:
        raise RunError(
            f"config key 'trainer.batch_size' is the global batch, {cfg.trainer.batch_size}, which {world.size} "
            f"processes cannot share evenly. Set it to a multiple of {world.size}."
        )
    target = get_method(cfg.dataset.build._target_)
    if "world_size" not in inspect.signature(target).parameters:
        if world.size == 1:  # a process group of one: its process reads the whole data set
            return {}
        raise RunError(
            f"dataset '{cfg.dataset.name}' is read by one process only. Train it without torchrun or SLURM "
            "tasks_per_node (a multirun with GPUS=0,1,... trains several runs side by side)."
        )
    return {"rank": world.rank, "world_size": world.size}


class Parts:
    """What a run trains with: its data, backbone, method, optimizer, schedule and precision.

    :meth:`update` is the one place a loss becomes a parameter update; a method's
    :meth:`~alr.methods.Method.train_step` calls it once (most methods) or once per network (DML in turn).
    ``train_model`` is the backbone the training step calls: in ``DistributedDataParallel`` under several
    processes, else ``model`` itself.
    """

    def __init__(self, cfg: DictConfig, world: World) -> None:
        t = cfg.trainer
        self.device, self.world = world.device, world
        device = world.device
        self.data = _build(
            cfg.dataset.build, None, batch_size=t.batch_size, device=device, seed=cfg.seed, **_shard(cfg, world)
        )
        if self.data.num_classes != cfg.dataset.num_classes:
            raise RunError(
                f"config key 'dataset.num_classes' is {cfg.dataset.num_classes} but the {cfg.dataset.name} data "
                f"has {self.data.num_classes} classes. Remove the override (or set "
                f"dataset.num_classes={self.data.num_classes})."
            )
        self.model = _build(cfg.model, f"model '{cfg.model_name}'").to(device)
        self.method = _build(cfg.method.module, f"method '{cfg.method.name}'").to(device)
        train = self.data.train
        self.steps = min(len(train), t.limit_train_batches or len(train))  # training steps per epoch
        facts = RunFacts(
            num_classes=self.data.num_classes,
            num_train=train.num_samples,
            indexed=train.indexed,
            epochs=t.epochs,
            steps_per_epoch=self.steps,
            seed=cfg.seed,
            device=device,
            rank=world.rank,
            world_size=world.size,
        )
        try:
            self.method.setup(facts)
        except ValueError as e:  # what the method cannot do with this data set, in one line
            raise RunError(f"method '{cfg.method.name}': {e}") from e
        if world.distributed and (networks := self.method.networks()):
            raise RunError(
                f"method '{cfg.method.name}' trains a network of its own beside the backbone ({', '.join(networks)}), "
                "which this suite runs in one process only (outside DistributedDataParallel it would differ from "
                "rank to rank). Run it without torchrun or SLURM tasks_per_node; GPUS=0,1,... trains several runs "
                "side by side."
            )
        self.channels_last = channels_last_on(t.channels_last, device)
        if self.channels_last:  # 4-D weights only: the backbone and DML's peer
            self.model = self.model.to(memory_format=torch.channels_last)
            self.method = self.method.to(memory_format=torch.channels_last)
        self.train_model = world.wrap(self.model)  # DDP copies rank 0's backbone to every rank
        if t.compile:  # training steps only: evaluation's eval mode would compile a second graph
            self.train_model = torch.compile(self.train_model)
        world.broadcast(self.method)
        self.method_params = [p for p in self.method.parameters() if p.requires_grad]
        groups = [{"params": list(self.model.parameters()), "weight_decay": cfg.optim.weight_decay}]
        # ALR's S, DML's peer: their own group, with the method's weight decay (docs/deviations.md#the-methods); a
        # parameter that carries an ``lr_multiplier`` gets a group whose learning rate is the run's times it.
        by_multiplier: dict[float, list[nn.Parameter]] = {}
        for p in self.method_params:
            by_multiplier.setdefault(float(getattr(p, "lr_multiplier", 1.0)), []).append(p)
        for multiplier, params in by_multiplier.items():
            groups.append({"params": params, "weight_decay": cfg.method.weight_decay, "lr_multiplier": multiplier})
        self.optimizer = instantiate(cfg.optim.optimizer)(groups)
        for group in self.optimizer.param_groups:  # before the scheduler, which takes each group's lr as its base
            group["lr"] *= group.get("lr_multiplier", 1.0)
        self.scheduler = instantiate(cfg.optim.scheduler)(self.optimizer)
        self.dtype = DTYPES[t.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

    STATE = ("model", "method", "optimizer", "scheduler", "scaler")

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def update(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` and step the optimizer (loss-scaled under fp16).

        Gradients are reset to ``None`` first, so a parameter the loss does not reach is left
        untouched by this step (no weight decay, no momentum): that is what lets a method update
        its networks one after the other with one optimizer.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.world.average_gradients(self.method_params)  # the backbone's are averaged by DDP during backward
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).state_dict() for name in self.STATE}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        try:
            for name in self.STATE:
                getattr(self, name).load_state_dict(state[name])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"{path} does not fit this run's model, method or optimizer ({' '.join(str(e).split())[:240]}). "
                "Move it away to train from scratch, or set trainer.resume=false."
            ) from e


def per_rank(saved: Any) -> list[Any]:
    """A checkpoint's entry that :meth:`World.gather` saved, one per rank. alr 0.1.0 saved one value instead
    (rank 0's RNG states; the epoch's sums over all ranks): it stands for a run of one process."""
    return saved if isinstance(saved, list) else [saved]


class Progress:
    """Where training stands: whole epochs done, steps done of the next one, time and the best test accuracy."""

    def __init__(self, ckpt: dict[str, Any] | None = None) -> None:
        ckpt = ckpt or {}
        self.epoch, self.step = ckpt.get("epoch", 0), ckpt.get("step", 0)
        self.partial = per_rank(ckpt["partial"]) if ckpt.get("partial") is not None else None
        self.method_sums = ckpt.get("method_sums")  # per rank, where the method keeps partial sums
        self.elapsed, self.best = ckpt.get("elapsed", 0.0), tuple(ckpt.get("best", (-1.0, 0)))

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed, "best": self.best}


def _train_epoch(
    cfg: DictConfig, parts: Parts, progress: Progress, epoch: int, steps: int, stop: StopOnSignal, bar: tqdm, save
) -> _EpochTotals:
    """Train epoch ``epoch`` (0-based), from the step a mid-epoch checkpoint reached; return its running sums."""
    t, model, method, world = cfg.trainer, parts.train_model, parts.method, parts.world
    model.train()
    method.train()
    totals = _EpochTotals(parts.device, world.size)
    skip = progress.step if epoch == progress.epoch else 0
    if skip:  # the method's state came back with method.state_dict(), its partial sums here
        totals.load_state_dict(progress.partial, world)
        if progress.method_sums is not None:
            world.restore_sums(method.partial_sums(), progress.method_sums)
        progress.partial = progress.method_sums = None  # every rank's shares: not needed again
    else:
        method.start_epoch(epoch)
    t0 = time.perf_counter()
    batches = islice(parts.data.train.epoch(epoch), steps)
    for _ in range(skip):  # the same batches (and augmentation draws) as the interrupted run
        next(batches)
    for step, batch in enumerate(batches, start=skip):
        if batch.inputs.dim() == 4:  # the model's memory format (DALI's batches are channels_last already)
            memory_format = torch.channels_last if parts.channels_last else torch.contiguous_format
            batch = batch._replace(inputs=batch.inputs.contiguous(memory_format=memory_format))
        out = method.train_step(model, batch, parts.update, parts.autocast)
        totals.add(step, out, batch.targets)
        bar.update(1)
        checkpoint = (step + 1) % t.log_every == 0 or step + 1 == steps
        if checkpoint:
            totals.check_finite(epoch, world)
            bar.set_postfix_str(f"epoch {epoch + 1}/{t.epochs} loss {float(totals.sums[0]) / (step + 1):.4f}")
        # Several processes agree on stopping at the steps where they sync anyway; one process at any step.
        if (checkpoint or not world.distributed) and world.any(stop.signum is not None) and step + 1 < steps:
            totals.check_finite(epoch, world)
            totals.seconds += time.perf_counter() - t0
            save(epoch, step + 1, totals)
            raise stop.interrupted(f"{where(epoch, step + 1)} (checkpoint written)")
    method.end_epoch(epoch, world)
    parts.scheduler.step()
    if parts.device.type == "cuda":
        torch.cuda.synchronize(parts.device)
    totals.seconds += time.perf_counter() - t0
    return totals


def _record(
    cfg: DictConfig, parts: Parts, epoch: int, steps: int, lr: float, totals: _EpochTotals
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Epoch ``epoch``'s line of ``metrics.jsonl`` (the training terms and accuracy, then the test metrics),
    and the test confusion matrix of each network the run is scored by."""
    t0 = time.perf_counter()
    totals = totals.reduced()
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
    record.update({f"train/{k}": float(v) / steps for k, v in zip(totals.names, totals.sums)})
    record["train/acc"] = 100.0 * float(totals.correct) / totals.seen
    parts.world.broadcast_buffers(parts.model)  # one set of BN statistics (rank 0's, as DDP's next forward would)
    limit, k = cfg.trainer.limit_test_batches, parts.data.num_classes
    scores = evaluate(parts.model, parts.method, parts.data.test, limit, parts.autocast, k, parts.device)
    record.update(scores.metrics)
    record["seconds"] = totals.seconds + time.perf_counter() - t0
    record["train/images_per_s"] = totals.seen / totals.seconds
    return record, scores.confusion


def _resume(parts: Parts, ckpt_path: Path, run_dir: Path) -> Progress:
    """Restore ``last.pt`` into ``parts`` and this process's RNGs; return where training stands.

    The loaded checkpoint (weights, optimizer state, every rank's partial sums) is held only here, so it is
    freed on return instead of staying in host memory on every rank for the whole run.
    """
    world = parts.world
    ckpt = load_checkpoint(ckpt_path)  # to the CPU: load_state_dict copies onto the device
    parts.load_state_dict(ckpt, ckpt_path)
    rng = per_rank(ckpt["rng"])
    set_rng_state(world.own_share(rng) or rng[0], parts.device, ckpt_path)
    progress = Progress(ckpt)
    if world.main:  # the global batch is the same (a config key), so another process count trains the same steps
        before = ckpt.get("world_size", 1)
        moved = f", on {world.size} processes instead of {before}" if before != world.size else ""
        if moved and progress.step:
            moved += (
                f" (epoch {progress.epoch + 1}'s logged averages then differ from an uninterrupted run's "
                "in the last bits)"
            )
        print(f"[alr] resuming {run_dir} after {where(progress.epoch, progress.step)}{moved}")
    return progress


def fit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from ``last.pt`` there) and return its result."""
    ckpt_path, t = run_dir / "last.pt", cfg.trainer
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    prepare_run_dir(run_dir)
    if t.resume and (done := skip_if_finished(run_dir, plain_cfg, resumable_keys(cfg))) is not None:
        return done

    # --- set-up: nothing is written until everything that can refuse the run has been checked ---
    world = setup(str(t.device))
    seed_everything(cfg.seed, t.deterministic)
    parts = Parts(cfg, world)
    progress = _resume(parts, ckpt_path, run_dir) if t.resume and ckpt_path.exists() else Progress()

    # --- the run folder: from here on files are written, by rank 0 only ---
    params = {"backbone": count_params(parts.model), "method": count_params(parts.method)}
    if world.main:
        start_run_folder(run_dir, plain_cfg, progress.epoch, parts.data.class_names, parts.data.info, params)
    logger = build_logger(plain_cfg, run_dir) if world.main else NoLogger()
    steps = parts.steps
    bar = tqdm(
        total=(t.epochs - progress.epoch) * steps - progress.step,
        disable=not (t.progress and world.main),
        desc=cfg.run_name,
        unit="step",
        dynamic_ncols=True,
    )

    def save(epoch: int, step: int, totals: _EpochTotals | None) -> None:
        """``last.pt`` after ``epoch`` whole epochs and ``step`` steps of the next one."""
        state = {**parts.state_dict(), **progress.state_dict(), "epoch": epoch, "step": step}
        # What differs between ranks is saved once per rank (a collective: every rank calls it).
        partial = world.gather(totals.state_dict()) if totals else None
        method_sums = world.gather(parts.method.partial_sums()) if totals else None
        state.update(partial=partial, method_sums=method_sums, rng=world.gather(rng_state(parts.device)))
        state["config"] = plain_cfg
        if world.main:
            save_checkpoint({**state, "alr_version": alr.__version__, "world_size": world.size}, ckpt_path)
        world.barrier()  # no process exits (and makes torchrun stop the others) before last.pt is written

    exit_code = 1
    try:
        with StopOnSignal() as stop:
            for epoch in range(progress.epoch, t.epochs):
                lr = parts.optimizer.param_groups[0]["lr"]
                totals = _train_epoch(cfg, parts, progress, epoch, steps, stop, bar, save)
                record, confusion = _record(cfg, parts, epoch, steps, lr, totals)
                progress.elapsed += record["seconds"]
                if record["test/acc"] > progress.best[0]:
                    progress.best = (record["test/acc"], epoch + 1)
                if world.main:
                    write_epoch(run_dir, cfg, parts.method, parts.data.class_names, record, confusion, logger)
                save(epoch + 1, 0, None)
                bar.set_postfix_str(
                    f"epoch {epoch + 1}/{t.epochs} loss {record['train/loss']:.4f} test {record['test/acc']:.2f}%"
                )
                if world.any(stop.signum is not None) and epoch + 1 < t.epochs:
                    raise stop.interrupted(f"{where(epoch + 1, 0)} (checkpoint written)")
        exit_code = 0
    except Interrupted as e:  # its hand_over finishes the logger after the requeue (a W&B upload takes seconds)
        e.logger, logger = logger, NoLogger()
        raise
    finally:
        bar.close()
        logger.finish(exit_code)

    result = run_folder.result(
        cfg,
        run_dir,
        progress.best,
        progress.elapsed,
        params,
        parts.data.info,
        world.size,
        parts.device,
        state_bytes(parts.method),
    )
    if world.distributed:  # DDP and the method's averaged gradients keep every rank's copy equal: check it
        result["identical_on_all_ranks"] = world.identical(parts.model, parts.method)
    if world.main:
        write_json(result, run_dir / "result.json")
        if not t.keep_checkpoint:  # after result.json: a finished run is skipped on resume, last.pt or not
            ckpt_path.unlink(missing_ok=True)
    return result
