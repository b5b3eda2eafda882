"""Training FLOPs per image and the dense tensor-core peak of common GPUs: how close a run gets to the floor.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward with a
float32 cross entropy (convolutions and matrix products, the work tensor cores do; normalisation
and activations are not counted). The count depends on the architecture, the image size and the
class count only, so it is the same on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense fp16/bf16 tensor-core peak (fp32 accumulate, no sparsity), TFLOP/s, from the vendors' data
# sheets; the first name contained in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "V100": 125.0,  # fp16 only
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "T4": 65.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The dense fp16/bf16 peak of the device called ``device_name``, or None if it is not in the table."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def training_flops_per_image(
    model: nn.Module, image_size: int, num_classes: int, batch: int = 2, device: torch.device | str = "cpu"
) -> float:
    """FLOPs of one training step (forward and backward) of ``model`` on square RGB images, per image."""
    model = model.to(device).train()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch
