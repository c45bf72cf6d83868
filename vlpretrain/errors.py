"""The project's user-facing error types.

A :class:`UserError` means the input (a file, a config field, a command-line argument) is wrong, not the code: the
command line prints its message on one line and exits with status 2, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message names the file, key or field at fault."""


class TrainingDiverged(RuntimeError):
    """A training run stopped itself (too many non-finite steps in a row); the message names the step."""
