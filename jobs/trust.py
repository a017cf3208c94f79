"""What Cherry checks before it trusts a name, a path or a URL, and how it keeps secrets to itself.

- run ids: one path component of letters, digits, `_`, `.` and `-` (never `/`, never a leading dot), so a run
  directory is always `<root>/<id>` and nothing a store row says can move it elsewhere;
- URLs: a password in one (`redis://:secret@host`) is shown as `***` wherever Cherry prints or stores it;
- files: Cherry's processes create files 0600 and directories 0700 unless the user's umask is stricter.

Torch-free and light: the CLI, the worker and the run's process all import it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from engine.errors import CherryError

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
PRIVATE_UMASK = 0o077


class UntrustedValue(CherryError):
    """A value from the store or the queue that Cherry refuses to act on (a malformed run id)."""


def check_run_id(run_id: object) -> str:
    """`run_id` when it is a safe single path component, else UntrustedValue naming it."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise UntrustedValue(
            f"run id {run_id!r} is not a Cherry run id (letters, digits, '_', '.', '-'; no '/'); refused"
        )
    return run_id


def derived_run_dir(root: Path, run_id: str) -> Path:
    """The directory of `run_id` under `root` (a home or $CHERRY_ARTIFACTS): the only place a run's files go."""
    return Path(root) / check_run_id(run_id)


def mask_url(url: str | None) -> str:
    """`url` with its password (and a lone user token) replaced by ***: safe to print, log or store."""
    if not url:
        return url or ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if "@" not in parts.netloc:
        return url
    credentials, _, host = parts.netloc.rpartition("@")
    user, colon, _password = credentials.partition(":")
    hidden = f"{user}:***" if colon else "***"
    return urlunsplit(parts._replace(netloc=f"{hidden}@{host}"))


def mask_secrets(text: str, *urls: str | None) -> str:
    """`text` with each of `urls` that occurs in it replaced by its masked form (error messages from clients)."""
    for url in urls:
        if url:
            text = text.replace(url, mask_url(url))
    return text


def keep_files_private() -> None:
    """Make this process (and the processes it starts) create files 0600 and directories 0700, unless the
    user's umask already hides more: store, samples, logs and caches can hold data and secrets."""
    current = os.umask(PRIVATE_UMASK)
    os.umask(current | PRIVATE_UMASK)
