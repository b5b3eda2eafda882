"""`make results` / `make plots` on real run folders of a shortened demo: tables, plots, missing cells."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alr.report import main
from alr.reporting.grid import expected_grid
from conftest import CONFIGS, ROOT, run_train

PNG = b"\x89PNG\r\n\x1a\n"


def test_expected_grid_is_read_from_the_experiments_sweep():
    grid = expected_grid("demo")
    assert grid.cells == [("digits", "digits_cnn", m) for m in ("baseline", "slr", "alr", "alr_s")]
    assert grid.seeds == [0, 1, 2]


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_has_a_grid_of_cells_and_seeds(name: str):
    grid = expected_grid(name)
    assert grid.cells and grid.seeds
    assert len(set(grid.cells)) == len(grid.cells) and all(len(cell) == 3 and all(cell) for cell in grid.cells)


@pytest.mark.slow
def test_results_and_plots_from_real_demo_runs(tmp_path, capsys):
    # Part of the demo's grid: 2 methods × 2 of its 3 seeds, 3 short epochs each.
    runs = tmp_path / "runs"
    overrides = (
        "experiment=demo",
        "trainer.epochs=3",
        "trainer.limit_train_batches=5",
        "method=baseline,alr",
        "seed=0,1",
    )
    run_train(*overrides, out=runs, multirun=True)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "alr.report", "all", "--runs", str(runs), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # this checkout's package, not the venv's
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = (out / "demo" / "table.md").read_text()
    alr_row = next(line for line in table.splitlines() if line.startswith("| ALR |"))
    assert "(p=" in alr_row or "(p<0.001)" in alr_row or "(p n/a)" in alr_row
    assert next(line for line in table.splitlines() if line.startswith("| ALR-S |")).endswith("| n/a |")
    assert "Welch's t-test" in table and "2/3 seeds" in table
    assert (out / "demo" / "residual_labels.png").read_bytes()[:8] == PNG
    curves = out / "plots" / "demo" / "digits-digits_cnn.png"
    assert curves.read_bytes()[:8] == PNG
    assert (out / "plots" / "demo" / "digits-digits_cnn-alr-s0-residual_labels.png").read_bytes()[:8] == PNG
    missing = proc.stdout.split("== missing cells", 1)[1]
    assert "demo / digits / digits_cnn / baseline: 2/3 seeds (not run: 2)" in missing
    assert "demo / digits / digits_cnn / alr_s: 0/3 seeds (not run: 0, 1, 2)" in missing
    assert "/ alr:" in missing and "/ slr:" in missing

    # A seed that failed and one still running: both count as missing, neither enters the table or the plots.
    (runs / "demo" / "digits-digits_cnn-alr-s1" / "result.json").write_text(json.dumps({"status": "failed"}))
    (runs / "demo" / "digits-digits_cnn-baseline-s1" / "result.json").write_text(json.dumps({"status": "running"}))
    curves.unlink()
    main(["all", "--runs", str(runs), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "demo / digits / digits_cnn / alr: 1/3 seeds (failed: 1; not run: 2)" in stdout
    assert "demo / digits / digits_cnn / baseline: 1/3 seeds (unfinished: 1; not run: 2)" in stdout
    table = (out / "demo" / "table.md").read_text()
    assert "(1/3 seeds, 1 failed)" in table and "(p n/a)" in table
    assert curves.read_bytes()[:8] == PNG

    main(["plots", "--runs", str(runs), "--out", str(tmp_path / "plots")])
    assert sorted(p.name for p in (tmp_path / "plots" / "demo").iterdir()) == [
        "digits-digits_cnn-alr-s0-residual_labels.png",
        "digits-digits_cnn.png",
    ]
