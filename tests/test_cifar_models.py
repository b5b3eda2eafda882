"""The CIFAR backbones: exact parameter counts (docs/deviations.md#models), logits' shape, and their configs."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from alr.models.preact_resnet import PreActResNet18
from alr.models.resnet_cifar import ResNetCifar
from alr.models.wide_resnet import WideResNet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# (config, class, parameters at K=10, at K=100), from docs/deviations.md#models.
MODELS = [
    ("preact_resnet18", PreActResNet18, 11_172_170, 11_218_340),
    ("wrn28_10", WideResNet, 36_479_194, 36_536_884),
    ("resnet32", ResNetCifar, 464_154, 470_004),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("config", "cls", "at_10", "at_100"), MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("k", [10, 100])
def test_config_builds_the_model_with_the_exact_parameter_count(config, cls, at_10, at_100, k: int) -> None:
    cfg = OmegaConf.create({"dataset": {"num_classes": k}, "model": OmegaConf.load(CONFIGS / f"model/{config}.yaml")})
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model)
    assert type(model) is cls
    assert n_params(model) == (at_10 if k == 10 else at_100)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, k) and torch.isfinite(logits).all()


def test_default_constructors_are_the_papers_architectures() -> None:
    assert n_params(ResNetCifar(num_classes=100)) == 470_004
    wrn = WideResNet(num_classes=10)
    assert len(wrn.blocks) == 12 and wrn.fc.in_features == 640


def test_depths_that_do_not_fit_the_pattern_are_refused() -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNetCifar(depth=33)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=27)


def test_option_a_shortcut_is_parameter_free_and_zero_pads() -> None:
    block = ResNetCifar(depth=8).blocks[1]  # the first block of stage 2: 16 → 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    skip = block.shortcut(x)
    assert skip.shape == (2, 32, 4, 4)
    assert torch.equal(skip[:, 8:24], x[:, :, ::2, ::2])
    assert not skip[:, :8].any() and not skip[:, 24:].any()


def test_training_mode_backward_reaches_every_parameter() -> None:
    model = PreActResNet18(num_classes=10)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
