"""A small CNN for 8×8 digits: the embedded default's backbone."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """conv32 → conv64 → max-pool → conv128 → global average pool → dropout → linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
