"""Wide residual network for CIFAR (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

WRN-d-k: a 3×3 stem of 16 channels, three groups of (d − 4)/6 pre-activation blocks of width
16k/32k/64k, dropout between the two convolutions of each block, a final BN–ReLU, global average
pooling and a linear layer. WRN-28-10 has 36,479,194 parameters at K=10 and 36,536,884 at K=100
(docs/deviations.md#models).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from alr.models.init import kaiming_init


class WideBlock(nn.Module):
    """BN–ReLU–conv3×3–BN–ReLU–dropout–conv3×3, plus a 1×1 projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(x).relu()
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.bn2(self.conv1(out)).relu()
        out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + skip


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32×32 inputs (28×28 grey ones too), returning ``B×num_classes`` logits."""

    def __init__(
        self, depth: int = 28, widen_factor: int = 10, dropout: float = 0.3, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, not {depth}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks, c_in = [], 16
        for c_out, stride in ((16 * widen_factor, 1), (32 * widen_factor, 2), (64 * widen_factor, 2)):
            for i in range(n):
                blocks.append(WideBlock(c_in, c_out, stride if i == 0 else 1, dropout))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.blocks(self.stem(x))).relu()
        return self.fc(out.mean(dim=(2, 3)))
