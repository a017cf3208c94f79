"""The run store: one SQLite file (WAL mode) holding runs, their metrics, samples and events.

WAL lets many readers (the TUI, `cherry metrics --follow`) read while one process per run writes,
and readers never block that writer. Every connection waits up to `BUSY_TIMEOUT_S` for a lock
rather than failing, because several workers, the CLI and the app share the file.

A `Store` wraps one connection: open one per thread or process (sqlite3 connections are not
shared across threads). The schema carries a version; `jobs.store_schema.MIGRATIONS[i]` takes version i
to i + 1. That module also defines the statuses, the sample kinds and the `RunRow` record of a row; they are
imported from here (the names imported `as` themselves below).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sqlite3
import time
import types
from pathlib import Path
from typing import Any, Iterable

from jobs.home import HomeError, sqlite_file_error
from jobs.store_schema import ENDED as ENDED
from jobs.store_schema import MIGRATIONS, SCHEMA_VERSION, sqlite_utils, status_fields
from jobs.store_schema import SAMPLE_KINDS as SAMPLE_KINDS
from jobs.store_schema import STATUSES as STATUSES
from jobs.store_schema import RunRow as RunRow
from jobs.store_schema import sample_kind as sample_kind

BUSY_TIMEOUT_S = 30.0


class StoreError(HomeError):
    """The run store file cannot be used (damaged, from a newer Cherry, read-only, locked)."""


AFTER_MOVING_STORE = (
    "Cherry then starts a new, empty store there, and every run directory beside it keeps its "
    "spec, metrics, samples, log and checkpoints"
)


def _explained(method):
    """Turn a SQLite failure inside a Store method into one message naming the store file and the fix."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as err:
            error = sqlite_file_error(self.path, err, "the run store", after_moving=AFTER_MOVING_STORE)
            raise StoreError(str(error)) from err

    return wrapper


class Store:
    """The single-machine store, and the interface of every store (`jobs.shared.open_store` picks one)."""

    shared = False  # True for a store whose state lives in Redis (jobs.shared.SharedStore)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db: sqlite_utils.Database | None = None
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if self.db.journal_mode != "wal":
                self.db.enable_wal()
            self.db.execute("PRAGMA synchronous = NORMAL")  # safe under WAL; a crash loses at most the last commit
            self._migrate()
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        if self.db is not None:
            self.db.conn.close()

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> None:
        # Read the version before taking a write lock: a store from a newer Cherry, or one that is
        # already current, is never written to here.
        version = self._stored_version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the run store {self.path} was written by a newer Cherry (schema version {version}; this Cherry "
                f"reads up to {SCHEMA_VERSION}) and is left as it is. Upgrade Cherry (pip install -U cherry-rlhf, "
                "or update your checkout), or set CHERRY_HOME to another directory for this version"
            )
        if version == SCHEMA_VERSION:
            return
        with self._write():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            version = self._stored_version()  # another process may have migrated meanwhile
            for migrate in MIGRATIONS[version:]:
                migrate(self.db)
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    def _stored_version(self) -> int:
        if not self.db["meta"].exists():
            return 0
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    def _write(self):
        """One write transaction, taken up front so concurrent writers queue instead of deadlocking."""
        return _Transaction(self.db.conn)

    # ------------------------------------------------------------------ runs

    def create_run(
        self,
        run_id: str,
        spec: dict[str, Any],
        *,
        name: str,
        out_dir: str | None,
        parent: str | None = None,
        priority: int = 0,
        retries: int = 0,
        planned_dir: str | None = None,
        experiment: str | None = None,
        swept: dict[str, Any] | None = None,
        prune: dict[str, Any] | None = None,
    ) -> RunRow:
        """A queued run. Without `out_dir` the worker that takes it puts its directory under its own home
        (`planned_dir` then stands for it in the specs of runs chained after it, until it is placed)."""
        row = {
            "id": run_id,
            "name": name,
            "status": "queued",
            "algorithm": spec.get("algorithm"),
            "model": spec.get("model"),
            "dataset": spec.get("dataset"),
            "spec": json.dumps(spec),
            "parent": parent,
            "priority": priority,
            "created_at": time.time(),
            "out_dir": out_dir,
            "planned_dir": planned_dir or out_dir,
            "cancel_requested": 0,
            "resume": 0,
            "attempts": 0,
            "retries": retries,
            "step": 0,
            "total_steps": 0,
            "experiment": experiment,
            "swept": json.dumps(swept) if swept else None,
            "prune": json.dumps(prune) if prune else None,
        }
        self._insert_run(row)
        return self.get_run(run_id)

    def _insert_run(self, row: dict[str, Any]) -> None:
        with self._write():
            self.db["runs"].insert(row)

    def get_run(self, run_id: str) -> RunRow | None:
        rows = list(self.db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
        return RunRow.from_row(rows[0]) if rows else None

    def find_runs(self, text: str) -> list[RunRow]:
        """Runs whose id equals `text`, else those whose id or name contains it."""
        exact = self.get_run(text)
        if exact is not None:
            return [exact]
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"  # all literal
        where = "id LIKE ? ESCAPE '\\' OR name LIKE ? ESCAPE '\\'"
        rows = self.db.query(f"SELECT * FROM runs WHERE {where} ORDER BY created_at", [pattern, pattern])
        return [RunRow.from_row(row) for row in rows]

    def list_runs(self, statuses: Iterable[str] | None = None, experiment: str | None = None) -> list[RunRow]:
        statuses = list(statuses or [])
        clauses = [f"status IN ({', '.join('?' * len(statuses))})"] if statuses else []
        params: list[Any] = list(statuses)
        if experiment is not None:
            clauses.append("experiment = ?")
            params.append(experiment)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.db.query(f"SELECT * FROM runs {where} ORDER BY created_at, rowid", params)
        return [RunRow.from_row(row) for row in rows]

    def update_run(self, run_id: str, **fields: Any) -> None:
        if "spec" in fields and not isinstance(fields["spec"], str):
            fields["spec"] = json.dumps(fields["spec"])
        self.change_run(run_id, fields)

    def set_status(
        self,
        run_id: str,
        status: str,
        *,
        only_if: Iterable[str] | None = None,
        beat_before: float | None = None,
        **fields: Any,
    ) -> bool:
        """Move a run to `status` (only from one of `only_if` when given, and only when its last heartbeat
        is older than `beat_before` when given); True when it moved."""
        return self.change_run(run_id, status_fields(status, fields), only_if=only_if, beat_before=beat_before)

    def change_run(
        self,
        run_id: str,
        fields: dict[str, Any],
        *,
        only_if: Iterable[str] | None = None,
        beat_before: float | None = None,
    ) -> bool:
        """Set `fields` in one step, only while the run's status is one of `only_if` (when given) and its
        last heartbeat is older than `beat_before` (when given); True when the run matched."""
        names = list(fields)
        sql = f"UPDATE runs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?"
        params = [fields[n] for n in names] + [run_id]
        if only_if is not None:
            allowed = list(only_if)
            sql += f" AND status IN ({', '.join('?' * len(allowed))})"
            params += allowed
        if beat_before is not None:
            sql += " AND COALESCE(heartbeat_at, started_at, 0) < ?"
            params.append(beat_before)
        with self._write():
            moved = self.db.execute(sql, params).rowcount
        return moved > 0

    def set_tags(self, run_id: str, tags: Iterable[str]) -> None:
        self.change_run(run_id, {"tags": json.dumps(sorted(set(tags))) if tags else None})

    def metric_at_step(self, run_ids: Iterable[str], name: str, step: int) -> dict[str, float]:
        """Each run's value of metric `name` logged at `step` (runs that have not reached it are left out)."""
        ids = list(run_ids)
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        sql = f"SELECT run_id, value FROM metrics WHERE name = ? AND step = ? AND run_id IN ({marks}) ORDER BY rowid"
        return {run_id: value for run_id, value in self.db.execute(sql, [name, step, *ids]).fetchall()}

    def heartbeat(self, run_id: str) -> None:
        self.change_run(run_id, {"heartbeat_at": time.time()})

    def delete_run(self, run_id: str) -> None:
        with self._write():
            for table in ("metrics", "samples", "events", "logs", "rollouts"):
                self.db.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            self.db.execute("DELETE FROM runs WHERE id = ?", [run_id])

    def dependents(self, run_id: str) -> list[RunRow]:
        """Runs chained after `run_id` that still wait for it (queued, not yet on the queue)."""
        rows = self.db.query(
            "SELECT * FROM runs WHERE parent = ? AND status = 'queued' AND task_id IS NULL ORDER BY created_at, rowid",
            [run_id],
        )
        return [RunRow.from_row(row) for row in rows]

    # ------------------------------------------------------------------ workers

    def worker_beat(
        self,
        worker_id: str,
        *,
        host: str,
        pid: int,
        slots: int,
        busy: int,
        queue: str,
        free: int = 0,
        gpus: bool = False,
    ) -> None:
        """Announce a live worker. `free` and `gpus` (what it has free now, and whether its slots are GPUs) are
        for the gang decision of runs over several machines, which needs Redis: this store keeps neither."""
        now = time.time()
        with self._write():
            self.db.execute(
                "INSERT INTO workers (id, host, pid, slots, busy, queue, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET busy = excluded.busy, "
                "heartbeat_at = excluded.heartbeat_at",
                [worker_id, host, pid, slots, busy, queue, now, now],
            )

    def remove_worker(self, worker_id: str) -> None:
        with self._write():
            self.db.execute("DELETE FROM workers WHERE id = ?", [worker_id])

    def live_workers(self, stale_after: float = 30.0) -> list[dict[str, Any]]:
        """Workers that beat within `stale_after` seconds (a killed worker stops beating); on this
        host, only those whose process is still there."""
        return fresh_workers(self.db.query("SELECT * FROM workers ORDER BY started_at"), stale_after)

    # ------------------------------------------------------------------ metrics, samples, events

    def add_metrics(self, run_id: str, step: int, metrics: dict[str, float], wall_time: float | None = None) -> None:
        now = time.time() if wall_time is None else wall_time
        rows = [
            {"run_id": run_id, "step": step, "name": name, "value": float(value), "time": now}
            for name, value in metrics.items()
            if isinstance(value, (int, float))
        ]
        with self._write():
            self.db["metrics"].insert_all(rows)
            self.db.execute("UPDATE runs SET step = MAX(COALESCE(step, 0), ?) WHERE id = ?", [step, run_id])

    def metrics(
        self,
        run_id: str,
        *,
        since_step: int = -1,
        after_id: int = 0,
        names: Iterable[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Rows {id, step, name, value, time} with step > since_step and id > after_id, in logging order.

        `id` only grows, so a follower passes the last id it saw to read just what is new.
        """
        sql = "SELECT rowid AS id, step, name, value, time FROM metrics WHERE run_id = ? AND step > ? AND rowid > ?"
        params: list[Any] = [run_id, since_step, after_id]
        names = list(names or [])
        if names:
            sql += f" AND name IN ({', '.join('?' * len(names))})"
            params += names
        return list(self.db.query(sql + " ORDER BY rowid", params))

    def metric_names(self, run_id: str) -> list[str]:
        return [
            r[0] for r in self.db.execute("SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", [run_id])
        ]

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """Each metric's most recent value."""
        rows = self.db.execute(
            "SELECT name, value FROM metrics WHERE rowid IN (SELECT MAX(rowid) FROM metrics WHERE run_id = ? GROUP BY name)",
            [run_id],
        )
        return {name: value for name, value in rows}

    def latest_metrics_many(self, run_ids: list[str]) -> dict[str, dict[str, float]]:
        return {run_id: self.latest_metrics(run_id) for run_id in run_ids}

    def add_samples(self, run_id: str, step: int, samples: list[dict[str, Any]]) -> None:
        rows = []
        for sample in samples:
            scores = {k: v for k, v in sample.items() if k not in ("prompt", "reference", "policy")}
            rows.append(
                {
                    "run_id": run_id,
                    "step": step,
                    "prompt": sample.get("prompt"),
                    "reference": sample.get("reference"),
                    "policy": sample.get("policy"),
                    "scores": json.dumps(scores, ensure_ascii=False),
                }
            )
        with self._write():
            self.db["samples"].insert_all(rows)

    def samples(self, run_id: str, step: int | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT step, prompt, reference, policy, scores FROM samples WHERE run_id = ?", [run_id]
        if step is not None:
            sql, params = sql + " AND step = ?", params + [step]
        out = []
        for row in self.db.query(sql + " ORDER BY rowid", params):
            extra = json.loads(row.pop("scores") or "{}")
            if extra.get("kind"):  # chosen vs rejected (or unpaired) rows have no reference/policy texts
                row = {k: v for k, v in row.items() if k not in ("reference", "policy") or v is not None}
            out.append({**row, **extra})
        return out

    def sample_steps(self, run_id: str) -> list[int]:
        return [
            r[0] for r in self.db.execute("SELECT DISTINCT step FROM samples WHERE run_id = ? ORDER BY step", [run_id])
        ]

    def add_rollouts(self, run_id: str, step: int, records: list[dict[str, Any]]) -> None:
        """Nothing on one machine: the run directory's rollouts/ holds them (`cherry rollouts` reads it there).
        A SharedStore streams them, and `_insert_rollouts` keeps them in each reading host's store."""

    def _insert_rollouts(self, run_id: str, step: int, records: str) -> None:
        with self._write():  # a step logged again (a resume replays it) replaces its earlier records
            self.db.execute("DELETE FROM rollouts WHERE run_id = ? AND step = ?", [run_id, step])
            self.db["rollouts"].insert({"run_id": run_id, "step": step, "records": records})

    def rollouts(self, run_id: str) -> list[dict[str, Any]]:
        """The rollout records this store holds for the run (streamed from another host), by step."""
        rows = self.db.execute("SELECT records FROM rollouts WHERE run_id = ? ORDER BY step, rowid", [run_id])
        return [record for (text,) in rows.fetchall() for record in json.loads(text)]

    def add_event(self, run_id: str, kind: str, message: str, **data: Any) -> None:
        self._insert_event(run_id, time.time(), kind, message, json.dumps(data, ensure_ascii=False, default=str))

    def _insert_event(self, run_id: str, at: float, kind: str, message: str, data: str) -> None:
        with self._write():
            self.db["events"].insert({"run_id": run_id, "time": at, "kind": kind, "message": message, "data": data})

    def add_log(self, run_id: str, text: str, at: float | None = None) -> None:
        with self._write():
            self.db["logs"].insert({"run_id": run_id, "time": time.time() if at is None else at, "text": text})

    def log_text(self, run_id: str) -> str:
        """The run's output as streamed by its worker (empty on one machine: the log file is here)."""
        return "".join(r[0] for r in self.db.execute("SELECT text FROM logs WHERE run_id = ? ORDER BY rowid", [run_id]))

    def events(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT time, kind, message, data FROM events WHERE run_id = ? ORDER BY rowid", [run_id])
        return [{**row, "data": json.loads(row["data"] or "{}")} for row in rows]

    def rewind(self, run_id: str, step: int) -> None:
        """Forget metrics, samples and rollouts after `step` (a resumed run replays from its checkpoint)."""
        with self._write():
            self.db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", [run_id, step])
            self.db.execute("DELETE FROM samples WHERE run_id = ? AND step > ?", [run_id, step])
            self.db.execute("DELETE FROM rollouts WHERE run_id = ? AND step > ?", [run_id, step])
            self.db.execute("UPDATE runs SET step = ? WHERE id = ?", [max(step, 0), run_id])


for _name, _method in list(vars(Store).items()):
    if isinstance(_method, types.FunctionType) and _name not in ("close", "_write"):
        setattr(Store, _name, _explained(_method))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self):
        if self.conn.in_transaction:  # nested use: the outer transaction commits
            self.nested = True
            return self
        self.nested = False
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.nested:
            return
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


class StoreReporter:
    """The engine's reporter for a run executed by a worker: everything goes to the store.

    (The engine writes the run directory's JSONL files itself, so a run dir stays self-contained.)
    """

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.store.add_metrics(self.run_id, step, metrics)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.store.add_samples(self.run_id, step, samples)

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        self.store.add_rollouts(self.run_id, step, records)

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        self.store.add_event(self.run_id, kind, message, **data)
        if kind == "start" and data.get("total_steps"):
            self.store.update_run(self.run_id, total_steps=int(data["total_steps"]))

    def rewind(self, step: int) -> None:
        self.store.rewind(self.run_id, step)


def fresh_workers(rows: Iterable[dict[str, Any]], stale_after: float) -> list[dict[str, Any]]:
    """Workers that beat within `stale_after` seconds; on this host, only those whose process is there."""
    cutoff = time.time() - stale_after
    host = this_host()
    return [w for w in rows if w["heartbeat_at"] >= cutoff and (w["host"] != host or pid_alive(w["pid"]))]


def this_host() -> str:
    """This machine's name in `host:path` and in worker heartbeats: $CHERRY_HOST, else the hostname
    (set it where containers on different machines would share a hostname)."""
    return os.environ.get("CHERRY_HOST") or socket.gethostname()


def pid_alive(pid: int | None) -> bool:
    """True when process `pid` exists and is not a zombie (an unreaped dead process)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # where /proc exists, a zombie is dead: in a container nobody may ever reap it
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True
