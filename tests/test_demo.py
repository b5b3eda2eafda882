"""The main job (`make demo`) end to end, shortened: a Hydra multirun of 4 methods × 3 seeds, then the report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, run_train


@pytest.mark.slow
def test_demo_multirun_and_report(tmp_path):
    run_train("experiment=demo", "trainer.epochs=2", out=tmp_path, multirun=True)
    runs = sorted(p.name for p in (tmp_path / "demo").iterdir() if (p / "result.json").exists())
    assert len(runs) == 12
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "alr.report", "demo", "--runs", str(tmp_path / "demo"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    table = (out / "table.md").read_text()
    assert proc.stdout.startswith("# Demo")
    for label in ("Baseline", "SLR", "ALR", "ALR-S"):
        assert f"| {label} | " in table
    assert table.count("| 3 |") == 4  # three seeds behind every row
    assert "94,186 + 90" in table and "not run" not in table
    assert (out / "table.csv").exists()
    png = out / "residual_labels.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
