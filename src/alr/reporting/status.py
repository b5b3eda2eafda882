"""The reproduction status: one row per result of the paper, computed from the run folders.

``python -m alr.report all`` (``make results``) writes ``results/status.md``, and ``scripts/sync_readme.py``
copies it onto the front page. For each result: the command that reproduces it, how many of the runs its
experiment's grid expects have finished or failed (the grid is read from ``configs/experiment/<name>.yaml``,
as for the missing-cells list), the precision and hardware the finished runs used, a one-line verdict
computed from the runs, and a link to the generated table. Which methods the verdict compares, and which run
Figure 3 draws, the experiment's ``report`` key says (``verdict``, ``heatmap``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alr.config import CONFIG_DIR
from alr.reporting.grid import Comparisons, Grid, configured_label, expected_grid, matches, method_labels
from alr.reporting.runs import Run, load_runs
from alr.reporting.stats import welch
from alr.reporting.tables import collect, shortened


@dataclass(frozen=True)
class Result:
    """A result of the paper and how the suite reproduces it."""

    label: str  # as the paper names it
    what: str  # what it shows, in a few words
    experiment: str  # configs/experiment/<experiment>.yaml holds its grid
    command: str
    output: str  # the generated file, relative to the results folder


RESULTS = (
    Result("Table 1", "CIFAR-10/100, PreAct ResNet-18 and WRN-28-10", "table1", "make reproduce-table1", "table1.md"),
    Result("Table 2", "ImageNet, ResNet-50/101/152", "table2", "make reproduce-table2", "table2.md"),
    Result(
        "Table 3", "AG News, Yahoo! Answers, Yelp; five text models", "table3", "make reproduce-table3", "table3.md"
    ),
    Result("Table 4", "CIFAR-100, ALR-S against KD and DML", "table4", "make reproduce-table4", "table4.md"),
    Result("Figure 3", "residual labels of CIFAR-10 over training", "table1", "make figure3", "figure3.png"),
    Result(
        "Label regularizers (beyond the paper)",
        "CIFAR-100, ALR against six later methods",
        "zoo",
        "make reproduce-zoo",
        "zoo.md",
    ),
    Result(
        "ALR's open choices (beyond the paper)",
        "CIFAR-100, one switch at a time",
        "alr_ablation",
        "make reproduce-ablation",
        "alr_ablation.md",
    ),
    Result(
        "Fashion-MNIST (beyond the paper)",
        "ResNet-8 on a CPU, 60,000 images, 12 methods",
        "fmnist",
        "make reproduce-fmnist",
        "fmnist.md",
    ),
    Result(
        "Fashion-MNIST, first recipe (beyond the paper)",
        "ResNet-32 on 8,000 images, ALR in both normalisations",
        "fmnist_resnet32",
        "make reproduce-fmnist-resnet32",
        "fmnist_resnet32.md",
    ),
)


def _ran_on(runs: list[Run]) -> str:
    """``fp16 on NVIDIA A100 ×8 runs`` style: the distinct precisions and devices of the finished runs."""
    done = [r for r in runs if r.status == "finished"]
    if not done:
        return "—"
    precisions = ", ".join(sorted({str(r.result.get("precision", "?")) for r in done}))
    devices = ", ".join(sorted({str(r.result.get("device", "?")) for r in done}))
    return f"{precisions} on {devices}"


def verdict(runs: list[Run], epochs: int, report: Comparisons, labels: dict[str, str] | None = None) -> str:
    """``report.verdict``'s method against its reference, cell by cell (same data set and model), from the
    finished runs; ``labels`` name the method (default: its config's label)."""
    done = [r for r in runs if r.status == "finished"]
    if not done:
        return "not run"
    if report.verdict is None:
        return f"{len(done)} runs finished; the experiment's config names no verdict (report.verdict)"
    method, reference = report.verdict
    label = (labels or {}).get(method) or configured_label(method)
    cells = collect(done)
    pairs = sorted({(d, m) for d, m, k in cells if k == method and (d, m, reference) in cells})
    if not pairs:
        return f"{len(done)} runs finished; no cell has both {label} and the {reference} yet"
    comparisons = [welch(cells[(d, m, method)], cells[(d, m, reference)]) for d, m in pairs]
    above = sum(c.diff > 0 for c in comparisons)
    text = f"{label} above {reference} in {above} of {len(pairs)} cells"
    tested = [c for c in comparisons if c.p_value is not None]
    if tested:
        text += f", {sum(c.diff > 0 and c.p_value < 0.05 for c in tested)} of them at p < 0.05"
    else:
        text += " (too few seeds for a test)"
    short = sum(shortened(r, epochs) for r in done)
    if short:
        text += f"; {short} of {len(done)} runs shortened (smoke): not comparable to the paper"
    return text


def _figure_row(result: Result, runs: list[Run], results_dir: Path, report: Comparisons) -> list[str]:
    """A figure drawn from one run: the one its experiment's ``report.heatmap`` names."""
    run = next((r for r in runs if matches(r, report.heatmap)), None)
    status = run.status if run else "not run"
    drawn = (results_dir / result.output).exists()
    finished = 1 if status == "finished" else 0
    counts = f"{finished} / {1 if status == 'failed' else 0} / 1"
    if status == "finished":
        text = "drawn from the finished run" if drawn else "run finished; `make figure3` draws it"
    else:
        text = "not run" if status == "not run" else f"its run is {status}"
    return [result.label, result.what, f"`{result.command}`", counts, _ran_on([run] if run else []), text]


def status_rows(runs_root: Path, results_dir: Path, grids: dict[str, Grid] | None = None) -> list[list[str]]:
    """One row per entry of :data:`RESULTS`: result, command, finished / failed / expected, ran on, verdict.

    ``grids``: the experiments' grids where the caller has read them already (each costs a compose per cell).
    """
    rows = []
    for result in RESULTS:
        link = f"[{result.label}]({result.output})" if (results_dir / result.output).exists() else result.label
        if not (Path(CONFIG_DIR) / "experiment" / f"{result.experiment}.yaml").exists():
            rows.append([result.label, result.what, "—", "—", "—", "not in the suite yet"])
            continue
        # Run folders, else the run records an experiment commits under results/<experiment>/runs/ (Fashion-MNIST).
        found = load_runs(runs_root / result.experiment) or load_runs(results_dir / result.experiment / "runs")
        runs = [r for r in found if r.config.get("experiment_name") == result.experiment]
        grid = (grids or {}).get(result.experiment) or expected_grid(result.experiment)
        if result.output.endswith(".png"):
            row = _figure_row(result, runs, results_dir, grid.report)
        else:
            expected = len(grid.cells) * len(grid.seeds)
            finished = sum(r.status == "finished" for r in runs)
            failed = sum(r.status == "failed" for r in runs)
            row = [
                result.label,
                result.what,
                f"`{result.command}`",
                f"{finished} / {failed} / {expected}",
                _ran_on(runs),
                verdict(runs, grid.epochs, grid.report, method_labels(grid, runs)),
            ]
        row[0] = link
        rows.append(row)
    return rows


def write_status(runs_root: Path, results_dir: Path, grids: dict[str, Grid] | None = None) -> str:
    """``results_dir/status.md``: the reproduction status table; return its Markdown."""
    header = ["Result", "What", "Command", "Runs finished / failed / expected", "Ran on", "Verdict"]
    lines = ["# Reproduction status", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in status_rows(runs_root, results_dir, grids)]
    lines += [
        "",
        "Runs are counted from the run folders under `runs/<experiment>/`; the expected ones from each "
        "experiment's grid (`configs/experiment/`). Verdict: the mean test accuracy after the last epoch of the "
        "method the experiment's `report.verdict` names (ALR-S for the paper's tables) against its reference's "
        "(the baseline) of the same data set and model, with Welch's t-test over seeds where each side has two or "
        f"more. Generated by `make results` (`python -m alr.report all --runs {runs_root}`).",
    ]
    text = "\n".join(lines) + "\n"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "status.md").write_text(text)
    return text
