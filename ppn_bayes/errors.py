"""User-facing errors.

Every problem a user can cause (a typo in a recipe, a missing file, a size out of range) raises a
:class:`PPNError` whose message is one line that names the problem and the fix.  The CLI prints it
as ``error: <message>`` and exits with status 2; Python users get the exception.  Anything else that
escapes is a bug in ppn-bayes, not in the user's input.
"""

from __future__ import annotations


class PPNError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(PPNError):
    """A recipe or option is wrong (unknown key, wrong type, value out of range)."""


class ModelError(PPNError):
    """A model cannot be found, loaded or is of an unsupported architecture."""


class DataError(PPNError):
    """A corpus is missing, empty or too short for the requested blocks."""


class SizeError(PPNError):
    """A requested size cannot be met."""


class RunError(PPNError):
    """A run directory is missing, incomplete, or belongs to another base model."""


class NumericalError(PPNError):
    """Training produced NaN/inf; the message names the term and the step."""


class OutputError(PPNError):
    """An output cannot be written: it would replace an input, holds files ppn-bayes did not write, is
    being written by another ppn process, or the file system refuses it (permission, read-only, full)."""
