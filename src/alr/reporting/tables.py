"""Result tables from run folders: mean ± std over seeds, parameters, significance against a reference method.

No method is named here: a table's rows are its experiment's grid (in its sweep's order) beside the paper's
rows and whatever else its runs hold, each method named by its config's label, and what a table compares is
its experiment's ``report`` key (:class:`~alr.reporting.grid.Comparisons`).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from alr.reporting.grid import Comparisons, Grid, expected_grid, method_labels, table_cells
from alr.reporting.runs import Run
from alr.reporting.stats import Cell, welch


def collect(runs: list[Run], metric: str = "final_test_acc") -> dict[tuple[str, str, str], Cell]:
    """Group runs by (dataset, model, method); a cell keeps finished values and counts the rest.

    ``metric`` is a key of ``result.json``, or a path into it (``final_test_acc_by_network/net2``).
    """
    cells: dict[tuple[str, str, str], Cell] = defaultdict(Cell)
    for run in runs:
        cell = cells[run.key]
        if run.status == "finished":
            value = run.result
            for part in metric.split("/"):
                value = value[part]
            cell.values.append(float(value))
            cell.params = run.result.get("params")
        elif run.status == "failed":
            cell.failed += 1
        else:
            cell.unfinished += 1
    return dict(cells)


def format_acc(cell: Cell | None, seeds_expected: int | None = None) -> str:
    """``mean ± std``; says "not run", "failed" or how many seeds when that is the truth."""
    if cell is None or (not cell.n and not cell.failed and not cell.unfinished):
        return "not run"
    if not cell.n:
        return f"failed ({cell.failed})" if cell.failed else "unfinished"
    text = f"{cell.mean:.2f} ± {cell.std:.2f}" if cell.n >= 2 else f"{cell.mean:.2f}"
    notes = []
    if seeds_expected and cell.n < seeds_expected:
        notes.append(f"{cell.n}/{seeds_expected} seeds")
    if cell.failed:
        notes.append(f"{cell.failed} failed")
    return text + (f" ({', '.join(notes)})" if notes else "")


def format_spread(cell: Cell | None, digits: int = 2) -> str:
    """``mean ± std`` of a cell's values (a seed's value alone); "—" where none finished (its accuracy says why)."""
    if cell is None or not cell.n:
        return "—"
    return f"{cell.mean:.{digits}f} ± {cell.std:.{digits}f}" if cell.n >= 2 else f"{cell.mean:.{digits}f}"


def format_params(params: dict[str, int] | None) -> str:
    if not params:
        return "—"
    extra = f" + {params['method']:,}" if params.get("method") else ""
    return f"{params['backbone']:,}{extra}"


def significance_header(report: Comparisons) -> str:
    """The header of the column :func:`significance` fills (every table that compares with a reference has it)."""
    return f"Δ vs {report.reference} (Welch p)"


def significance_note(report: Comparisons) -> str:
    """The note that explains :func:`significance_header`'s column."""
    ref = report.reference
    return (
        f"Δ vs {ref}: the method's mean minus the {ref}'s mean of the same data set and model, in points, with "
        "the two-sided p-value of Welch's t-test over seeds; * marks p < 0.05; n/a where either side has fewer than "
        "2 finished seeds or every seed of both gave the same accuracy (p n/a), or one has no finished run (n/a)."
    )


def declared(grid: Grid, key: str) -> str:
    """``report.<key>`` of ``grid``'s experiment, which its table needs; one line naming it where it is not set."""
    value = getattr(grid.report, key)
    if value is None:
        raise ValueError(f"configs/experiment/{grid.experiment}.yaml: set report.{key} (its table needs it)")
    return value


def significance(cells: dict, dataset: str, model: str, method: str, report: Comparisons) -> str:
    """A compared method against the experiment's reference (``report.reference``) of the same data set and
    model: ``+0.12 (p=0.034) *``, ``+0.12 (p n/a)`` or ``n/a``.

    Empty for the methods the experiment does not compare (:meth:`Comparisons.compares`: the reference itself,
    and those ``report.compared`` leaves out).
    """
    if not report.compares(method):
        return ""
    a, b = cells.get((dataset, model, method)), cells.get((dataset, model, report.reference))
    comparison = welch(a, b) if a and b else None
    return comparison.format() if comparison else "n/a"


def versus_column(cells: dict, key: tuple[str, str, str], method: str) -> str:
    """The column "``method`` − this row": ``method``'s mean minus the row's, same data set and model, with Welch's
    test; empty on ``method``'s own row, n/a where a side has no finished run."""
    if key[2] == method:
        return ""
    against, cell = cells.get((key[0], key[1], method)), cells.get(key)
    comparison = welch(against, cell) if against and cell else None
    return comparison.format() if comparison else "n/a"


def write_table(rows: list[list[str]], header: list[str], out_md: Path, title: str, notes: list[str]) -> str:
    """Write ``out_md`` (Markdown) and the same rows as ``out_md.with_suffix('.csv')``; return the Markdown."""
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines + [""] + notes) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    with out_md.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return text


def trained_on(runs: list[Run]) -> tuple[float, str, str]:
    """Seconds of training behind the finished runs, and their devices and torch versions (comma-joined)."""
    finished = [r for r in runs if r.status == "finished"]
    seconds = sum(r.result.get("wall_time_s", 0.0) for r in finished)
    devices = ", ".join(sorted({r.result.get("device", "?") for r in finished}))
    versions = ", ".join(sorted({r.result.get("torch_version", "?") for r in finished}))
    return seconds, devices, versions


def demo_table(runs: list[Run], out_md: Path, seeds: int = 3, grid: Grid | None = None) -> str:
    """The embedded default's table, laid out like the paper's Table 1: a row per method of the demo's grid
    (``configs/experiment/demo.yaml``), then any other its runs hold."""
    grid = grid or expected_grid("demo")
    declared(grid, "reference")
    cells, labels = collect(runs), method_labels(grid, runs)
    header = ["Method", "Test accuracy (%)", "Seeds", "Params (backbone + method)", significance_header(grid.report)]
    rows = []
    for key in table_cells(grid.cells, (r.key for r in runs)):
        cell = cells.get(key)
        rows.append(
            [
                labels[key[2]],
                format_acc(cell, seeds),
                str(cell.n if cell else 0),
                format_params(cell.params if cell else None),
                significance(cells, *key, grid.report),
            ]
        )
    wall, devices, versions = trained_on(runs)
    notes = [
        "Test accuracy after the last epoch, mean ± sample std over seeds.",
        significance_note(grid.report),
        f"Generated by `python -m alr.report demo` from {len(runs)} run folders; "
        f"{wall:.0f} s of training on {devices} with torch {versions}.",
    ]
    return write_table(rows, header, out_md, "Demo: scikit-learn digits, DigitsCNN", notes)


PAPER_DIR = Path(__file__).resolve().parents[3] / "results" / "paper"
DATASET_LABELS = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "digits": "digits",
    "imagenet": "ImageNet",
    "ag_news": "AG News",
    "yahoo_answers": "Yahoo! Answers",
    "yelp_full": "Yelp Review Full",
}
MODEL_LABELS = {
    "preact_resnet18": "PreAct ResNet-18",
    "wrn28_10": "WRN-28-10",
    "resnet8": "ResNet-8",
    "resnet32": "ResNet-32",
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "resnet152": "ResNet-152",
    "fasttext": "FastText",
    "textrnn": "TextRNN",
    "textrcnn": "TextRCNN (extra)",
    "charcnn": "CharCNN",
    "transformer": "Transformer",
}


def load_paper(table: str, paper_dir: Path = PAPER_DIR) -> list[dict[str, str]]:
    """The paper's own numbers for ``table`` (e.g. ``"table1"``), in the paper's row order."""
    path = paper_dir / f"{table}.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: it holds the paper's reported numbers for {table}")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def paper_rows(table: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """The paper's rows of ``table`` by (dataset, model, method), in the paper's order."""
    return {(r["dataset"], r["model"], r["method"]): r for r in load_paper(table)}


def rows_of(table: str, grid: Grid, runs: list[Run]) -> list[tuple[str, str, str]]:
    """A table's rows: the paper's, the grid's cells it lacks and the runs' other cells (:func:`table_cells`)."""
    return table_cells(paper_rows(table), grid.cells, (r.key for r in runs))


def shortened(run: Run, epochs: int) -> bool:
    """A run trained with capped batches or fewer epochs than the recipe (smoke or debug runs)."""
    trainer = run.config.get("trainer", {})
    return bool(trainer.get("limit_train_batches")) or int(trainer.get("epochs", epochs)) != epochs


def provenance(runs: list[Run], epochs: int, table: str, command: str = "") -> list[str]:
    """The notes every table of the paper ends with: shortened runs flagged, and what made it from which runs."""
    finished = [r for r in runs if r.status == "finished"]
    short = [r for r in runs if shortened(r, epochs)]
    notes = []
    if short:
        notes.append(
            f"**{len(short)} of {len(runs)} runs were shortened (capped batches or fewer than {epochs} epochs, "
            "e.g. `SMOKE=1`): their numbers test the pipeline and are not comparable to the paper.**"
        )
    seconds, devices, versions = trained_on(runs)
    processes = sorted({int(r.result.get("processes", 1)) for r in finished})
    per_run = f" ({', '.join(map(str, processes))} processes per run)" if processes not in ([], [1]) else ""
    trained = f"; {seconds / 3600:.2f} h of training on {devices}{per_run} with torch {versions}" if finished else ""
    notes.append(
        f"Generated by `{command or f'python -m alr.report {table}'}` from {len(runs)} run folders "
        f"({len(finished)} finished){trained}."
    )
    return notes


def table1(
    runs: list[Run], out_md: Path, seeds: int = 5, epochs: int = 300, command: str = "", grid: Grid | None = None
) -> str:
    """Table 1 (CIFAR-10/100 × PreAct ResNet-18, WRN-28-10 × its grid's methods), ours beside the paper's."""
    grid = grid or expected_grid("table1")
    declared(grid, "reference")
    cells, labels, paper = collect(runs), method_labels(grid, runs), paper_rows("table1")
    header = [
        "Dataset",
        "Model",
        "Method",
        "Ours (%)",
        "Seeds",
        "Paper (%)",
        "Ours − paper",
        significance_header(grid.report),
        "Params (ours)",
        "Params (paper)",
    ]
    rows = []
    for key in rows_of("table1", grid, runs):
        cell, reported = cells.get(key), paper.get(key)
        diff = f"{cell.mean - float(reported['accuracy']):+.2f}" if cell and cell.n and reported else "—"
        rows.append(
            [
                DATASET_LABELS.get(key[0], key[0]),
                MODEL_LABELS.get(key[1], key[1]),
                labels[key[2]],
                format_acc(cell),
                f"{cell.n if cell else 0}/{seeds}",
                f"{float(reported['accuracy']):.2f} ± {float(reported['std']):.2f}" if reported else "—",
                diff,
                significance(cells, *key, grid.report),
                format_params(cell.params if cell else None),
                reported["params"] if reported else "—",
            ]
        )
    notes = [
        "Ours: test accuracy after the last epoch (`docs/deviations.md#recipes-and-reporting`), mean ± sample std "
        f"over the seeds that finished ({seeds} expected). Paper: its Table 1, averaged over 5 runs "
        "(`results/paper/table1.csv`).",
        significance_note(grid.report),
    ]
    notes += provenance(runs, epochs, "table1", command)
    return write_table(rows, header, out_md, "Table 1: CIFAR-10 / CIFAR-100, test accuracy (%)", notes)


def _teacher_params(runs: list[Run], cell_runs: list[Run]) -> int | None:
    """The backbone parameters of the teacher a finished run names (``method.teacher_run``, KD), read from that
    folder's ``result.json``, or from the run of the same folder name among ``runs`` if the folders moved."""
    for run in cell_runs:
        teacher = run.config.get("method", {}).get("teacher_run")
        if run.status != "finished" or not teacher:
            continue
        path = Path(teacher) / "result.json"
        if path.is_file():
            return int(json.loads(path.read_text())["params"]["backbone"])
        named = [r for r in runs if r.path.name == Path(teacher).name and r.result.get("params")]
        if named:
            return int(named[0].result["params"]["backbone"])
    return None


def _multiple(params: dict[str, int] | None, teacher: int | None, one_backbone: int | None) -> str:
    """Every parameter a method needs (trained, and KD's frozen teacher) over one backbone of the row's model."""
    if not params or not one_backbone:
        return "—"
    total = params["backbone"] + params.get("method", 0) + (teacher or 0)
    return f"×{total / one_backbone:.2f}" + (" (with the frozen teacher)" if teacher else "")


def _one_backbone(cells: dict[tuple[str, str, str], Cell], key: tuple[str, str, str]) -> int | None:
    """The parameters of one backbone of ``key``'s model: its own runs' count, else another cell's of the same
    data set and model."""
    same = [cells.get(key)] + [c for k, c in cells.items() if k[:2] == key[:2]]
    return next((c.params["backbone"] for c in same if c and c.params), None)


def networks(cell_runs: list[Run], declared: int = 0) -> list[str]:
    """The networks a cell's method is scored by, as its runs recorded them (``final_test_acc_by_network`` in
    ``result.json``), else ``declared`` of them (``report.networks``, for a cell no run has finished yet);
    empty for a method scored by its backbone alone."""
    recorded = {net for r in cell_runs for net in r.result.get("final_test_acc_by_network") or {}}
    return sorted(recorded) or ([f"net{i}" for i in range(1, declared + 1)] if declared > 1 else [])


def table4(
    runs: list[Run], out_md: Path, seeds: int = 5, epochs: int = 200, command: str = "", grid: Grid | None = None
) -> str:
    """Table 4 (CIFAR-100; ResNet-32 and WRN-28-10 × its grid's methods), ours beside the paper's.

    A method scored by several networks (DML) has a row for their mean (the DML paper's convention), followed
    by a row per network; every row is compared by Welch's t-test with ``report.versus`` (ALR-S) of its model.
    """
    grid = grid or expected_grid("table4")
    report, labels, paper = grid.report, method_labels(grid, runs), paper_rows("table4")
    versus = labels.get(declared(grid, "versus"), report.versus)
    cells = collect(runs)
    header = [
        "Model",
        "Method",
        "Ours (%)",
        "Seeds",
        "Paper (%)",
        "Ours − paper",
        f"{versus} − this row (Welch p)",
        "Params (ours)",
        "Multiple (ours)",
        "Multiple (paper)",
    ]
    rows = []
    for key in rows_of("table4", grid, runs):
        cell, reported = cells.get(key), paper.get(key)
        cell_runs = [r for r in runs if r.key == key]
        teacher = _teacher_params(runs, cell_runs)
        std = f" ± {float(reported['std']):.2f}" if reported and reported["std"] else ""
        quoted = f"{float(reported['accuracy']):.2f}{std}{reported['quoted']}" if reported else "—"
        params = format_params(cell.params if cell else None)
        if teacher:
            params += f" + teacher {teacher:,} (frozen)"
        nets = networks(cell_runs, report.networks.get(key[2], 0))
        label = labels[key[2]] + (f" (mean of {len(nets)} networks)" if nets else "")
        rows.append(
            [
                MODEL_LABELS.get(key[1], key[1]),
                label,
                format_acc(cell),
                f"{cell.n if cell else 0}/{seeds}",
                quoted,
                f"{cell.mean - float(reported['accuracy']):+.2f}" if cell and cell.n and reported else "—",
                versus_column(cells, key, report.versus),
                params,
                _multiple(cell.params if cell else None, teacher, _one_backbone(cells, key)),
                reported["params"] if reported else "—",
            ]
        )
        for net in nets:
            net_cell = collect(cell_runs, f"final_test_acc_by_network/{net}").get(key) if cell_runs else None
            rows.append(
                [
                    MODEL_LABELS.get(key[1], key[1]),
                    f"{labels[key[2]]}, network {net.removeprefix('net')}",
                    format_acc(net_cell),
                    f"{net_cell.n if net_cell else 0}/{seeds}",
                ]
                + ["—", "—", "", "", "", ""]
            )
    notes = [
        "Ours: test accuracy after the last epoch (`docs/deviations.md#recipes-and-reporting`), mean ± sample std "
        f"over the seeds that finished ({seeds} expected). DML trains two networks per run; its row is the mean of "
        "the two networks' accuracies (the DML paper's convention), and the two rows below it give each network "
        "on its own.",
        "Paper: its Table 4 (`results/paper/table4.csv`); * marks the numbers it quotes from the DML paper "
        "(Zhang et al. 2018) rather than runs of its own. The suite trains those rows itself: replications of the "
        "DML paper found independent ResNet-32s at about 71 % on CIFAR-100, not 68.99; our Baseline row shows "
        "what we got, unadjusted.",
        f"{versus} − this row: {versus}'s mean minus this row's, same model, in points, with the two-sided p-value "
        "of Welch's t-test over seeds; * marks p < 0.05; n/a where a side has no finished run.",
        "Multiple: every parameter the method needs (both of DML's networks, ALR's matrix, KD's frozen teacher) "
        "over the parameters of one backbone of the row's model, from the run folders' `result.json` (KD's teacher: "
        "the folder its `method.teacher_run` names). The paper prints ~3× for KD; a WRN-28-10 teacher with a "
        "ResNet-32 student counts far more.",
    ]
    notes += provenance(runs, epochs, "table4", command)
    return write_table(
        rows, header, out_md, "Table 4: comparison with KD and DML on CIFAR-100, test accuracy (%)", notes
    )


def table2(runs: list[Run], out_md: Path, epochs: int = 90, command: str = "", grid: Grid | None = None) -> str:
    """Table 2 (ImageNet × ResNet-50/101/152 v1.5 × its grid's methods): top-1 and top-5, ours beside the paper's."""
    grid = grid or expected_grid("table2")
    top1, top5 = collect(runs), collect(runs, "final_test_acc5")
    labels, paper = method_labels(grid, runs), paper_rows("table2")
    header = [
        "Model",
        "Method",
        "Top-1 ours (%)",
        "Top-1 paper (%)",
        "Top-1 ours − paper",
        "Top-5 ours (%)",
        "Top-5 paper (%)",
        "Top-5 ours − paper",
        "Params (ours)",
    ]
    rows = []
    for key in rows_of("table2", grid, runs):
        reported = paper.get(key)
        row = [MODEL_LABELS.get(key[1], key[1]), labels[key[2]]]
        for cells, column in ((top1, "top1"), (top5, "top5")):
            cell = cells.get(key)
            diff = f"{cell.mean - float(reported[column]):+.2f}" if cell and cell.n and reported else "—"
            row += [format_acc(cell), f"{float(reported[column]):.2f}" if reported else "—", diff]
        cell = top1.get(key)
        rows.append(row + [format_params(cell.params if cell else None)])
    notes = [
        "Ours: top-1 and top-5 accuracy on the validation set after the last epoch, every validation image counted "
        "once (`docs/deviations.md#recipes-and-reporting`), one seed. Paper: its Table 2 "
        "(`results/paper/table2.csv`), which gives no spread.",
    ]
    notes += provenance(runs, epochs, "table2", command)
    return write_table(rows, header, out_md, "Table 2: ImageNet-1k (ILSVRC-2012), top-1 / top-5 accuracy (%)", notes)


def table3(runs: list[Run], out_md: Path, epochs: int = 30, command: str = "", grid: Grid | None = None) -> str:
    """Table 3 (AG News, Yahoo! Answers, Yelp × five text models × its grid's methods), ours beside the paper's.

    Rows follow the grid (``configs/experiment/table3.yaml``): TextRCNN is the suite's extra row (the network
    the paper cites for TextRNN), and has no paper number.
    """
    grid = grid or expected_grid("table3")
    declared(grid, "reference")
    cells, labels = collect(runs), method_labels(grid, runs)
    paper = {key: float(r["accuracy"]) for key, r in paper_rows("table3").items()}
    header = ["Dataset", "Model", "Method", "Ours (%)", "Seeds", "Paper (%)", "Ours − paper"]
    header.append(significance_header(grid.report))
    header.append("Params (ours)")
    rows = []
    for key in table_cells(grid.cells, (r.key for r in runs)):
        cell, reported = cells.get(key), paper.get(key)
        diff = f"{cell.mean - reported:+.2f}" if cell and cell.n and reported is not None else "—"
        rows.append(
            [
                DATASET_LABELS.get(key[0], key[0]),
                MODEL_LABELS.get(key[1], key[1]),
                labels[key[2]],
                format_acc(cell),
                str(cell.n if cell else 0),
                f"{reported:.2f}" if reported is not None else "—",
                diff,
                significance(cells, *key, grid.report),
                format_params(cell.params if cell else None),
            ]
        )
    notes = [
        "Ours: test accuracy after the last epoch (`docs/deviations.md#recipes-and-reporting`), mean ± sample std "
        "over the seeds that finished (the paper ran one). Paper: its Table 3 (`results/paper/table3.csv`). "
        "TextRCNN (Lai et al. 2015, the paper's citation for TextRNN) is an extra row the paper does not have. "
        "Models and tokenisation: docs/table3-text.md.",
        significance_note(grid.report),
    ]
    notes += provenance(runs, epochs, "table3", command)
    return write_table(rows, header, out_md, "Table 3: text classification, test accuracy (%)", notes)
