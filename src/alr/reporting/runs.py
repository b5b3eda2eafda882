"""Reading run folders: ``config.yaml``, ``metrics.jsonl``, ``result.json`` and the snapshots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml


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


def load_runs(root: Path | str) -> list[Run]:
    """Every run folder under ``root`` (a folder holding ``config.yaml``), sorted by path."""
    runs = []
    for cfg_path in sorted(Path(root).rglob("config.yaml")):
        if cfg_path.parent.name == ".hydra":
            continue
        config = yaml.safe_load(cfg_path.read_text())
        result_path = cfg_path.parent / "result.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        runs.append(Run(cfg_path.parent, config, result))
    return runs
