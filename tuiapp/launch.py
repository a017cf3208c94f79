"""`cherry demo` in the app: queue the demo run and make sure a worker will execute it.

The worker is started detached (its own session, output in `$CHERRY_HOME/worker.log`), so the
run keeps going when the app quits; reopening the app shows it as it is. Torch-free.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from jobs import CherryError
from jobs.store import pid_alive

WORKER_LOG = "worker.log"
WORKER_PID = "worker.pid"  # the last worker this module started (covers the seconds before its first heartbeat)
STARTING_S = 30.0


def demo_methods() -> list[str]:
    from engine.spec import demo_dir

    return sorted(p.stem for p in demo_dir().glob("*.yaml"))


def demo_spec(method: str, overrides: list[str]):
    """The demo run `method` (presets/demo/METHOD.yaml) with `--set` overrides, validated."""
    from engine.spec import demo_dir, resolve_spec

    if not (demo_dir() / "model").exists():
        raise CherryError(f"the demo model is missing under {demo_dir()}; build it with `cherry demo build`")
    methods = demo_methods()
    if method not in methods:
        raise CherryError(f"--method {method!r} has no demo run; choose one of: {', '.join(methods)}")
    return resolve_spec(str(demo_dir() / f"{method}.yaml"), overrides)


def live_workers(home: Path) -> list[dict]:
    """Workers consuming this home's queue now, and one this module started seconds ago (not beating yet)."""
    from jobs.runs import Jobs

    jobs = Jobs(home)
    try:
        workers = jobs.live_workers()
    finally:
        jobs.close()
    if workers:
        return workers
    pid_file = Path(home) / WORKER_PID
    try:
        pid, started = pid_file.read_text().split()
        if time.time() - float(started) < STARTING_S and pid_alive(int(pid)):
            return [{"pid": int(pid), "starting": True}]
    except (OSError, ValueError):
        pass
    return []


def start_worker(home: Path) -> int:
    """`cherry worker` for `home`, detached from this terminal; returns its pid."""
    home = Path(home)
    env = {**os.environ, "CHERRY_HOME": str(home)}
    with open(home / WORKER_LOG, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "tuiapp.cli", "worker"],  # -P: nothing planted in the cwd loads
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (home / WORKER_PID).write_text(f"{proc.pid} {time.time()}\n")
    return proc.pid


def ensure_worker(home: Path) -> int | None:
    """Start a worker unless one is live; the new worker's pid, or None when one was running."""
    if live_workers(home):
        return None
    return start_worker(home)


def launch_demo(home: Path, method: str = "dpo", overrides: list[str] | None = None, *, worker: bool = True):
    """Queue the demo run through the job queue; start a worker if none is live. Returns (run, worker pid or None)."""
    from jobs.runs import Jobs

    spec = demo_spec(method, list(overrides or []))
    jobs = Jobs(home)
    try:
        run = jobs.submit(spec)
    finally:
        jobs.close()
    pid = ensure_worker(home) if worker else None
    return run, pid
