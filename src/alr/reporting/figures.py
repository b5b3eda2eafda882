"""Residual-label heatmaps (the paper's Figure 3)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from alr.reporting.runs import Run  # noqa: E402


def _draw(ax, matrix: np.ndarray, labels: list[str], title: str, vmax: float | None = None):
    """One K×K residual-label matrix with the diagonal blank; row k = where class k's errors go."""
    k = len(matrix)
    masked = np.ma.masked_where(np.eye(k, dtype=bool), matrix)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax)
    if labels and k <= 20:
        ax.set_xticks(range(k), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("mistaken for")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    return im


def heatmap_figure(matrix: np.ndarray, labels: list[str], title: str = "") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 4.5), constrained_layout=True)
    fig.colorbar(_draw(ax, matrix, labels, title), ax=ax, shrink=0.8)
    return fig


def residual_label_panels(run: Run, epochs: list[int] | None, out: Path, panels: int = 3) -> Path:
    """Figure 3: ``softmax(S)`` of one ALR run at several epochs side by side, μ = training accuracy.

    ``epochs=None`` picks ``panels`` epochs spread from the first snapshot to the last.
    """
    available = run.snapshot_epochs()
    if not available:
        raise FileNotFoundError(f"{run.path}/residual_labels holds no snapshots: is this an ALR run?")
    if epochs is None:
        picks = np.linspace(0, len(available) - 1, min(panels, len(available))).round().astype(int)
        epochs = sorted({available[i] for i in picks})
    missing = [e for e in epochs if e not in available]
    if missing:
        raise ValueError(f"{run.path}: no residual-label snapshot for epochs {missing}; have {available}")
    train_acc = {m["epoch"]: m["train/acc"] for m in run.metrics()}
    labels = run.class_names()
    fig, axes = plt.subplots(1, len(epochs), figsize=(4.6 * len(epochs), 4.6), constrained_layout=True, squeeze=False)
    for ax, epoch in zip(axes[0], epochs):
        mu = f", μ = {train_acc[epoch]:.1f}%" if epoch in train_acc else ""
        im = _draw(ax, run.snapshot(epoch), labels, f"epoch {epoch}{mu}")
        fig.colorbar(im, ax=ax, shrink=0.75)
    c = run.config
    fig.suptitle(
        f"Residual labels softmax(S)\n{c['dataset']['name']}, {c['model_name']}, {c['method']['name']}, "
        f"seed {c['seed']}",
        fontsize=11,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
