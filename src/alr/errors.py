"""Errors about a run's input or surroundings: the entry point prints them as one ``error:`` line."""

from __future__ import annotations


class RunError(RuntimeError):
    """A problem the user can fix (bad data, checkpoint, run folder, disk); the message says how."""


class CheckpointError(RunError):
    """A checkpoint that cannot be resumed from: truncated, foreign, or from another suite version."""


class DiskFullError(RunError):
    """The disk filled up while saving; the previous file is intact."""


class RunFolderConflict(RunError):
    """A run folder that holds a run of another config: a sweep reports it and goes on with its other jobs."""


class TeacherNotFinished(RunError):
    """A KD run whose teacher run has not finished: a sweep reports it and goes on with its other jobs."""
