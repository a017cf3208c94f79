"""The run store's SQLite schema: each version's tables and columns, as the migrations that take a store
file from one version to the next (`MIGRATIONS[i]` takes version i to i + 1), and the sqlite-utils import."""

from __future__ import annotations

import types
from typing import Callable


def _import_sqlite_utils() -> types.ModuleType:
    """sqlite-utils imports pandas and numpy when they are installed, only to name column types for their
    values: about 2.5 s of CPU, most of what `cherry ls` would cost. The store declares its columns and
    writes plain Python values, so those two are hidden from that import unless something loaded them."""
    import sys

    hidden = [name for name in ("pandas", "numpy") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # importing it raises ImportError: sqlite-utils goes on without it
    try:
        import sqlite_utils
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return sqlite_utils


sqlite_utils = _import_sqlite_utils()


def _v1(db: sqlite_utils.Database) -> None:
    db["runs"].create(
        {
            "id": str,
            "name": str,
            "status": str,
            "algorithm": str,
            "model": str,
            "dataset": str,
            "spec": str,  # the full, validated RunSpec as JSON
            "parent": str,  # the run this one was chained after (`--after`), if any
            "priority": int,  # higher runs first; FIFO within a priority
            "created_at": float,
            "started_at": float,
            "finished_at": float,
            "heartbeat_at": float,
            "worker_host": str,
            "worker_pid": int,
            "pid": int,  # the worker and the run's own process
            "task_id": str,  # the Huey task carrying this run (to revoke a queued run)
            "cancel_requested": int,
            "resume": int,
            "attempts": int,
            "retries": int,
            "step": int,
            "total_steps": int,
            "error": str,
            "log_tail": str,
            "out_dir": str,
        },
        pk="id",
    )
    db["runs"].create_index(["status"])
    db["metrics"].create({"run_id": str, "step": int, "name": str, "value": float, "time": float})
    db["metrics"].create_index(["run_id", "step"])  # "since step N" reads while a run writes
    db["samples"].create({"run_id": str, "step": int, "prompt": str, "reference": str, "policy": str, "scores": str})
    db["samples"].create_index(["run_id", "step"])
    db["events"].create({"run_id": str, "time": float, "kind": str, "message": str, "data": str})
    db["events"].create_index(["run_id", "time"])


def _v2(db: sqlite_utils.Database) -> None:
    """Workers announce themselves, so front ends can tell whether anyone consumes the queue."""
    db["workers"].create(
        {
            "id": str,
            "host": str,
            "pid": int,
            "slots": int,
            "busy": int,
            "queue": str,
            "started_at": float,
            "heartbeat_at": float,
        },
        pk="id",
    )


def _v3(db: sqlite_utils.Database) -> None:
    """Several machines: which GPUs a run holds, where its directory was planned at submit and which
    host's disk holds it (a worker puts it under its own home), how far this store ingested each
    shared run's stream, and log text streamed from other hosts."""
    db["runs"].add_column("gpus", str)
    db["runs"].add_column("planned_dir", str)
    db["runs"].add_column("files_host", str)  # the host whose disk alone holds the run's directory
    db["shared_runs"].create({"run_id": str, "rev": int, "stream_id": str, "seq": int}, pk="run_id")
    # The run's process output, for hosts that do not have its log file (streamed by its worker).
    db["logs"].create({"run_id": str, "time": float, "text": str})
    db["logs"].create_index(["run_id"])


def _v4(db: sqlite_utils.Database) -> None:
    """Experiments: the group a run belongs to (a sweep's runs share one), the values its sweep point
    set, the early-stopping rule it follows, and the user's tags and note."""
    db["runs"].add_column("experiment", str)
    db["runs"].add_column("swept", str)  # JSON {key: value} of the sweep point
    db["runs"].add_column("prune", str)  # JSON {rule, metric, after} or null
    db["runs"].add_column("tags", str)  # JSON list of tags
    db["runs"].add_column("note", str)
    db["runs"].create_index(["experiment"])


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2, _v3, _v4]
SCHEMA_VERSION = len(MIGRATIONS)
