"""A sweep goes past the runs it must refuse, then says which: ``hydra.callbacks.exit_on_refused``.

A run refused before it wrote anything (:class:`alr.errors.Refused`: its folder holds a run of another
config, or a KD teacher has not finished) is recorded here by the entry point in a multirun, which goes
on with the other jobs.
(The list lives in this module, not in ``alr.train``: run as ``python -m alr.train`` that module is
``__main__``, while Hydra imports the callback from ``alr.train``, a second copy.)
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

REFUSED: list[str] = []


class ExitOnRefused(Callback):
    """Once the sweep has trained every job it could, exit 1 naming the refused runs, one line each."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if REFUSED:
            print(f"error: {len(REFUSED)} run(s) of this sweep were refused, the others went on:", file=sys.stderr)
            print("\n".join(f"error: {line}" for line in REFUSED), file=sys.stderr)
            sys.exit(1)
