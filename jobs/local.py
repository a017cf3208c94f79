"""Run a spec in this process (the `cherry train` path: quick use and debugging).

The run is recorded in the store like a queued one (status, metrics, samples, events), so
`cherry ls`, `cherry metrics` and the app show it; it just skips the queue and the worker.

Ctrl+C: the first asks the run to stop after its current step, save a checkpoint and end
`interrupted` (so `cherry resume RUN` continues it exactly, on a worker); a second one quits at
once, without a new checkpoint. Either way the store records the run as interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.errors import CherryError
from engine.reporting import MultiReporter, Reporter
from engine.spec import RunSpec
from jobs.home import cache_dir, cherry_home, new_run_id
from jobs.reporters import build_reporters, check_report_to, close_all
from jobs.shared import open_store, ride_out_outages
from jobs.store import StoreReporter, this_host
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

    check_report_to(spec)  # a missing package is refused before anything is written
    home = cherry_home()
    store = open_store(home)  # a store that cannot be used is refused before a run directory is made
    if store.shared:  # reached: from here on this process runs a run, which rides out a Redis restart
        ride_out_outages()
        store.close()
        store = open_store(home)
    run_dir = Path(out_dir).resolve() if out_dir else home / new_run_id(spec.display_name, home)
    run_id = local_run_id(run_dir, home)
    if store.get_run(run_id) is None:
        store.create_run(run_id, spec.to_dict(), name=spec.display_name, out_dir=str(run_dir))
    store.set_status(
        run_id,
        "running",
        worker_host=this_host(),
        worker_pid=os.getpid(),
        pid=os.getpid(),
        files_host=this_host() if store.shared else None,
        heartbeat_at=None,
        cancel_requested=0,
        error=None,
        finished_at=None,
    )
    store.add_event(run_id, "worker", "running in the foreground (`cherry train`)")
    stopped = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(home, run_id, stopped), daemon=True)
    beat.start()
    ctrl_c = CtrlC()
    status, error = "failed", None
    extra: list = []  # report_to: TensorBoard, W&B
    try:
        extra = build_reporters(spec, run_dir, run_id=run_id)
        reporters = [StoreReporter(store, run_id), *extra] + ([reporter] if reporter is not None else [])
        with ctrl_c:
            summary = train(
                spec,
                run_dir,
                MultiReporter(*reporters),
                should_stop=ctrl_c.or_(should_stop),
                cache_dir=cache_dir(),
                resume=resume,
            )
        status = summary["status"]
        if status == "interrupted":
            error = (
                f"stopped by Ctrl+C at step {summary['step']} (checkpoint saved); continue with "
                f"`cherry resume {run_id}` (on a worker) or `cherry train --resume {run_dir}`"
            )
        return run_dir, summary
    except KeyboardInterrupt:
        status = "interrupted"
        error = (
            f"quit by a second Ctrl+C, without a new checkpoint; `cherry resume {run_id}` continues "
            "from the last one saved (or from the start)"
        )
        raise
    except CherryError as err:
        error = str(err)
        raise
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        with _ctrl_c_ignored():  # recording how the run ended is not interrupted in turn
            close_all(extra)
            stopped.set()
            beat.join()
            # A write cut short by Ctrl+C may have left this connection inside a transaction: closing
            # it rolls that back, and the ending is recorded on a fresh connection.
            store.close()
            store = open_store(home)
            if store.set_status(run_id, status, only_if=["running"], error=error) and status == "interrupted":
                store.add_event(run_id, "interrupted", error)
            store.close()


def run_launched_rank(spec: RunSpec, *, resume: bool = False) -> None:
    """A rank other than 0 of a run another launcher started (torchrun, accelerate launch, srun): it trains
    its share and records nothing. Rank 0's `cherry train` records the run in the store and writes its
    directory (the engine gives every rank rank 0's spec and run directory)."""
    from engine.train import train

    train(spec, Path("."), None, cache_dir=cache_dir(), resume=resume)


class CtrlC:
    """SIGINT in the foreground, while a run trains: the first asks for a stop at the next step (the
    engine's `should_stop` answers "interrupted"), the second raises KeyboardInterrupt at once.

    Installed only from the main thread (where Python delivers signals); elsewhere it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl+C: stopping after this step and saving a checkpoint (Ctrl+C again quits at once)",
            file=sys.stderr,
            flush=True,
        )

    def or_(self, other: Callable[[], bool | str | None] | None) -> Callable[[], bool | str | None]:
        """A `should_stop` that answers "interrupted" after Ctrl+C, else what `other` answers."""
        return lambda: "interrupted" if self.requested else (other() if other is not None else None)


@contextlib.contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def local_run_id(run_dir: Path, home: Path) -> str:
    """The store id of a foreground run: its directory's name in the home, else a stable id for a
    directory outside it (so `--resume DIR` finds its row again)."""
    run_dir = Path(run_dir).resolve()
    if run_dir.parent == home:
        return run_dir.name
    return f"{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:6]}"


def _heartbeat(home: Path, run_id: str, stopped: threading.Event) -> None:
    """Beat from a thread with its own connection (sqlite3 connections stay in their thread)."""
    store = open_store(home)
    try:
        while not stopped.wait(HEARTBEAT_SECONDS):
            store.heartbeat(run_id)
    finally:
        store.close()
