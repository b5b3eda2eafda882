"""The real entry point, end to end on the CPU, and its errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_train

FAST = ["debug=fast", "trainer.batch_size=32"]


@pytest.mark.parametrize("method", ["baseline", "slr", "alr", "alr_s"])
def test_entry_point_runs_every_method(tmp_path, method: str):
    run_train(f"method={method}", *FAST, out=tmp_path)
    run_dir = tmp_path / "default" / f"digits-digits_cnn-{method}-s0"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "finished"
    assert result["method"] == method and result["model"] == "digits_cnn" and result["dataset"] == "digits"
    assert result["params"]["method"] == (90 if method.startswith("alr") else 0)
    assert 0.0 <= result["final_test_acc"] <= 100.0
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert {"train/loss", "train/L_hard", "train/acc", "test/acc", "lr", "seconds"} <= set(lines[0])
    assert (run_dir / "config.yaml").exists() and (run_dir / "last.pt").exists()
    # Calibration and the test loss in every epoch; the last epoch's and the best epoch's in result.json.
    assert {"test/loss", "test/ece"} <= set(lines[0]) and 0.0 <= lines[-1]["test/ece"] <= 100.0
    assert (result["final_test_nll"], result["final_test_ece"]) == (lines[-1]["test/loss"], lines[-1]["test/ece"])
    best = lines[result["best_epoch"] - 1]
    assert (result["best_test_acc"], result["best_test_ece"]) == (best["test/acc"], best["test/ece"])
    confusion = np.load(run_dir / "test_confusion.npy")  # after the last epoch: true class x predicted class
    assert confusion.shape == (10, 10) and confusion.sum() == lines[-1]["test/images"]
    assert 100.0 * np.trace(confusion) / confusion.sum() == pytest.approx(lines[-1]["test/acc"])
    snaps = sorted((run_dir / "residual_labels").glob("*.npy")) if method.startswith("alr") else []
    if method.startswith("alr"):
        assert {"train/L_res", "train/L_upd", "train/w"} <= set(lines[0])
        assert [p.name for p in snaps] == ["epoch_001.npy", "epoch_002.npy"]
        m = np.load(snaps[-1])
        assert m.shape == (10, 10) and np.allclose(np.diag(m), 0) and np.allclose(m.sum(1), 1, atol=1e-5)
    else:
        assert not (run_dir / "residual_labels").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, precision: str):
    run_train("method=alr_s", f"trainer.precision={precision}", *FAST, out=tmp_path)
    result = json.loads((tmp_path / "default" / "digits-digits_cnn-alr_s-s0" / "result.json").read_text())
    assert result["status"] == "finished" and result["precision"] == precision


def test_rerun_skips_a_finished_run(tmp_path):
    run_train("method=baseline", *FAST, out=tmp_path)
    proc = run_train("method=baseline", *FAST, out=tmp_path)
    assert "finished already" in proc.stdout


@pytest.mark.parametrize(
    "override,needle",
    [
        ("dataset=mnist", "dataset"),
        ("method=mixup", "method"),
        ("trainer.epochs=-3", "trainer.epochs"),
        ("trainer.precision=fp64", "trainer.precision"),
    ],
)
def test_bad_config_exits_with_a_message_naming_the_key(tmp_path, override: str, needle: str):
    proc = run_train(override, *FAST, out=tmp_path, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert override.split("=")[1] in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("last.pt"))


@pytest.mark.parametrize(("setting", "cpu", "cuda"), [("cuda", False, True), (True, True, True), (False, False, False)])
def test_channels_last_on_cuda_only_by_default_and_on_every_device_when_true(setting, cpu: bool, cuda: bool):
    from alr.errors import RunError
    from alr.trainer import channels_last_on

    assert channels_last_on(setting, torch.device("cpu")) is cpu
    assert channels_last_on(setting, torch.device("cuda", 1)) is cuda
    with pytest.raises(RunError, match="trainer.channels_last must be cuda, true or false; got 'cpu'"):
        channels_last_on("cpu", torch.device("cpu"))


def test_a_cpu_run_with_channels_last_trains_its_backbone_in_that_format(tmp_path):
    from alr.distributed import World
    from alr.trainer import Parts
    from conftest import compose

    cfg = compose("debug=fast", "trainer.channels_last=true", f"paths.output_dir={tmp_path}")
    parts = Parts(cfg, World(torch.device("cpu")))
    conv = next(m for m in parts.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert parts.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
