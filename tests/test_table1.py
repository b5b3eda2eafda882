"""Table 1: the experiment's recipe, the smoke grid end to end, the table builder, Figure 3, sharding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from alr.config_check import ConfigError, validate
from alr.data import cifar, samples
from alr.reporting.runs import load_runs
from alr.reporting.tables import load_paper, table1
from conftest import ROOT, compose, run_train


def test_table1_experiment_is_the_papers_recipe_and_grid():
    cfg = compose("experiment=table1")
    OmegaConf.resolve(cfg)
    assert cfg.experiment_name == "table1"
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (300, 128)
    assert cfg.optim.weight_decay == 5e-4 and cfg.method.weight_decay == 0.0
    opt = cfg.optim.optimizer
    assert (opt._target_, opt.lr, opt.momentum, opt.nesterov) == ("torch.optim.SGD", 0.1, 0.9, True)
    assert list(cfg.optim.scheduler.milestones) == [60, 120, 160] and cfg.optim.scheduler.gamma == 0.1
    grid = yaml.safe_load((ROOT / "configs/experiment/table1.yaml").read_text())["hydra"]["sweeper"]["params"]
    axes = {k: v.split(",") for k, v in grid.items()}
    assert axes == {
        "dataset": ["cifar10", "cifar100"],
        "model": ["preact_resnet18", "wrn28_10"],
        "method": ["baseline", "slr", "alr", "alr_s"],
        "seed": ["0", "1", "2", "3", "4"],
    }
    paper_keys = [(r["dataset"], r["model"], r["method"]) for r in load_paper("table1")]
    assert sorted(paper_keys) == sorted(
        (d, m, k) for d in axes["dataset"] for m in axes["model"] for k in axes["method"]
    )


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_sample_files_load_through_the_real_cifar_loader(tmp_path: Path, name: str):
    samples.write_cifar(tmp_path, name, n_train=30, n_test=10)
    arrays = cifar.load_arrays(name, tmp_path)
    assert arrays["x_train"].shape == (30, 3, 32, 32) and arrays["x_test"].shape == (10, 3, 32, 32)
    assert arrays["x_train"].dtype == np.uint8 and arrays["x_train"].max() > 200
    assert set(np.unique(arrays["y_train"])) <= set(range(10))
    assert arrays["class_names"][:2] == ["digit 0", "digit 1"]
    assert len(arrays["class_names"]) == cifar.LAYOUTS[name].num_classes
    # The three channels are one grey digit, each 8×8 pixel a 4×4 block.
    x = arrays["x_train"][0]
    assert (x[0] == x[1]).all() and (x[0] == x[2]).all()
    assert (x[0, ::4, ::4].repeat(4, 0).repeat(4, 1) == x[0]).all()


def _fake_run(root: Path, dataset: str, model: str, method: str, seed: int, acc: float | None, **trainer) -> None:
    """A run folder as the trainer leaves it: ``config.yaml`` and ``result.json`` (``acc=None``: failed)."""
    path = root / f"{dataset}-{model}-{method}-s{seed}"
    path.mkdir(parents=True)
    config = {
        "dataset": {"name": dataset},
        "model_name": model,
        "method": {"name": method},
        "seed": seed,
        "trainer": {"epochs": 300, "limit_train_batches": None, **trainer},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    extra = 9900 if method.startswith("alr") else 0
    result = (
        {"status": "failed", "error": "non-finite loss"}
        if acc is None
        else {
            "status": "finished",
            "final_test_acc": acc,
            "params": {"backbone": 11218340, "method": extra},
            "wall_time_s": 3600.0,
            "device": "NVIDIA H100",
            "torch_version": "2.14.1",
        }
    )
    (path / "result.json").write_text(json.dumps(result))


def _row(table: str, *cells: str) -> list[str]:
    prefix = "| " + " | ".join(cells) + " |"
    rows = [line for line in table.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, f"no single row starting with {prefix!r}"
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_table1_cells_from_run_folders(tmp_path: Path):
    c100 = ("cifar100", "preact_resnet18")
    for seed, acc in enumerate([77.0, 77.5, 78.0, 77.5, 77.0]):
        _fake_run(tmp_path, *c100, "baseline", seed, acc)
    for seed, acc in enumerate([79.0, 79.5, 79.0]):
        _fake_run(tmp_path, *c100, "alr_s", seed, acc)
    _fake_run(tmp_path, *c100, "alr", 0, 78.0)
    _fake_run(tmp_path, *c100, "slr", 0, None)
    text = table1(load_runs(tmp_path), tmp_path / "out" / "table1.md", command="python -m alr.report table1")

    base = _row(text, "CIFAR-100", "PreAct ResNet-18", "Baseline")
    assert base[3:8] == ["77.40 ± 0.42", "5/5", "77.54 ± 0.31", "-0.14", ""]
    assert base[8:] == ["11,218,340", "11.22M"]
    alr_s = _row(text, "CIFAR-100", "PreAct ResNet-18", "ALR-S")
    assert alr_s[3:7] == ["79.17 ± 0.29", "3/5", "79.08 ± 0.24", "+0.09"]
    # Welch's t-test, 3 vs 5 seeds: t = 7.05 with 5.69 degrees of freedom, p = 0.00051.
    assert alr_s[7] == "+1.77 (p<0.001) *"
    assert alr_s[8:] == ["11,218,340 + 9,900", "11.22M + 10K"]
    assert _row(text, "CIFAR-100", "PreAct ResNet-18", "ALR")[3:8] == [
        "78.00",
        "1/5",
        "78.15 ± 0.27",
        "-0.15",
        "+0.60 (p n/a)",
    ]
    assert _row(text, "CIFAR-100", "PreAct ResNet-18", "SLR")[3:5] == ["failed (1)", "0/5"]
    assert _row(text, "CIFAR-10", "WRN-28-10", "ALR")[3:8] == ["not run", "0/5", "96.35 ± 0.11", "—", "n/a"]
    assert text.count("| not run |") == 12
    assert "shortened" not in text
    assert "from 10 run folders (9 finished); 9.00 h of training on NVIDIA H100" in text
    csv_text = (tmp_path / "out" / "table1.csv").read_text()
    assert csv_text.splitlines()[0].startswith("Dataset,Model,Method,Ours (%),Seeds,Paper (%)")
    assert len(csv_text.splitlines()) == 17


def test_table1_flags_shortened_runs(tmp_path: Path):
    _fake_run(tmp_path, "cifar10", "wrn28_10", "baseline", 0, 50.0, limit_train_batches=2)
    _fake_run(tmp_path, "cifar10", "wrn28_10", "baseline", 1, 50.0, epochs=30)
    text = table1(load_runs(tmp_path), tmp_path / "table1.md")
    assert "2 of 2 runs were shortened" in text and "not comparable to the paper" in text


@pytest.mark.slow
def test_smoke_grid_end_to_end(tmp_path: Path):
    """`make reproduce-table1 SMOKE=1` with one of the five seeds: every cell of the grid, then the table (the
    mean and spread over seeds: test_table1_cells_from_run_folders)."""
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "alr.data.samples", "--out", str(data), "cifar10", "cifar100"], check=True, cwd=ROOT
    )
    smoke = ["experiment=table1", "debug=smoke", f"dataset.data_dir={data}", "trainer.keep_checkpoint=false"]
    run_train(*smoke, "seed=0", out=tmp_path, multirun=True)
    runs = load_runs(tmp_path / "table1")
    assert len(runs) == 16 and all(r.status == "finished" for r in runs)
    assert not list((tmp_path / "table1").rglob("last.pt"))  # 2.8 GB of weights, kept otherwise
    assert {r.key for r in runs} == {(r["dataset"], r["model"], r["method"]) for r in load_paper("table1")}
    wrn = next(r for r in runs if r.key == ("cifar100", "wrn28_10", "alr"))
    assert wrn.result["params"] == {"backbone": 36_536_884, "method": 9_900}
    assert json.loads((wrn.path / "classes.json").read_text())[:1] == ["digit 0"]

    out = tmp_path / "results"
    report = [sys.executable, "-m", "alr.report"]
    subprocess.run([*report, "table1", "--runs", str(tmp_path / "table1"), "--out", str(out)], check=True, cwd=ROOT)
    text = (out / "table1.md").read_text()
    assert "not run" not in text and text.count("| 1/5 |") == 16
    assert "16 of 16 runs were shortened" in text
    png = out / "figure3.png"
    run = tmp_path / "table1" / "cifar10-preact_resnet18-alr-s0"
    subprocess.run([*report, "figure3", "--run", str(run), "--out", str(png)], check=True, cwd=ROOT)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure3_without_a_run_says_how_to_make_one(tmp_path: Path):
    cmd = [sys.executable, "-m", "alr.report", "figure3", "--run", str(tmp_path / "nope")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'nope'} is not a run folder" in proc.stderr and "make reproduce-table1" in proc.stderr


def test_shards_split_a_multirun_without_overlap(tmp_path: Path):
    done = []
    for shard in ("0/2", "1/2"):
        out = tmp_path / shard.replace("/", "of")
        run_train("debug=fast", "method=baseline,alr", "seed=0,1,2", f"shard={shard}", out=out, multirun=True)
        done.append({p.parent.name for p in out.rglob("result.json")})
    assert done[0].isdisjoint(done[1])
    assert len(done[0]) == len(done[1]) == 3
    assert done[0] | done[1] == {f"digits-digits_cnn-{m}-s{s}" for m in ("baseline", "alr") for s in range(3)}
    # Job 0 (baseline, seed 0) ran in shard 0/2; without shard=, or with another GPU count, it is found finished.
    for shard in ([], ["shard=0/1"]):
        again = run_train("debug=fast", "method=baseline", "seed=0", *shard, out=tmp_path / "0of2")
        assert "has finished already: skipping" in again.stdout


@pytest.mark.parametrize("value", ["2/2", "1", "a/b", "-1/3"])
def test_bad_shard_names_the_key(value: str):
    with pytest.raises(ConfigError) as err:
        validate(compose(f"shard={value}"))
    assert err.value.key == "shard" and "shard=0/4" in str(err.value)


def _make_dry_run(*args: str) -> str:
    proc = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_targets_run_the_grid_the_smoke_mode_and_one_shard_per_gpu():
    plain = _make_dry_run("reproduce-table1")
    assert "-m alr.train -m experiment=table1 paths.output_dir=runs" in plain
    assert "-m alr.report table1 --runs runs/table1 --out results" in plain
    smoke = _make_dry_run("reproduce-table1", "SMOKE=1")
    assert "-m alr.data.samples --out runs/smoke/data cifar10 cifar100" in smoke
    assert "debug=smoke dataset.data_dir=runs/smoke/data trainer.keep_checkpoint=false" in smoke
    assert "--runs runs/smoke/table1 --out runs/smoke/results" in smoke
    sharded = _make_dry_run("reproduce-table1", "GPUS=0,3")
    assert 'gpus="0 3"' in sharded and "CUDA_VISIBLE_DEVICES=$g" in sharded and "shard=$i/$n" in sharded
    figure = _make_dry_run("figure3", "FIG3_EPOCHS=1,300")
    assert "figure3 --run runs/table1/cifar10-preact_resnet18-alr-s0 --out results/figure3.png --epochs 1,300" in figure
