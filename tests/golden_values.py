"""Helpers of the methods' peer tests: stored golden values of a loss (``tests/golden/<name>.json``: compared by
default, rewritten with ``ALR_REGEN_GOLDEN=1``, then commit the file; the numbers come from the code, never
typed in by hand), and a linear classifier trained for three SGD steps by a loss."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GOLDEN = Path(__file__).resolve().parent / "golden"


def check_golden(name: str, values: dict[str, torch.Tensor], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Compare ``values`` (tensors, flattened to lists of floats) with ``golden/<name>.json``, or write it."""
    current = {k: [float(x) for x in v.detach().double().flatten()] for k, v in values.items()}
    path = GOLDEN / f"{name}.json"
    if os.environ.get("ALR_REGEN_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(current, indent=1) + "\n")
    assert path.is_file(), f"no golden values at {path}: run this test once with ALR_REGEN_GOLDEN=1 and commit the file"
    stored = json.loads(path.read_text())
    assert stored.keys() == current.keys(), f"{path.name}: keys {sorted(stored)} != {sorted(current)}"
    for key, expected in stored.items():
        torch.testing.assert_close(
            torch.tensor(current[key], dtype=torch.float64),
            torch.tensor(expected, dtype=torch.float64),
            rtol=rtol,
            atol=atol,
            msg=lambda m, key=key: f"{path.name}, {key}: {m}",
        )


def logits_case(B: int, K: int, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``B×K`` logits (``scale`` × a standard normal draw) and ``B`` labels, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, K, generator=g), torch.randint(0, K, (B,), generator=g)


def loss_and_grad(loss_fn, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_fn(logits, y)`` and its gradient with respect to the logits."""
    z = logits.clone().requires_grad_()
    loss = loss_fn(z, y)
    loss.backward()
    return loss.detach(), z.grad


def linear_classifier(g: torch.Generator, D: int = 6, K: int = 5) -> torch.nn.Linear:
    """A ``D → K`` linear layer with weights drawn from ``g``."""
    model = torch.nn.Linear(D, K)
    with torch.no_grad():
        model.weight.copy_(torch.randn(K, D, generator=g))
        model.bias.copy_(torch.randn(K, generator=g))
    return model


def train_three_steps(loss_fn, seed: int = 0, extra: list[torch.nn.Parameter] = ()):
    """A linear classifier (and ``extra`` parameters) trained by 3 SGD steps of ``loss_fn(model, x, y)``; returns
    its weight, bias and the three losses."""
    g = torch.Generator().manual_seed(seed)
    D, K, B = 6, 5, 8
    model = linear_classifier(g, D, K)
    batches = [(torch.randn(B, D, generator=g), torch.randint(0, K, (B,), generator=g)) for _ in range(3)]
    opt = torch.optim.SGD([*model.parameters(), *extra], lr=0.5, momentum=0.9, weight_decay=5e-4)
    losses = []
    for x, y in batches:
        loss = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return model.weight.detach(), model.bias.detach(), torch.stack(losses)


class RecordOps(TorchDispatchMode):
    """The name of every op that runs under it (``aten._local_scalar_dense`` is a read back, ``aten.lift_fresh`` a
    tensor made from host data)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
