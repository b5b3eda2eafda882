"""Stopping cleanly on a signal: checkpoint at the next step boundary, then requeue or exit.

A pre-empted or timed-out SLURM job gets a signal some time before it is killed: submitit (behind
Hydra's ``submitit_slurm`` launcher) asks SLURM for ``USR2`` ``signal_delay_s`` seconds ahead and
installs a handler that requeues the job (the launcher is checkpointable: its ``checkpoint()``
resubmits the same task). Left alone, that handler would exit in the middle of a step and lose
everything since the last end-of-epoch checkpoint. :class:`StopOnSignal` puts itself in front: the
signal only sets a flag; the trainer checks it between steps (a Python bool, no device sync), writes
a mid-epoch checkpoint and raises :class:`Interrupted`; the entry point then calls
:meth:`Interrupted.hand_over`, which runs submitit's handler (checkpoint the submission, requeue,
exit) or, outside submitit, exits with ``128 + signal``. The requeued job reruns the same command,
which resumes in the run folder.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``previous`` is the handler it displaced."""

    def __init__(self, signum: int, where: str, previous: Any = None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after {where}")
        self.signum, self.previous = signum, previous

    def hand_over(self) -> None:
        """Run the handler that was there before (submitit's: requeue, then exit), else exit ``128 + signal``."""
        if callable(self.previous):
            self.previous(self.signum, None)  # submitit: dump the resubmission, requeue, sys.exit(-1)
        sys.exit(128 + self.signum)


def _signals() -> list[int]:
    """SIGTERM (``kill``, ``scancel``, pre-emption) and the signal submitit uses for pre-emption/timeout."""
    sigs = [signal.SIGTERM]
    try:
        from submitit.core.job_environment import JobEnvironment

        sigs.append(JobEnvironment._usr_sig())
    except (ImportError, RuntimeError):
        sigs.append(signal.SIGUSR2)
    return list(dict.fromkeys(sigs))


class StopOnSignal:
    """Context manager: while active, the stop signals set :attr:`signum` instead of acting at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for sig in _signals():
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def interrupted(self, where: str) -> Interrupted:
        """The exception to raise once the checkpoint is written.

        A process of a multi-process run that did not get the signal itself (another rank did) stops as if
        it had got SIGTERM.
        """
        signum = self.signum if self.signum is not None else signal.SIGTERM
        return Interrupted(signum, where, self._previous.get(signum))
