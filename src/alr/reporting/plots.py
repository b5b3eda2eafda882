"""Learning curves per table cell from run folders (no W&B needed): ``python -m alr.report plots``.

One PNG per (experiment, dataset, model): test accuracy (in full, and zoomed on the second half of
training), test loss, training accuracy and each training loss term over epochs; one colour (and dash)
per method, the mean over seeds as a line and the min–max range over seeds as a band. Only finished
runs are drawn, so every line averages the same seeds at every epoch. A method's colour and dash follow
its place in its experiment's sweep (``configs/experiment/<name>.yaml``), its name in the legend is its
config's label.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from alr.reporting.figures import residual_label_panels  # noqa: E402
from alr.reporting.grid import Grid, grid_if_configured, heatmap_run, method_labels, method_order  # noqa: E402
from alr.reporting.runs import Run  # noqa: E402

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
COLORS = plt.get_cmap("tab10").colors
# Methods whose curves coincide (SLR and ALR-S share the smoothed L_hard) stay apart by their dashes: the k-th
# method of a sweep takes the k-th colour and the k-th dash (the dashes cycle with a period prime to the colours').
DASHES = ["-", ":", "--", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2))]


def style(method: str, order: list[str]) -> tuple[tuple[float, ...], str | tuple]:
    """The colour and dash of ``method``: those of its place in ``order`` (its experiment's sweep)."""
    k = order.index(method) if method in order else len(order)
    return COLORS[k % len(COLORS)], DASHES[k % len(DASHES)]


def curve(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Epochs and the mean, min and max of ``key`` over ``runs`` at each epoch that every run logged."""
    series = [{m["epoch"]: m[key] for m in run.metrics() if key in m} for run in runs]
    epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not epochs:
        return None
    values = np.array([[s[e] for e in epochs] for s in series])
    return np.array(epochs), values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def learning_curves(
    runs: list[Run], out: Path, title: str, order: list[str] | None = None, labels: Mapping[str, str] | None = None
) -> Path:
    """One figure of :data:`PANELS` for the runs of one (experiment, dataset, model).

    ``order``: the methods in their experiment's sweep order (:func:`~alr.reporting.grid.method_order`), which
    sets the order of the legend and each method's colour and dash; ``labels``: how the legend names them.
    Both default to what the runs say (their methods by name, their configs' labels).
    """
    by_method: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_method[run.key[2]].append(run)
    order = order if order is not None else method_order(None, runs)
    labels = {**method_labels(None, runs), **(labels or {})}
    drawn = sorted(by_method, key=lambda m: (order.index(m) if m in order else len(order), m))
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), constrained_layout=True)
    for ax, (key, panel_title, ylabel, scale) in zip(axes.flat, PANELS):
        for method in drawn:
            c = curve(by_method[method], key)
            if c is None:
                continue
            epochs, mean, lo, hi = c
            if scale == "zoom":
                half = epochs > epochs[-1] / 2
                epochs, mean, lo, hi = epochs[half], mean[half], lo[half], hi[half]
            color, dash = style(method, order)
            ax.plot(epochs, mean, color=color, ls=dash, lw=1.8, label=labels[method])
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
    handles = []
    for m in drawn:
        color, dash = style(m, order)
        handles.append(plt.Line2D([], [], color=color, ls=dash, lw=2, label=f"{labels[m]} ({len(by_method[m])} seeds)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle(f"{title}: mean over seeds, band = min–max over seeds")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_plots(runs: list[Run], out_dir: Path, grids: Mapping[str, Grid] | None = None) -> list[Path]:
    """Learning curves for every (experiment, dataset, model) with finished runs, and the residual-label
    heatmaps (first, middle and last snapshot) of the lowest-seed finished run of each method there that saved
    residual-label snapshots. ``grids``: the experiments' grids where the caller has read them already."""
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "finished":
            groups[(run.config["experiment_name"], *run.key[:2])].append(run)
    written = []
    experiments: dict[str, Grid | None] = {}
    for (experiment, dataset, model), cell_runs in sorted(groups.items()):
        if experiment not in experiments:
            experiments[experiment] = grid_if_configured(experiment, grids)
        grid = experiments[experiment]
        experiment_runs = [r for r in runs if r.config.get("experiment_name") == experiment]
        order, labels = method_order(grid, experiment_runs), method_labels(grid, experiment_runs)
        folder = out_dir / experiment
        title = f"{experiment}: {dataset}, {model}"
        written.append(learning_curves(cell_runs, folder / f"{dataset}-{model}.png", title, order, labels))
        for method in sorted({r.key[2] for r in cell_runs}, key=order.index):
            run = heatmap_run(cell_runs, {"method": method})
            if run:
                out = folder / f"{dataset}-{model}-{method}-s{run.seed}-residual_labels.png"
                written.append(residual_label_panels(run, None, out))
    return written


def accuracy_against_ece(
    runs: list[Run], out: Path, title: str, order: list[str], labels: Mapping[str, str], reference: str | None = None
) -> Path:
    """Each method's last-epoch test accuracy against its test ECE: the mean over seeds as a point, one sample
    std as error bars on both axes, the ``reference`` method's mean accuracy as a dotted line."""
    by_method: dict[str, list[Run]] = defaultdict(list)
    for run in (r for r in runs if r.status == "finished"):
        by_method[run.key[2]].append(run)
    drawn = [m for m in order if m in by_method]
    fig, ax = plt.subplots(figsize=(8, 6), constrained_layout=True)
    for method in drawn:
        acc = np.array([r.result["final_test_acc"] for r in by_method[method]])
        ece = np.array([r.result["final_test_ece"] for r in by_method[method]])
        spread = len(acc) > 1
        color, _ = style(method, order)
        ax.errorbar(
            ece.mean(),
            acc.mean(),
            xerr=ece.std(ddof=1) if spread else None,
            yerr=acc.std(ddof=1) if spread else None,
            fmt="o",
            color=color,
            capsize=3,
            label=f"{labels[method]} ({len(acc)} seeds)",
        )
        ax.annotate(labels[method], (ece.mean(), acc.mean()), xytext=(5, 4), textcoords="offset points", fontsize=8)
    if reference in by_method:
        ax.axhline(np.mean([r.result["final_test_acc"] for r in by_method[reference]]), color="grey", ls=":", lw=1)
    ax.set_xlabel("test ECE (%), 15 bins: lower is better calibrated")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: mean ± sample std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
