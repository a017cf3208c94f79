"""Several machines: one Redis carries what hosts must share; each host keeps its own SQLite store.

`open_store(home)` is how every part of Cherry opens the run store. Without `CHERRY_REDIS_URL` it is
the single-machine `Store` (one SQLite file, nothing to start). With it, a `SharedStore`: the same
methods, but

- each run's row is a Redis hash (`cherry:run:<id>`). Every change goes through one Lua script that
  checks the run's status (and, for the dead-worker sweep, its heartbeat age) and writes in the same
  step, so two hosts never both take, end or cancel one run: no read-modify-write race;
- each run's metrics, samples, rollouts (one entry per step), events and log chunks are entries of its Redis stream
  (`cherry:stream:<id>`), appended by the run's own process with an approximate MAXLEN, so Redis
  memory stays bounded however long a run logs;
- reads first ingest what changed into this host's SQLite store, which stays the query engine (the
  app, `cherry ls/show/metrics/samples/logs`). The last stream id applied is written in the same
  transaction as the rows it produced, so ingest resumes where it stopped and re-reading a stream
  never duplicates a row; a front end that was offline catches up on its next read.

SQLite on a network filesystem is never involved: each SQLite file is written by processes of one host.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from engine.errors import CherryError
from jobs.home import cherry_home, store_path
from jobs.store import RunRow, Store, fresh_workers
from jobs.trust import mask_secrets, mask_url

log = logging.getLogger("cherry.worker")

PREFIX = "cherry"
STREAM_MAXLEN = int(os.environ.get("CHERRY_STREAM_MAXLEN", "20000"))  # entries kept per run in Redis
PAGE = 2000  # stream entries per read

log = logging.getLogger("cherry.shared")

# Set `fields` (JSON: name -> string, or null to clear) on run hash KEYS[1] when it exists (or, with
# ARGV[5] = "1", only when it does not: creation), its status is one of ARGV[3] (JSON list, "" = any)
# and its last heartbeat is older than ARGV[4] ("" = no condition). Bumps the global revision so
# front ends re-read just the runs that changed. Returns 1 when it wrote.
CHANGE_LUA = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[5] == '1' then
  if exists then return 0 end
elseif not exists then
  return 0
end
if ARGV[3] ~= '' then
  local status = redis.call('HGET', KEYS[1], 'status')
  local allowed = false
  for _, s in ipairs(cjson.decode(ARGV[3])) do
    if s == status then allowed = true end
  end
  if not allowed then return 0 end
end
if ARGV[4] ~= '' then
  local beat = redis.call('HGET', KEYS[1], 'heartbeat_at') or redis.call('HGET', KEYS[1], 'started_at') or '0'
  if tonumber(beat) >= tonumber(ARGV[4]) then return 0 end
end
for name, value in pairs(cjson.decode(ARGV[2])) do
  if value == cjson.null then redis.call('HDEL', KEYS[1], name) else redis.call('HSET', KEYS[1], name, value) end
end
local rev = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'rev', rev)
redis.call('ZADD', KEYS[2], rev, ARGV[1])
return 1
"""

# Append one entry to run KEYS[1]'s stream KEYS[2] with the run's next sequence number (a reader
# that sees a jump knows entries were trimmed before it read them); a metrics entry raises the
# run's step, a rewind sets it. Nothing is written for a run that was removed.
APPEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 't', ARGV[3], 'seq', seq, 'step', ARGV[4],
           'time', ARGV[5], 'data', ARGV[6])
if ARGV[7] == 'max' then
  local step = tonumber(redis.call('HGET', KEYS[1], 'step') or '0')
  if tonumber(ARGV[4]) > step then redis.call('HSET', KEYS[1], 'step', ARGV[4]) end
elseif ARGV[7] == 'set' then
  redis.call('HSET', KEYS[1], 'step', ARGV[4])
end
local rev = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'rev', rev)
redis.call('ZADD', KEYS[3], rev, ARGV[1])
return seq
"""


def redis_url() -> str | None:
    return os.environ.get("CHERRY_REDIS_URL") or None


def open_store(home: Path | None = None) -> Store:
    """This home's run store: the SQLite `Store`, or a `SharedStore` over Redis with CHERRY_REDIS_URL."""
    path = store_path(home or cherry_home())
    url = redis_url()
    return SharedStore(path, RedisState.connect(url)) if url else Store(path)


def _encode(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


_clients: dict[tuple[int, str, bool], Any] = {}
_patient = False  # see `ride_out_outages`
FRONT_END_CONNECT_S = 2.0  # a front end hears of an unreachable Redis within about twice this


def ride_out_outages() -> None:
    """This process (a worker, a run's child) waits for Redis: its first contact retries with backoff,
    saying so in its log, and its commands retry for about a minute. Front ends (the CLI, the app) do not:
    a refused or unreachable Redis is an error within seconds."""
    global _patient
    _patient = True


def redis_unreachable(err: BaseException) -> bool:
    """Whether `err` says Redis cannot be reached (refused, timed out, connection lost)."""
    try:
        import redis
    except ImportError:
        return False
    return isinstance(err, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))


def _unreachable_error(url: str, err: BaseException) -> CherryError:
    return CherryError(
        f"cannot reach Redis at {mask_url(url)} (CHERRY_REDIS_URL): {mask_secrets(str(err), url)}; start "
        "redis-server there, or unset CHERRY_REDIS_URL to use this machine's own queue and store"
    )


def _first_contact(url: str) -> None:
    """Ping once, failing fast; a patient process keeps trying with backoff, one log line per try."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    probe = redis.Redis.from_url(
        url,
        socket_connect_timeout=FRONT_END_CONNECT_S,
        socket_timeout=FRONT_END_CONNECT_S,
        retry=Retry(NoBackoff(), 0),
    )
    delay = 1.0
    try:
        while True:
            try:
                probe.ping()
                return
            except redis.exceptions.RedisError as err:
                if not _patient or not redis_unreachable(err):
                    raise _unreachable_error(url, err) from None
                # not the URL itself: it may hold a password
                log.warning("Redis (CHERRY_REDIS_URL) is unreachable (%s): trying again in %.0fs", err, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
    finally:
        probe.close()


class RedisState:
    """Run hashes, worker beats and per-run event streams in one Redis (thread-safe: one client per process)."""

    def __init__(self, client: Any, url: str) -> None:
        self.r = client
        self.url = url
        self._change = client.register_script(CHANGE_LUA)
        self._append = client.register_script(APPEND_LUA)

    @classmethod
    def connect(cls, url: str) -> "RedisState":
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        key = (os.getpid(), url, _patient)  # a forked process must not share its parent's sockets
        client = _clients.get(key)
        if client is None:
            _first_contact(url)
            # A worker or a run rides out a Redis restart: commands retry for about a minute before failing.
            # A front end tries once more, so that it answers within seconds.
            client = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=5 if _patient else FRONT_END_CONNECT_S,
                health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=4.0, base=0.2), 20 if _patient else 1),
                retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
            )
            _clients[key] = client
        return cls(client, url)

    # ------------------------------------------------------------------ keys

    def run_key(self, run_id: str) -> str:
        return f"{PREFIX}:run:{run_id}"

    def stream_key(self, run_id: str) -> str:
        return f"{PREFIX}:stream:{run_id}"

    INDEX, REV, WORKERS, EPOCH = f"{PREFIX}:runs", f"{PREFIX}:rev", f"{PREFIX}:workers", f"{PREFIX}:epoch"

    # ------------------------------------------------------------------ runs

    def change(
        self,
        run_id: str,
        fields: dict[str, Any],
        *,
        only_if: Iterable[str] | None = None,
        beat_before: float | None = None,
        create: bool = False,
    ) -> bool:
        encoded = json.dumps({name: _encode(value) for name, value in fields.items()})
        allowed = json.dumps(list(only_if)) if only_if is not None else ""
        beat = repr(float(beat_before)) if beat_before is not None else ""
        keys = [self.run_key(run_id), self.INDEX, self.REV]
        return bool(self._change(keys=keys, args=[run_id, encoded, allowed, beat, "1" if create else ""]))

    def get_many(self, run_ids: list[str]) -> list[dict[str, str] | None]:
        pipe = self.r.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(self.run_key(run_id))
        return [row or None for row in pipe.execute()]

    def delete(self, run_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(self.run_key(run_id), self.stream_key(run_id))
        pipe.zrem(self.INDEX, run_id)
        pipe.incr(self.REV)
        pipe.execute()

    def revision(self) -> tuple[int, str]:
        """The global revision (bumped by every change) and this Redis's epoch (new after a wipe)."""
        self.r.set(self.EPOCH, uuid.uuid4().hex, nx=True)
        pipe = self.r.pipeline(transaction=False)
        pipe.get(self.REV)
        pipe.get(self.EPOCH)
        rev, epoch = pipe.execute()
        return int(rev or 0), epoch

    def changed_since(self, rev: int) -> list[str]:
        return self.r.zrangebyscore(self.INDEX, f"({rev}", "+inf")

    def all_ids(self) -> set[str]:
        return set(self.r.zrange(self.INDEX, 0, -1))

    # ------------------------------------------------------------------ streams

    def append(self, run_id: str, kind: str, step: int | None, at: float, data: str, step_mode: str = "") -> bool:
        keys = [self.run_key(run_id), self.stream_key(run_id), self.INDEX, self.REV]
        args = [run_id, STREAM_MAXLEN, kind, "" if step is None else int(step), repr(at), data, step_mode]
        return bool(self._append(keys=keys, args=args))

    def read(self, after: dict[str, str]) -> dict[str, list[tuple[str, dict[str, str]]]]:
        """Entries after each run's last applied id, oldest first."""
        out: dict[str, list[tuple[str, dict[str, str]]]] = {run_id: [] for run_id in after}
        todo = dict(after)
        while todo:
            pipe = self.r.pipeline(transaction=False)
            for run_id, last in todo.items():
                pipe.xrange(self.stream_key(run_id), f"({last}" if last else "-", "+", count=PAGE)
            pages = pipe.execute()
            following = {}
            for (run_id, _), page in zip(todo.items(), pages):
                out[run_id] += page
                if len(page) == PAGE:
                    following[run_id] = page[-1][0]
            todo = following
        return out

    # ------------------------------------------------------------------ workers

    def worker_beat(self, worker_id: str, row: dict[str, Any]) -> None:
        self.r.hset(self.WORKERS, worker_id, json.dumps(row))

    def remove_worker(self, worker_id: str) -> None:
        self.r.hdel(self.WORKERS, worker_id)

    def workers(self) -> list[dict[str, Any]]:
        return [json.loads(value) for value in self.r.hvals(self.WORKERS)]


class SharedStore(Store):
    """`Store`'s methods over Redis: shared state and streams there, queries on this host's SQLite copy."""

    shared = True

    def __init__(self, path: str | Path, state: RedisState) -> None:
        super().__init__(path)
        self.state = state
        self._types = {name: typ for name, typ in self.db["runs"].columns_dict.items()}

    # ------------------------------------------------------------------ run rows

    def _insert_run(self, row: dict[str, Any]) -> None:
        if not self.state.change(row["id"], row, create=True):
            raise RunIdTaken(row["id"])

    def _decode(self, raw: dict[str, str]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for name, typ in self._types.items():
            value = raw.get(name)
            if value is not None and typ is int:
                value = int(float(value))
            elif value is not None and typ is float:
                value = float(value)
            row[name] = value
        return row

    def get_run(self, run_id: str) -> RunRow | None:
        (raw,) = self.state.get_many([run_id])
        if raw is None:
            return None
        row = self._decode(raw)
        return RunRow.from_row(row)

    def change_run(
        self,
        run_id: str,
        fields: dict[str, Any],
        *,
        only_if: Iterable[str] | None = None,
        beat_before: float | None = None,
    ) -> bool:
        return self.state.change(run_id, fields, only_if=only_if, beat_before=beat_before)

    def find_runs(self, text: str) -> list[RunRow]:
        self.sync_runs()
        return super().find_runs(text)

    def list_runs(self, statuses: Iterable[str] | None = None, experiment: str | None = None) -> list[RunRow]:
        self.sync_runs()
        return super().list_runs(statuses, experiment)

    def dependents(self, run_id: str) -> list[RunRow]:
        self.sync_runs()
        return super().dependents(run_id)

    def delete_run(self, run_id: str) -> None:
        self.state.delete(run_id)
        super().delete_run(run_id)
        with self._write():
            self.db.execute("DELETE FROM shared_runs WHERE run_id = ?", [run_id])

    def sync_runs(self) -> None:
        """Bring this host's copy of the run rows up to date: only runs changed since the last sync."""
        rev, epoch = self.state.revision()
        meta = dict(
            self.db.execute("SELECT key, value FROM meta WHERE key IN ('shared_rev', 'shared_epoch')").fetchall()
        )
        known_epoch = meta.get("shared_epoch")
        if known_epoch is not None and known_epoch != epoch:
            self._restore_lost_runs()  # Redis lost its data (restarted without persistence)
            meta = {}
        known = int(meta.get("shared_rev", 0))
        if rev == known and known_epoch == epoch:
            return
        changed = self.state.changed_since(known if rev >= known else 0)
        rows = [self._decode(raw) for raw in self.state.get_many(changed) if raw is not None]
        alive = self.state.all_ids()
        with self._write():
            for row in rows:
                self.db["runs"].upsert(row, pk="id")
                self.db.execute(
                    "INSERT INTO shared_runs (run_id, rev) VALUES (?, ?) ON CONFLICT(run_id) DO UPDATE SET rev = excluded.rev",
                    [row["id"], row.get("rev") or 0],
                )
            gone = [r[0] for r in self.db.execute("SELECT run_id FROM shared_runs").fetchall() if r[0] not in alive]
            for run_id in gone:  # removed by another host
                Store.delete_run(self, run_id)
                self.db.execute("DELETE FROM shared_runs WHERE run_id = ?", [run_id])
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('shared_rev', ?)", [str(rev)])
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('shared_epoch', ?)", [epoch])

    def _restore_lost_runs(self) -> None:
        """Put back the runs this host knows and Redis lost; a run another host restored first is kept."""
        for run in Store.list_runs(self):
            row = {k: v for k, v in run.row.items() if v is not None}
            self.state.change(run.id, row, create=True)
        with self._write():  # the streams start over: positions and sequence numbers restart
            self.db.execute("UPDATE shared_runs SET stream_id = NULL, seq = 0, rev = 0")

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
        now = time.time()
        known = next((w for w in self.state.workers() if w["id"] == worker_id), None)
        self.state.worker_beat(
            worker_id,
            {
                "id": worker_id,
                "host": host,
                "pid": pid,
                "slots": slots,
                "busy": busy,
                "queue": queue,
                "free": free,
                "gpus": gpus,
                "started_at": known["started_at"] if known else now,
                "heartbeat_at": now,
            },
        )

    def remove_worker(self, worker_id: str) -> None:
        self.state.remove_worker(worker_id)

    def live_workers(self, stale_after: float = 30.0) -> list[dict[str, Any]]:
        rows = sorted(self.state.workers(), key=lambda w: w["started_at"])
        return fresh_workers(rows, stale_after)

    # ------------------------------------------------------------------ the run's process writes

    def add_metrics(self, run_id: str, step: int, metrics: dict[str, float], wall_time: float | None = None) -> None:
        numbers = {name: float(value) for name, value in metrics.items() if isinstance(value, (int, float))}
        at = time.time() if wall_time is None else wall_time
        self.state.append(run_id, "metrics", step, at, json.dumps(numbers), "max")

    def add_samples(self, run_id: str, step: int, samples: list[dict[str, Any]]) -> None:
        self.state.append(run_id, "samples", step, time.time(), json.dumps(samples, ensure_ascii=False, default=str))

    def add_rollouts(self, run_id: str, step: int, records: list[dict[str, Any]]) -> None:
        """One stream entry per step (`log_rollouts: N` bounds its size); its run directory keeps the shard."""
        self.state.append(run_id, "rollouts", step, time.time(), json.dumps(records, ensure_ascii=False, default=str))

    def add_event(self, run_id: str, kind: str, message: str, **data: Any) -> None:
        body = {"kind": kind, "message": message, "data": data}
        self.state.append(run_id, "event", None, time.time(), json.dumps(body, ensure_ascii=False, default=str))

    def add_log(self, run_id: str, text: str) -> None:
        self.state.append(run_id, "log", None, time.time(), text)

    def rewind(self, run_id: str, step: int) -> None:
        self.state.append(run_id, "rewind", max(step, 0), time.time(), "", "set")

    # ------------------------------------------------------------------ front ends read

    def metrics(self, run_id: str, **kwargs: Any) -> list[dict[str, Any]]:
        self.ingest([run_id])
        return super().metrics(run_id, **kwargs)

    def metric_at_step(self, run_ids: Iterable[str], name: str, step: int) -> dict[str, float]:
        ids = list(run_ids)
        self.ingest(ids)
        return super().metric_at_step(ids, name, step)

    def metric_names(self, run_id: str) -> list[str]:
        self.ingest([run_id])
        return super().metric_names(run_id)

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        self.ingest([run_id])
        return super().latest_metrics(run_id)

    def latest_metrics_many(self, run_ids: list[str]) -> dict[str, dict[str, float]]:
        self.ingest(run_ids)  # every run's stream in one round trip
        return {run_id: Store.latest_metrics(self, run_id) for run_id in run_ids}

    def samples(self, run_id: str, step: int | None = None) -> list[dict[str, Any]]:
        self.ingest([run_id])
        return super().samples(run_id, step)

    def sample_steps(self, run_id: str) -> list[int]:
        self.ingest([run_id])
        return super().sample_steps(run_id)

    def events(self, run_id: str) -> list[dict[str, Any]]:
        self.ingest([run_id])
        return super().events(run_id)

    def rollouts(self, run_id: str) -> list[dict[str, Any]]:
        self.ingest([run_id])
        return super().rollouts(run_id)

    def log_text(self, run_id: str) -> str:
        self.ingest([run_id])
        return super().log_text(run_id)

    def ingest(self, run_ids: Iterable[str]) -> None:
        """Apply each run's new stream entries to this host's store, once each, in order."""
        wanted = list(dict.fromkeys(run_ids))
        if not wanted:
            return
        entries = self.state.read(self._positions(wanted))
        if not any(entries.values()):
            return
        with self._write():
            # Read the positions again inside the write transaction: another process of this host
            # may have applied some of these entries since; those are skipped, never applied twice.
            for run_id, (last, seq) in self._positions(list(entries), with_seq=True).items():
                applied = False
                for entry_id, fields in entries[run_id]:
                    if last and _id_key(entry_id) <= _id_key(last):
                        continue
                    try:
                        number = int(fields["seq"])
                        self._check_entry(fields)
                    except (KeyError, TypeError, ValueError) as err:  # not what a Cherry process writes
                        log.warning("skipped malformed stream entry %s of run %s: %s", entry_id, run_id, err)
                        last, applied = entry_id, True
                        continue
                    if number > seq + 1:
                        self._insert_event(
                            run_id,
                            float(fields["time"]),
                            "gap",
                            (
                                f"{number - seq - 1} live event(s) were trimmed from Redis before this host read them; "
                                "the run directory's metrics.jsonl and events.jsonl have everything"
                            ),
                            "{}",
                        )
                    self._apply(run_id, fields)
                    last, seq, applied = entry_id, number, True
                if applied:
                    self.db.execute(
                        "INSERT INTO shared_runs (run_id, rev, stream_id, seq) VALUES (?, 0, ?, ?) "
                        "ON CONFLICT(run_id) DO UPDATE SET stream_id = excluded.stream_id, seq = excluded.seq",
                        [run_id, last, seq],
                    )

    def _positions(self, run_ids: list[str], with_seq: bool = False) -> dict[str, Any]:
        rows = dict.fromkeys(run_ids, (None, 0))
        marks = ", ".join("?" * len(run_ids))
        for run_id, stream_id, seq in self.db.execute(
            f"SELECT run_id, stream_id, seq FROM shared_runs WHERE run_id IN ({marks})", run_ids
        ).fetchall():
            rows[run_id] = (stream_id, seq or 0)
        return rows if with_seq else {run_id: last for run_id, (last, _) in rows.items()}

    @staticmethod
    def _check_entry(fields: dict[str, str]) -> None:
        """Raise ValueError (or KeyError, TypeError) for an entry `_apply` could not apply."""
        kind, data = fields["t"], fields["data"]
        float(fields["time"])
        int(fields["step"]) if fields.get("step") else 0
        if kind in ("metrics", "event"):
            body = json.loads(data)
            if not isinstance(body, dict) or (kind == "event" and not {"kind", "message", "data"} <= body.keys()):
                raise ValueError(f"a {kind} entry whose data is not the object Cherry writes")
            if kind == "metrics" and not all(isinstance(v, (int, float)) for v in body.values()):
                raise ValueError("a metrics entry with a value that is not a number")
        elif kind in ("samples", "rollouts"):
            rows = json.loads(data)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError(f"a {kind} entry whose data is not a list of objects")

    def _apply(self, run_id: str, fields: dict[str, str]) -> None:
        kind, at, data = fields["t"], float(fields["time"]), fields["data"]
        step = int(fields["step"]) if fields.get("step") else 0
        if kind == "metrics":
            Store.add_metrics(self, run_id, step, json.loads(data), wall_time=at)
        elif kind == "samples":
            Store.add_samples(self, run_id, step, json.loads(data))
        elif kind == "rollouts":
            self._insert_rollouts(run_id, step, data)
        elif kind == "event":
            body = json.loads(data)
            self._insert_event(run_id, at, body["kind"], body["message"], json.dumps(body["data"], ensure_ascii=False))
        elif kind == "log":
            Store.add_log(self, run_id, data, at)
        elif kind == "rewind":
            Store.rewind(self, run_id, step)


class RunIdTaken(CherryError):
    """Another host created a run with this id first (same name, same second)."""
