"""The training loop: one for every data set, backbone and method.

Read top to bottom: checks of the run folder, set-up (device, data, model, method, optimizer),
resume from ``last.pt``, then per epoch: train, evaluate, write ``metrics.jsonl`` / snapshots /
``last.pt``; finally ``result.json``. The loop knows nothing about any method: ``method(model, x, y)``
returns the loss, the logits and the terms to log (see :mod:`alr.methods.supervised`).

Reliability (README, "When things go wrong"):

- Everything that can refuse a run (the folder, the config it holds, the data, the method, the
  checkpoint) is checked before anything is written, so a refused run changes no file.
- ``last.pt`` is written atomically at the end of every epoch and, on a stop signal, between two
  steps (:mod:`alr.preempt`); it holds the step reached and the epoch's running sums, and since an
  epoch's batches are a function of ``(seed, epoch)`` a resumed run replays the same batches.
- The loss is checked for NaN/inf every ``log_every`` steps and at the end of every epoch, on the
  device: the first bad step and its terms are recorded without a host sync, and no checkpoint is
  ever written from an epoch with a non-finite loss.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

import alr
from alr.checkpoint import (
    disk_errors,
    load_checkpoint,
    save_checkpoint,
    stale_temporaries,
    write_json,
    write_text,
)
from alr.errors import CheckpointError, RunError
from alr.loggers import build_logger
from alr.preempt import StopOnSignal

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch, step and term."""


# Keys that may change between the run that wrote a folder and the command that resumes it: where
# things are read and written, how progress is shown, which device (and which shard's process) runs it.
RESUMABLE_CHANGES = (
    "shard",
    "paths",
    "logger",
    "trainer.progress",
    "trainer.log_every",
    "trainer.resume",
    "trainer.device",
    "trainer.channels_last",
    "dataset.data_dir",
    "dataset.download",
    "dataset.num_workers",
    "dataset.cache_dir",
    # the same keys as the data set's build node interpolates them (and the progress bar it shows)
    "dataset.build.data_dir",
    "dataset.build.download",
    "dataset.build.num_workers",
    "dataset.build.cache_dir",
    "dataset.build.progress",
)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but no CUDA device is visible. Use trainer.device=cpu or auto.")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: nn.Module, method: nn.Module, batches, limit: int | None, autocast) -> dict[str, float]:
    """Top-1 (and top-5 where K > 5) accuracy in percent, and the mean cross entropy."""
    model.eval()
    correct1 = correct5 = loss_sum = n = 0
    for x, y in islice(batches.epoch(0), limit):
        with autocast():
            logits = method.predict(model, x).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum()
        correct5 += (top == y[:, None]).any(dim=1).sum()
        n += len(y)
    out = {"test/acc": 100.0 * float(correct1) / n, "test/loss": float(loss_sum) / n}
    if logits.shape[1] > 5:
        out["test/acc5"] = 100.0 * float(correct5) / n
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key (saved -> now)`` for every key that differs, except :data:`RESUMABLE_CHANGES`."""
    a, b = _flatten(saved), _flatten(now)

    def keep(key: str) -> bool:
        return not any(key == p or key.startswith(p + ".") for p in RESUMABLE_CHANGES)

    return [
        f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})"
        for k in sorted(a.keys() | b.keys())
        if keep(k) and a.get(k) != b.get(k)
    ]


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and make sure a file can be written there."""
    fix = "Point paths.output_dir (or hydra.run.dir) at a folder you can write to."
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise RunError(f"cannot write the run folder {run_dir} ({e.strerror or e}). {fix}") from e


def _check_same_run(run_dir: Path, plain_cfg: dict[str, Any]) -> None:
    """Refuse to resume or skip a run folder that holds a run of another config."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists() or not ((run_dir / "last.pt").exists() or (run_dir / "result.json").exists()):
        return
    try:
        saved = yaml.safe_load(saved_path.read_text())
        assert isinstance(saved, dict)
    except Exception as e:
        raise RunError(
            f"{saved_path} is not a readable config ({type(e).__name__}). Move the run folder away to start fresh."
        ) from e
    if saved.get("config_version") != plain_cfg["config_version"]:
        raise RunError(
            f"{saved_path} is config version {saved.get('config_version')!r}, this suite writes version "
            f"{plain_cfg['config_version']}: the run folder is from another version of the suite. Finish it with "
            "that version, or start fresh in another folder (a different experiment_name or hydra.run.dir)."
        )
    diff = config_differences(saved, plain_cfg)
    if diff:
        raise RunError(
            f"{run_dir} holds a run of another config: {'; '.join(diff)}. Rerun with the saved values to resume, "
            "choose another folder (experiment_name=... or hydra.run.dir=...), or set trainer.resume=false to "
            "start over in this folder (its files are overwritten)."
        )


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

    def __init__(self, device: torch.device) -> None:
        self.names: list[str] | None = None
        self.sums = self.bad_terms = torch.zeros(0, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.seen, self.seconds = 0, 0.0

    def add(self, step: int, out: Any, targets: torch.Tensor) -> None:
        vec = torch.stack([out.loss.detach().float(), *(v.float() for v in out.terms.values())])
        if self.names is None:
            self.names, self.sums, self.bad_terms = ["loss", *out.terms], torch.zeros_like(vec), torch.zeros_like(vec)
        self.sums += vec
        self.correct += (out.logits.detach().argmax(dim=1) == targets).sum()
        self.seen += len(targets)
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(vec[0])
        self.first_bad = torch.where(newly_bad, step, self.first_bad)
        self.bad_terms = torch.where(newly_bad, vec, self.bad_terms)

    def check_finite(self, epoch: int) -> None:
        """Raise :class:`NonFiniteLossError` naming the first bad step of ``epoch`` (0-based) and its terms."""
        step = int(self.first_bad)
        if step < 0:
            return
        values = dict(zip(self.names, self.bad_terms.tolist()))
        bad = [f"{n}={v}" for n, v in values.items() if n != "loss" and not np.isfinite(v)] or [
            f"loss={values['loss']}"
        ]
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch + 1}, step {step + 1} ({', '.join(bad)}). No checkpoint was "
            "written after it: last.pt, if there is one, holds the last good state. Lower the learning rate "
            "(under fp16, try bf16 or fp32) and rerun with trainer.resume=false."
        )

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("names", "sums", "bad_terms", "correct", "first_bad", "seen", "seconds")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def fit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from ``last.pt`` there) and return its result."""
    result_path, ckpt_path, metrics_path = run_dir / "result.json", run_dir / "last.pt", run_dir / "metrics.jsonl"
    t = cfg.trainer
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    prepare_run_dir(run_dir)
    if t.resume:
        _check_same_run(run_dir, plain_cfg)
        if result_path.exists() and json.loads(result_path.read_text()).get("status") == "finished":
            print(f"[alr] {run_dir} has finished already: skipping (trainer.resume=false to train again)")
            return json.loads(result_path.read_text())

    # --- set-up (nothing is written until everything that can refuse the run has been checked) ---
    seed_everything(cfg.seed, t.deterministic)
    device = pick_device(str(t.device))
    data = _build(cfg.dataset.build, None, batch_size=t.batch_size, device=device, seed=cfg.seed)
    if data.num_classes != cfg.dataset.num_classes:
        raise RunError(
            f"config key 'dataset.num_classes' is {cfg.dataset.num_classes} but the {cfg.dataset.name} data has "
            f"{data.num_classes} classes. Remove the override (or set dataset.num_classes={data.num_classes})."
        )
    model = _build(cfg.model, f"model '{cfg.model_name}'").to(device)
    method = _build(cfg.method.module, f"method '{cfg.method.name}'").to(device)
    if t.channels_last and device.type == "cuda":  # 4-D weights only: the backbone and DML's peer
        model = model.to(memory_format=torch.channels_last)
        method = method.to(memory_format=torch.channels_last)

    groups = [{"params": list(model.parameters()), "weight_decay": cfg.optim.weight_decay}]
    extra = [p for p in method.parameters() if p.requires_grad]
    if extra:  # ALR's S, DML's peer: their own group, with the method's weight decay (SPEC §1)
        groups.append({"params": extra, "weight_decay": cfg.method.weight_decay})
    optimizer = instantiate(cfg.optim.optimizer)(groups)
    scheduler = instantiate(cfg.optim.scheduler)(optimizer)
    dtype = DTYPES[t.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

    def autocast():
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    start_epoch, start_step, elapsed, best, partial = 0, 0, 0.0, (-1.0, 0), None
    if t.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        try:
            model.load_state_dict(ckpt["model"])
            method.load_state_dict(ckpt["method"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"{ckpt_path} does not fit this run's model, method or optimizer ({' '.join(str(e).split())[:240]}). "
                "Move it away to train from scratch, or set trainer.resume=false."
            ) from e
        set_rng_state(ckpt["rng"])
        start_epoch, start_step, partial = ckpt["epoch"], ckpt.get("step", 0), ckpt.get("partial")
        elapsed, best = ckpt["elapsed"], tuple(ckpt["best"])
        print(f"[alr] resuming {run_dir} after epoch {start_epoch}" + (f", step {start_step}" if start_step else ""))

    # --- the run folder: from here on files are written --------------------------------------
    for tmp in stale_temporaries(ckpt_path):  # left by a save that was killed mid-write
        tmp.unlink()
    write_text(OmegaConf.to_yaml(plain_cfg), run_dir / "config.yaml")
    # Lines written after the checkpoint we resume from would otherwise appear twice.
    history = [m for m in read_metrics(metrics_path) if m["epoch"] <= start_epoch]
    write_text("".join(json.dumps(m) + "\n" for m in history), metrics_path)

    params = {"backbone": count_params(model), "method": count_params(method)}
    write_text(json.dumps(data.class_names) + "\n", run_dir / "classes.json")
    logger = build_logger(plain_cfg, run_dir)
    write_json({"status": "running", "params": params, "data": data.info}, result_path)
    steps = min(len(data.train), t.limit_train_batches or len(data.train))
    bar = tqdm(
        total=(t.epochs - start_epoch) * steps - start_step,
        disable=not t.progress,
        desc=cfg.run_name,
        unit="step",
        dynamic_ncols=True,
    )

    def save(epoch: int, step: int, totals: _EpochTotals | None) -> None:
        """``last.pt`` after ``epoch`` whole epochs and ``step`` steps of the next one."""
        save_checkpoint(
            {
                "model": model.state_dict(),
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "step": step,
                "partial": totals.state_dict() if totals else None,
                "elapsed": elapsed,
                "best": best,
                "rng": rng_state(),
                "config": plain_cfg,
                "alr_version": alr.__version__,
            },
            ckpt_path,
        )

    exit_code = 1
    try:
        with StopOnSignal() as stop:
            for epoch in range(start_epoch, t.epochs):
                # --- train -----------------------------------------------------------------
                model.train()
                method.train()
                totals = _EpochTotals(device)
                skip = start_step if epoch == start_epoch else 0
                if skip:
                    totals.load_state_dict(partial)  # the method's own state came back with method.state_dict()
                else:
                    method.start_epoch()
                t0 = time.perf_counter()
                batches = islice(data.train.epoch(epoch), steps)
                for _ in range(skip):  # the same batches (and augmentation draws) as the interrupted run
                    next(batches)
                for step, (x, y) in enumerate(batches, start=skip):
                    if t.channels_last and device.type == "cuda" and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast():
                        out = method(model, x, y)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(out.loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    totals.add(step, out, y)
                    bar.update(1)
                    if (step + 1) % t.log_every == 0 or step + 1 == steps:
                        totals.check_finite(epoch)
                        bar.set_postfix_str(
                            f"epoch {epoch + 1}/{t.epochs} loss {float(totals.sums[0]) / (step + 1):.4f}"
                        )
                    if stop.signum is not None and step + 1 < steps:
                        totals.check_finite(epoch)
                        totals.seconds += time.perf_counter() - t0
                        save(epoch, step + 1, totals)
                        raise stop.interrupted(f"epoch {epoch + 1}, step {step + 1} (checkpoint written)")
                scheduler_lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_seconds = totals.seconds + time.perf_counter() - t0

                # --- evaluate and record -----------------------------------------------------
                record: dict[str, Any] = {"epoch": epoch + 1, "lr": scheduler_lr}
                record.update({f"train/{k}": float(v) / steps for k, v in zip(totals.names, totals.sums)})
                record["train/acc"] = 100.0 * float(totals.correct) / totals.seen
                record.update(evaluate(model, method, data.test, t.limit_test_batches, autocast))
                record["seconds"] = totals.seconds + time.perf_counter() - t0
                record["train/images_per_s"] = totals.seen / train_seconds
                elapsed += record["seconds"]
                if record["test/acc"] > best[0]:
                    best = (record["test/acc"], epoch + 1)
                with disk_errors(metrics_path), metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                logger.log(record, step=epoch + 1)
                if (epoch + 1) % t.snapshot_every == 0 or epoch + 1 == t.epochs:
                    for name, matrix in method.snapshots().items():
                        (run_dir / name).mkdir(exist_ok=True)
                        m = matrix.float().cpu().numpy()
                        with disk_errors(run_dir / name):
                            np.save(run_dir / name / f"epoch_{epoch + 1:03d}.npy", m)
                        logger.log_matrix(name, m, data.class_names, step=epoch + 1)
                save(epoch + 1, 0, None)
                bar.set_postfix_str(
                    f"epoch {epoch + 1}/{t.epochs} loss {record['train/loss']:.4f} test {record['test/acc']:.2f}%"
                )
                if stop.signum is not None and epoch + 1 < t.epochs:
                    raise stop.interrupted(f"epoch {epoch + 1} (checkpoint written)")
        exit_code = 0
    finally:
        bar.close()
        logger.finish(exit_code)

    final = read_metrics(metrics_path)[-1]
    result = {
        "status": "finished",
        "final_test_acc": final["test/acc"],
        "final_test_acc5": final.get("test/acc5"),
        "best_test_acc": best[0],
        "best_epoch": best[1],
        "epochs": t.epochs,
        "params": params,
        "data": data.info,
        "wall_time_s": elapsed,
        "experiment": cfg.experiment_name,
        "dataset": cfg.dataset.name,
        "model": cfg.model_name,
        "method": cfg.method.name,
        "seed": cfg.seed,
        "precision": t.precision,
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "alr_version": alr.__version__,
    }
    write_json(result, result_path)
    return result
