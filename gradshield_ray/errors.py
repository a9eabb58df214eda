"""Errors of the Ray pipeline that a user sees (a run that cannot proceed, a failed Ray Data execution)."""
from __future__ import annotations


class RunError(RuntimeError):
    """The run cannot proceed (mismatched output prefix, lost rows, bad input)."""


class DatasetFailed(RunError):
    """A Ray Data execution failed; the message carries the original exception's type and text."""
