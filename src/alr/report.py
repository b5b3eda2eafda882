"""Generate tables and figures from run folders: ``python -m alr.report {demo,plots,all}``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from alr.reporting.figures import residual_label_panels
from alr.reporting.grid import expected_grid, missing_cells
from alr.reporting.plots import write_plots
from alr.reporting.runs import load_runs
from alr.reporting.tables import demo_table
from alr.train import CONFIG_DIR


def demo(runs_dir: Path, out_dir: Path) -> None:
    runs = load_runs(runs_dir)
    if not runs:
        sys.exit(f"error: no run folders under {runs_dir}; run `make demo` (or python -m alr.train -m experiment=demo)")
    print(demo_table(runs, out_dir / "table.md"))
    alr_runs = sorted((r for r in runs if r.key[2] == "alr" and r.status == "finished"), key=lambda r: r.seed)
    if alr_runs:
        png = residual_label_panels(alr_runs[0], None, out_dir / "residual_labels.png")
        print(f"wrote {out_dir / 'table.md'}, {out_dir / 'table.csv'} and {png}")


# Experiment name (configs/experiment/<name>.yaml) -> builder(runs_dir, out_dir) of its tables and figures.
# `all` calls each builder whose runs/<name>/ holds run folders, writing into results/<name>/.
REPORTS: dict[str, Callable[[Path, Path], None]] = {"demo": demo}


def plots(runs_dir: Path, out_dir: Path) -> None:
    written = write_plots(load_runs(runs_dir), out_dir)
    if not written:
        sys.exit(f"error: no finished run folders under {runs_dir}; train some first (e.g. make demo)")
    print("wrote " + ", ".join(map(str, written)))


def build_all(runs_root: Path, results: Path) -> list[str]:
    """Every registered report and every plot for which run folders exist; return the cells still missing."""
    for name, build in REPORTS.items():
        if load_runs(runs_root / name):
            print(f"== {name}")
            build(runs_root / name, results / name)
        else:
            print(f"== {name}: no run folders under {runs_root / name}, skipped")
    runs = load_runs(runs_root)
    written = write_plots(runs, results / "plots")
    print(f"== plots: {len(written)} PNG files under {results / 'plots'}")
    missing = []
    for config in sorted(Path(CONFIG_DIR, "experiment").glob("*.yaml")):
        grid = expected_grid(config.stem)
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
    p = sub.add_parser("plots", help="learning curves per table cell and residual-label heatmaps (PNG)")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("results/plots"))
    p = sub.add_parser("all", help="every table and plot for which run folders exist, then the missing cells")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    if args.what == "demo":
        demo(args.runs, args.out)
    elif args.what == "plots":
        plots(args.runs, args.out)
    else:
        missing = build_all(args.runs, args.out)
        print("== missing cells (experiment / dataset / model / method)")
        print("\n".join(f"  {line}" for line in missing) if missing else "  none: every cell has all its seeds")


if __name__ == "__main__":
    main()
