"""Cherry's home: where run directories, caches (and later the store and queue) live.

`$CHERRY_HOME` when set, else `runs/` under the current directory.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from pathlib import Path

from engine.errors import CherryError


class HomeError(CherryError):
    """Cherry's home, its run store or its queue file cannot be used; the message says which and why."""


def cherry_home() -> Path:
    home = Path(os.environ.get("CHERRY_HOME", "runs")).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise HomeError(f"Cherry's home {home} is a file, not a directory; set CHERRY_HOME to a directory") from None
    except OSError as err:
        raise HomeError(
            f"cannot create Cherry's home {home} ({err.strerror}); set CHERRY_HOME to a directory you can write"
        ) from None
    return home.resolve()


def read_only(path: Path) -> bool:
    """True when the file `path` or its directory cannot be written by this process."""
    path = Path(path)
    # SQLite writes its -wal and -shm files beside the database, so the directory counts too.
    return not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK))


def sqlite_file_error(path: Path, err: Exception, what: str, *, after_moving: str) -> HomeError:
    """One message for a SQLite file of the home that cannot be used: which file, why, and what to do.

    Cherry never repairs, replaces or deletes such a file; `after_moving` says what moving it aside
    gives the user (e.g. a new empty store, with every run directory still there).
    """
    path = Path(path)
    detail = str(err) or type(err).__name__
    if isinstance(err, PermissionError) or read_only(path) or "readonly" in detail or "read-only" in detail:
        where = f"Cherry's home {path.parent}" if not os.access(path.parent, os.W_OK) else "the file"
        return HomeError(
            f"{what} {path} cannot be written ({detail}): {where} is read-only for this user. "
            f"Make it writable (chmod u+w {path.parent} {path}) or set CHERRY_HOME to a directory you can write"
        )
    if isinstance(err, sqlite3.OperationalError) and "locked" in detail:
        return HomeError(
            f"{what} {path} stayed locked ({detail}): another process holds it. Wait for it or stop it "
            "(a stuck `cherry worker` or `cherry train`), then try again"
        )
    if isinstance(err, sqlite3.DatabaseError) and not isinstance(err, sqlite3.OperationalError):
        siblings = [
            p.name for p in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")) if p.exists()
        ]
        also = f" together with {' and '.join(siblings)}" if siblings else ""
        return HomeError(
            f"{what} {path} is damaged or not a Cherry file ({detail}). Cherry never overwrites it: move it aside"
            f"{also} (e.g. `mv {path} {path}.broken`); {after_moving}"
        )
    return HomeError(f"{what} {path} cannot be used ({detail}); check the file and its directory")


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
        except OSError as err:
            raise HomeError(
                f"cannot create the run directory {home / run_id} ({err.strerror}): Cherry's home {home} "
                f"must be writable (chmod u+w {home}), or set CHERRY_HOME to a directory you can write"
            ) from None


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


def runs_root(home: Path, shared: bool) -> Path:
    """Where this host puts run directories: $CHERRY_ARTIFACTS for a shared store when set, else the home.

    A run's directory is always `runs_root(...) / run_id` (jobs.trust.derived_run_dir): never a path read
    from a store row, so whoever can write the store cannot choose where a worker writes or what
    `cherry rm` deletes."""
    return (artifacts_root() if shared else None) or Path(home)


def cache_dir() -> Path:
    return cherry_home() / "cache"
