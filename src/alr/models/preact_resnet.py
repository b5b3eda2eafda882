"""Pre-activation ResNet-18 for CIFAR (He et al. 2016, "Identity Mappings in Deep Residual Networks").

CIFAR stem (one 3×3 convolution, no max-pool), four stages of two pre-activation basic blocks
(64/128/256/512 channels), and the final BN–ReLU that pre-activation networks need before pooling.
11,172,170 parameters at K=10 and 11,218,340 at K=100 (docs/deviations.md#models).
"""

from __future__ import annotations

from torch import Tensor, nn

from alr.models.init import kaiming_init


class PreActBlock(nn.Module):
    """BN–ReLU–conv3×3–BN–ReLU–conv3×3, plus a 1×1 projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(x).relu()
        # The projection sees the pre-activated input, as in the paper's full pre-activation unit.
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.bn2(out).relu())
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32×32 inputs (28×28 grey ones too), returning ``B×num_classes`` logits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [PreActBlock(c_in, c_out, stride), PreActBlock(c_out, c_out)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.blocks(self.stem(x))).relu()
        return self.fc(out.mean(dim=(2, 3)))
