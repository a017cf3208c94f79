"""Pieces shared by the command-line modules."""

from __future__ import annotations

import functools

import typer

from jobs import CherryError


def friendly(fn):
    """User errors become one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CherryError as err:
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper
