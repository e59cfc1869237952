"""Exceptions that carry a message meant for the user.

The CLI turns :class:`UserError` into one line on stderr and exit code 2, and
:class:`VerificationError` into exit code 1; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a file, key or value that is not what was expected (CLI exit code 2)."""


class VerificationError(Exception):
    """A library or artefact failed an integrity check (CLI exit code 1)."""
