"""Exceptions that carry a message meant for the user.

The CLI turns :class:`UserError` into one line on stderr and exit code 2, and
:class:`VerificationError` into exit code 1; anything else is a bug (exit code 3, traceback with --debug).
"""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), for one-line errors."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


class UserError(Exception):
    """Bad input: a file, key or value that is not what was expected (CLI exit code 2)."""


class VerificationError(Exception):
    """A library or artefact failed an integrity check (CLI exit code 1)."""
