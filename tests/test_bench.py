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
        "gpu / torchvision",
        "GFLOPs per image",
        "dali-cpu / torchvision",
        "cached load",
        "samples/s",
    ):
        assert figure in report
    assert "### Targets" in report
    assert report.count("\ntarget ") == 5  # items 1 (three targets), 2 and 3 each say whether they hold
