"""Loss cost: forward+backward of ``ALRLoss`` against ``F.cross_entropy``, and against one training step.

Section 1 of ``results/bench.md`` (``make bench``).

For K ∈ {10, 100, 1000} and batch 128 and 256 on the current device, each round times calls
(as many as last ``--sample-ms``) of cross entropy, of ``ALRLoss`` and of the plain autograd
definition of the same loss (``alr_terms_reference`` with the same running-accuracy bookkeeping:
what ``ALRLoss`` computed before its fused backward), in rotating order; medians over rounds, with
the spread of the per-round ratios. Then one ``preact_resnet18`` training step (forward, cross
entropy, backward, SGD) at batch 128, interleaved with the loss at that batch, gives the loss's share of a step.

    python bench/bench_loss.py            # 15 rounds of 20 ms samples, 4 timed ResNet steps
    python bench/bench_loss.py --quick    # 3 rounds of 5 ms samples, ResNet step at batch 8
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from benchutil import (
    add_common_args,
    calibrated,
    describe,
    flat,
    interleave,
    iqr,
    median,
    ratio_with_spread,
    setup,
    time_calls,
)
from torch.utils._python_dispatch import TorchDispatchMode

from alr import ALRLoss
from alr.methods.alr_loss import alr_terms_reference
from alr.models import PreActResNet18

TARGET_RATIO_K1000 = 12.0  # the suite's target (docs/speed.md): at most 12× cross entropy at K=1000 on CPU
TARGET_STEP_SHARE = 0.005  # and under 0.5 % of a preact_resnet18 step at batch 128


class _LargestOutputs(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


class PlainALRLoss(ALRLoss):
    """ALRLoss as plain autograd ops (``alr_terms_reference``), with the same running-accuracy bookkeeping."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.correct += (logits.argmax(dim=1) == targets).sum()
            self.seen += targets.numel()
            w = 1.0 - self.acc_train
        l_hard, l_res, l_upd = alr_terms_reference(logits, self.S, targets, self.label_smoothing)
        self.last_terms = {"L_hard": l_hard.detach(), "L_res": l_res.detach(), "L_upd": l_upd.detach(), "w": w}
        return l_hard + w * l_res + l_upd


def loss_calls(K: int, B: int, device: torch.device) -> dict[str, callable]:
    g = torch.Generator().manual_seed(K * B)
    z = (3 * torch.randn(B, K, generator=g)).to(device).requires_grad_()
    y = torch.randint(0, K, (B,), generator=g).to(device)
    crits = {"ALRLoss": ALRLoss(K, normalisation="sum").to(device), "plain_autograd": PlainALRLoss(K).to(device)}

    def cross_entropy() -> None:
        z.grad = None
        F.cross_entropy(z, y).backward()

    def alr(name: str) -> None:
        z.grad = crits[name].S.grad = None  # as the trainer's zero_grad(set_to_none=True) leaves them
        crits[name](z, y).backward()

    return {"cross_entropy": cross_entropy, **{name: partial(alr, name) for name in crits}}


def largest_tensor(K: int, B: int) -> int:
    """Elements of the largest tensor one ALRLoss forward+backward builds, S's own gradient aside."""
    z = torch.randn(B, K, requires_grad=True)
    crit = ALRLoss(K)
    with _LargestOutputs() as mode:
        crit(z, torch.randint(0, K, (B,))).backward()
    return max(n for n in (torch.Size(s).numel() for s in mode.shapes) if n != K * (K - 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sample-ms", type=float, default=20.0, help="each timed sample: calls lasting about this")
    parser.add_argument("--steps", type=int, default=4, help="timed ResNet steps (after one warm-up step)")
    parser.add_argument("--step-batch", type=int, default=128)
    add_common_args(parser)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5 ms samples, 2 ResNet steps at batch 8")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.sample_ms, args.steps, args.step_batch = 3, 5.0, 2, 8
    device = setup(args)
    print(
        f"loss forward+backward on {describe(device)}, float32: {args.rounds} rounds, each a sample of calls lasting"
        f" about {args.sample_ms:g} ms per variant; medians"
    )
    print("ratio: ALRLoss (or plain autograd ALR) time / F.cross_entropy time; [min-max of per-round ratios]")
    print(f"{'K':>5} {'B':>4} {'CE us':>8} {'ALRLoss us':>11} {'ALRLoss/CE':>20} {'plain autograd/CE':>20}")
    at_1000 = {}
    for K in (10, 100, 1000):
        for B in (128, 256):
            calls = loss_calls(K, B, device)
            res = interleave({k: calibrated(fn, args.sample_ms / 1e3, device) for k, fn in calls.items()}, args.rounds)
            fast = ratio_with_spread(res["ALRLoss"], res["cross_entropy"])
            plain = ratio_with_spread(res["plain_autograd"], res["cross_entropy"])
            if K == 1000:
                at_1000[B] = fast
            ce_us, alr_us = (median(flat(res[k])) * 1e6 for k in ("cross_entropy", "ALRLoss"))
            print(
                f"{K:>5} {B:>4} {ce_us:>8.0f} {alr_us:>11.0f} {fast[0]:>7.2f}x [{fast[1]:.2f}-{fast[2]:.2f}]"
                f" {plain[0]:>7.2f}x [{plain[1]:.2f}-{plain[2]:.2f}]"
            )
    largest = {K: largest_tensor(K, 128) for K in (10, 1000)}

    # The loss's share of one training step: preact_resnet18 at batch step_batch, SGD Nesterov as Table 1.
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(args.step_batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.step_batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    time_calls(step, 1, device)  # warm-up: allocations, kernel selection
    loss_at_step_batch = {K: loss_calls(K, args.step_batch, device)["ALRLoss"] for K in (10, 100, 1000)}
    variants = {"step": lambda: [time_calls(step, 1, device)]}
    variants.update({f"alr{K}": calibrated(fn, args.sample_ms / 1e3, device) for K, fn in loss_at_step_batch.items()})
    res = interleave(variants, args.steps)
    step_s = median(flat(res["step"]))
    lo, hi = iqr(flat(res["step"]))
    print()
    print(
        f"preact_resnet18 training step, batch {args.step_batch}, K=10, fp32: median {step_s:.3f} s"
        f" over {args.steps} steps [IQR {lo:.3f}-{hi:.3f}]"
    )
    shares = {}
    for K in (10, 100, 1000):
        shares[K] = median(flat(res[f"alr{K}"])) / step_s
        print(f"ALRLoss forward+backward at K={K:<4} (batch {args.step_batch}): {100 * shares[K]:.4f} % of that step")
    print(
        "largest tensor one ALRLoss forward+backward builds (besides S's K x (K-1) gradient), batch 128: "
        + ", ".join(f"K={K}: {n:,} elements (B x K = {128 * K:,})" for K, n in largest.items())
    )
    print()
    worst = max(v[0] for v in at_1000.values())
    verdict = "holds" if worst <= TARGET_RATIO_K1000 else "does not hold"
    print(f"target ALRLoss <= {TARGET_RATIO_K1000:g}x cross entropy at K=1000: {verdict} (worst batch: {worst:.2f}x)")
    no_kk = all(n <= 128 * K for K, n in largest.items())
    print(f"target no K x K matrix built per step: {'holds' if no_kk else 'does not hold'}")
    verdict = "holds" if shares[10] < TARGET_STEP_SHARE else "does not hold"
    note = "" if args.step_batch == 128 else f" (measured at batch {args.step_batch}, not 128)"
    print(f"target under 0.5 % of a preact_resnet18 step: {verdict} at K=10 ({100 * shares[10]:.4f} %){note}")


if __name__ == "__main__":
    main()
