"""Fashion-MNIST's CPU recipe (``experiment=fmnist``): backbone, memory format and batch, by images/s.

Section 8 of ``results/bench.md`` (``make bench``).

The recipe (``configs/experiment/fmnist.yaml``, composed here as ``python -m alr.train`` would) trains ResNet-8
with a one-channel stem at batch 128 on 1×28×28 images, with ``trainer.channels_last=true`` on the CPU (the
trainer's default, ``cuda``, applies it on CUDA only: ``alr.trainer.channels_last_on``), and means a run to
take at most 5 minutes on a 2-core CPU. This bench times that choice against its alternatives, side by side:

* the recipe's backbone in the other memory format, and at twice the batch;
* the next two depths of its family (ResNet-14, ResNet-20) in the recipe's format and batch.

A variant's work is one full training step of the recipe (forward, cross entropy, backward, the recipe's
optimizer step with its weight decay) on a fixed batch of random inputs, each variant with its own model and
optimizer; and, per backbone and format, the evaluation forward (eval mode, no autograd) at the recipe's
evaluation batch. In each of ``--rounds`` rounds every variant runs once, a sample of calls lasting about
``--sample-s`` seconds, the order rotated from round to round. Figures are medians over the rounds with
[min-max over the rounds]; ratios are to the recipe's own variant, round by round.

A run's projected time is the recipe's epochs × (its training images at the variant's training rate + its
test images at the backbone's evaluation rate): the backbone's own work, without the augmentation, the
method's loss and the trainer's bookkeeping (sections 1 to 4 measure those).

Threads and clock: unlike the other CPU benches, this one times what the recipe runs, a training run on all
of torch's threads, so ``--threads -1`` (the default) or ``0`` keeps torch's own thread count here, and with more
than one thread ``benchutil.setup`` times by wall time. ``--device auto`` is the recipe's device, the CPU.

    python bench/bench_fmnist.py            # 8 rounds of 1 s samples per variant: about 1.5 minutes
    python bench/bench_fmnist.py --quick    # batch 16, 2 rounds of short samples: seconds
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import benchutil
import torch
import torch.nn.functional as F
from benchutil import add_common_args, calibrated, describe, flat, interleave, median, ratio_with_spread, setup
from hydra.utils import instantiate
from omegaconf import DictConfig

from alr.config import compose
from alr.trainer import channels_last_on

TARGET_MINUTES = 5.0  # one run of the recipe, training and evaluation, on a 2-core CPU (docs/fashion-mnist.md)
IMAGE = 28  # Fashion-MNIST's images are 28×28
# torch's own thread count, read on import: the bench driver imports every bench before any of them sets its threads
DEFAULT_THREADS = torch.get_num_threads()


@dataclass(frozen=True)
class Variant:
    depth: int
    channels_last: bool
    batch: int

    def name(self) -> str:
        return f"ResNet-{self.depth} {'channels_last' if self.channels_last else 'contiguous'}"

    def key(self) -> str:
        return f"train {self.name()} at {self.batch}"

    def eval_key(self) -> str:
        return f"eval {self.name()}"


def build(cfg: DictConfig, depth: int, channels_last: bool, device: torch.device) -> torch.nn.Module:
    """The recipe's backbone at ``depth`` (its family's 6n + 2), in the given memory format."""
    model = instantiate(cfg.model, depth=depth).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def inputs(cfg: DictConfig, batch: int, device: torch.device) -> torch.Tensor:
    """Random images in the standard format; each timed call converts them, as the trainer converts every batch."""
    return torch.randn(batch, cfg.model.in_channels, IMAGE, IMAGE, device=device)


def training_step(cfg: DictConfig, v: Variant, device: torch.device) -> Callable[[], None]:
    """One training step of the recipe for variant ``v``, on a fixed random batch."""
    model = build(cfg, v.depth, v.channels_last, device).train()
    optimizer = instantiate(cfg.optim.optimizer)(model.parameters(), weight_decay=cfg.optim.weight_decay)
    x = inputs(cfg, v.batch, device)
    y = torch.randint(cfg.dataset.num_classes, (v.batch,), device=device)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format

    def step() -> None:
        loss = F.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def evaluation_forward(cfg: DictConfig, v: Variant, batch: int, device: torch.device) -> Callable[[], None]:
    """The evaluation forward of ``v``'s backbone (eval mode, no autograd) on a fixed random batch of ``batch``."""
    model = build(cfg, v.depth, v.channels_last, device).eval()
    x = inputs(cfg, batch, device)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format

    @torch.no_grad()
    def forward() -> None:
        model(x.contiguous(memory_format=fmt))

    return forward


def per_image(sampler: Callable[[], list[float]], batch: int) -> Callable[[], list[float]]:
    return lambda: [s / batch for s in sampler()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=1.0, help="seconds of calls per variant and round")
    parser.add_argument("--quick", action="store_true", help="batch 16 (evaluation 32), 2 rounds of 0.02 s samples")
    add_common_args(parser)
    args = parser.parse_args(argv)
    # The driver runs every bench in one process and describes the others' threads and clock after the last one.
    saved = torch.get_num_threads(), benchutil.clock, benchutil.CLOCK_NAME
    try:
        run(args)
    finally:
        torch.set_num_threads(saved[0])
        benchutil.clock, benchutil.CLOCK_NAME = saved[1:]


def run(args: argparse.Namespace) -> None:
    cfg = compose(["experiment=fmnist"])
    if args.device == "auto":
        args.device = cfg.trainer.device
    if args.threads <= 0:
        args.threads = DEFAULT_THREADS  # as the recipe's run has
    device = setup(args)
    t = cfg.trainer
    batch, eval_batch = t.batch_size, cfg.dataset.build.eval_batch_size
    if args.quick:
        batch, eval_batch, args.rounds, args.sample_s = 16, 32, 2, 0.02
    depth, fmt = cfg.model.depth, channels_last_on(t.channels_last, device)

    recipe = Variant(depth, fmt, batch)
    variants = [
        Variant(depth, not fmt, batch),
        recipe,
        Variant(depth, fmt, 2 * batch),
        Variant(depth + 6, fmt, batch),
        Variant(depth + 12, fmt, batch),
    ]
    torch.manual_seed(0)
    samplers = {}
    for v in variants:
        samplers[v.key()] = per_image(calibrated(training_step(cfg, v, device), args.sample_s, device), v.batch)
        if v.eval_key() not in samplers:
            forward = evaluation_forward(cfg, v, eval_batch, device)
            samplers[v.eval_key()] = per_image(calibrated(forward, args.sample_s, device), eval_batch)
    wall, cpu = time.perf_counter(), time.process_time()
    res = interleave(samplers, args.rounds)
    share = (time.process_time() - cpu) / (time.perf_counter() - wall) / torch.get_num_threads()

    def projected(v: Variant) -> list[float]:
        """Minutes of one run of the recipe at ``v``'s rates, round by round."""
        return [
            t.epochs * (cfg.dataset.num_train * median(train) + cfg.dataset.num_test * median(test)) / 60
            for train, test in zip(res[v.key()], res[v.eval_key()])
        ]

    def rate(rounds: list[list[float]]) -> str:
        per_round = [1 / median(r) for r in rounds]
        return f"{1 / median(flat(rounds)):>6,.0f} [{min(per_round):,.0f}-{max(per_round):,.0f}]"

    opt = cfg.optim.optimizer
    step = f"{opt._target_.rsplit('.', 1)[-1]} lr {opt.lr:g}, {'Nesterov ' if opt.get('nesterov') else ''}momentum"
    print(
        f"experiment=fmnist's training step (forward, cross entropy, backward, {step} {opt.get('momentum', 0):g},"
        f" wd {cfg.optim.weight_decay:g}) on random {cfg.model.in_channels}x{IMAGE}x{IMAGE} inputs, fp32,"
        f" on {describe(device)} (torch's own thread count unless --threads says otherwise: the recipe's run)"
    )
    print(
        f"evaluation: eval-mode forward at batch {eval_batch}, no autograd; {args.rounds} rounds, each a sample of"
        f" calls lasting about {args.sample_s:g} s per variant, interleaved; medians [min-max over rounds]"
    )
    print(
        f"run: {t.epochs} epochs x ({cfg.dataset.num_train:,} training images at the training rate"
        f" + {cfg.dataset.num_test:,} test images at the evaluation rate), the backbone's work only"
    )
    print(
        f"CPU share: the process's CPU time was {share:.2f} of {torch.get_num_threads()} thread(s) x the wall time"
        " while timing; well below 1, other jobs held the cores and a wall-clock rate counts their time"
    )
    if args.quick:
        print("(quick: a smoke test at small batches, not figures)")
    print()
    print(f"{'variant':<34} {'batch':>5} {'train img/s':>20} {'/ recipe':>19} {'eval img/s':>20} {'run, min':>17}")
    minutes = {}
    for v in variants:
        ratio = ratio_with_spread(res[recipe.key()], res[v.key()])  # seconds per image: the recipe's over v's
        minutes[v] = projected(v)
        label = v.name() + (" (recipe)" if v == recipe else "")
        print(
            f"{label:<34} {v.batch:>5} {rate(res[v.key()]):>20} {ratio[0]:>6.2f}x [{ratio[1]:.2f}-{ratio[2]:.2f}]"
            f" {rate(res[v.eval_key()]):>20} {median(minutes[v]):>6.1f} [{min(minutes[v]):.1f}-{max(minutes[v]):.1f}]"
        )

    other, double = variants[0], variants[2]
    print()
    speedup = ratio_with_spread(res[other.key()], res[recipe.key()])
    print(
        f"memory format: {recipe.name()} trains {speedup[0]:.2f}x [{speedup[1]:.2f}-{speedup[2]:.2f}] the images/s"
        f" of {other.name()}"
    )
    speedup = ratio_with_spread(res[recipe.key()], res[double.key()])
    print(
        f"batch: {double.batch} trains {speedup[0]:.2f}x [{speedup[1]:.2f}-{speedup[2]:.2f}] the images/s"
        f" of {recipe.batch}, {median(minutes[double]):.1f} min a run against {median(minutes[recipe]):.1f}"
    )
    fits = [v for v in variants if v.batch == batch and v.channels_last == fmt and median(minutes[v]) <= TARGET_MINUTES]
    deepest = f"ResNet-{max(v.depth for v in fits)}" if fits else "none"
    print(f"backbone: the deepest whose projected run is within {TARGET_MINUTES:g} min here: {deepest}")
    print()
    m = minutes[recipe]
    verdict = "met" if median(m) <= TARGET_MINUTES else "not met"
    print(
        f"target experiment=fmnist run ({recipe.name()}, batch {batch}) <= {TARGET_MINUTES:g} min on {device.type}"
        f" with {torch.get_num_threads()} thread(s): {verdict} (projected {median(m):.1f} min"
        f" [{min(m):.1f}-{max(m):.1f}], the backbone's work only)"
    )


if __name__ == "__main__":
    main()
