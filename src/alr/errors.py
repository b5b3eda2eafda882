"""Errors about a run's input or surroundings: the entry point prints them as one ``error:`` line."""

from __future__ import annotations


class RunError(RuntimeError):
    """A problem the user can fix (bad data, checkpoint, run folder, disk); the message says how."""


class CheckpointError(RunError):
    """A checkpoint that cannot be resumed from: truncated, foreign, or from another suite version."""


class DiskFullError(RunError):
    """The disk filled up while saving; the previous file is intact."""


class Refused(RunError):
    """A run refused before it wrote anything, for a reason of its own: a sweep goes on with its other jobs,
    then exits 1 naming it (:mod:`alr.sweep`)."""


class RunFolderConflict(Refused):
    """A run folder that holds a run of another config."""


class TeacherNotFinished(Refused):
    """A KD run whose teacher run has not finished (Table 4 trains the teachers first)."""
