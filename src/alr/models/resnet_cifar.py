"""ResNet for CIFAR (He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2).

ResNet-``6n+2``: a 3×3 stem of 16 channels, three stages of ``n`` basic blocks (16/32/64 channels;
the first block of stages 2 and 3 halves the resolution), global average pooling and a linear
layer. Shortcuts are parameter-free ("option A"): subsample by 2 and zero-pad the new channels.
ResNet-32 (n = 5) has 464,154 parameters at K=10 and 470,004 at K=100 (docs/deviations.md#models).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from alr.models.init import kaiming_init


class BasicBlock(nn.Module):
    """conv3×3–BN–ReLU–conv3×3–BN, added to an identity (or option-A) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra_channels = stride, c_out - c_in

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class ResNetCifar(nn.Module):
    """ResNet-``depth`` (6n + 2) for 32×32 inputs (28×28 grey ones too), returning ``B×num_classes`` logits."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, not {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))
