"""The CUDA paths: on-device CIFAR batches, CUDA autocast with a GradScaler, channels_last. Skipped without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alr.data import cifar, samples
from conftest import run_train

pytestmark = pytest.mark.gpu


def test_cifar_batches_are_made_on_the_gpu(tmp_path: Path):
    samples.write_cifar(tmp_path, "cifar10", n_train=64, n_test=16)
    data = cifar.build(16, "cuda", name="cifar10", data_dir=tmp_path)
    x, y = next(iter(data.train.epoch(0)))
    assert x.is_cuda and y.is_cuda and x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    again, _ = next(iter(data.train.epoch(0)))
    assert torch.equal(x, again)  # the epoch's generator lives on the device and is reseeded per epoch
    x_test, _ = next(iter(data.test.epoch(0)))
    raw = torch.from_numpy(cifar.load_arrays("cifar10", tmp_path)["x_test"][:16]).cuda().float() / 255
    mean = torch.tensor(cifar.LAYOUTS["cifar10"].mean, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(cifar.LAYOUTS["cifar10"].std, device="cuda").view(1, 3, 1, 1)
    torch.testing.assert_close(x_test, (raw - mean) / std)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda(tmp_path: Path, precision: str):
    data = tmp_path / "data"
    samples.write_cifar(data, "cifar100", n_train=64, n_test=16)
    run_train(
        "experiment=table1",
        "dataset=cifar100",
        "method=alr_s",
        "trainer.device=cuda",
        f"trainer.precision={precision}",
        "trainer.epochs=2",
        "trainer.batch_size=16",
        "trainer.progress=false",
        "trainer.channels_last=true",
        f"dataset.data_dir={data}",
        out=tmp_path,
    )
    run = tmp_path / "table1" / "cifar100-preact_resnet18-alr_s-s0"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["precision"] == precision
    assert result["device"] != "cpu"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics)
