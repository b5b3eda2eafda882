"""Fashion-MNIST on a CPU (``experiment=fmnist``): its table, learning curves, residual-label heatmap and run records.

The run folders are not tracked, so :func:`archive` copies what the table and the figures read from each
finished run (``config.yaml``, ``result.json``, ``metrics.jsonl``, ``classes.json``, the test confusion
matrix and the residual-label snapshots: a few kB a run) into ``results/fmnist/runs/<run>/``, and everything
is then built from those copies: the committed table regenerates from the repository alone, byte for byte
(a test checks it).
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from alr.reporting.figures import residual_label_panels
from alr.reporting.grid import Grid, expected_grid, heatmap_run, method_labels, method_order
from alr.reporting.plots import learning_curves
from alr.reporting.runs import Run, load_runs
from alr.reporting.stats import Cell, welch
from alr.reporting.tables import (
    collect,
    declared,
    format_acc,
    format_params,
    format_spread,
    significance_header,
    write_table,
)

KEPT = ("config.yaml", "result.json", "metrics.jsonl", "classes.json", "test_confusion.npy")
SNAPSHOTS = "residual_labels"


def archive(runs: list[Run], dest: Path) -> list[Run]:
    """Copy each finished run's records into ``dest/<run folder name>/`` (replacing an older copy); return
    the archived runs, read back from ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for run in (r for r in runs if r.status == "finished"):
        target = dest / run.path.name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        for name in KEPT:
            if (run.path / name).exists():
                shutil.copy2(run.path / name, target / name)
        if (run.path / SNAPSHOTS).is_dir():
            shutil.copytree(run.path / SNAPSHOTS, target / SNAPSHOTS)
    return load_runs(dest)


def confusion_rank_correlation(run: Run, reference_run: Run) -> float:
    """Spearman's ρ over the K(K−1) off-diagonal entries between a run's last residual labels (``softmax(S)``
    placed as K×K, as ALR's snapshots save it) and a reference run's row-normalised test confusion matrix:
    whether the residual labels rank the class pairs as the reference's mistakes do."""
    residual = run.snapshot(run.snapshot_epochs()[-1])
    confusion = np.load(reference_run.path / "test_confusion.npy").astype(np.float64)
    confusion /= confusion.sum(axis=1, keepdims=True).clip(min=1)
    off = ~np.eye(len(residual), dtype=bool)
    return float(stats.spearmanr(residual[off], confusion[off]).statistic)


def sweeps_wall_time(runs: list[Run], gap_s: float = 120.0) -> tuple[float, int]:
    """Wall seconds of the sweeps that trained ``runs``, and how many sweeps: runs trained one after another
    (the next starting within ``gap_s`` of the previous one's end, its process start-up) form one sweep, from
    its first run's start of training to its last run's end; the time between sweeps is not counted."""
    spans = sorted((r.result["finished_at"] - r.result["wall_time_s"], r.result["finished_at"]) for r in runs)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] <= gap_s:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return sum(end - start for start, end in merged), len(merged)


def fmnist_table(runs: list[Run], out_md: Path, seeds: int = 3, grid: Grid | None = None) -> str:
    """One row per method, in the sweep's order (``configs/experiment/fmnist.yaml``): last-epoch test accuracy,
    ECE and NLL (mean ± std over seeds), the first epoch's training accuracy, Welch's test against the
    experiment's ``report.reference``, and for each run that saved residual labels their rank correlation with
    the reference's confusions (seed s against seed s)."""
    grid = grid or expected_grid("fmnist")
    report, labels, ref = grid.report, method_labels(grid, runs), declared(grid, "reference")
    finished = [r for r in runs if r.status == "finished"]
    by_method: dict[str, list[Run]] = defaultdict(list)
    for run in sorted(finished, key=lambda r: r.seed):
        by_method[run.key[2]].append(run)
    reference = {r.seed: r for r in by_method.get(report.reference, [])}
    header = [
        "Method",
        "Test accuracy (%)",
        "Seeds",
        "Test ECE (%)",
        "Test NLL",
        "Train acc., epoch 1 (%)",
        significance_header(report),
        "ρ(residual labels, confusions)",
        "Params (backbone + method)",
    ]
    cells = {method: cell for (_, _, method), cell in collect(runs).items()}  # one data set and model
    rows = []
    for method in (m for m in method_order(grid, runs) if m in by_method):
        rs = by_method[method]
        compared = report.compares(method) and report.reference in cells
        comparison = welch(cells[method], cells[report.reference]) if compared else None
        rhos = [
            confusion_rank_correlation(r, reference[r.seed]) for r in rs if r.snapshot_epochs() and r.seed in reference
        ]
        rows.append(
            [
                labels[method],
                format_acc(cells[method], seeds),
                str(len(rs)),
                format_spread(Cell([r.result["final_test_ece"] for r in rs]), 2),
                format_spread(Cell([r.result["final_test_nll"] for r in rs]), 3),
                format_spread(Cell([r.metrics()[0]["train/acc"] for r in rs]), 1),
                comparison.format() if comparison else "",
                format_spread(Cell(rhos), 2) if rhos else "",
                format_params(cells[method].params),
            ]
        )
    cpus = ", ".join(sorted({str(r.result.get("cpu", "?")) for r in finished})) or "—"
    torches = ", ".join(sorted({str(r.result.get("torch_version", "?")) for r in finished})) or "—"
    wall, sweeps = sweeps_wall_time(finished)
    threads = ", ".join(sorted({str(r.result.get("threads", "?")) for r in finished})) or "—"
    epochs = ", ".join(sorted({str(r.result["epochs"]) for r in finished})) or "—"
    subset = ", ".join(sorted({f"{r.result['data'].get('train_images', '?'):,}" for r in finished})) or "—"
    tested = ", ".join(sorted({f"{int(r.metrics()[-1]['test/images']):,}" for r in finished})) or "—"
    notes = [
        "Fashion-MNIST (Xiao et al. 2017), ResNet-32 with a one-channel stem, trained on a fixed stratified "
        f"subset of {subset} training images and scored on {tested} test images "
        f"(`configs/experiment/fmnist.yaml`). Every number is after the last epoch ({epochs}), mean ± sample std "
        f"over the seeds that finished ({seeds} expected).",
        "ECE: expected calibration error, 15 equal-width confidence bins. NLL: the test set's mean cross entropy. "
        "Train acc., epoch 1: the running training accuracy of the first epoch.",
        f"Δ vs {ref}: the method's mean minus the {ref}'s, in points, with the two-sided p-value of Welch's "
        "t-test over seeds; * marks p < 0.05.",
        "ρ: Spearman's rank correlation over the 90 off-diagonal entries between an ALR run's residual labels "
        f"after the last epoch and the row-normalised test confusion matrix of the {ref} run of the same seed; "
        "mean ± std over seeds.",
        "What this table does and does not test: docs/fashion-mnist.md. The paper's claims are about 300-epoch "
        f"CIFAR runs; these train {epochs} epochs on a CPU.",
        f"Generated by `python -m alr.report fmnist` from the {len(runs)} run records in `results/fmnist/runs/` "
        f"({len(finished)} finished); trained on {cpus} ({threads} threads) with torch {torches}: "
        f"{sum(r.result['wall_time_s'] for r in finished) / 60:.1f} min of training and evaluation, "
        f"{wall / 60:.1f} min of wall time in {sweeps} sweep{'s' if sweeps != 1 else ''}.",
    ]
    return write_table(rows, header, out_md, "Fashion-MNIST on a CPU: test accuracy, calibration, confusions", notes)


def fmnist_report(runs_dir: Path, results_dir: Path) -> list[Path]:
    """Archive the finished runs of ``runs_dir`` into ``results_dir/fmnist/runs/``, then write, from those
    records, ``results_dir/fmnist.{md,csv}``, the learning curves and the residual-label heatmap of the run the
    experiment's ``report.heatmap`` names (its lowest finished seed)."""
    records = results_dir / "fmnist" / "runs"
    runs = archive(load_runs(runs_dir) if runs_dir.exists() else [], records)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {runs_dir} nor records under {records}")
    grid = expected_grid("fmnist")
    written = [results_dir / "fmnist.md", results_dir / "fmnist.csv"]
    fmnist_table(runs, written[0], grid=grid)
    finished = [r for r in runs if r.status == "finished"]
    order, labels = method_order(grid, runs), method_labels(grid, runs)
    curves = results_dir / "fmnist" / "curves.png"
    written.append(learning_curves(finished, curves, "Fashion-MNIST, ResNet-32", order, labels))
    if run := heatmap_run(finished, grid.report.heatmap):
        written.append(residual_label_panels(run, None, results_dir / "fmnist" / "residual_labels.png"))
    return written
