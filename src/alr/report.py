"""Generate tables and figures from run folders: ``python -m alr.report demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alr.reporting.figures import residual_label_panels
from alr.reporting.runs import load_runs
from alr.reporting.tables import demo_table


def demo(runs_dir: Path, out_dir: Path) -> None:
    runs = load_runs(runs_dir)
    if not runs:
        sys.exit(f"error: no run folders under {runs_dir}; run `make demo` (or python -m alr.train -m experiment=demo)")
    print(demo_table(runs, out_dir / "table.md"))
    alr_runs = sorted((r for r in runs if r.key[2] == "alr" and r.status == "finished"), key=lambda r: r.seed)
    if alr_runs:
        png = residual_label_panels(alr_runs[0], None, out_dir / "residual_labels.png")
        print(f"wrote {out_dir / 'table.md'}, {out_dir / 'table.csv'} and {png}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alr.report", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("demo", help="the embedded default's table and residual-label heatmap")
    p.add_argument("--runs", type=Path, default=Path("runs/demo"))
    p.add_argument("--out", type=Path, default=Path("results/demo"))
    args = parser.parse_args(argv)
    if args.what == "demo":
        demo(args.runs, args.out)


if __name__ == "__main__":
    main()
