"""Atomic writes and checked reads: a crash in the middle of a save leaves the previous file intact.

A checkpoint is written to a hidden temporary file beside its destination (``.last.pt.<random>.tmp``),
flushed and fsynced, then renamed over the destination, which POSIX makes atomic. A reader only ever
opens the destination name, so a half-written temporary file is never taken for a checkpoint.

Checkpoints are read with ``torch.load(weights_only=True)``, to the CPU: a ``last.pt`` holds tensors, numbers,
strings and plain containers only (the RNG states included, see :func:`alr.trainer.rng_state`), so a file that
carries anything else (a pickled callable, say: a shared teacher run, a run folder on a shared disk) is refused
before any of it runs. The one exception allowed is numpy's array reconstruction, which checkpoints of alr 0.1.0
hold for numpy's RNG state: an array is data, not code. Loading to the CPU and letting ``load_state_dict`` copy
into the model's tensors works from any device to any device (a checkpoint of ``cuda:3`` resumes on ``cuda:0``
or on a CPU), and RNG states must be CPU tensors anyway.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

import alr
from alr.errors import CheckpointError, DiskFullError

# What the trainer writes; a file without these keys is not one of this suite's checkpoints. (``step`` and
# ``partial``, the position inside an epoch, are newer and optional: older checkpoints end an epoch.)
CHECKPOINT_KEYS = ("model", "method", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "alr_version")

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    with disk_errors(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private (0600); give the usual permissions
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)  # the rename itself survives a power cut
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full disk (or quota) while writing ``path`` into :class:`DiskFullError`, which says what to do."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(
            f"disk full while writing {path} ({e.strerror or e}); the previous {Path(path).name} is intact. "
            "Free some space (or move paths.output_dir to a larger disk) and rerun the same command to resume."
        ) from e


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files a killed save left beside ``path``."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it."""
    _atomic(path, lambda f: torch.save(state, f))


# numpy's RNG state in checkpoints of alr 0.1.0: an array of uint32 (data, no code), allowed by name.
_NUMPY_ARRAY = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint the trainer wrote, to the CPU; :class:`CheckpointError` says why another file can't be used."""
    path = Path(path)
    fresh = "Move it away (or delete the run folder) to train from scratch, or set trainer.resume=false."
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if (found := re.search(r"GLOBAL ([\w.]+)", str(e))) is None:
            raise CheckpointError(
                f"{path} is not a readable checkpoint (UnpicklingError: {_last_line(e)}); it may be truncated or "
                f"not written by this suite. {fresh}"
            ) from None
        raise CheckpointError(
            f"{path} holds an object that is not data ({found.group(1)}): loading it could run code, so it is "
            f"refused and nothing in it ran. Use checkpoints this suite wrote. {fresh}"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"it may be truncated or not written by this suite. {fresh}"
        ) from e
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this suite (missing {', '.join(missing)}). {fresh}")
    version = ckpt["config"].get("config_version") if isinstance(ckpt["config"], dict) else None
    if version != alr.CONFIG_VERSION:
        raise CheckpointError(
            f"{path} was written by alr {ckpt['alr_version']} with config version {version!r}; this suite "
            f"reads version {alr.CONFIG_VERSION}. Resume it with that version of the suite, or start fresh in "
            "another folder (a different experiment_name or hydra.run.dir)."
        )
    return ckpt


def _last_line(error: Exception) -> str:
    """The line of torch's long unpickling message that says what failed."""
    lines = [line for line in str(error).splitlines() if line.strip() and "documentation" not in line]
    return (lines[-1] if lines else type(error).__name__)[:120]


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically."""
    write_text(json.dumps(obj, indent=2) + "\n", path)


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    _atomic(path, lambda f: f.write(text.encode()))
