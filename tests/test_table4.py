"""Table 4: the grid and its order, DML's two update rules, exact resume, the table, the smoke grid end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from alr.data import Batch
from alr.distributed import World
from alr.methods.distill import DeepMutualLearning
from alr.preempt import Interrupted
from alr.reporting.grid import expected_grid
from alr.reporting.runs import load_runs
from alr.reporting.tables import load_paper, table4
from alr.trainer import Parts, fit
from conftest import ROOT, compose, run_train
from test_resume import _assert_same_state
from test_table1 import _row

FAST = ["debug=fast", "trainer.batch_size=32"]


def test_table4_experiment_is_the_dml_papers_recipe_and_grid():
    cfg = compose("experiment=table4", "method=dml")
    OmegaConf.resolve(cfg)
    assert (cfg.experiment_name, cfg.dataset.name, cfg.model_name) == ("table4", "cifar100", "resnet32")
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.optim.weight_decay) == (200, 64, 5e-4)
    opt = cfg.optim.optimizer
    assert (opt._target_, opt.lr, opt.momentum, opt.nesterov) == ("torch.optim.SGD", 0.1, 0.9, True)
    assert list(cfg.optim.scheduler.milestones) == [60, 120, 180] and cfg.optim.scheduler.gamma == 0.1
    assert cfg.method["update"] == "alternate"  # `method.update=simultaneous` on the command line
    with pytest.raises(ValueError, match="config key 'method.update': unknown 'together'"):
        DeepMutualLearning(nn.Linear(2, 2), update="together")
    grid = expected_grid("table4")
    resnet, wrn = ("cifar100", "resnet32"), ("cifar100", "wrn28_10")
    assert grid.cells == [(*wrn, "baseline"), (*wrn, "dml"), (*wrn, "alr_s")] + [
        (*resnet, m) for m in ("baseline", "kd", "dml", "alr_s")
    ]
    assert grid.seeds == [0, 1, 2, 3, 4]
    assert sorted(grid.cells) == sorted((r["dataset"], r["model"], r["method"]) for r in load_paper("table4"))
    # Each KD seed distils the WRN-28-10 baseline of its own seed, in the same experiment's folder.
    kd = compose("experiment=table4", "method=kd", "seed=3", "paths.output_dir=/runs")
    assert kd.method.teacher_run == "/runs/table4/cifar100-wrn28_10-baseline-s3"


def _tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _suite_steps(update: str, batches) -> tuple[nn.Module, nn.Module]:
    """DML as the trainer runs it: one optimizer with a group per network, and the trainer's ``update``."""
    model, method = _tiny(0), DeepMutualLearning(_tiny(1), update=update)
    optimizer = _sgd([{"params": list(model.parameters())}, {"params": list(method.parameters())}])
    parts = SimpleNamespace(
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        world=World(torch.device("cpu")),  # one process: nothing to average
        method_params=list(method.parameters()),
    )
    for x, y in batches:
        method.train_step(model, Batch(x, y), lambda loss: Parts.update(parts, loss), nullcontext)
    return model, method.peer


def test_dml_alternate_equals_two_optimizers_updating_in_turn():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(5)]
    # Zhang et al., Algorithm 1, by hand: each network its own optimizer; network 2 learns from network 1's
    # predictions after network 1's step.
    net1, net2 = _tiny(0), _tiny(1)
    opt1, opt2 = _sgd(net1.parameters()), _sgd(net2.parameters())

    def kl(p_log_target, log_p):
        return (p_log_target.exp() * (p_log_target - log_p)).sum(1).mean()

    for x, y in batches:
        z1, z2 = net1(x), net2(x)
        loss1 = F.cross_entropy(z1, y) + kl(F.log_softmax(z2, 1).detach(), F.log_softmax(z1, 1))
        opt1.zero_grad()
        loss1.backward()
        opt1.step()
        with torch.no_grad():
            z1 = net1(x)
        loss2 = F.cross_entropy(z2, y) + kl(F.log_softmax(z1, 1), F.log_softmax(z2, 1))
        opt2.zero_grad()
        loss2.backward()
        opt2.step()

    model, peer = _suite_steps("alternate", batches)
    for ours, ref in ((model, net1), (peer, net2)):
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    # The cheaper rule trains network 2 against network 1's predictions from before its step: not the same.
    _, peer_simultaneous = _suite_steps("simultaneous", batches)
    assert not torch.allclose(next(peer_simultaneous.parameters()), next(net2.parameters()), atol=1e-4)


def test_dml_stopped_mid_epoch_resumes_bit_exact_with_both_networks_state(tmp_path, monkeypatch):
    straight = fit(compose("method=dml", *FAST), tmp_path / "straight")
    assert set(straight["final_test_acc_by_network"]) == {"net1", "net2"}
    nets = straight["final_test_acc_by_network"]
    assert straight["final_test_acc"] == pytest.approx((nets["net1"] + nets["net2"]) / 2)
    last = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test/acc"] == straight["final_test_acc"] and last["test/net2/acc"] == nets["net2"]
    eces = straight["final_test_ece_by_network"]  # calibration per network, and their mean as the run's
    assert straight["final_test_ece"] == pytest.approx((eces["net1"] + eces["net2"]) / 2)
    assert sorted(p.name for p in (tmp_path / "straight").glob("test_confusion*")) == [
        "test_confusion_net1.npy",
        "test_confusion_net2.npy",
    ]

    real_step, calls = DeepMutualLearning.train_step, []

    def step_then_stop(self, *args):
        out = real_step(self, *args)
        calls.append(1)
        if len(calls) == 5:  # step 2 of epoch 2 (3 steps an epoch): a SIGTERM between two steps
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(DeepMutualLearning, "train_step", step_then_stop)
    run_dir = tmp_path / "stopped"
    with pytest.raises(Interrupted, match="after step 2 of epoch 2"):
        fit(compose("method=dml", *FAST), run_dir)
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    # Every parameter of both networks has its own momentum buffer in the one optimizer's state.
    n_params = len(list(instantiate(compose("method=dml").model).parameters()))
    assert len(ckpt["optimizer"]["state"]) == 2 * n_params
    monkeypatch.setattr(DeepMutualLearning, "train_step", real_step)
    assert fit(compose("method=dml", *FAST), run_dir)["status"] == "finished"

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(run_dir / "last.pt", weights_only=True)
    for key in ("model", "method", "optimizer", "scheduler", "epoch", "step", "best"):
        _assert_same_state(a[key], b[key], key)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["final_test_acc_by_network"] == nets and result["final_test_acc"] == straight["final_test_acc"]
    torch.use_deterministic_algorithms(False)  # debug=fast turns it on for the whole process


def test_kd_before_its_teacher_is_refused_and_the_sweep_goes_on(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    (teacher / "result.json").write_text(json.dumps({"status": "running"}))
    # slr stands for a cell the sweep's product holds but the table does not (Table 4: KD of WRN-28-10).
    overrides = ["method=kd,dml,slr", f"++method.teacher_run={teacher}", "+grid_exclude=[{method: slr}]", *FAST]
    proc = run_train(*overrides, "trainer.epochs=1", out=tmp_path, multirun=True, check=False)
    assert proc.returncode == 1 and "error: 1 run(s) of this sweep were refused, the others went on:" in proc.stderr
    assert f"error: config key 'method.teacher_run': the teacher run {teacher} has not finished " in proc.stderr
    assert "(status 'running' in result.json)" in proc.stderr and "Traceback" not in proc.stderr
    runs = {r.key[2]: r.status for r in load_runs(tmp_path / "default")}
    assert runs == {"dml": "finished"}  # KD refused without a file written; slr not in the grid


def _fake_run(root: Path, model: str, method: str, seed: int, acc: float, nets=None, teacher=None) -> None:
    path = root / f"cifar100-{model}-{method}-s{seed}"
    path.mkdir(parents=True)
    backbone = {"resnet32": 470_004, "wrn28_10": 36_536_884}[model]
    extra = {"dml": backbone, "alr_s": 9_900}.get(method, 0)
    config = {
        "dataset": {"name": "cifar100"},
        "model_name": model,
        "method": {"name": method, **({"teacher_run": str(teacher)} if teacher else {})},
        "seed": seed,
        "trainer": {"epochs": 200, "limit_train_batches": None},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    result = {"status": "finished", "final_test_acc": acc, "params": {"backbone": backbone, "method": extra}}
    if nets:
        result["final_test_acc_by_network"] = dict(zip(("net1", "net2"), nets))
    (path / "result.json").write_text(json.dumps(result))


def test_table4_rows_from_run_folders(tmp_path: Path):
    teachers = tmp_path / "teachers"  # KD's teacher folders, elsewhere than the table's runs
    for seed in range(3):
        _fake_run(teachers, "wrn28_10", "baseline", seed, 79.0)
    runs = tmp_path / "table4"
    for seed, acc in enumerate([71.0, 71.4, 70.6]):
        _fake_run(runs, "resnet32", "baseline", seed, acc)
        _fake_run(runs, "resnet32", "alr_s", seed, acc + 1.0)
        teacher = teachers / f"cifar100-wrn28_10-baseline-s{seed}"
        _fake_run(runs, "resnet32", "kd", seed, acc + 0.5, teacher=teacher)
    for seed, (n1, n2) in enumerate([(72.0, 73.0), (72.5, 73.5)]):
        _fake_run(runs, "resnet32", "dml", seed, (n1 + n2) / 2, nets=(n1, n2))
    text = table4(load_runs(runs), tmp_path / "out" / "table4.md", command="python -m alr.report table4")

    base = _row(text, "ResNet-32", "Baseline")
    assert base[2:] == ["71.00 ± 0.40", "3/5", "68.99*", "+2.01", "+1.00 (p=0.038) *", "470,004", "×1.00", "1×"]
    kd = _row(text, "ResNet-32", "KD")
    assert kd[2:6] == ["71.50 ± 0.40", "3/5", "69.48*", "+2.02"]
    assert kd[7:] == ["470,004 + teacher 36,536,884 (frozen)", "×78.74 (with the frozen teacher)", "~ 3×"]
    dml = _row(text, "ResNet-32", "DML (mean of 2 networks)")
    assert dml[2:6] == ["72.75 ± 0.35", "2/5", "70.93*", "+1.82"] and dml[8:] == ["×2.00", "~ 2×"]
    assert dml[6].startswith("-0.75 (p=")
    assert _row(text, "ResNet-32", "DML, network 1")[2:4] == ["72.25 ± 0.35", "2/5"]
    assert _row(text, "ResNet-32", "DML, network 2")[2:4] == ["73.25 ± 0.35", "2/5"]
    assert _row(text, "ResNet-32", "ALR-S")[2:] == [
        "72.00 ± 0.40",
        "3/5",
        "70.97 ± 0.37",
        "+1.03",
        "",
        "470,004 + 9,900",
        "×1.02",
        "~ 1×",
    ]
    assert _row(text, "WRN-28-10", "DML (mean of 2 networks)")[2:7] == ["not run", "0/5", "80.18*", "—", "n/a"]
    assert "mean of the two networks' accuracies (the DML paper's convention)" in text
    assert "about 71 %" in text and "shortened" not in text
    csv_lines = (tmp_path / "out" / "table4.csv").read_text().splitlines()
    assert csv_lines[0].startswith("Model,Method,Ours (%),Seeds,Paper (%)") and len(csv_lines) == 12

    # The teacher folders moved away: the teacher's count is found among the runs by its folder's name.
    moved = tmp_path / "moved"
    teachers.rename(moved)
    text = table4(load_runs(tmp_path), tmp_path / "out" / "table4.md")
    assert _row(text, "ResNet-32", "KD")[8] == "×78.74 (with the frozen teacher)"


@pytest.mark.slow
def test_smoke_grid_end_to_end(tmp_path: Path):
    """The grid of `make reproduce-table4 SMOKE=1` for one of the five seeds and one step a run, in one sweep
    (whose order trains the WRN-28-10 teacher before the KD student that picks it up), then the table."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "alr.data.samples", "--out", str(data), "cifar100"], check=True, cwd=ROOT)
    smoke = ["experiment=table4", "debug=smoke", "trainer.limit_train_batches=1", f"dataset.data_dir={data}", "seed=0"]
    run_train(*smoke, out=tmp_path, multirun=True)
    runs = load_runs(tmp_path / "table4")
    assert len(runs) == 7 and all(r.status == "finished" for r in runs)
    assert sorted(r.key for r in runs) == sorted(expected_grid("table4").cells)
    kd = next(r for r in runs if r.key[2] == "kd")
    assert kd.config["method"]["teacher_run"] == str(tmp_path / "table4" / "cifar100-wrn28_10-baseline-s0")
    dml = next(r for r in runs if r.key == ("cifar100", "wrn28_10", "dml"))
    assert dml.result["params"] == {"backbone": 36_536_884, "method": 36_536_884}
    assert set(dml.result["final_test_acc_by_network"]) == {"net1", "net2"}

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "alr.report", "table4", "--runs", str(tmp_path / "table4"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # this checkout's package, not the venv's
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env=env)
    text = (out / "table4.md").read_text()
    assert "not run" not in text and text.count("| 1/5 |") == 11 and "7 of 7 runs were shortened" in text
    assert "×78.74 (with the frozen teacher)" in text and text.count("| ×2.00 |") == 2


def test_make_reproduce_table4_trains_the_teachers_first():
    def dry(*args: str) -> list[str]:
        proc = subprocess.run(["make", "-n", "reproduce-table4", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return [" ".join(line.split()) for line in proc.stdout.splitlines() if "alr." in line]

    plain = dry()
    assert "-m alr.train -m experiment=table4 paths.output_dir=runs model=wrn28_10 method=baseline" in plain[0]
    assert plain[1].rstrip().endswith("-m alr.train -m experiment=table4 paths.output_dir=runs")
    assert "-m alr.report table4 --runs runs/table4 --out results" in plain[2]
    smoke = dry("SMOKE=1")
    assert "-m alr.data.samples --out runs/smoke/data cifar100" in smoke[0]
    smoke_args = "debug=smoke dataset.data_dir=runs/smoke/data trainer.keep_checkpoint=false"
    assert f"{smoke_args} model=wrn28_10 method=baseline trainer.keep_checkpoint=true" in smoke[1]  # teachers keep it
    assert smoke[2].rstrip().endswith(smoke_args)
    sharded = dry("GPUS=0,1")
    assert "model=wrn28_10 method=baseline trainer.keep_checkpoint=true shard=$i/$n" in sharded[0]
    assert "shard=$i/$n" in sharded[1]
    assert "log=runs/table4-teachers-shard$i.log" in sharded[0] and "log=runs/table4-shard$i.log" in sharded[1]
    assert "wait $p" in sharded[0]  # every shard of the teachers ends before the grid's sweep starts


def test_only_dml_trains_a_network_of_its_own():
    """What the trainer refuses under several processes (DDP keeps only the backbone equal on every rank)."""
    from alr.methods import CrossEntropy, Supervised

    for update in DeepMutualLearning.UPDATES:
        assert list(DeepMutualLearning(nn.Linear(2, 2), update=update).networks()) == ["net2"]
    assert Supervised(CrossEntropy()).networks() == {}


@pytest.mark.parametrize("update", DeepMutualLearning.UPDATES)
def test_dml_is_refused_under_several_processes_whichever_its_update(tmp_path: Path, update: str):
    """Simultaneous DML too: its peer would be outside DDP, with batch-norm statistics of its own on each rank."""
    from alr.errors import RunError
    from test_imagenet import write_tree

    write_tree(tmp_path / "imagenet", train_per_class=2, val_per_class=1)
    cfg = compose(
        "dataset=imagenet",
        "dataset.num_classes=3",
        "dataset.image_size=32",
        "dataset.resize_size=36",
        "dataset.loader=torchvision",
        "dataset.num_workers=0",
        f"dataset.data_dir={tmp_path}",
        "model=digits_cnn",
        "+model.in_channels=3",
        "method=dml",
        f"method.update={update}",
        "debug=fast",
        "trainer.batch_size=4",
    )
    with pytest.raises(RunError, match=r"trains a network of its own beside the backbone \(net2\)"):
        Parts(cfg, World(torch.device("cpu"), rank=0, size=2))  # refused before any process group is needed
