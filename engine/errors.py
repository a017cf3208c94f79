"""User-facing errors.

Anything a user can cause (a bad path, a misnamed column, an impossible value) is raised as a
`CherryError` whose message names the field and the fix. Front ends print the message and exit
non-zero; they never show a traceback for these.
"""

# The exit codes of a run's process (and of `cherry` itself), read by the worker: a user error (2) or running
# out of memory (3) is the run's own and is not retried; Ctrl+C ends the foreground with 130, as shells do.
USER_ERROR_EXIT = 2
OOM_EXIT = 3
INTERRUPTED_EXIT = 130


class CherryError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class SpecError(CherryError):
    """A run spec or preset field is unknown, mistyped or impossible; `field` names the setting when one is to blame
    (the app's form shows the message beside that field)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DataError(CherryError):
    """A dataset cannot be loaded or does not match the format the algorithm needs."""


class ModelError(CherryError):
    """A model or tokenizer cannot be loaded."""


def first_line(exc: BaseException) -> str:
    """A foreign exception (a parser's, a library's) as one short line to quote in a CherryError."""
    lines = str(exc).strip().splitlines()
    msg = lines[0] if lines else ""
    msg = msg if len(msg) <= 200 else msg[:197] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
