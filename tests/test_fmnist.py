"""Fashion-MNIST on a CPU (experiment=fmnist, the benchmark; fmnist_resnet32, the first recipe): the smoke grid
end to end, its table from run folders, the rank correlation of residual labels with confusions, the make targets,
and each committed table from its committed records."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from alr.data import samples
from alr.reporting.fmnist import archive, confusion_rank_correlation, fmnist_report
from alr.reporting.runs import load_run, load_runs
from conftest import ROOT, run_train


@pytest.mark.slow
def test_the_smoke_grid_trains_and_reports_from_its_archived_records(tmp_path: Path):
    data = tmp_path / "data"
    samples.write_mnist(data, "fashion_mnist")
    runs = tmp_path / "runs"
    run_train(
        "experiment=fmnist",
        "debug=smoke",
        f"dataset.data_dir={data}",
        "dataset.train_subset=100",  # of the sample files' 200 (make reproduce-fmnist SMOKE=1 does the same)
        "seed=0,1",
        out=runs,
        multirun=True,
    )
    folders = sorted(p.name for p in (runs / "fmnist").iterdir() if p.is_dir())
    methods = (
        "baseline",
        "slr",
        "alr",
        "alr_s",
        "alr_sum",
        "alr_s_sum",
        "ols",
        "lspp",
        "cp",
        "tfkd",
        "pskd",
        "disturblabel",
    )
    assert folders == sorted(f"fashion_mnist-resnet8-{m}-s{s}" for m in methods for s in (0, 1))
    run = runs / "fmnist" / "fashion_mnist-resnet8-alr-s0"
    result = json.loads((run / "result.json").read_text())
    assert result["data"]["train_images"] and np.load(run / "test_confusion.npy").shape == (10, 10)
    assert json.loads((run / "classes.json").read_text())[0] == "T-shirt/top"

    written = fmnist_report(runs / "fmnist", tmp_path / "results")
    records = tmp_path / "results" / "fmnist" / "runs"
    assert sorted(p.name for p in records.iterdir()) == folders  # what the table is built from
    assert sorted(p.name for p in (records / run.name).iterdir()) == [
        "classes.json",
        "config.yaml",
        "metrics.jsonl",
        "residual_labels",
        "result.json",
        "test_confusion.npy",
    ]
    table = (tmp_path / "results" / "fmnist.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = lines[0].split(" | "), [line.split(" | ") for line in lines[1:]]
    col = {name.strip("| "): i for i, name in enumerate(header)}
    labels = ["Baseline", "SLR", "ALR", "ALR-S", "ALR (summed)", "ALR-S (summed)", "OLS", "LS++", "CP", "TF-KD"]
    assert [r[0].lstrip("| ") for r in rows] == [*labels, "PS-KD", "DisturbLabel"]
    assert all(r[col["Seeds"]] == "2" for r in rows)
    rho = col["ρ(residual labels, confusions)"]
    assert [r[0].lstrip("| ") for r in rows if r[rho]] == ["ALR", "ALR-S", "ALR (summed)", "ALR-S (summed)"]
    welch, holm = col["Δ vs baseline (Welch p)"], col["Holm p"]
    assert rows[0][welch] == rows[0][holm] == "" and all("(p" in r[welch] for r in rows[1:])
    claimed = sum("(p=" in r[welch] or "(p<" in r[welch] for r in rows)
    assert sum(r[holm].startswith("p") for r in rows) == claimed  # a Holm p for each Welch p, none for "p n/a"
    assert "24 run records in `results/fmnist/runs/` (24 finished)" in table
    assert {p.name for p in written} >= {"fmnist.md", "fmnist.csv", "accuracy_ece.png", "curves.png"}

    # From the records alone (the run folders gone), the same bytes.
    copy = tmp_path / "again" / "fmnist" / "runs"
    shutil.copytree(records, copy)
    fmnist_report(tmp_path / "no-runs-here", tmp_path / "again")
    assert (tmp_path / "again" / "fmnist.md").read_text() == table


def _fake_run(folder: Path, method: str, seed: int, residual: np.ndarray | None, confusion: np.ndarray) -> None:
    folder.mkdir(parents=True)
    config = {"dataset": {"name": "fashion_mnist"}, "model_name": "resnet32", "method": {"name": method}, "seed": seed}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "result.json").write_text(json.dumps({"status": "finished"}))
    np.save(folder / "test_confusion.npy", confusion)
    if residual is not None:
        (folder / "residual_labels").mkdir()
        np.save(folder / "residual_labels" / "epoch_001.npy", residual * 0)  # only the last snapshot counts
        np.save(folder / "residual_labels" / "epoch_002.npy", residual)


def test_rank_correlation_of_residual_labels_with_the_baselines_row_normalised_confusions(tmp_path: Path):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(4, 4)) + np.diag([500, 100, 900, 300])  # rows of different sizes
    normalised = counts / counts.sum(axis=1, keepdims=True)
    off = ~np.eye(4, dtype=bool)
    same_order = np.where(off, normalised, 0.0)
    _fake_run(tmp_path / "b", "baseline", 0, None, counts)
    _fake_run(tmp_path / "a", "alr", 0, same_order, counts)
    _fake_run(tmp_path / "r", "alr", 0, np.where(off, -normalised, 0.0), counts)
    _fake_run(tmp_path / "c", "alr", 0, np.where(off, counts, 0), counts)  # raw counts rank differently
    baseline = load_run(tmp_path / "b")
    assert confusion_rank_correlation(load_run(tmp_path / "a"), baseline) == pytest.approx(1.0)
    assert confusion_rank_correlation(load_run(tmp_path / "r"), baseline) == pytest.approx(-1.0)
    assert confusion_rank_correlation(load_run(tmp_path / "c"), baseline) < 1.0
    assert [r.path.name for r in archive(load_runs(tmp_path), tmp_path / "kept")] == ["a", "b", "c", "r"]


@pytest.mark.parametrize("experiment", ["fmnist", "fmnist_resnet32"])
def test_make_reproduce_fmnist_passes_the_data_folder_and_stops_without_it(experiment: str):
    target = "reproduce-" + experiment.replace("_", "-")

    def dry(*args: str) -> list[str]:
        proc = subprocess.run(["make", "-n", target, *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return [" ".join(line.split()) for line in proc.stdout.splitlines() if "alr." in line or "test -d" in line]

    plain = dry("FMNIST_DATA=/srv/fmnist")
    assert f"-m alr.train -m experiment={experiment} paths.output_dir=runs dataset.data_dir=/srv/fmnist" in plain[1]
    assert f"-m alr.report {experiment} --runs runs/{experiment} --out results" in plain[2]
    guard = subprocess.run(["bash", "-c", plain[0]], capture_output=True, text=True)
    assert guard.returncode == 1 and "error: no Fashion-MNIST folder at /srv/fmnist" in guard.stderr
    smoke = dry("SMOKE=1")
    assert "-m alr.data.samples --out runs/smoke/data fashion_mnist" in smoke[0]
    assert "debug=smoke dataset.data_dir=runs/smoke/data" in smoke[1] and "/usr/share" not in smoke[1]
    assert "dataset.train_subset=100" in smoke[1]


@pytest.mark.parametrize("experiment", ["fmnist", "fmnist_resnet32"])
def test_the_committed_table_regenerates_from_the_committed_records_byte_for_byte(tmp_path: Path, experiment: str):
    """results/<experiment>.md comes from real runs of the grid: cells × seeds of its sweep, each finished and
    unshortened (ResNet-32's whole grid; the benchmark's as far as its sweep has gone, each run whole)."""
    from alr.reporting.fmnist import fmnist_table
    from alr.reporting.grid import expected_grid

    records = load_runs(ROOT / "results" / experiment / "runs")
    grid = expected_grid(experiment)
    expected = sorted((c, s) for c in grid.cells for s in grid.seeds)
    found = sorted((r.key, r.seed) for r in records)
    assert found == expected if experiment == "fmnist_resnet32" else set(found) <= set(expected)
    assert all(r.status == "finished" and not r.config["trainer"]["limit_train_batches"] for r in records)
    assert all(r.config["experiment_name"] == experiment for r in records)  # the ResNet-32 ones read as upgraded
    assert all(r.result["epochs"] == grid.epochs == len(r.metrics()) for r in records)
    fmnist_table(records, tmp_path / "table.md", grid=grid, experiment=experiment)
    assert (tmp_path / "table.md").read_text() == (ROOT / "results" / f"{experiment}.md").read_text()
    assert (tmp_path / "table.csv").read_text() == (ROOT / "results" / f"{experiment}.csv").read_text()


@pytest.mark.parametrize("experiment", ["fmnist", "fmnist_resnet32"])
def test_a_fresh_checkout_restores_the_committed_records_and_the_sweep_skips_their_runs(tmp_path: Path, experiment):
    """make reproduce-fmnist on a checkout without run folders copies each committed record back into runs/, and
    the trainer takes it as its finished run (no training), so a grid stopped in one session goes on in the next."""
    from alr.trainer import fit
    from conftest import compose

    target = "reproduce-" + experiment.replace("_", "-")
    proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
    restore = next(line for line in proc.stdout.splitlines() if "from its committed record" in line)
    name = f"fashion_mnist-{'resnet8' if experiment == 'fmnist' else 'resnet32'}-baseline-s0"
    shutil.copytree(ROOT / "results" / experiment / "runs" / name, tmp_path / "results" / experiment / "runs" / name)
    (tmp_path / "runs" / experiment / "other").mkdir(parents=True)  # an existing folder is left as it is
    for _ in range(2):  # the second time, nothing to restore
        done = subprocess.run(["bash", "-c", restore], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout == "" and sorted(p.name for p in (tmp_path / "runs" / experiment).iterdir()) == [name, "other"]
    run_dir = tmp_path / "runs" / experiment / name
    cfg = compose(f"experiment={experiment}", "method=baseline", "seed=0", f"paths.output_dir={tmp_path / 'runs'}")
    result = fit(cfg, run_dir)
    assert result["status"] == "finished" and not (run_dir / "last.pt").exists()
    assert result == json.loads((ROOT / "results" / experiment / "runs" / name / "result.json").read_text())
