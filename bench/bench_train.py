"""Per-step time of the suite's trainer with ``alr_s`` and ``baseline``, and of a bare loop.

Section 2-3 of ``results/bench.md`` (``make bench``).

Three variants, each a fresh run of ``--steps`` training steps of the same backbone on the same
batches (synthetic files in CIFAR-10's on-disk format, the suite's on-device loader), in rotating
order for ``--rounds`` rounds:

* ``trainer baseline`` and ``trainer alr_s``: ``alr.trainer.fit`` itself, as ``python -m alr.train``
  composes it (``dataset=cifar10 model=<model> method=...``), so per-step bookkeeping, logging
  syncs (every ``trainer.log_every`` steps) and the method's own parameters are all counted;
* ``bare loop``: a hand-written PyTorch loop doing the same work: same model, optimizer, batches,
  precision, cross entropy, and nothing else.

A step's time is the wall time between two consecutive batches leaving the loader (timestamps taken
in a wrapper around the training batches; on CUDA each timestamp synchronises the device). The
first step of every run (allocations, kernel selection) is dropped, and so is the last (it has no
next batch), so each run gives ``steps − 2`` samples. Medians over all samples of a variant; the
spread is the min-max of the per-round ratios.

Op accounting: step times on a shared CPU scatter by ±10 % from step to step, too wide to settle a 1 %
target. So one more run of each method goes under ``torch.profiler`` over the same timed steps, and
the ops are compared: every op ALR-S calls more often than the baseline (ALR's loss, ``S``'s update)
counts at its mean self time, every op it calls less often (the baseline's cross entropy) counts
against. The net, per step, against the baseline's own step is ALR-S's added work; effects outside
the ops (cache, allocator) are what the step-time comparison sees and this one does not.

Every other method (``--methods``; by default each file of ``configs/method/``) gets the same op accounting
against the baseline, one profiled run each, beside what its config declares one step runs (``method.cost``,
what the GPU-hours forecast prices): KD distils a teacher trained here for a few steps.

    python bench/bench_train.py            # preact_resnet18, batch 128, 4 rounds × 6 steps
    python bench/bench_train.py --quick    # batch 8, 1 round × 3 steps
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import benchutil
import torch
import torch.nn.functional as F
from bench_cifar_pipeline import write_synthetic_cifar10
from benchutil import add_common_args, describe, flat, interleave, iqr, median, ratio_with_spread, setup, sync
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile

from alr.config import CONFIG_DIR, compose
from alr.data import Batch
from alr.trainer import DTYPES, fit, seed_everything

TARGET_METHOD = 0.01  # the suite's target (docs/speed.md): alr_s within 1 % of baseline per step
TARGET_TRAINER = 0.95  # and the trainer at least 0.95 of a bare loop's steps per second

QUICK_METHODS = ("kd", "pskd")  # --quick: a teacher's forward and a per-sample table, not every method
_stamps: list[float] = []  # filled by TimedBatches, read after each run
_window: list[ProfiledSteps] = []  # when set, TimedBatches profiles the timed steps of the next run


class ProfiledSteps:
    """``torch.profiler`` over a run's timed steps: from batch 1 leaving the loader to the last one leaving."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.last, self.device, self.steps = steps - 1, device, steps - 2
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profile = profile(activities=activities, record_shapes=True)

    def at(self, i: int) -> None:
        if i == 1:
            self.profile.start()
        elif i == self.last:
            self.profile.stop()

    def ops(self) -> dict[str, tuple[float, float]]:
        """``op [input shapes]`` -> (calls, self time in ms) per step: device time on CUDA, CPU time otherwise.

        By shape, so that a scalar copy is not charged at the mean of all copies (a batch's among them)."""
        cuda = self.device.type == "cuda"
        out = {}
        for e in self.profile.key_averages(group_by_input_shape=True):
            shapes = ",".join(str(list(x)) if x else "." for x in e.input_shapes if x is not None)
            out[f"{e.key} {shapes}"] = (
                e.count / self.steps,
                (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / self.steps,
            )
        return out


def op_difference(
    alr: dict[str, tuple[float, float]], base: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """Op -> (calls, ms) that one step of ``alr`` makes more (positive) or fewer (negative) than one of ``base``."""
    diff = {}
    for key in alr.keys() | base.keys():
        (n_a, t_a), (n_b, t_b) = alr.get(key, (0, 0.0)), base.get(key, (0, 0.0))
        if abs(n_a - n_b) > 1e-9:  # a changed count, at the mean self time of one call (where it is called more)
            per_call = t_a / n_a if n_a > n_b else t_b / n_b
            diff[key] = (n_a - n_b, (n_a - n_b) * per_call)
    return diff


def step_time_verdict(per_round: tuple[float, float], margin: float, ok: bool) -> str:
    """A target's verdict from step times: "not resolved" while the per-round ratios spread wider than twice
    its ``margin`` (noise, not the code), else whether it holds."""
    if per_round[1] - per_round[0] > 2 * margin:
        return "not resolved by this run (step-to-step noise is wider than the target)"
    return "holds" if ok else "does not hold"


class TimedBatches:
    """The training batches of a data bundle, with a timestamp each time a batch leaves."""

    def __init__(self, inner, device: torch.device) -> None:
        self.inner, self.device = inner, device
        self.num_samples, self.indexed = inner.num_samples, inner.indexed

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for i, batch in enumerate(self.inner.epoch(epoch)):
            sync(self.device)
            _stamps.append(benchutil.clock())
            if _window:
                _window[0].at(i)
            yield batch


def timed_build(device: torch.device, **kwargs):
    """``alr.data.cifar.build`` with its training batches timed: the ``_target_`` the benched configs use."""
    from alr.data import cifar

    data = cifar.build(device=device, **kwargs)
    data.train = TimedBatches(data.train, torch.device(device))
    return data


def compose_run(method: str, data_dir: str, model: str, batch: int, steps: int, device: str, *extra: str) -> DictConfig:
    """The config ``python -m alr.train`` would compose, shrunk to ``steps`` steps and one tiny test batch."""
    overrides = [
        "dataset=cifar10",
        f"dataset.data_dir={data_dir}",
        f"model={model}",
        f"method={method}",
        "trainer.epochs=1",
        f"trainer.batch_size={batch}",
        f"trainer.limit_train_batches={steps}",
        "trainer.limit_test_batches=1",
        "trainer.progress=false",
        "trainer.resume=false",
        f"trainer.device={device}",
        "dataset.build.eval_batch_size=16",
        f"dataset.build._target_={__name__}.timed_build",
        *extra,
    ]
    return compose(overrides)


def all_methods() -> list[str]:
    """Every method config of the suite but the baseline, in name order."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml") if p.stem != "baseline")


def declared_cost(cfg: DictConfig) -> str:
    """What ``method.cost`` says one training step runs, in words."""
    cost = cfg.method.cost
    steps = f"{cost.steps:g} step{'s' if cost.steps != 1 else ''} like {cost.like}"
    return steps + "".join(f" + a {model} forward" for model in cost.forwards)


def bare_loop(cfg: DictConfig, device: torch.device) -> None:
    """The same work as the trainer's baseline run, written plainly: forward, cross entropy, backward, step."""
    t = cfg.trainer
    seed_everything(cfg.seed, t.deterministic)
    data = instantiate(cfg.dataset.build, batch_size=t.batch_size, device=device, seed=cfg.seed)
    model = instantiate(cfg.model).to(device)
    channels_last = t.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = instantiate(cfg.optim.optimizer)(model.parameters(), weight_decay=cfg.optim.weight_decay)
    dtype = DTYPES[t.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    model.train()
    for x, y, _ in islice(data.train.epoch(0), t.limit_train_batches):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext():
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first and last are not timed)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 round of 3 steps, 2 methods' accounting")
    parser.add_argument(
        "--methods", default=None, help="comma-separated methods for the per-method op accounting (default: all)"
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.rounds = 8, 3, 1
    device = setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_cifar10(root / "data", n=args.batch_size * args.steps, n_test=16)

        def run(method: str | None, r: list[int], *extra: str) -> list[float]:
            cfg = compose_run(
                method or "baseline", str(root / "data"), args.model, args.batch_size, args.steps, device.type, *extra
            )
            _stamps.clear()
            if method is None:
                bare_loop(cfg, device)
            else:
                r[0] += 1
                fit(cfg, root / f"run{r[0]}")
            return [b - a for a, b in zip(_stamps[1:], _stamps[2:])]

        count = [0]
        run(None, count)  # warm-up for the process: library initialisation, first kernel selections
        res = interleave(
            {
                "trainer baseline": lambda: run("baseline", count),
                "trainer alr_s": lambda: run("alr_s", count),
                "bare loop": lambda: run(None, count),
            },
            args.rounds,
        )
        ops = {}
        for method in ("baseline", "alr_s", None):
            _window[:] = [ProfiledSteps(args.steps, device)]
            run(method, count)
            ops[method or "bare loop"] = _window.pop().ops()
        methods = args.methods.split(",") if args.methods else list(QUICK_METHODS) if args.quick else all_methods()
        declared, extra = {}, {}
        for method in methods:
            cfg = compose_run(method, str(root / "data"), args.model, args.batch_size, args.steps, device.type)
            if "teacher_run" in cfg.method:  # a teacher of the benched backbone, trained here for a few steps
                teacher = root / "teacher"
                if not (teacher / "result.json").exists():
                    teacher_cfg = compose_run(
                        "baseline", str(root / "data"), args.model, args.batch_size, 2, device.type
                    )
                    fit(teacher_cfg, teacher)
                extra[method] = [f"method.teacher_run={teacher}", f"method.teacher_model={args.model}"]
                cfg = compose_run(
                    method, str(root / "data"), args.model, args.batch_size, args.steps, device.type, *extra[method]
                )
            declared[method] = declared_cost(cfg)
            if method in ops:
                continue
            _window[:] = [ProfiledSteps(args.steps, device)]
            run(method, count, *extra.get(method, []))
            ops[method] = _window.pop().ops()

    n = len(flat(res["bare loop"]))
    print(
        f"{args.model}, batch {args.batch_size}, fp32, on {describe(device)}: {args.rounds} rounds x 1 run"
        f" of {args.steps} steps per variant, {n} timed steps per variant"
    )
    print(f"{'variant':<18} {'median s/step':>14} {'IQR':>17} {'images/s':>10}")
    for name, rounds in res.items():
        lo, hi = iqr(flat(rounds))
        s = median(flat(rounds))
        print(f"{name:<18} {s:>14.4f} {lo:>8.4f}-{hi:<8.4f} {args.batch_size / s:>10.1f}")
    method = ratio_with_spread(res["trainer alr_s"], res["trainer baseline"])
    trainer = ratio_with_spread(res["bare loop"], res["trainer baseline"])
    print()
    print(
        f"alr_s / baseline, time per step (trainer): {method[0]:.4f} [per-round {method[1]:.4f}-{method[2]:.4f}]"
        f" -> ALR overhead {100 * (method[0] - 1):+.2f} %"
    )
    print(
        f"trainer / bare loop, steps per second (baseline): {trainer[0]:.4f}"
        f" [per-round {trainer[1]:.4f}-{trainer[2]:.4f}]"
    )
    print()
    overhead, lo, hi = (100 * (v - 1) for v in method)
    verdict = step_time_verdict(method[1:], TARGET_METHOD, overhead <= 100 * TARGET_METHOD)
    print(
        f"target alr_s within 1 % of baseline per step on {device.type}: {verdict}:"
        f" median overhead {overhead:+.2f} %, per round {lo:+.2f} % to {hi:+.2f} %"
    )
    step_ms = 1e3 * median(flat(res["trainer baseline"]))
    what = "device" if device.type == "cuda" else "CPU"

    def accounting(name: str, more: str, fewer: str) -> float:
        """Print ``more``'s ops beyond ``fewer``'s and the reverse, per step; the net in % of the baseline's step."""
        diff = op_difference(ops[more], ops[fewer])
        added, saved = sum(ms for _, ms in diff.values() if ms > 0), -sum(ms for _, ms in diff.values() if ms < 0)
        net = 100 * (added - saved) / step_ms
        print(
            f"op accounting, {name} ({what} self time per step, one profiled run each): {more}'s ops beyond"
            f" {fewer}'s {added:.3f} ms, the reverse {saved:.3f} ms, of a {step_ms:.1f} ms step: {net:+.3f} %"
        )
        for key, (calls, ms) in sorted(diff.items(), key=lambda kv: -abs(kv[1][1]))[:8]:
            print(f"  {key[:60]:<60} {calls:+6.1f} calls {ms:+8.3f} ms")
        return net

    print()
    net = accounting("ALR-S against the baseline", "alr_s", "baseline")
    extra = accounting("the trainer against a bare loop", "baseline", "bare loop")
    print()
    print(f"per-method cost against the baseline, by op accounting ({what} self time per step, one profiled run each):")
    print(f"{'method':<14} {'added ms':>9} {'saved ms':>9} {'net % of a step':>16}   what its config declares")
    for method in methods:
        diff = op_difference(ops[method], ops["baseline"])
        added, saved = sum(ms for _, ms in diff.values() if ms > 0), -sum(ms for _, ms in diff.values() if ms < 0)
        print(
            f"{method:<14} {added:>9.3f} {saved:>9.3f} {100 * (added - saved) / step_ms:>+15.2f}%   {declared[method]}"
        )
    print()
    verdict = "holds" if net <= 100 * TARGET_METHOD else "does not hold"
    print(f"target alr_s within 1 % of baseline per step on {device.type}, by op accounting: {verdict} ({net:+.3f} %)")
    verdict = step_time_verdict(trainer[1:], 1 - TARGET_TRAINER, trainer[0] >= TARGET_TRAINER)
    print(
        f"target trainer >= {TARGET_TRAINER} of the bare loop's steps/s: {verdict}: median {trainer[0]:.4f},"
        f" per round {trainer[1]:.4f} to {trainer[2]:.4f}"
    )
    by_ops = 1 / (1 + extra / 100)
    verdict = "holds" if by_ops >= TARGET_TRAINER else "does not hold"
    print(f"target trainer >= {TARGET_TRAINER} of the bare loop's steps/s, by op accounting: {verdict} ({by_ops:.4f})")
    if args.batch_size != 128 or args.model != "preact_resnet18":
        print(f"(measured with {args.model} at batch {args.batch_size}; the targets are for preact_resnet18 at 128)")


if __name__ == "__main__":
    main()
