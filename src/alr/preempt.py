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

Under SLURM a process leaves only once the job is requeued: a task that exits non-zero first makes ``srun``
(with ``KillOnBadExit=1``) end the step, killing rank 0 before it has requeued the job, or ending a
pre-empted job as failed before SLURM requeues it. So only rank 0 requeues (submitit's handler returns at
once on the other ranks), and a process whose handler returned waits for SLURM to end the step. Rank 0
finishes the logger only after the requeue, and within :data:`FINISH_TIMEOUT_S`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

# After ``scontrol requeue`` SLURM sends the job SIGTERM (which submitit ignores) and SIGKILL KillWait
# seconds later (30 by default): the W&B upload gets less than that; what it has not sent stays on disk.
FINISH_TIMEOUT_S = 20.0


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``previous`` is the handler it displaced."""

    def __init__(self, signum: int, where: str, previous: Any = None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after {where}")
        self.signum, self.previous = signum, previous
        self.logger: Any = None  # the run's logger, still open: finished here, after the requeue

    def hand_over(self, lead_s: float = 0.0) -> None:
        """Run the handler that was there before (submitit's: requeue), finish the logger, exit ``128 + signal``.

        Under SLURM, submitit's handler requeues the job and exits on rank 0 for USR2; it returns on the other
        ranks, and on every rank for SIGTERM (a pre-empted job is SLURM's to requeue, at the end of its grace
        time). Where it returns, the process waits for SLURM to end the job step, at most ``lead_s`` seconds
        (the launcher's ``signal_delay_s``), rather than exit before the job is requeued.
        """
        code = 128 + self.signum
        try:
            if callable(self.previous):
                self.previous(self.signum, None)  # submitit, rank 0, USR2: dump the resubmission, requeue, exit
        finally:
            if self.logger is not None and not self.logger.finish(code, timeout_s=FINISH_TIMEOUT_S):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # W&B's exit hook would wait for the upload that just timed out
        if callable(self.previous) and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            print(f"[alr] waiting up to {lead_s:.0f} s for SLURM to end the job step", file=sys.stderr)
            time.sleep(lead_s)  # a signal SLURM sends meanwhile (SIGTERM, SIGCONT: submitit's no-ops) does not cut it
        sys.exit(code)


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
