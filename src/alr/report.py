"""Tables and figures from run folders: ``python -m alr.report {demo,table1,...,table4,fmnist,figure3,plots,all}``."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from alr.config import CONFIG_DIR
from alr.reporting.figures import residual_label_panels
from alr.reporting.fmnist import fmnist_report
from alr.reporting.grid import expected_grid, heatmap_run, missing_cells
from alr.reporting.plots import write_plots
from alr.reporting.runs import load_run, load_runs
from alr.reporting.status import write_status
from alr.reporting.tables import demo_table, table1, table2, table3, table4
from alr.reporting.zoo import alr_ablation, zoo


def demo(runs_dir: Path, out_dir: Path) -> None:
    runs = load_runs(runs_dir)
    if not runs:
        sys.exit(f"error: no run folders under {runs_dir}; run `make demo` (or python -m alr.train -m experiment=demo)")
    grid = expected_grid("demo")
    print(demo_table(runs, out_dir / "table.md", grid=grid))
    if run := heatmap_run(runs, grid.report.heatmap):  # the run configs/experiment/demo.yaml's report names
        png = residual_label_panels(run, None, out_dir / "residual_labels.png")
        print(f"wrote {out_dir / 'table.md'}, {out_dir / 'table.csv'} and {png}")


# Each table of the paper, and of the experiments beyond it that compare methods: its builder (runs, out_md,
# command=...) and its subcommand's help. The experiment configs/experiment/<name>.yaml trains it into
# runs/<name>/; the table goes to results/<name>.{md,csv}.
TABLES: dict[str, tuple[Callable[..., str], str]] = {
    "table1": (table1, "Table 1 (CIFAR) beside the paper's numbers"),
    "table2": (table2, "Table 2 (ImageNet, top-1 and top-5) beside the paper's numbers"),
    "table3": (table3, "Table 3 (text) beside the paper's numbers"),
    "table4": (table4, "Table 4 (CIFAR-100, KD and DML) beside the paper's numbers"),
    "zoo": (zoo, "ALR against the label regularizers that came after it (CIFAR-100)"),
    "alr_ablation": (alr_ablation, "ALR's open choices, one at a time (CIFAR-100)"),
}


def table_report(name: str, runs_dir: Path, out_dir: Path, command: str = "") -> None:
    """``out_dir/<name>.{md,csv}``: every cell of table ``name``, "not run" where no run finished."""
    runs = load_runs(runs_dir) if runs_dir.exists() else []
    if not runs:
        print(f"[alr] no run folders under {runs_dir}: every cell says 'not run' (make reproduce-{name} trains them)")
    print(TABLES[name][0](runs, out_dir / f"{name}.md", command=command))
    print(f"wrote {out_dir / f'{name}.md'} and {out_dir / f'{name}.csv'}")


def figure3(run_dir: Path, epochs: list[int] | None, panels: int, out: Path) -> None:
    """Figure 3: the residual labels of one ALR run at several epochs side by side."""
    if not (run_dir / "config.yaml").is_file():
        sys.exit(
            f"error: {run_dir} is not a run folder (no config.yaml). Train it first, e.g. `make reproduce-table1` "
            "or python -m alr.train experiment=table1 dataset=cifar10 model=preact_resnet18 method=alr seed=0; "
            "or pick another run with --run (make figure3 FIG3_RUN=...)."
        )
    try:
        png = residual_label_panels(load_run(run_dir), epochs, out, panels=panels)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {png}")


def _epochs(text: str) -> list[int]:
    try:
        return [int(e) for e in text.split(",") if e]
    except ValueError:
        message = f"--epochs takes comma-separated integers, e.g. 1,60,160,300; got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


# Fashion-MNIST's experiments (configs/experiment/<name>.yaml) and the make target that trains each.
FMNIST = {"fmnist": "make reproduce-fmnist", "fmnist_resnet32": "make reproduce-fmnist-resnet32"}


def fmnist(experiment: str, runs_dir: Path, out_dir: Path) -> None:
    """Fashion-MNIST: the finished runs archived under ``out_dir/<experiment>/runs/``, then the table and figures."""
    try:
        written = fmnist_report(runs_dir, out_dir, experiment)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}; train them with {FMNIST[experiment]}")
    print((out_dir / f"{experiment}.md").read_text())
    print("wrote " + ", ".join(map(str, written)))


# Experiment name (configs/experiment/<name>.yaml) -> builder(runs_dir, out_dir) of its tables and figures, and
# the folder under results/ it writes into. `all` calls each builder whose runs/<name>/ holds run folders.
REPORTS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "demo": (demo, "demo"),
    **{name: (partial(table_report, name), "") for name in TABLES},
    **{name: (partial(fmnist, name), "") for name in FMNIST},
}


def plots(runs_dir: Path, out_dir: Path) -> None:
    written = write_plots(load_runs(runs_dir), out_dir)
    if not written:
        sys.exit(f"error: no finished run folders under {runs_dir}; train some first (e.g. make demo)")
    print("wrote " + ", ".join(map(str, written)))


def build_all(runs_root: Path, results: Path) -> list[str]:
    """Every registered report and every plot for which run folders exist; return the cells still missing."""
    for name, (build, out_dir) in REPORTS.items():
        if load_runs(runs_root / name):
            print(f"== {name}")
            build(runs_root / name, results / out_dir)
        else:
            print(f"== {name}: no run folders under {runs_root / name}, skipped")
    runs = load_runs(runs_root)
    experiments = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml"))
    grids = {name: expected_grid(name) for name in experiments}  # read once: each composes every option
    written = write_plots(runs, results / "plots", grids)
    print(f"== plots: {len(written)} PNG files under {results / 'plots'}")
    print("== reproduction status")
    print(write_status(runs_root, results, grids))
    missing = []
    for grid in grids.values():
        lines = missing_cells(grid, runs)
        if len(lines) == len(grid.cells) and not any(r.config.get("experiment_name") == grid.experiment for r in runs):
            lines = [
                f"{grid.experiment}: nothing run yet ({len(grid.cells)} cells × {len(grid.seeds)} seeds; "
                f"python -m alr.train -m experiment={grid.experiment})"
            ]
        missing += lines
    return missing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alr.report", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("demo", help="the embedded default's table and residual-label heatmap")
    p.add_argument("--runs", type=Path, default=Path("runs/demo"))
    p.add_argument("--out", type=Path, default=Path("results/demo"))
    for name, (_, help_text) in TABLES.items():
        p = sub.add_parser(name, help=f"{help_text}: {name}.md and {name}.csv")
        p.add_argument("--runs", type=Path, default=Path(f"runs/{name}"))
        p.add_argument("--out", type=Path, default=Path("results"))
    for name in FMNIST:
        p = sub.add_parser(name, help=f"Fashion-MNIST on a CPU: run records, {name}.md and .csv, figures")
        p.add_argument("--runs", type=Path, default=Path(f"runs/{name}"))
        p.add_argument("--out", type=Path, default=Path("results"))
    p = sub.add_parser("figure3", help="Figure 3: one ALR run's residual labels at several epochs")
    p.add_argument("--run", type=Path, default=Path("runs/table1/cifar10-preact_resnet18-alr-s0"))
    p.add_argument("--epochs", type=_epochs, default=None, help="e.g. 1,60,160,300 (default: spread over the run)")
    p.add_argument("--panels", type=int, default=4, help="how many epochs when --epochs is not given")
    p.add_argument("--out", type=Path, default=Path("results/figure3.png"))
    p = sub.add_parser("plots", help="learning curves per table cell and residual-label heatmaps (PNG)")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("results/plots"))
    p = sub.add_parser("all", help="every table and plot for which run folders exist, then the missing cells")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "alr.report", *(sys.argv[1:] if argv is None else argv)])
    if args.what == "demo":
        demo(args.runs, args.out)
    elif args.what in TABLES:
        table_report(args.what, args.runs, args.out, command)
    elif args.what in FMNIST:
        fmnist(args.what, args.runs, args.out)
    elif args.what == "figure3":
        figure3(args.run, args.epochs, args.panels, args.out)
    elif args.what == "plots":
        plots(args.runs, args.out)
    else:
        missing = build_all(args.runs, args.out)
        print("== missing cells (experiment / dataset / model / method)")
        print("\n".join(f"  {line}" for line in missing) if missing else "  none: every cell has all its seeds")


if __name__ == "__main__":
    main()
