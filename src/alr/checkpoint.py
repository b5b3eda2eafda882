"""Atomic writes: a crash in the middle of a save leaves the previous file intact."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it."""
    _atomic(path, lambda f: torch.save(state, f))


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically."""
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
