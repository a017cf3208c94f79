"""Run a spec in this process (the `cherry train` path: quick use and debugging).

The run is recorded in the store like a queued one (status, metrics, samples, events), so
`cherry ls`, `cherry metrics` and the app show it; it just skips the queue and the worker.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Callable

from engine.errors import CherryError
from engine.reporting import MultiReporter, Reporter
from engine.spec import RunSpec
from jobs.home import cache_dir, cherry_home, new_run_id, store_path
from jobs.store import Store, StoreReporter, this_host
from jobs.worker import HEARTBEAT_SECONDS


def run_in_process(
    spec: RunSpec,
    out_dir: str | Path | None = None,
    reporter: Reporter | None = None,
    *,
    resume: bool = False,
    should_stop: Callable[[], bool | str | None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    from engine.train import train  # torch is imported only once a run really starts

    home = cherry_home()
    store = Store(store_path(home))  # a store that cannot be used is refused before a run directory is made
    run_dir = Path(out_dir).resolve() if out_dir else home / new_run_id(spec.display_name, home)
    run_id = run_dir.name if run_dir.parent == home else _outside_id(run_dir)
    if store.get_run(run_id) is None:
        store.create_run(run_id, spec.to_dict(), name=spec.display_name, out_dir=str(run_dir))
    store.set_status(run_id, "running", worker_host=this_host(), worker_pid=os.getpid(), pid=os.getpid(),
                     heartbeat_at=None, cancel_requested=0, error=None, finished_at=None)
    store.add_event(run_id, "worker", "running in the foreground (`cherry train`)")
    stopped = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(store.path, run_id, stopped), daemon=True)
    beat.start()
    reporters = [StoreReporter(store, run_id)] + ([reporter] if reporter is not None else [])
    status, error = "failed", None
    try:
        summary = train(spec, run_dir, MultiReporter(*reporters), should_stop=should_stop, cache_dir=cache_dir(), resume=resume)
        status = summary["status"]
        return run_dir, summary
    except KeyboardInterrupt:
        status, error = "interrupted", f"interrupted; continue with `cherry train --resume {run_dir}`"
        raise
    except CherryError as err:
        error = str(err)
        raise
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        stopped.set()
        beat.join()
        store.set_status(run_id, status, only_if=["running"], error=error)
        store.close()


def _outside_id(run_dir: Path) -> str:
    """A stable id for a run directory outside the home (so `--resume DIR` finds its row again)."""
    return f"{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:6]}"


def _heartbeat(path: Path, run_id: str, stopped: threading.Event) -> None:
    """Beat from a thread with its own connection (sqlite3 connections stay in their thread)."""
    store = Store(path)
    try:
        while not stopped.wait(HEARTBEAT_SECONDS):
            store.heartbeat(run_id)
    finally:
        store.close()
