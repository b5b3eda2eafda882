"""The bench driver runs every bench in quick mode and writes a report with every section (not timings)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_driver_writes_every_section(tmp_path):
    out = tmp_path / "bench.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = out.read_text()
    sys.path.insert(0, str(ROOT / "bench"))
    from run_all import SECTIONS

    for title in SECTIONS:
        assert f"\n### {title}\n" in report
    for fact in ("| CPU |", "| torch |", "| device |", "--quick"):
        assert fact in report
    for figure in (
        "ALRLoss/CE",
        "trainer / bare loop",
        "alr_s / baseline",
        "by op accounting",
        "per-method cost against the baseline",
        "_ALRFunction",
        "gpu / torchvision",
        "GFLOPs per image",
        "dali-cpu / torchvision",
        "cached load",
        "samples/s",
        "(recipe)",
    ):
        assert figure in report
    assert "### Targets" in report
    # 3 of the loss; method and trainer, by step times and by ops; Fashion-MNIST's run time
    assert report.count("\ntarget ") == 8


def test_op_accounting_charges_each_extra_call_at_its_own_mean_and_the_missing_ones_against():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train import op_difference

    alr = {"loss [8, 10]": (1.0, 0.3), "copy_ .": (16.0, 0.08), "conv [8, 3]": (20.0, 400.0)}
    base = {"cross_entropy [8, 10]": (1.0, 0.1), "copy_ .": (2.0, 0.01), "conv [8, 3]": (20.0, 410.0)}
    diff = op_difference(alr, base)
    assert diff.keys() == {"loss [8, 10]", "copy_ .", "cross_entropy [8, 10]"}  # same calls: not a difference
    assert diff["loss [8, 10]"] == (1.0, 0.3) and diff["cross_entropy [8, 10]"] == (-1.0, -0.1)
    calls, ms = diff["copy_ ."]
    assert calls == 14.0 and abs(ms - 14 * 0.005) < 1e-12
