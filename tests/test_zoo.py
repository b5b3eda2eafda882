"""The experiments beyond the paper that compare methods: the zoo of label regularizers and ALR's ablation.

Their grids and recipes, their smoke grids end to end (one seed, ResNet-32) with their tables, the committed
tables that say "not run" until runs exist, and their make targets.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alr.reporting.grid import expected_grid
from alr.reporting.runs import load_runs
from alr.reporting.zoo import zoo
from conftest import ROOT, compose, run_train

ZOO_METHODS = ["baseline", "slr", "alr", "alr_s", "ols", "lspp", "cp", "tfkd", "pskd", "disturblabel"]


def test_zoo_is_table_1s_recipe_on_cifar100_with_ten_methods_and_five_seeds():
    cfg = compose("experiment=zoo")
    OmegaConf.resolve(cfg)
    assert (cfg.experiment_name, cfg.dataset.name, cfg.trainer.epochs, cfg.trainer.batch_size) == (
        "zoo",
        "cifar100",
        300,
        128,
    )
    assert list(cfg.optim.scheduler.milestones) == [60, 120, 160] and cfg.optim.weight_decay == 5e-4
    grid = expected_grid("zoo")
    assert grid.methods == ZOO_METHODS and grid.seeds == [0, 1, 2, 3, 4]
    assert {m for _, m, _ in grid.cells} == {"preact_resnet18", "resnet32"} and len(grid.cells) == 20
    assert (grid.report.reference, grid.report.versus) == ("baseline", "alr_s")


def test_the_ablation_changes_one_switch_of_alr_per_variant():
    grid = expected_grid("alr_ablation")
    assert grid.seeds == [0, 1, 2] and {m for _, m, _ in grid.cells} == {"preact_resnet18"}
    default = OmegaConf.to_container(compose("method=alr").method.module.criterion)
    changed = {}
    for method in grid.methods:
        if method in ("alr", "alr_s", "alr_s_sum"):
            continue
        criterion = OmegaConf.to_container(compose(f"method={method}").method.module.criterion)
        changed[method] = {k: v for k, v in criterion.items() if default.get(k) != v}
    assert all(len(keys) == 1 or set(keys) == {"weight", "weight_value"} for keys in changed.values()), changed
    assert changed["alr_sum"] == {"normalisation": "sum"} and changed["alr_batch_acc"] == {"acc_source": "batch"}
    assert {"alr_s", "alr_s_sum"} <= set(grid.methods)  # the normalisation for both ALR and ALR-S
    assert grid.report.reference == "alr" and grid.report.verdict == ("alr_sum", "alr")
    assert default["normalisation"] == "mean"  # every variant but alr_sum, alr_s_sum: eq. 4–5's average


def _smoke(experiment: str, tmp_path: Path) -> list:
    from alr.data import samples

    data = tmp_path / "data"
    samples.main(["--out", str(data), "cifar100"])  # the files `make reproduce-zoo SMOKE=1` writes
    overrides = [f"experiment={experiment}", "debug=smoke", f"dataset.data_dir={data}", "seed=0", "model=resnet32"]
    run_train(*overrides, "trainer.limit_train_batches=1", "trainer.keep_checkpoint=false", out=tmp_path, multirun=True)
    return load_runs(tmp_path / experiment)


def _report(experiment: str, tmp_path: Path) -> list[dict[str, str]]:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "alr.report", experiment, "--runs", str(tmp_path / experiment), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    assert "were shortened" in (out / f"{experiment}.md").read_text()
    with (out / f"{experiment}.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_zoo_smoke_grid_end_to_end(tmp_path: Path):
    runs = _smoke("zoo", tmp_path)
    assert sorted(r.key[2] for r in runs) == sorted(ZOO_METHODS) and all(r.status == "finished" for r in runs)
    state = {r.key[2]: r.result["method_state_bytes"] for r in runs}
    assert state["baseline"] == 0 and state["pskd"] > state["ols"] > 0  # per-sample rows above per-class ones
    rows = _report("zoo", tmp_path)
    ours = [r for r in rows if r["Model"] == "ResNet-32"]
    assert [r["Method"] for r in ours] == [expected_grid("zoo").labels[m] for m in ZOO_METHODS]
    assert all(r["Seeds"] == "1/5" and r["NLL"] != "—" for r in ours)
    for row, run in zip(ours, sorted(runs, key=lambda r: ZOO_METHODS.index(r.key[2]))):  # one seed: no ± std
        assert row["ECE (%)"] == f"{run.result['final_test_ece']:.2f}" and 0 <= run.result["final_test_ece"] <= 100
    assert {r["Accuracy (%)"] for r in rows if r["Model"] == "PreAct ResNet-18"} == {"not run"}


@pytest.mark.slow
def test_ablation_smoke_grid_end_to_end(tmp_path: Path):
    runs = _smoke("alr_ablation", tmp_path)
    grid = expected_grid("alr_ablation")
    assert sorted(r.key[2] for r in runs) == sorted(grid.methods) and all(r.status == "finished" for r in runs)
    rows = _report("alr_ablation", tmp_path)
    assert [r["Method"] for r in rows if r["Model"] == "ResNet-32"] == [grid.labels[m] for m in grid.methods]


def test_committed_tables_say_not_run_until_runs_exist(tmp_path: Path):
    for name in ("zoo", "alr_ablation"):
        committed = (ROOT / "results" / f"{name}.md").read_text()
        assert "| not run |" in committed and "(0 finished)" in committed
    assert zoo([], tmp_path / "zoo.md") == (ROOT / "results" / "zoo.md").read_text()


def test_make_targets_run_the_sweep_then_the_table():
    for target, experiment in (("reproduce-zoo", "zoo"), ("reproduce-ablation", "alr_ablation")):
        dry = subprocess.run(["make", "-n", target, "SMOKE=1"], cwd=ROOT, capture_output=True, text=True, check=True)
        lines = [line for line in dry.stdout.splitlines() if not line.startswith("make")]  # make[1]: Entering ...
        assert "-m alr.data.samples --out runs/smoke/data cifar100" in lines[0]
        assert f"-m alr.train -m experiment={experiment} paths.output_dir=runs/smoke debug=smoke" in lines[1]
        assert f"-m alr.report {experiment} --runs runs/smoke/{experiment} --out runs/smoke/results" in lines[2]
