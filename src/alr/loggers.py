"""Experiment loggers: ``none`` (the run folder only) and Weights & Biases."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np


class NoLogger:
    """Logs nothing beyond the run folder, which the trainer always writes."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_matrix(self, name: str, matrix: np.ndarray, labels: list[str], step: int) -> None:
        pass

    def finish(self, exit_code: int = 0, timeout_s: float | None = None) -> bool:
        return True


def has_credentials() -> bool:
    """A W&B API key in the environment or in ``~/.netrc`` (where ``wandb login`` puts it)."""
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )


def _wandb_mode(mode: str) -> str:
    """``auto`` is online only where credentials exist, so a run never blocks without a network."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_credentials() else "offline"


class WandbLogger:
    """One W&B run per training run; resumed runs continue the same W&B run (id kept in the folder)."""

    def __init__(self, cfg: dict[str, Any], run_dir: Path, project: str, entity: str | None, mode: str):
        import wandb

        self._wandb = wandb
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else None  # None: W&B picks a new id
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=_wandb_mode(mode),
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            name=cfg["run_name"],
            group=f"{cfg['experiment_name']}/{cfg['dataset']['name']}/{cfg['model_name']}/{cfg['method']['name']}",
            job_type=cfg["experiment_name"],
            tags=[
                cfg["experiment_name"],
                cfg["dataset"]["name"],
                cfg["model_name"],
                cfg["method"]["name"],
                f"seed{cfg['seed']}",
            ],
            config=cfg,
        )
        id_file.write_text(self.run.id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_matrix(self, name: str, matrix: np.ndarray, labels: list[str], step: int) -> None:
        from alr.reporting.figures import heatmap_figure

        table = self._wandb.Table(
            columns=["class", *labels], data=[[c, *row] for c, row in zip(labels, matrix.tolist())]
        )
        fig = heatmap_figure(matrix, labels, title=f"{name}, epoch {step}")
        self.run.log({f"{name}/heatmap": self._wandb.Image(fig), f"{name}/matrix": table}, step=step)
        import matplotlib.pyplot as plt

        plt.close(fig)

    def finish(self, exit_code: int = 0, timeout_s: float | None = None) -> bool:
        """End the W&B run; with ``timeout_s``, stop waiting for its upload after that long (then ``False``).

        What W&B has not sent by then stays in the run's folder under ``wandb/``: ``make wandb-sync`` uploads
        an offline run, ``wandb sync <folder>`` an online one.
        """
        if timeout_s is None:
            self.run.finish(exit_code=exit_code)
            return True
        worker = threading.Thread(target=self.run.finish, kwargs={"exit_code": exit_code}, daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            print(
                f"[alr] W&B had not finished after {timeout_s:.0f} s; what it did not upload stays in "
                f"{Path(self.run.dir).parent} (wandb sync uploads it)",
                file=sys.stderr,
            )
        return not worker.is_alive()


def build_logger(cfg: dict[str, Any], run_dir: Path) -> NoLogger | WandbLogger:
    lg = cfg["logger"]
    if lg["name"] == "wandb":
        return WandbLogger(cfg, run_dir, lg.get("project", "alr"), lg.get("entity"), lg.get("mode", "auto"))
    return NoLogger()
