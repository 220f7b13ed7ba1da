"""Errors a user can fix. The CLI prints them as one line and exits with status 2; the HTTP API
answers them with 4xx. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class DiffsearchError(Exception):
    """Base of the errors caused by the user's input or environment."""


class JobError(DiffsearchError):
    """A job file, flag or request is malformed; the message names the field."""


class StoreError(DiffsearchError):
    """The run folder or its Zarr store cannot be used (unwritable, corrupt, another job)."""


class DistillError(DiffsearchError):
    """Distillation cannot run as asked (bad steps, prompts, output folder)."""
