"""A run's folder: refusing another config's folder, what resume may change, and what rank 0 writes there.

The trainer (:mod:`alr.trainer`) calls these at the start of a run (:func:`skip_if_finished`,
:func:`start_run_folder`), after each epoch (:func:`write_epoch`) and at the end (:func:`result`); nothing
here trains. What a folder holds: docs/runs-and-results.md.
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

import alr
from alr.checkpoint import disk_errors, stale_temporaries, write_json, write_text
from alr.errors import RunError, RunFolderConflict

# Keys that may change between the run that wrote a folder and the command that resumes it: where
# things are read and written, how progress is shown, which device (and which shard's process) runs it.
RESUMABLE_CHANGES = (
    "shard",
    "paths",
    "logger",
    "trainer.progress",
    "trainer.log_every",
    "trainer.resume",
    "trainer.keep_checkpoint",
    "trainer.device",
    "trainer.channels_last",
    "trainer.compile",
    "dataset.data_dir",
    "dataset.folder",
    "dataset.download",
    "dataset.download_timeout_s",
    "dataset.num_workers",
    "dataset.num_train",
    "dataset.num_test",
    "dataset.cache_dir",
    "method.label",  # how reports name the method, and what the GPU forecast prices: neither changes training
    "method.cost",
    "method.max_state_mb",  # a limit PS-KD checks before it trains: raising it changes no step
    "report",  # what an experiment's tables compare (configs/experiment/): only reporting reads it
)


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


def resumable_keys(cfg: DictConfig) -> set[str]:
    """:data:`RESUMABLE_CHANGES`, plus every key whose value is computed from one of them.

    A config node may copy a resumable key by interpolation (``dataset.build.data_dir: ${..data_dir}``,
    a KD teacher's folder under ``${paths.output_dir}``); such a copy may change with the key it copies.
    The copies are found from the interpolations themselves, for every data set and method: each
    resumable leaf is set to a distinct marker in a copy of the config, and the keys whose resolved
    value then differs depend on one. (A key that mixes in a non-resumable key is safe to skip here:
    that key is compared on its own.)
    """
    marked = copy.deepcopy(cfg)
    raw = _flatten(OmegaConf.to_container(cfg, resolve=False))
    leaves = [k for k in raw if any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)]
    with open_dict(marked):
        for i, leaf in enumerate(leaves):
            OmegaConf.update(marked, leaf, f"<resumable {i}>", force_add=True)
    try:
        before = _flatten(OmegaConf.to_container(cfg, resolve=True))
        after = _flatten(OmegaConf.to_container(marked, resolve=True))
    except Exception:  # an interpolation that cannot take a marker: keep to the listed keys
        return set(RESUMABLE_CHANGES)
    return set(RESUMABLE_CHANGES) | {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


# ALR's normalisation key (docs/deviations.md#alrs-loss). It replaced two booleans, `class_mean` and
# `residual_mean`, when eq. 4–5's average became the default: until then `method=alr` and `method=alr_s` held
# the summed form, and `alr_mean`, `alr_s_mean` the averaged one.
NORMALISATION = "method.module.criterion.normalisation"
# (name, form) of a run saved before that change -> the method config that holds the form now.
RENAMED_ALR = {
    ("alr", "sum"): "alr_sum",
    ("alr_s", "sum"): "alr_s_sum",
    ("alr_mean", "mean"): "alr",
    ("alr_s_mean", "mean"): "alr_s",
}


def _alr_normalisation(saved: dict[str, Any]) -> dict[str, Any]:
    """An ALR run saved with ``class_mean`` and ``residual_mean`` (or without either: the summed form), in today's
    ``normalisation`` key and method name. A renamed run's saved label is its old config's, so it is dropped (the
    config that holds the form now names it); a summed run keeping its name has " (summed)" added to its label."""
    method = saved.get("method")
    criterion = (method.get("module") or {}).get("criterion") if isinstance(method, dict) else None
    if not (isinstance(criterion, dict) and str(criterion.get("_target_", "")).endswith("ALRLoss")):
        return saved
    if "normalisation" in criterion:
        return saved
    saved = copy.deepcopy(saved)
    method, criterion = saved["method"], saved["method"]["module"]["criterion"]
    class_mean, residual_mean = criterion.pop("class_mean", False), criterion.pop("residual_mean", False)
    form = "class_mean" if class_mean else "mean" if residual_mean else "sum"
    criterion["normalisation"] = form
    renamed = RENAMED_ALR.get((method.get("name"), form))
    if renamed:
        method["name"] = renamed
        method.pop("label", None)
    elif form == "sum" and method.get("label"):
        method["label"] = f"{method['label']} (summed)"
    return saved


def _fmnist_resnet32(saved: dict[str, Any]) -> dict[str, Any]:
    """A Fashion-MNIST run of ResNet-32 saved as ``experiment_name: fmnist`` (that experiment's recipe before the
    CPU benchmark took its name) belongs to ``fmnist_resnet32``, where that recipe lives on unchanged."""
    if saved.get("experiment_name") == "fmnist" and saved.get("model_name") == "resnet32":
        return {**saved, "experiment_name": "fmnist_resnet32"}
    return saved


# Each turns a saved config.yaml of an older suite into today's keys and names, in the order they were made; a
# later one may rely on an earlier one's output.
SAVED_CONFIG_UPGRADES = (_alr_normalisation, _fmnist_resnet32)


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A run folder's saved config (``config.yaml``) in today's keys and method names: what resuming compares
    (:func:`config_differences`) and what reports read (:func:`alr.reporting.runs.load_run`). Leaves ``saved``
    as it is; a config already in today's keys comes back unchanged."""
    for upgrade in SAVED_CONFIG_UPGRADES:
        saved = upgrade(saved)
    return saved


# Keys added to the configs after runs were made without them, with the value those runs had: a saved config
# that lacks one (where the current config has it) is compared as if it held that value, so run folders made
# before the key existed still resume or are skipped as finished.
ADDED_KEYS = {
    "method.module.criterion.teach": "all",
    "method.module.criterion.s_update": "gradient",
    "method.module.criterion.weight": "one_minus_acc",
    "method.module.criterion.weight_value": None,
    "method.module.criterion.s_lr_multiplier": 1.0,
    "method.module.criterion.s_init": "zeros",
    "method.teacher_model": "wrn28_10",
}


def config_differences(saved: dict[str, Any], now: dict[str, Any], resumable: set[str] | None = None) -> list[str]:
    """``key (saved -> now)`` for every key that differs, except the ``resumable`` ones (and their children); the
    saved config read in today's keys (:func:`upgrade_saved_config`, then :data:`ADDED_KEYS`)."""
    a, b = _flatten(upgrade_saved_config(saved)), _flatten(now)
    a |= {k: v for k, v in ADDED_KEYS.items() if k not in a and k in b}
    skip = set(RESUMABLE_CHANGES) if resumable is None else resumable

    def keep(key: str) -> bool:
        return not any(key == p or key.startswith(p + ".") for p in skip)

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


def _summed_under_its_old_name(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The overrides that resume ``saved``, a summed ALR run saved before the normalisation key, when ``now`` is a
    run of the same method name in another normalisation (the average ``method=alr`` means now); else None."""
    upgraded = upgrade_saved_config(saved)
    was, form = _flatten(saved), _flatten(upgraded).get(NORMALISATION)
    if form != "sum" or NORMALISATION in was or _flatten(now).get(NORMALISATION, "sum") == "sum":
        return None
    if was.get("method.name") != _flatten(now).get("method.name"):
        return None
    name = upgraded["method"]["name"]
    return f"method={name}" if name != was["method.name"] else f"method={name} {NORMALISATION}=sum"


def check_same_run(run_dir: Path, plain_cfg: dict[str, Any], resumable: set[str]) -> None:
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
    diff = config_differences(saved, plain_cfg, resumable)
    if diff and (how := _summed_under_its_old_name(saved, plain_cfg)):
        raise RunFolderConflict(
            f"{run_dir} holds ALR's summed form (method={saved['method']['name']} before eq. 4–5's average became "
            f"its default): rerun it as {how}, or move it."
        )
    if diff:
        raise RunFolderConflict(
            f"{run_dir} holds a run of another config: {'; '.join(diff)}. Rerun with the saved values to resume, "
            "choose another folder (experiment_name=... or hydra.run.dir=...), or set trainer.resume=false to "
            "start over in this folder (its files are overwritten)."
        )


def skip_if_finished(run_dir: Path, plain_cfg: dict[str, Any], resumable: set[str]) -> dict[str, Any] | None:
    """The saved result of a finished run of this config, after refusing a folder that holds another config."""
    check_same_run(run_dir, plain_cfg, resumable)
    result_path = run_dir / "result.json"
    if result_path.exists() and json.loads(result_path.read_text()).get("status") == "finished":
        print(f"[alr] {run_dir} has finished already: skipping (trainer.resume=false to train again)")
        return json.loads(result_path.read_text())
    return None


def start_run_folder(
    run_dir: Path, plain_cfg: dict[str, Any], epochs_done: int, class_names: list[str], data_info: dict, params: dict
) -> None:
    """Write the config, trim ``metrics.jsonl`` to the checkpoint, the class names and a running ``result.json``."""
    ckpt_path, metrics_path = run_dir / "last.pt", run_dir / "metrics.jsonl"
    for tmp in stale_temporaries(ckpt_path):  # left by a save that was killed mid-write
        tmp.unlink()
    write_text(OmegaConf.to_yaml(plain_cfg), run_dir / "config.yaml")
    # Lines written after the checkpoint we resume from would otherwise appear twice.
    history = [m for m in read_metrics(metrics_path) if m["epoch"] <= epochs_done]
    write_text("".join(json.dumps(m) + "\n" for m in history), metrics_path)
    write_text(json.dumps(class_names) + "\n", run_dir / "classes.json")
    write_json({"status": "running", "params": params, "data": data_info}, run_dir / "result.json")


def write_epoch(
    run_dir: Path,
    cfg: DictConfig,
    method: Any,
    class_names: list[str],
    record: dict[str, Any],
    confusion: dict[str, np.ndarray],
    logger: Any,
) -> None:
    """Append the epoch's metrics and log them; save the method's matrices when a snapshot is due, and after
    the last epoch the test confusion matrices (``test_confusion.npy``; ``test_confusion_<network>.npy`` for a
    method scored by several networks), rows the true class, columns the predicted one."""
    metrics_path, epoch, t = run_dir / "metrics.jsonl", record["epoch"], cfg.trainer
    with disk_errors(metrics_path), metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    logger.log(record, step=epoch)
    if epoch % t.snapshot_every == 0 or epoch == t.epochs:
        for name, matrix in method.snapshots().items():
            (run_dir / name).mkdir(exist_ok=True)
            m = matrix.float().cpu().numpy()
            with disk_errors(run_dir / name):
                np.save(run_dir / name / f"epoch_{epoch:03d}.npy", m)
            logger.log_matrix(name, m, class_names, step=epoch)
    if epoch == t.epochs:
        for network, counts in confusion.items():
            path = run_dir / (f"test_confusion_{network}.npy" if network else "test_confusion.npy")
            with disk_errors(path):
                np.save(path, counts)


def by_network(record: dict[str, Any], metric: str = "acc") -> dict[str, float]:
    """Each network's test ``metric`` in an epoch's record, for a method scored by several (DML)."""
    parts = {tuple(k.split("/")): v for k, v in record.items()}
    return {key[1]: v for key, v in parts.items() if len(key) == 3 and key[0] == "test" and key[2] == metric}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def result(
    cfg: DictConfig,
    run_dir: Path,
    best: tuple[float, int],
    elapsed: float,
    params: dict[str, int],
    data_info: dict,
    processes: int,
    device: torch.device,
    method_state_bytes: int = 0,
) -> dict[str, Any]:
    """``result.json`` of a finished run: the last epoch's test metrics (what the tables report), the best
    epoch's by test accuracy, and what the run was."""
    history = read_metrics(run_dir / "metrics.jsonl")
    final = history[-1]
    best_epoch = next((m for m in history if m["epoch"] == best[1]), final)
    return {
        "status": "finished",
        "final_test_acc": final["test/acc"],
        "final_test_acc5": final.get("test/acc5"),
        "final_test_nll": final["test/loss"],
        "final_test_ece": final["test/ece"],
        **({"final_test_acc_by_network": nets} if (nets := by_network(final)) else {}),
        **({"final_test_ece_by_network": nets} if (nets := by_network(final, "ece")) else {}),
        "best_test_acc": best[0],
        "best_epoch": best[1],
        "best_test_nll": best_epoch["test/loss"],
        "best_test_ece": best_epoch.get("test/ece"),  # (an epoch logged by alr 0.1.0 has none)
        "epochs": cfg.trainer.epochs,
        "params": params,
        "method_state_bytes": method_state_bytes,
        "data": data_info,
        "wall_time_s": elapsed,
        "experiment": cfg.experiment_name,
        "dataset": cfg.dataset.name,
        "model": cfg.model_name,
        "method": cfg.method.name,
        "seed": cfg.seed,
        "precision": cfg.trainer.precision,
        "processes": processes,
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "finished_at": time.time(),
        "alr_version": alr.__version__,
    }
