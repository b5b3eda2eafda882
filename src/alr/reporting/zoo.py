"""Tables of the experiments beyond the paper that compare methods under one recipe (docs/zoo.md):
``experiment=zoo`` (ALR against the label regularizers that came after it) and ``experiment=alr_ablation``
(ALR's open choices, one at a time).

One builder serves both: per (data set, model, method) cell of the experiment's grid, in its sweep's order,
the last epoch's test accuracy, ECE and NLL (mean ± sample std over seeds), the parameters and the bytes of
state the method keeps, and Welch's tests against ``report.reference`` and, where the experiment names one,
against ``report.versus``. A cell without a finished run says "not run"; no number comes from anywhere but
the run folders' ``result.json``.
"""

from __future__ import annotations

from pathlib import Path

from alr.reporting.grid import Grid, expected_grid, method_labels, table_cells
from alr.reporting.runs import Run
from alr.reporting.stats import Cell
from alr.reporting.tables import (
    DATASET_LABELS,
    MODEL_LABELS,
    collect,
    declared,
    format_acc,
    format_params,
    format_spread,
    provenance,
    significance,
    significance_header,
    significance_note,
    versus_column,
    write_table,
)


def format_bytes(cell: Cell | None) -> str:
    """The bytes of state a method keeps (``method_state_bytes``), in B, KiB or MiB; "—" before a run says."""
    if cell is None or not cell.n:
        return "—"
    n = max(cell.values)
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def comparison_table(
    experiment: str, title: str, runs: list[Run], out_md: Path, command: str = "", grid: Grid | None = None
) -> str:
    """``out_md`` and its ``.csv``: every cell of ``experiment``'s grid (and any other cell its runs hold)."""
    grid = grid or expected_grid(experiment)
    report, labels = grid.report, method_labels(grid, runs)
    declared(grid, "reference")
    seeds = len(grid.seeds)
    acc, ece, nll = collect(runs), collect(runs, "final_test_ece"), collect(runs, "final_test_nll")
    state = collect([r for r in runs if "method_state_bytes" in r.result], "method_state_bytes")
    versus = labels.get(report.versus, report.versus) if report.versus else None
    header = ["Dataset", "Model", "Method", "Accuracy (%)", "Seeds", "ECE (%)", "NLL", "Params", "Extra state"]
    header += [significance_header(report)] + ([f"{versus} − this row (Welch p)"] if versus else [])
    rows = []
    for key in table_cells(grid.cells, (r.key for r in runs)):
        cell = acc.get(key)
        row = [
            DATASET_LABELS.get(key[0], key[0]),
            MODEL_LABELS.get(key[1], key[1]),
            labels.get(key[2], key[2]),
            format_acc(cell),
            f"{cell.n if cell else 0}/{seeds}",
            format_spread(ece.get(key)),  # result.json's ECE is in percent already
            format_spread(nll.get(key), 3),
            format_params(cell.params if cell else None),
            format_bytes(state.get(key)),
            significance(acc, *key, report),
        ]
        if versus:
            row.append(versus_column(acc, key, report.versus))
        rows.append(row)
    notes = [
        "Accuracy, ECE and NLL: the test set after the last epoch (`docs/deviations.md#recipes-and-reporting`), "
        f"mean ± sample std over the seeds that finished ({seeds} expected); the best epoch's are in each run's "
        "`result.json`. ECE: expected calibration error over 15 equal-width confidence bins, in points; NLL: the "
        "mean negative log-likelihood of the true class.",
        "Params: the backbone's parameters, + the method's own (a learned label matrix). Extra state: the bytes "
        "the method keeps beside the backbone (its `state_dict` and per-rank sums: `method_state_bytes` in "
        "`result.json`), the optimizer's buffers not counted.",
        significance_note(report),
    ]
    if versus:
        notes.append(
            f"{versus} − this row: {versus}'s mean minus this row's, same data set and model, in points, with the "
            "two-sided p-value of Welch's t-test over seeds; * marks p < 0.05; n/a where a side has no finished run."
        )
    notes += provenance(runs, grid.epochs, experiment, command)
    return write_table(rows, header, out_md, title, notes)


def zoo(runs: list[Run], out_md: Path, command: str = "", grid: Grid | None = None) -> str:
    """``results/zoo.md``: ALR, its baseline and label smoothing beside six later label regularizers."""
    title = "ALR and the label regularizers that came after it: CIFAR-100, Table 1's recipe"
    return comparison_table("zoo", title, runs, out_md, command, grid)


def alr_ablation(runs: list[Run], out_md: Path, command: str = "", grid: Grid | None = None) -> str:
    """``results/alr_ablation.md``: ALR with one of its open choices changed per row."""
    title = "ALR's open choices, one at a time: CIFAR-100, PreAct ResNet-18, Table 1's recipe"
    return comparison_table("alr_ablation", title, runs, out_md, command, grid)
