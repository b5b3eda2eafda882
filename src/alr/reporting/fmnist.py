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
from alr.reporting.plots import accuracy_against_ece, learning_curves
from alr.reporting.runs import Run, load_runs
from alr.reporting.stats import Cell, format_p, holm, welch
from alr.reporting.tables import (
    MODEL_LABELS,
    collect,
    declared,
    format_acc,
    format_params,
    format_spread,
    significance_header,
    write_table,
)
from alr.reporting.zoo import format_bytes

ALPHA = 0.05
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


def _data_phrase(finished: list[Run]) -> str:
    """How many training images the runs trained on: the whole split, or the fixed stratified subset."""
    sizes = sorted({int(r.result["data"].get("train_images", 0)) for r in finished})
    subsets = sorted({r.config.get("dataset", {}).get("train_subset") for r in finished}, key=str)
    shown = ", ".join(f"{n:,}" for n in sizes) or "—"
    if subsets == [None]:
        return f"on all {shown} training images"
    return f"on a fixed stratified subset of {shown} training images"


def _minutes(finished: list[Run]) -> str:
    """A run's training and evaluation time: the median and the range over ``finished``, in minutes."""
    times = sorted(r.result["wall_time_s"] / 60 for r in finished)
    if not times:
        return "—"
    return f"{float(np.median(times)):.1f} min (median; {times[0]:.1f} to {times[-1]:.1f})"


def fmnist_table(
    runs: list[Run], out_md: Path, seeds: int = 3, grid: Grid | None = None, experiment: str = "fmnist"
) -> str:
    """One row per method, in the sweep's order (``configs/experiment/<experiment>.yaml``): last-epoch test
    accuracy, ECE and NLL (mean ± std over seeds), the first epoch's training accuracy, Welch's test against the
    experiment's ``report.reference`` with Holm's adjustment over the table's comparisons, for each run that saved
    residual labels their rank correlation with the reference's confusions (seed s against seed s), parameters
    and the method's own state."""
    grid = grid or expected_grid(experiment)
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
        "Holm p",
        "ρ(residual labels, confusions)",
        "Params (backbone + method)",
        "Method state",
    ]
    cells = {method: cell for (_, _, method), cell in collect(runs).items()}  # one data set and model
    state = {
        m: c
        for (_, _, m), c in collect([r for r in runs if "method_state_bytes" in r.result], "method_state_bytes").items()
    }
    methods = [m for m in method_order(grid, runs) if m in by_method]
    comparisons = {
        m: welch(cells[m], cells[report.reference]) if report.compares(m) and report.reference in cells else None
        for m in methods
    }
    tested = [m for m in methods if comparisons[m] and comparisons[m].p_value is not None]
    adjusted = dict(zip(tested, holm([comparisons[m].p_value for m in tested])))
    rows = []
    for method in method_order(grid, runs):
        if method not in by_method:  # a cell of the sweep with no finished run: what it is, nothing else
            rows.append([labels[method], format_acc(cells.get(method), seeds), "0", *[""] * (len(header) - 3)])
            continue
        rs, comparison = by_method[method], comparisons[method]
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
                (format_p(adjusted[method]) + (" *" if adjusted[method] < ALPHA else "")) if method in adjusted else "",
                format_spread(Cell(rhos), 2) if rhos else "",
                format_params(cells[method].params),
                format_bytes(state.get(method)),
            ]
        )
    survivors = [labels[m] for m in tested if adjusted[m] < ALPHA]
    cpus = ", ".join(sorted({str(r.result.get("cpu", "?")) for r in finished})) or "—"
    torches = ", ".join(sorted({str(r.result.get("torch_version", "?")) for r in finished})) or "—"
    wall, sweeps = sweeps_wall_time(finished)
    threads = ", ".join(sorted({str(r.result.get("threads", "?")) for r in finished})) or "—"
    epochs = ", ".join(sorted({str(r.result["epochs"]) for r in finished})) or "—"
    images = ", ".join(sorted({f"{int(r.metrics()[-1]['test/images']):,}" for r in finished})) or "—"
    models = sorted({r.key[1] for r in finished})
    model = ", ".join(MODEL_LABELS.get(m, m) for m in models) or "—"
    notes = [
        f"Fashion-MNIST (Xiao et al. 2017), {model} with a one-channel stem, trained {_data_phrase(finished)} "
        f"and scored on {images} test images (`configs/experiment/{experiment}.yaml`). Every number is after the "
        f"last epoch ({epochs}), mean ± sample std over the seeds that finished ({seeds} expected).",
        "ECE: expected calibration error, 15 equal-width confidence bins. NLL: the test set's mean cross entropy. "
        "Train acc., epoch 1: the running training accuracy of the first epoch.",
        f"Δ vs {ref}: the method's mean minus the {ref}'s, in points, with the two-sided p-value of Welch's "
        "t-test over seeds; * marks p < 0.05.",
        (
            f"Holm p: the {len(tested)} Welch p-values of this table adjusted together by Holm's step-down method "
            f"(the chance of any false claim among them at most the level); below {ALPHA}: "
            f"{', '.join(survivors) if survivors else 'none'}."
        )
        if tested
        else "Holm p: Welch's p-values adjusted together by Holm's step-down method, once the table has any.",
        "ρ: Spearman's rank correlation over the 90 off-diagonal entries between a run's residual labels "
        f"after the last epoch and the row-normalised test confusion matrix of the {ref} run of the same seed; "
        "mean ± std over seeds. Method state: what the method keeps beside the backbone (`method_state_bytes`; "
        "— where the records predate it).",
        f"What this table does and does not test: {report.page or 'docs/'}. The paper's claims are about 300-epoch "
        f"CIFAR runs; these train {epochs} epochs on a CPU.",
        f"Generated by `python -m alr.report {experiment}` from the {len(runs)} run record{'s' * (len(runs) != 1)} "
        f"in `results/{experiment}/runs/` ({len(finished)} finished); trained on {cpus} ({threads} threads) with "
        f"torch {torches}: {sum(r.result['wall_time_s'] for r in finished) / 60:.1f} min of training and "
        f"evaluation, {wall / 60:.1f} min of wall time in {sweeps} sweep{'s' if sweeps != 1 else ''}; a run took "
        f"{_minutes(finished)}, longer where other work shared the cores.",
    ]
    return write_table(rows, header, out_md, "Fashion-MNIST on a CPU: test accuracy, calibration, confusions", notes)


def fmnist_report(runs_dir: Path, results_dir: Path, experiment: str = "fmnist") -> list[Path]:
    """Archive the finished runs of ``runs_dir`` into ``results_dir/<experiment>/runs/``, then write, from those
    records, ``results_dir/<experiment>.{md,csv}``, accuracy against ECE per method, the learning curves (of the
    methods ``report.curves`` names, else all) and the residual-label heatmap of the run the experiment's
    ``report.heatmap`` names (its lowest finished seed)."""
    records = results_dir / experiment / "runs"
    runs = archive(load_runs(runs_dir) if runs_dir.exists() else [], records)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {runs_dir} nor records under {records}")
    grid = expected_grid(experiment)
    written = [results_dir / f"{experiment}.md", results_dir / f"{experiment}.csv"]
    fmnist_table(runs, written[0], seeds=len(grid.seeds), grid=grid, experiment=experiment)
    finished = [r for r in runs if r.status == "finished"]
    order, labels = method_order(grid, runs), method_labels(grid, runs)
    model = ", ".join(sorted({MODEL_LABELS.get(r.key[1], r.key[1]) for r in finished}))
    title = f"Fashion-MNIST, {model}"
    folder = results_dir / experiment
    written.append(
        accuracy_against_ece(finished, folder / "accuracy_ece.png", title, order, labels, grid.report.reference)
    )
    drawn = [r for r in finished if grid.report.curves is None or r.key[2] in grid.report.curves]
    written.append(learning_curves(drawn, folder / "curves.png", title, order, labels))
    if run := heatmap_run(finished, grid.report.heatmap):
        written.append(residual_label_panels(run, None, folder / "residual_labels.png"))
    return written
