"""The training loop: one for every data set, backbone and method.

Read top to bottom: set-up (device, data, model, method, optimizer), resume from the run folder,
then per epoch: train, evaluate, write ``metrics.jsonl`` / snapshots / ``last.pt``; finally
``result.json``. The loop knows nothing about any method: ``method(model, x, y)`` returns the
loss, the logits and the terms to log (see :mod:`alr.methods.supervised`).
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

import alr
from alr.checkpoint import save_checkpoint, write_json
from alr.loggers import build_logger

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch, step and term."""


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


def fit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from ``last.pt`` there) and return its result."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path, ckpt_path, metrics_path = run_dir / "result.json", run_dir / "last.pt", run_dir / "metrics.jsonl"
    t = cfg.trainer
    if t.resume and result_path.exists() and json.loads(result_path.read_text()).get("status") == "finished":
        print(f"[alr] {run_dir} has finished already: skipping (trainer.resume=false to train again)")
        return json.loads(result_path.read_text())

    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(plain_cfg))

    # --- set-up ------------------------------------------------------------------------------
    seed_everything(cfg.seed, t.deterministic)
    device = pick_device(str(t.device))
    data = instantiate(cfg.dataset.build, batch_size=t.batch_size, device=device, seed=cfg.seed)
    model = instantiate(cfg.model).to(device)
    method = instantiate(cfg.method.module).to(device)
    if t.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    groups = [{"params": list(model.parameters()), "weight_decay": cfg.optim.weight_decay}]
    extra = [p for p in method.parameters() if p.requires_grad]
    if extra:  # ALR's S has its own group: weight decay 0 unless the method sets one (SPEC §1)
        groups.append({"params": extra, "weight_decay": cfg.method.weight_decay})
    optimizer = instantiate(cfg.optim.optimizer)(groups)
    scheduler = instantiate(cfg.optim.scheduler)(optimizer)
    dtype = DTYPES[t.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

    def autocast():
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    start_epoch, elapsed, best = 0, 0.0, (-1.0, 0)
    if t.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch, elapsed, best = ckpt["epoch"], ckpt["elapsed"], tuple(ckpt["best"])
        print(f"[alr] resuming {run_dir} after epoch {start_epoch}")
    # Lines written after the checkpoint we resume from would otherwise appear twice.
    history = [m for m in read_metrics(metrics_path) if m["epoch"] <= start_epoch]
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history))

    params = {"backbone": count_params(model), "method": count_params(method)}
    (run_dir / "classes.json").write_text(json.dumps(data.class_names) + "\n")
    logger = build_logger(plain_cfg, run_dir)
    write_json({"status": "running", "params": params}, result_path)
    steps = min(len(data.train), t.limit_train_batches or len(data.train))
    bar = tqdm(
        total=(t.epochs - start_epoch) * steps,
        disable=not t.progress,
        desc=cfg.run_name,
        unit="step",
        dynamic_ncols=True,
    )
    exit_code = 1
    try:
        for epoch in range(start_epoch, t.epochs):
            # --- train ---------------------------------------------------------------------
            model.train()
            method.train()
            method.start_epoch()
            t0 = time.perf_counter()
            names, sums, correct, seen = None, None, 0, 0
            first_bad = torch.full((), -1, device=device)
            for step, (x, y) in enumerate(islice(data.train.epoch(epoch), steps)):
                if t.channels_last and device.type == "cuda" and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    out = method(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()
                scaler.step(optimizer)
                scaler.update()

                # Book-keeping stays on the device: no host synchronisation per step.
                vec = torch.stack([out.loss.detach().float(), *(v.float() for v in out.terms.values())])
                if names is None:
                    names, sums = ["loss", *out.terms], torch.zeros_like(vec)
                sums += vec
                correct += (out.logits.detach().argmax(dim=1) == y).sum()
                seen += len(y)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(vec[0]), step, first_bad)
                bar.update(1)
                if (step + 1) % t.log_every == 0 or step + 1 == steps:
                    _check_finite(first_bad, epoch, names, sums)
                    bar.set_postfix_str(f"epoch {epoch + 1}/{t.epochs} loss {float(sums[0]) / (step + 1):.4f}")
            scheduler_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - t0

            # --- evaluate and record ---------------------------------------------------------
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": scheduler_lr}
            record.update({f"train/{k}": float(v) / steps for k, v in zip(names, sums)})
            record["train/acc"] = 100.0 * float(correct) / seen
            record.update(evaluate(model, method, data.test, t.limit_test_batches, autocast))
            record["seconds"] = time.perf_counter() - t0
            record["train/images_per_s"] = seen / train_seconds
            elapsed += record["seconds"]
            if record["test/acc"] > best[0]:
                best = (record["test/acc"], epoch + 1)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            logger.log(record, step=epoch + 1)
            if (epoch + 1) % t.snapshot_every == 0 or epoch + 1 == t.epochs:
                for name, matrix in method.snapshots().items():
                    (run_dir / name).mkdir(exist_ok=True)
                    m = matrix.float().cpu().numpy()
                    np.save(run_dir / name / f"epoch_{epoch + 1:03d}.npy", m)
                    logger.log_matrix(name, m, data.class_names, step=epoch + 1)
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "elapsed": elapsed,
                    "best": best,
                    "rng": rng_state(),
                    "config": plain_cfg,
                    "alr_version": alr.__version__,
                },
                ckpt_path,
            )
            bar.set_postfix_str(
                f"epoch {epoch + 1}/{t.epochs} loss {record['train/loss']:.4f} test {record['test/acc']:.2f}%"
            )
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


def _check_finite(first_bad: torch.Tensor, epoch: int, names: list[str], sums: torch.Tensor) -> None:
    step = int(first_bad)
    if step < 0:
        return
    bad_terms = [n for n, v in zip(names[1:], sums[1:].tolist()) if not np.isfinite(v)] or ["loss"]
    raise NonFiniteLossError(
        f"non-finite loss at epoch {epoch + 1}, step {step + 1} (term: {', '.join(bad_terms)}). "
        "The last good checkpoint (last.pt, end of the previous epoch) is kept."
    )
