"""Cherry's home: where run directories, caches (and later the store and queue) live.

`$CHERRY_HOME` when set, else `runs/` under the current directory.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path


def cherry_home() -> Path:
    home = Path(os.environ.get("CHERRY_HOME", "runs")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home.resolve()


def new_run_id(label: str, home: Path | None = None) -> str:
    """A sortable, readable, unique id such as `20261121-194501-dpo-demo`; its run directory is created.

    Creating the directory is what reserves the id, so processes submitting at the same second
    never get the same one.
    """
    home = home or cherry_home()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")[:40] or "run"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    run_id, n = base, 1
    while True:
        try:
            (home / run_id).mkdir(parents=True)
            return run_id
        except FileExistsError:
            n += 1
            run_id = f"{base}-{n}"


def store_path(home: Path | None = None) -> Path:
    """The run store: runs, metrics, samples and events of every run in this home."""
    return (home or cherry_home()) / "cherry.db"


def artifacts_root() -> Path | None:
    """$CHERRY_ARTIFACTS: a directory every host sees (NFS, a mounted bucket) for run directories.

    Unset, a run's directory is on the disk of the worker that runs it, under that worker's home."""
    value = os.environ.get("CHERRY_ARTIFACTS")
    if not value:
        return None
    path = Path(value).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def cache_dir() -> Path:
    return cherry_home() / "cache"
