"""`make gpu-check` on the CPU: clear exits, the verdict, the time budget, predictions, the report, one measurement;
compiled training on CUDA."""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from alr import gpu_check
from alr.checkpoint import load_checkpoint
from alr.data import samples
from alr.gpu_check import (
    BACKBONES,
    NAMED_CHECKS,
    PROMISE_MINUTES,
    STEP_BUDGET_S,
    Backbone,
    Cell,
    end_to_end,
    exit_status,
    gpu_tests,
    plan,
    slug,
    throughput,
    throughput_seconds,
    write_report,
)
from alr.models import PreActResNet18
from alr.reporting.gpu import Cost, RunRecipe, predict, render, table_recipes
from conftest import ROOT, run_train

SCRIPT = [sys.executable, str(ROOT / "scripts" / "gpu_check.py")]


def _script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([*SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


def test_without_cuda_the_check_exits_with_one_line():
    proc = _script({"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no CUDA device is visible (torch ")
    assert "make gpu-check" in proc.stderr


def test_a_missing_package_is_named_with_how_to_install_it(tmp_path: Path):
    shadow = tmp_path / "shadow" / "hydra"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'hydra'\", name='hydra')\n")
    proc = _script({"PYTHONPATH": str(tmp_path / "shadow")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "the GPU check needs hydra-core>=1.3,<1.4 (import hydra: ModuleNotFoundError" in proc.stderr
    assert "python -m pip install 'hydra-core>=1.3,<1.4'" in proc.stderr and "make gpu-wheels" in proc.stderr
    assert "omegaconf" not in proc.stderr.split("Install with")[0]  # only what is missing


def _cell(model: str, method: str, precision: str, ips: float, eval_ips: float, cl=True, comp=False, **kw) -> dict:
    return {
        "model": model,
        "image_size": 32,
        "num_classes": 100,
        "batch_size": 128,
        "method": method,
        "precision": precision,
        "channels_last": cl,
        "compile": comp,
        "status": "ok",
        "train_images_per_s": ips,
        "range": [0.99 * ips, 1.01 * ips],
        "eval_images_per_s": eval_ips,
        **kw,
    }


THROUGHPUT = [
    _cell("preact_resnet18", "baseline", "fp32", 10_000, 50_000),
    _cell("preact_resnet18", "alr_s", "fp32", 9_900, 50_000),
    _cell("preact_resnet18", "baseline", "bf16", 20_000, 100_000),
    _cell("preact_resnet18", "alr_s", "bf16", 19_800, 100_000),
    _cell("wrn28_10", "baseline", "fp32", 2_000, 10_000),
    _cell("wrn28_10", "alr_s", "fp32", 1_990, 10_000),
    {**_cell("wrn28_10", "baseline", "bf16", 0, 0), "status": "skipped (time budget)"},
]


def test_predicted_gpu_hours_of_table1_from_its_configs_and_given_throughputs():
    recipes = table_recipes("table1")
    assert len(recipes) == 16 and {r.seeds for r in recipes} == {5}
    r = recipes[0]
    assert (r.epochs, r.batch_size, r.num_train, r.num_test, r.precision, r.compile) == (
        300,
        128,
        50000,
        10000,
        "fp32",
        False,
    )
    p = predict(recipes, THROUGHPUT)["table1"]
    assert p["runs"] == 80
    # Per run: 300 epochs × (50,000 ÷ train images/s + 10,000 ÷ eval images/s); 5 seeds; 2 data sets.
    preact = 300 * (50_000 / 10_000 + 10_000 / 50_000) * 2 + 300 * (50_000 / 9_900 + 10_000 / 50_000) * 2
    wrn = 300 * (50_000 / 2_000 + 10_000 / 10_000) * 2 + 300 * (50_000 / 1_990 + 10_000 / 10_000) * 2
    assert p["configured"]["hours"] == pytest.approx(2 * 5 * (preact + wrn) / 3600)
    assert p["configured"]["missing"] == []
    # Fastest: bf16 for preact_resnet18 (the skipped wrn28_10 bf16 cell does not count).
    preact_bf16 = 300 * (50_000 / 20_000 + 0.1) * 2 + 300 * (50_000 / 19_800 + 0.1) * 2
    assert p["fastest"]["hours"] == pytest.approx(2 * 5 * (preact_bf16 + wrn) / 3600)


def test_cells_not_measured_are_left_out_and_named():
    common = dict(seeds=1, epochs=10, batch_size=64, num_train=1000, num_test=100, channels_last=True, compile=False)
    baseline = Cost("baseline")
    recipes = [
        RunRecipe("t", "cifar100", "preact_resnet18", "dml", precision="fp32", cost=Cost("baseline", 2), **common),
        RunRecipe(
            "t",
            "cifar100",
            "preact_resnet18",
            "kd",
            precision="fp32",
            cost=Cost("baseline", 1, ("wrn28_10",)),
            **common,
        ),
        RunRecipe(
            "t",
            "cifar100",
            "preact_resnet18",
            "kd",
            precision="fp32",
            cost=Cost("baseline", 1, ("resnet50",)),
            **common,
        ),
        RunRecipe("t", "cifar100", "resnet32", "baseline", precision="fp32", cost=baseline, **common),
        RunRecipe("t", "cifar100", "preact_resnet18", "slr", precision="fp16", cost=baseline, **common),
        RunRecipe(
            "t", "text", "preact_resnet18", "baseline", **{**common, "num_train": None}, precision="fp32", cost=baseline
        ),
    ]
    p = predict(recipes, THROUGHPUT)["t"]
    dml = 10 * (2 * 1000 / 10_000 + 100 / 50_000)  # two networks' steps
    kd = 10 * (1000 / 10_000 + 1000 / 10_000 + 100 / 50_000)  # the student's step and the teacher's forward pass
    assert p["configured"]["hours"] == pytest.approx((dml + kd) / 3600)
    assert p["configured"]["missing"] == [
        "resnet50 (forward pass of kd) not measured at fp32, channels_last, eager",
        "resnet32 / baseline not measured at fp32, channels_last, eager",
        "preact_resnet18 / baseline not measured at fp16, channels_last, eager",
        "dataset text has no num_train/num_test in its config",
    ]


def test_every_method_is_priced_from_its_configs_cost_kd_with_its_teachers_forward_pass():
    recipes = table_recipes("table4")
    cost = {r.method: r.cost for r in recipes}
    assert cost == {
        "baseline": Cost("baseline"),
        "kd": Cost("baseline", 1, ("wrn28_10",)),  # configs/method/kd.yaml: the teacher's forward pass
        "dml": Cost("baseline", 2),
        "alr_s": Cost("alr_s"),
    }
    rates = {"resnet32": (8_000, 40_000), "wrn28_10": (2_000, 10_000)}  # train, eval images/s
    throughput = [_cell(m, k, "fp32", *rates[m]) for m in rates for k in ("baseline", "alr_s")]
    p = predict(recipes, throughput)["table4"]
    assert p["runs"] == 35 and p["configured"]["missing"] == []

    def run(model: str, steps: float = 1, teacher: str | None = None) -> float:
        train, evaluate = rates[model]
        forward = 50_000 / rates[teacher][1] if teacher else 0.0
        return 200 * (steps * 50_000 / train + forward + 10_000 / evaluate)

    runs = [run("wrn28_10"), run("wrn28_10", 2), run("wrn28_10")]
    runs += [run("resnet32"), run("resnet32", teacher="wrn28_10"), run("resnet32", 2), run("resnet32")]
    assert p["configured"]["hours"] == pytest.approx(5 * sum(runs) / 3600)


def _report() -> dict:
    common = dict(epochs=300, batch_size=128, num_train=50000, num_test=10000, precision="fp32", compile=False)
    like = {"baseline": "baseline", "slr": "baseline", "alr": "alr_s", "alr_s": "alr_s"}
    recipes = [
        RunRecipe("table1", d, m, k, seeds=5, channels_last=True, cost=Cost(like[k]), **common)
        for d in ("cifar10", "cifar100")
        for m in ("preact_resnet18", "wrn28_10")
        for k in like
    ]
    kd = Cost("baseline", 1, ("wrn28_10",))
    recipes.append(RunRecipe("table1", "cifar100", "resnet32", "kd", seeds=5, channels_last=True, cost=kd, **common))
    return {
        "command": "python -m alr.gpu_check",
        "date": "2026-11-25 22:00 UTC",
        "elapsed_s": 431.0,
        "machine": {
            "gpu": "NVIDIA H100 80GB HBM3",
            "memory_gib": 79.2,
            "capability": "9.0",
            "sms": 132,
            "driver": "580.159.04",
            "cuda": "13.0",
            "cudnn": 91300,
            "torch": "2.11.0+cu130",
            "python": "3.12.3",
            "version": "0.1.0",
            "commit": "abc1234",
            "peak_tflops": 989.0,
            "bf16": True,
            "fp32_matmul": "IEEE fp32",
            "fp32_conv": "TF32",
        },
        "optional": {"W&B (logger=wandb)": "skipped: ModuleNotFoundError: No module named 'wandb'"},
        "tests": {"summary": "passed: 3 passed, 0 failed, 0 skipped in 41 s", "failures": []},
        "end_to_end": [
            {"precision": "fp32", "status": "ok", "final_loss": 1.2345, "test_acc": 71.5, "seconds": 12.0},
            {"precision": "fp16", "status": "failed: non-finite loss at epoch 2"},
        ],
        "throughput": copy.deepcopy(THROUGHPUT),
        "flops_per_image": {"preact_resnet18": 3.33e9},
        "recipes": [asdict(r) for r in recipes],
        "recipe_objects": recipes,
        "skipped_experiments": ["demo (trains on the CPU: trainer.device=cpu)"],
    }


def test_the_report_is_generated_from_the_measurements(tmp_path: Path):
    md = write_report(_report(), tmp_path)
    assert md.name == "nvidia-h100-80gb-hbm3.md" and slug("Tesla V100-SXM2-16GB") == "tesla-v100-sxm2-16gb"
    data = json.loads(md.with_suffix(".json").read_text())
    assert "recipe_objects" not in data and data["predictions"]["table1"]["runs"] == 85
    text = md.read_text()
    assert text == render(data)
    assert "| driver / CUDA / cuDNN | 580.159.04 / 13.0 / 91300 |" in text
    assert "| W&B (logger=wandb) | skipped: ModuleNotFoundError: No module named 'wandb' |" in text
    assert "| fp16 | failed: non-finite loss at epoch 2 | — | — | — |" in text
    # preact bf16: 20,000 images/s, ALR-S 1 % slower per image, 3.33 GFLOP × 20,000/s ÷ 989 TFLOP/s = 6.7 %.
    assert (
        "| preact_resnet18 | 32² K=100 | 128 | bf16 | channels_last | eager | 20,000 | 19,800–20,200 | 19,800 " in text
    )
    assert "| +1.0 % | 100,000 | 6.7 % |" in text
    assert "| wrn28_10 | 32² K=100 | 128 | bf16 | channels_last | eager | skipped (time budget) |" in text
    assert "- preact_resnet18: bf16, channels_last, eager (20,000 images/s)" in text
    hours = data["predictions"]["table1"]["configured"]["hours"]
    assert f"| table1 | 85 | {hours:,.1f} h (+ 1 cell not measured) |" in text
    assert "- table1, as configured: resnet32 / baseline not measured at fp32, channels_last, eager (1 cell)" in text
    assert "Not predicted: demo (trains on the CPU: trainer.device=cpu)." in text


# Stand-ins for the named GPU tests, run by the check's own step 2 (a real pytest and its JUnit file):
# one passes, one fails in one of its two parametrisations, one skips.
FAKE_GPU_TESTS = """
import pytest

pytestmark = pytest.mark.gpu


def test_resume_on_cuda_is_bit_identical():
    pass


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_alr_step_without_host_sync_under_ddp(precision):
    assert precision == "fp32", "RuntimeError: called a synchronizing CUDA operation"


def test_trainer_step_without_host_sync_under_ddp():
    pytest.skip("this torch is built without NCCL")
"""


def test_the_gpu_tests_step_gives_each_named_check_a_line(tmp_path: Path):
    (tmp_path / "test_fake_gpu.py").write_text(FAKE_GPU_TESTS)
    tests = gpu_tests(120, [tmp_path / "test_fake_gpu.py"])
    assert tests["summary"].startswith("FAILED: 2 passed, 1 failed, 1 skipped in ")
    results = {c["check"]: c["result"] for c in tests["checks"]}
    assert results == {
        "CUDA resume bit-identical": "passed",
        "ALR step without host sync under DDP": "FAILED: AssertionError: RuntimeError: called a synchronizing "
        "CUDA operation",
        "Trainer step (ALR) without host sync under DDP": "skipped: this torch is built without NCCL",
    }
    text = write_report({**_report(), "tests": tests}, tmp_path / "report").read_text()
    assert "| CUDA resume bit-identical | `test_resume_on_cuda_is_bit_identical` | passed |" in text
    row = "| Trainer step (ALR) without host sync under DDP | `test_trainer_step_without_host_sync_under_ddp` | "
    assert row + "skipped: this torch is built without NCCL |" in text

    (tmp_path / "test_fake_gpu.py").write_text(FAKE_GPU_TESTS.replace("test_resume_on_cuda", "test_resume_on_gpu"))
    tests = gpu_tests(120, [tmp_path / "test_fake_gpu.py"])  # a renamed test is a failure, not a silent gap
    assert tests["checks"][0]["result"] == "FAILED: pytest -m gpu did not report test_resume_on_cuda_is_bit_identical"


# The named checks, all passing: the stand-in for a healthy GPU node's own gpu tests.
PASSING_GPU_TESTS = "import pytest\n\npytestmark = pytest.mark.gpu\n" + "".join(
    f"\n\ndef {test}():\n    pass\n" for test in NAMED_CHECKS
)


def _site(tmp_path: Path, *lines: str) -> Path:
    """A folder whose ``sitecustomize.py`` runs ``lines`` at the start of every Python given it on PYTHONPATH."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text("\n".join(["import sys", *lines, ""]))
    return folder


def test_without_pytest_the_gpu_tests_fail_the_check_and_the_launcher_names_pytest(tmp_path: Path):
    """No pytest: none of the named checks can run, so the check fails (it used to pass with 'skipped')."""
    site = _site(tmp_path, 'sys.modules["pytest"] = None  # as on a node where pytest is not installed')
    (tmp_path / "test_fake_gpu.py").write_text(PASSING_GPU_TESTS)
    code = "import json, sys; from pathlib import Path; from alr.gpu_check import gpu_tests; "
    code += "print(json.dumps(gpu_tests(60, [Path(sys.argv[1])])))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")])}
    cmd = [sys.executable, "-c", code, str(tmp_path / "test_fake_gpu.py")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tests = json.loads(proc.stdout.splitlines()[-1])
    assert tests["summary"].startswith("FAILED: pytest is not installed (python -m pip install 'pytest>=8'")
    assert [c["result"][: len("FAILED: not run: pytest")] for c in tests["checks"]] == ["FAILED: not run: pytest"] * 3
    assert exit_status({"tests": tests, "end_to_end": []}) == 1
    assert exit_status({"tests": gpu_tests(60, []), "end_to_end": []}) == 1  # no gpu test file to run: the same

    proc = _script({"PYTHONPATH": str(site)})  # make gpu-check stops before the check, naming pytest
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "the GPU check needs pytest>=8 (import pytest: ModuleNotFoundError" in proc.stderr
    assert "python -m pip install 'pytest>=8'" in proc.stderr and "antlr4-python3-runtime pytest`" in proc.stderr


def test_a_node_without_dali_passes_and_the_report_says_dali_was_not_tested(tmp_path: Path, monkeypatch):
    """Step 2 on a healthy GPU node without DALI (optional), stood in for on the CPU: the suite's DALI test
    skips with its reason, which the report gives, and the check passes (it used to fail)."""
    no_dali = 'sys.modules["nvidia.dali"] = None  # as on a node where DALI is not installed'
    # conftest then keeps the gpu tests, as on a GPU node: the DALI test must skip before it touches CUDA.
    seen_gpu = "import torch; torch.cuda.is_available = lambda: True"
    monkeypatch.setenv("PYTHONPATH", str(_site(tmp_path, no_dali, seen_gpu)))  # pytest's, through the check's env
    (tmp_path / "test_fake_gpu.py").write_text(PASSING_GPU_TESTS)
    tests = gpu_tests(180, [tmp_path / "test_fake_gpu.py", ROOT / "tests" / "test_imagenet.py"])
    reason = "NVIDIA DALI is not installed (optional: pip install -e '.[dali]'): its GPU decoding is not tested"
    assert tests["summary"].startswith("passed: 3 passed, 0 failed, 1 skipped in "), tests["summary"]
    dali = "test_dali_mixed_decoding_on_the_gpu_matches_the_cpu_pipeline"
    assert tests["summary"].endswith(f" s (skipped: `{dali}`: {reason})")
    assert [why for _, why in tests["skips"]] == [reason] and tests["failures"] == []
    assert {c["result"] for c in tests["checks"]} == {"passed"}
    assert exit_status({"tests": tests, "end_to_end": [{"precision": "fp32", "status": "ok"}]}) == 0
    assert reason in write_report({**_report(), "tests": tests}, tmp_path / "report").read_text()


def test_the_step_budgets_add_up_to_the_promise_the_docs_and_make_help_state():
    assert sum(STEP_BUDGET_S.values()) == 60 * PROMISE_MINUTES
    docs = (ROOT / "docs" / "gpu-check.md").read_text()
    make_help = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("gpu-check:"))
    for where, text in {"docs/gpu-check.md": docs, "make help": make_help, "alr.gpu_check": gpu_check.__doc__}.items():
        claims = re.findall(r"\b(?:in|within|under|about) (\d+) min", text)
        assert claims and set(claims) == {str(PROMISE_MINUTES)}, f"{where} promises {claims} minutes"
    for step, seconds in STEP_BUDGET_S.items():  # the docs' table of the budget
        assert re.search(rf"^\| \d?\.? ?[^|]*\(`{step}`\) \| {seconds} s \|", docs, re.M), step
    assert f"| total | {60 * PROMISE_MINUTES} s |" in docs and f"default {60 * PROMISE_MINUTES})" in docs


def test_the_end_to_end_step_ends_at_its_budget(tmp_path: Path):
    """Step 3's budget holds for the step as a whole (the sample files and every run), not per run."""
    start = time.perf_counter()
    runs = end_to_end(tmp_path, ["fp32", "bf16", "fp16"], 3, 1)
    assert time.perf_counter() - start < 1 + 10  # the sample files alone take more (11 s on a 2-core CPU)
    assert len(runs) == 3 and all("step 3's 1 s budget" in r["status"] for r in runs), runs


def test_each_named_check_is_a_gpu_test_of_the_suite():
    defined = {}  # test function -> the source of its module
    for path in (ROOT / "tests").glob("test_*.py"):
        text = path.read_text()
        defined |= {node.name: text for node in ast.parse(text).body if isinstance(node, ast.FunctionDef)}
    for test in NAMED_CHECKS:
        assert "pytestmark = pytest.mark.gpu" in defined.get(test, ""), f"{test} is not a gpu test under tests/"


def test_the_throughput_gets_what_the_steps_before_it_left_of_the_budget(tmp_path: Path):
    assert throughput_seconds(450, 160) == 450 - 160 - STEP_BUDGET_S["report"]  # slower tests: fewer cells
    assert throughput_seconds(450, 440) == 0  # nothing left: every cell is listed as skipped
    report = {**_report(), "settings": {"budget_s": 450.0}}
    report["steps_s"] = {"machine": 14.2, "tests": 121.0, "end_to_end": 47.6, "throughput": 254.9}
    assert (
        "Time of the 450 s budget: machine 14 s, GPU tests 121 s, end to end 48 s, throughput 255 s "
        "(the throughput gets what is left)." in write_report(report, tmp_path).read_text()
    )


def test_the_plan_measures_each_setting_on_every_backbone_eager_first_then_compiled_bf16():
    cells = plan(list(BACKBONES), ["fp32", "bf16", "fp16"])
    assert len(cells) == len({(c.backbone, c.method, c.precision, c.channels_last, c.compile) for c in cells}) == 96
    first = [(c.backbone.model, c.method, c.precision, c.channels_last, c.compile) for c in cells[:8]]
    assert first == [(b.model, m, "fp32", True, False) for b in BACKBONES for m in ("baseline", "alr_s")]
    assert not any(c.compile for c in cells[:48])
    assert all(c.compile and c.precision == "bf16" and c.channels_last for c in cells[48:56])


def test_throughput_is_measured_through_the_trainer(tmp_path: Path):
    """The GPU path's measurement, run on the CPU: a warm-up epoch, then images/s from metrics.jsonl."""
    tiny = Backbone("resnet32", image_size=8, num_classes=10, batch_size=4, eval_batch_size=8)
    cells = [Cell(tiny, m, "fp32", False, False) for m in ("baseline", "alr_s")]
    seen = []
    out = throughput(cells, tmp_path, 1, 0.01, time.perf_counter() + 300, seen.append, device="cpu")
    assert [c["status"] for c in out] == ["ok", "ok"] and len(seen) == 2
    for c in out:
        assert c["train_images_per_s"] > 0 and c["eval_images_per_s"] > 0 and c["range"][0] <= c["range"][1]
    assert out[1]["steps_per_epoch"] == 10  # set by the first cell: at least 10 steps
    skipped = throughput(cells[:1], tmp_path, 1, 0.01, time.perf_counter(), seen.append, device="cpu")
    assert skipped[0]["status"] == "skipped (time budget)"


def test_make_targets():
    check = subprocess.run(["make", "-n", "gpu-check", "ARGS=--budget 600"], cwd=ROOT, capture_output=True, text=True)
    assert "scripts/gpu_check.py --budget 600" in check.stdout
    wheels = subprocess.run(["make", "-n", "gpu-wheels"], cwd=ROOT, capture_output=True, text=True)
    assert "pip wheel --no-deps --wheel-dir .whl 'hydra-core>=1.3,<1.4'" in wheels.stdout
    # --no-deps: pytest's own requirements must be named one by one (a node may run Python 3.10: all of them).
    named = {re.split(r"[<>=!~ ;\[]", spec)[0].lower() for spec in re.findall(r"'([^']+)'", wheels.stdout)}
    needed = {"pytest"} | {
        re.split(r"[<>=!~ ;\[]", req)[0].lower()
        for req in importlib.metadata.requires("pytest")
        if "extra ==" not in req and "sys_platform" not in req
    }
    assert needed <= named, f"gpu-wheels lacks {sorted(needed - named)}"


@pytest.mark.gpu
def test_compiled_training_on_cuda(tmp_path: Path):
    """trainer.compile=true: the compiled backbone trains, evaluation runs it eagerly, last.pt loads as usual."""
    data = tmp_path / "data"
    samples.write_cifar(data, "cifar10", n_train=256, n_test=64)
    run_train(
        "experiment=table1",
        "method=alr_s",
        "trainer.device=cuda",
        "trainer.precision=bf16",
        "trainer.compile=true",
        "trainer.epochs=2",
        "trainer.batch_size=64",
        "trainer.progress=false",
        f"dataset.data_dir={data}",
        out=tmp_path,
    )
    run = tmp_path / "table1" / "cifar10-preact_resnet18-alr_s-s0"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["device"] != "cpu"
    # last.pt holds the plain module's keys (no _orig_mod. prefix): an eager backbone loads it.
    PreActResNet18(num_classes=10).load_state_dict(load_checkpoint(run / "last.pt")["model"])
