"""Stored golden values of a loss (``tests/golden/<name>.json``): compared by default, rewritten with
``ALR_REGEN_GOLDEN=1`` (then commit the file). The numbers come from the code, never typed in by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

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
