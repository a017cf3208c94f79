"""What the run store holds: the SQLite schema, as the migrations that take a store file from one version to
the next (`MIGRATIONS[i]` takes version i to i + 1); the statuses and sample kinds; the `RunRow` record of a
`runs` row and what its columns mean. `jobs.store.Store` reads and writes it."""

from __future__ import annotations

import json
import time
import types
from dataclasses import dataclass, field, fields
from typing import Any, Callable


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


def _v5(db: sqlite_utils.Database) -> None:
    """Online runs' training rollouts streamed from other hosts (Redis mode), one row per step: the step's
    records as a JSON list (engine/rollout_store.py). On one machine the run directory holds them."""
    db["rollouts"].create({"run_id": str, "step": int, "records": str})
    db["rollouts"].create_index(["run_id", "step"])


def _v6(db: sqlite_utils.Database) -> None:
    """Runs over several machines (`num_machines`): every machine of a run (its worker's host and GPUs), and
    why a queued run still waits (e.g. for more workers)."""
    db["runs"].add_column("machines", str)  # JSON list of {host, worker, gpus}, machine rank order
    db["runs"].add_column("waiting", str)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2, _v3, _v4, _v5, _v6]
SCHEMA_VERSION = len(MIGRATIONS)


# ---------------------------------------------------------------- what a row means


# What a sample row holds, by its `kind`: reference vs policy completions of one prompt (no kind),
# a preference pair with the method's reward of each side, or an unpaired completion with its label.
SAMPLE_KINDS = ("comparison", "preference", "unpaired")
# pruned: stopped early by its sweep's rule (its eval metric stayed below the median of its experiment)
STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted", "pruned")
ENDED = ("completed", "failed", "cancelled", "interrupted", "pruned")


def sample_kind(row: dict[str, Any]) -> str:
    """comparison (reference vs policy), preference (chosen vs rejected with rewards) or unpaired."""
    return row.get("kind") or "comparison"


@dataclass
class RunRow:
    """One row of `runs`, its columns as typed attributes (the JSON ones decoded); built by `from_row`.

    A column is None where the row holds no value (a queued run has no worker, no start time).
    `row` keeps the row exactly as stored, for what copies it whole (another host's store, `--json`)."""

    id: str
    status: str  # one of STATUSES
    spec: dict[str, Any]  # the full, validated RunSpec
    name: str | None
    algorithm: str | None
    model: str | None
    dataset: str | None
    parent: str | None  # the run this one was chained after (`--after`), if any
    priority: int | None  # higher runs first; FIFO within a priority
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    worker_host: str | None
    worker_pid: int | None
    pid: int | None  # the run's own process
    task_id: str | None  # the queue task carrying a queued run
    cancel_requested: int | None  # 1: stop at the next step
    resume: int | None  # 1: continue from the last checkpoint
    attempts: int | None
    retries: int | None
    step: int | None
    total_steps: int | None
    error: str | None
    log_tail: str | None
    out_dir: str | None
    gpus: str | None  # the GPUs it holds (held, once ended), e.g. "0,1"
    planned_dir: str | None  # its directory as planned at submit, until a worker places it
    files_host: str | None  # the host whose disk alone holds its directory (None: every host sees it)
    experiment: str | None
    swept: dict[str, Any]  # the values its sweep point set ({} for a run not from a sweep)
    prune: dict[str, Any] | None  # its sweep's early-stopping rule
    tags: list[str]
    note: str | None
    machines: list[dict[str, Any]]  # a run over several machines: each one's {host, worker, gpus}, by machine rank
    waiting: str | None  # why a queued run has not started (a gang waiting for workers)
    row: dict[str, Any] = field(repr=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRow:
        """The record of one `runs` row (a dict of its columns, as SQLite or the shared store gives it)."""
        row = dict(row)
        plain = {name: row.get(name) for name in _PLAIN_COLUMNS}
        return cls(
            **plain,
            spec=json.loads(row.get("spec") or "{}"),
            swept=json.loads(row.get("swept") or "{}"),
            prune=json.loads(row.get("prune") or "null"),
            tags=json.loads(row.get("tags") or "[]"),
            machines=json.loads(row.get("machines") or "[]"),
            row=row,
        )

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def waiting_for_parent(self) -> bool:
        """Queued after another run (`--after`) that has not completed yet: it has no queue task until then."""
        return bool(self.parent) and self.status == "queued" and not self.task_id

    @property
    def hosts(self) -> str:
        """Where it runs (ran): its worker's host and GPUs, or every machine's for a run over several."""
        if self.machines:
            return " + ".join(m["host"] + (f" GPU {m['gpus']}" if m.get("gpus") else "") for m in self.machines)
        return (self.worker_host or "") + (f" GPU {self.gpus}" if self.gpus else "")

    @property
    def location(self) -> str:
        """Where the run's files are, as a user on any host should read it: `host:path` for a directory on
        one worker's disk, the plain path when every host sees it."""
        if not self.out_dir:
            return "(on the disk of the worker that takes it)"
        return f"{self.files_host}:{self.out_dir}" if self.files_host else self.out_dir


_DECODED_COLUMNS = ("spec", "swept", "prune", "tags", "machines")
_PLAIN_COLUMNS = tuple(f.name for f in fields(RunRow) if f.name not in (*_DECODED_COLUMNS, "row"))


def status_fields(status: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The fields a move to `status` sets: the status itself and its start or finish time."""
    assert status in STATUSES, status
    fields = {**fields, "status": status}
    if status in ENDED:
        fields.setdefault("finished_at", time.time())
    if status == "running":
        fields.setdefault("started_at", time.time())
    return fields
