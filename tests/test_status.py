"""The reproduction status: counts from the run folders against each experiment's grid, and the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from alr.reporting.grid import Comparisons
from alr.reporting.runs import Run
from alr.reporting.status import status_rows, verdict, write_status

REPORT = Comparisons(verdict=("alr_s", "baseline"))  # as configs/experiment/table1.yaml's report key declares it


def _run(method: str, seed: int, acc: float | None, dataset: str = "cifar10", model: str = "wrn28_10", epochs=300):
    config = {
        "experiment_name": "table1",
        "dataset": {"name": dataset},
        "model_name": model,
        "method": {"name": method},
        "seed": seed,
        "trainer": {"epochs": epochs, "limit_train_batches": None},
    }
    result = {"status": "finished", "final_test_acc": acc, "precision": "bf16", "device": "NVIDIA H100"}
    return Run(Path(f"{dataset}-{model}-{method}-s{seed}"), config, result if acc is not None else {})


def test_verdict_counts_cells_above_the_baseline_and_the_significant_ones():
    runs = [_run("baseline", s, 95.0 + 0.1 * s) for s in range(3)] + [
        _run("alr_s", s, 96.0 + 0.1 * s) for s in range(3)
    ]
    runs += [_run("baseline", s, 80.0 + s, model="preact_resnet18") for s in range(2)]
    runs += [_run("alr_s", s, 79.0 + s, model="preact_resnet18") for s in range(2)]
    assert verdict(runs, 300, REPORT) == "ALR-S above baseline in 1 of 2 cells, 1 of them at p < 0.05"
    one_seed = [_run("baseline", 0, 70.0), _run("alr_s", 0, 71.0)]
    assert verdict(one_seed, 300, REPORT) == "ALR-S above baseline in 1 of 1 cells (too few seeds for a test)"
    assert verdict([_run("baseline", 0, None)], 300, REPORT) == "not run"
    assert (
        verdict([_run("baseline", 0, 70.0)], 300, REPORT)
        == "1 runs finished; no cell has both ALR-S and the baseline yet"
    )
    short = [_run("baseline", 0, 70.0, epochs=1), _run("alr_s", 0, 71.0, epochs=1)]
    assert verdict(short, 300, REPORT).endswith("; 2 of 2 runs shortened (smoke): not comparable to the paper")
    # The experiment's config says which pair the verdict compares, and the label names the method.
    slr = Comparisons(verdict=("slr", "alr_s"))
    assert (
        verdict(one_seed + [_run("slr", 0, 72.0)], 300, slr)
        == "SLR above alr_s in 1 of 1 cells (too few seeds for a test)"
    )
    assert verdict(one_seed, 300, Comparisons()).endswith("the experiment's config names no verdict (report.verdict)")


def test_status_counts_runs_against_the_grid_and_links_existing_tables(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    for run in (_run("baseline", 0, 95.0), _run("alr_s", 0, 95.5)):
        folder = runs / "table1" / run.path
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(run.config))
        (folder / "result.json").write_text(json.dumps(run.result))
    results.mkdir()
    (results / "table1.md").write_text("# Table 1\n")
    rows = {row[0]: row for row in status_rows(runs, results)}
    table1 = rows["[Table 1](table1.md)"]
    assert table1[2:] == [
        "`make reproduce-table1`",
        "2 / 0 / 80",
        "bf16 on NVIDIA H100",
        "ALR-S above baseline in 1 of 1 cells (too few seeds for a test)",
    ]
    assert rows["Figure 3"][3:] == ["0 / 0 / 1", "—", "not run"]
    assert "| Result | What | Command |" in write_status(runs, results)
    assert (results / "status.md").exists()
