"""The weight initialisation the CIFAR backbones share (He et al. 2015, as in the ResNet and WRN papers)."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """Convolutions: He-normal with fan-out (ReLU gain); batch norms: weight 1, bias 0. Linear layers keep torch's."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
