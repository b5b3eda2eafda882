"""Learning curves per table cell from run folders (no W&B needed): ``python -m alr.report plots``.

One PNG per (experiment, dataset, model): test accuracy (in full, and zoomed on the second half of
training), test loss, training accuracy and each training loss term over epochs; one colour (and dash)
per method, the mean over seeds as a line and the min–max range over seeds as a band. Only finished
runs are drawn, so every line averages the same seeds at every epoch.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from alr.reporting.figures import residual_label_panels  # noqa: E402
from alr.reporting.runs import Run  # noqa: E402
from alr.reporting.tables import METHOD_LABELS  # noqa: E402

# (metrics.jsonl key, panel title, y-axis label, y scale); "zoom" is linear, limited to the second half
PANELS = [
    ("test/acc", "Test accuracy", "accuracy (%)", "linear"),
    ("test/acc", "Test accuracy, second half", "accuracy (%)", "zoom"),
    ("test/loss", "Test loss", "cross entropy", "log"),
    ("train/acc", "Training accuracy (running, per epoch)", "accuracy (%)", "linear"),
    ("train/L_hard", "L_hard (train)", "cross entropy", "log"),
    ("train/L_res", "L_res (train)", "cross entropy", "linear"),
    ("train/L_upd", "L_upd (train)", "cross entropy", "linear"),
    ("train/w", "w = 1 − acc_train", "w", "linear"),
]
METHOD_ORDER = list(METHOD_LABELS)
COLORS = dict(zip(METHOD_ORDER, plt.get_cmap("tab10").colors))
# Methods whose curves coincide (SLR and ALR-S share the smoothed L_hard) stay apart by their dashes.
LINESTYLES = {
    "baseline": "-",
    "slr": ":",
    "alr": "-",
    "alr_s": "--",
    "alr_mean": "-",
    "alr_s_mean": "--",
    "kd": "-.",
    "dml": (0, (5, 1, 1, 1, 1, 1)),
}
ALR_METHODS = ("alr", "alr_s")


def _order(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def curve(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Epochs and the mean, min and max of ``key`` over ``runs`` at each epoch that every run logged."""
    series = [{m["epoch"]: m[key] for m in run.metrics() if key in m} for run in runs]
    epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not epochs:
        return None
    values = np.array([[s[e] for e in epochs] for s in series])
    return np.array(epochs), values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def learning_curves(runs: list[Run], out: Path, title: str) -> Path:
    """One figure of :data:`PANELS` for the runs of one (experiment, dataset, model)."""
    by_method: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_method[run.key[2]].append(run)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), constrained_layout=True)
    for ax, (key, panel_title, ylabel, scale) in zip(axes.flat, PANELS):
        for method in sorted(by_method, key=_order):
            c = curve(by_method[method], key)
            if c is None:
                continue
            epochs, mean, lo, hi = c
            if scale == "zoom":
                half = epochs > epochs[-1] / 2
                epochs, mean, lo, hi = epochs[half], mean[half], lo[half], hi[half]
            color, style = COLORS.get(method), LINESTYLES.get(method, "-")
            ax.plot(epochs, mean, color=color, ls=style, lw=1.8, label=METHOD_LABELS.get(method, method))
            if len(by_method[method]) > 1:
                ax.fill_between(epochs, lo, hi, color=color, alpha=0.1 if scale == "zoom" else 0.18, lw=0)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged by these methods", ha="center", va="center", transform=ax.transAxes)
        elif scale == "log":
            ax.set_yscale("log")
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D(
            [],
            [],
            color=COLORS.get(m),
            ls=LINESTYLES.get(m, "-"),
            lw=2,
            label=f"{METHOD_LABELS.get(m, m)} ({len(by_method[m])} seeds)",
        )
        for m in sorted(by_method, key=_order)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle(f"{title}: mean over seeds, band = min–max over seeds")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_plots(runs: list[Run], out_dir: Path) -> list[Path]:
    """Learning curves for every (experiment, dataset, model) with finished runs, and the residual-label
    heatmaps (first, middle and last snapshot) of the lowest-seed finished run of each ALR method there."""
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "finished":
            groups[(run.config["experiment_name"], *run.key[:2])].append(run)
    written = []
    for (experiment, dataset, model), cell_runs in sorted(groups.items()):
        folder = out_dir / experiment
        written.append(
            learning_curves(cell_runs, folder / f"{dataset}-{model}.png", f"{experiment}: {dataset}, {model}")
        )
        for method in ALR_METHODS:
            alr_runs = sorted(
                (r for r in cell_runs if r.key[2] == method and r.snapshot_epochs()), key=lambda r: r.seed
            )
            if alr_runs:
                run = alr_runs[0]
                out = folder / f"{dataset}-{model}-{method}-s{run.seed}-residual_labels.png"
                written.append(residual_label_panels(run, None, out))
    return written
