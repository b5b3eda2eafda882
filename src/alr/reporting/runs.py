"""Reading run folders: ``config.yaml``, ``metrics.jsonl``, ``result.json`` and the snapshots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from alr.run_folder import upgrade_saved_config


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``finished``, ``failed`` or ``running`` (started, or stopped before the end)."""
        return self.result.get("status", "running")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.config["dataset"]["name"], self.config["model_name"], self.config["method"]["name"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def class_names(self) -> list[str]:
        path = self.path / "classes.json"
        return json.loads(path.read_text()) if path.exists() else []

    def snapshot_epochs(self, name: str = "residual_labels") -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in (self.path / name).glob("epoch_*.npy"))

    def snapshot(self, epoch: int, name: str = "residual_labels") -> np.ndarray:
        return np.load(self.path / name / f"epoch_{epoch:03d}.npy")


def load_run(path: Path | str) -> Run:
    """The run in folder ``path`` (it holds the ``config.yaml`` the trainer writes), its config read in today's keys
    and method names (:func:`alr.run_folder.upgrade_saved_config`: an ALR run saved when the summed form was
    ``method=alr``'s default is read as ``alr_sum``)."""
    path = Path(path)
    config = upgrade_saved_config(yaml.safe_load((path / "config.yaml").read_text()))
    result_path = path / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    return Run(path, config, result)


def load_runs(root: Path | str) -> list[Run]:
    """Every run folder under ``root`` (a folder holding ``config.yaml``), sorted by path.

    Hydra's ``.hydra/config.yaml`` and W&B's ``wandb/.../config.yaml`` inside a run folder are not runs.
    """
    root = Path(root)
    return [
        load_run(p.parent)
        for p in sorted(root.rglob("config.yaml"))
        if not {".hydra", "wandb"} & set(p.relative_to(root).parts[:-1])
    ]
