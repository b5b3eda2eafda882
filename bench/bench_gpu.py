"""Images per second of ``preact_resnet18`` CIFAR training on a GPU, and the fraction of the compute floor.

Section 5 of ``results/bench.md`` (``make bench``).

Training FLOPs per image come from ``torch.utils.flop_counter.FlopCounterMode`` over one forward
and backward (convolutions and matrix products, the work tensor cores do; normalisation and
activations are not counted); that count is device-independent and is printed on a CPU too.

On a CUDA device, every combination of precision (fp16 with a ``GradScaler``, bf16), memory format
(``channels_last`` or not) and ``torch.compile`` (or eager) trains on a fixed batch of CIFAR-shaped
images: forward, cross entropy in float32, backward, SGD Nesterov. Variants are interleaved over
``--rounds`` rounds of ``--steps`` steps; medians. The achieved fraction of the floor is
``FLOPs per image × images/s ÷ peak``, with the device's dense fp16/bf16 tensor-core peak from
``alr.flops.PEAK_TFLOPS`` (or ``--peak-tflops``). Without a CUDA device the throughput table is skipped.

    python bench/bench_gpu.py            # batch 128, 5 rounds × 20 steps per variant
    python bench/bench_gpu.py --quick    # 2 rounds × 3 steps
"""

from __future__ import annotations

import argparse
from itertools import product

import torch
import torch.nn.functional as F
from benchutil import add_common_args, flat, interleave, iqr, median, setup, time_calls

from alr.flops import peak_tflops
from alr.flops import training_flops_per_image as model_flops_per_image
from alr.models import PreActResNet18


def training_flops_per_image(num_classes: int = 10) -> float:
    """FLOPs of one forward+backward of preact_resnet18 on 32×32 images, per image (on the CPU)."""
    return model_flops_per_image(PreActResNet18(num_classes=num_classes), 32, num_classes)


def make_step(dtype: torch.dtype, channels_last: bool, compile: bool, batch: int, device: torch.device):
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=10).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    forward = torch.compile(model) if compile else model
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def throughput_table(device: torch.device, args: argparse.Namespace, flops: float) -> None:
    """Images/s and the fraction of the compute floor for every precision × memory format × compile."""
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or peak_tflops(name)
    dtypes = {"fp16": torch.float16}
    if torch.cuda.is_bf16_supported(including_emulation=False):  # not on V100 and older
        dtypes["bf16"] = torch.bfloat16
    steps = {}
    for (dname, dtype), cl, comp in product(dtypes.items(), (False, True), (False, True)):
        key = f"{dname:<5} {'channels_last' if cl else 'contiguous':<14} {'compile' if comp else 'eager':<8}"
        steps[key] = make_step(dtype, cl, comp, args.batch_size, device)
        time_calls(steps[key], 3, device)  # warm-up; compiles the compiled variants
    res = interleave({k: lambda fn=fn: [time_calls(fn, args.steps, device)] for k, fn in steps.items()}, args.rounds)
    print(f"{name}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps per variant, medians")
    peak_note = f"peak {peak:g} TFLOP/s" if peak else "peak unknown (--peak-tflops)"
    print(f"{'precision format   mode':<31} {'images/s':>10} {'IQR':>19} {'of ' + peak_note:>30}")
    rates = {}
    for key, rounds in res.items():
        s = median(flat(rounds))
        lo, hi = iqr(flat(rounds))
        rates[key] = args.batch_size / s
        frac = f"{100 * flops * rates[key] / (peak * 1e12):.1f} %" if peak else "-"
        print(f"{key:<31} {rates[key]:>10,.0f} {args.batch_size / hi:>9,.0f}-{args.batch_size / lo:<9,.0f} {frac:>30}")
    best = max(rates, key=rates.get)
    print(f"fastest: {' '.join(best.split())} ({rates[best]:,.0f} images/s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed sample")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 steps")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 3
    device = setup(args)
    flops = training_flops_per_image()
    print(f"preact_resnet18, 32x32, K=10: training GFLOPs per image (forward+backward) = {flops / 1e9:.3f}")
    if device.type != "cuda":
        print("no CUDA device: the GPU throughput table (fp16/bf16 x channels_last x torch.compile) is skipped")
        return

    throughput_table(device, args, flops)


if __name__ == "__main__":
    main()
