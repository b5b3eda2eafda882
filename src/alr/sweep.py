"""A sweep goes past the run folders it must refuse, then says which: ``hydra.callbacks.exit_on_refused``.

A folder that holds a run of another config (:class:`alr.errors.RunFolderConflict`) is refused before
anything is written; in a multirun the entry point records it here and goes on with the other jobs.
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
    """Once the sweep has trained every job it could, exit 1 naming the refused run folders, one line each."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if REFUSED:
            print(f"error: {len(REFUSED)} run folder(s) of this sweep were refused:", file=sys.stderr)
            print("\n".join(f"error: {line}" for line in REFUSED), file=sys.stderr)
            sys.exit(1)
