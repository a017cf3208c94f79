"""`cherry bench queue`: the several-machines set-up under load, on one machine, measured.

It starts its own redis-server on a free port and, as separate processes with their own homes and
host names (as separate machines would be):
- two workers (`worker-a`, `worker-b`), one run slot each;
- two front ends (`front-a`, `front-b`) that submit their share of the runs in one burst, at the
  same moment, with mixed priorities, through `Jobs.submit` (what `cherry submit` does);
- an observer front end in this process that polls like the app does and records how late it sees
  each run end and has its events in its own SQLite store;
- then a streamer process that keeps N synthetic runs logging metrics every 100 ms while the
  Textual app, headless in this process, reads the store and repaints: its frame time is measured.

What is real: Redis, Huey's priority queue, the Lua status transitions, the per-run streams, each
front end's SQLite ingest, the worker's supervision of one child process per run. What is not: the
child process is a stub that logs a few metrics and completes instead of training (200 trainings
do not fit on a laptop CPU). The stub is reachable only through `python -m benchmarks.queue_load`, and a
bench worker refuses any Redis but the bench's own (it checks a key the bench writes at start), so
it can never take a user's queued run. Those processes' code is in benchmarks/queue_load_roles.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.queue_load_roles import EXECUTIONS_KEY, OWNER_KEY, ROLES, TAKEN_KEY
from engine.errors import CherryError


@dataclass
class QueueBenchConfig:
    runs: int = 200  # split evenly over the front ends
    front_ends: int = 2
    workers: int = 2
    priorities: tuple[int, ...] = (0, 1, 5, 10)
    steps: int = 5  # metric rows each stub run logs
    streams: int = 8  # synthetic live runs while the app is measured
    stream_interval: float = 0.1
    app_seconds: float = 20.0
    drain_timeout: float = 900.0
    seed: int = 0


class RedisServerMissing(CherryError):
    """No redis-server (or no redis Python package) on this machine."""


def redis_server_missing() -> str | None:
    """Why the bench cannot run here, or None."""
    if not shutil.which("redis-server"):
        return "redis-server is not installed (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis Python package is not installed (pip install 'cherry[redis]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server on a free port, its data in `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        import redis

        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data_dir)]
        self.proc = subprocess.Popen(
            args + ["--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise CherryError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank rule; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values) if values else 0.0,
        "p95": percentile(values, 0.95),
        "max": max(values, default=0.0),
    }


def priority_inversions(taken: list[dict], queued: dict[str, dict]) -> dict[str, int]:
    """For each worker: pairs it took lower priority first although the higher one was already queued.

    `taken`: {"run", "worker", "at"} in the order tasks were taken, `at` the moment the queue pop that
    returned it began; `queued`: run id -> {"priority", "enqueued_at"} (the time `submit` returned, so
    the task was in the queue by then). Only pairs where the higher one was certainly queued before the
    pop began count; a run submitted later was not there to be chosen. Needs one slot per worker."""
    out: dict[str, int] = {}
    for worker in sorted({t["worker"] for t in taken}):
        order = [t for t in taken if t["worker"] == worker]
        count = 0
        for i, first in enumerate(order):
            for later in order[i + 1 :]:
                a, b = queued[first["run"]], queued[later["run"]]
                if a["priority"] < b["priority"] and b["enqueued_at"] < first["at"]:
                    count += 1
        out[worker] = count
    return out


# ---------------------------------------------------------------------- the roles' entry point (benchmarks/queue_load_roles.py)


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ROLES:
        print(
            "usage: python -m benchmarks.queue_load worker|child|submit|stream CONFIG_JSON (started by `cherry bench queue`)"
        )
        sys.exit(2)
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))


# ---------------------------------------------------------------------- the benchmark


class _Observer(threading.Thread):
    """A front end polling every 0.25 s: when it first sees each run ended, and has its events ingested."""

    def __init__(self, home: Path) -> None:
        super().__init__(daemon=True, name="bench-observer")
        self.home = home
        self.status_lag: dict[str, float] = {}
        self.ingest_lag: dict[str, float] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from jobs.shared import open_store

        store = open_store(self.home)
        try:
            while not self.stop.wait(0.25):
                ended = [r for r in store.list_runs(["completed"]) if r.id not in self.status_lag]
                seen = time.time()
                store.ingest([r.id for r in ended])
                ingested = time.time()
                for run in ended:
                    self.status_lag[run.id] = seen - run.row["finished_at"]
                    self.ingest_lag[run.id] = ingested - run.row["finished_at"]
        except BaseException as err:  # reported by the bench, not lost in a thread
            self.error = err
        finally:
            store.close()


class _Procs:
    """The bench's child processes: started with a host's env, all stopped at the end."""

    def __init__(self, root: Path, url: str, owner: str, base: dict) -> None:
        self.root, self.url, self.owner, self.base = root, url, owner, base
        self.procs: list[subprocess.Popen] = []

    def env(self, host: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CHERRY_ARTIFACTS"}
        home = self.root / host
        home.mkdir(exist_ok=True)
        env.update(
            CHERRY_HOME=str(home),
            CHERRY_HOST=host,
            CHERRY_REDIS_URL=self.url,
            CHERRY_BENCH_OWNER=self.owner,
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self, role: str, host: str, config: dict, *, pipes: bool = False) -> subprocess.Popen:
        args = [sys.executable, "-m", "benchmarks.queue_load", role, json.dumps({**self.base, **config})]
        if pipes:
            proc = subprocess.Popen(args, env=self.env(host), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        else:
            log = open(self.root / f"{host}.log", "w")
            proc = subprocess.Popen(args, env=self.env(host), stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_queue_bench(cfg: QueueBenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark; the figures and the invariants' outcome as a dict."""
    missing = redis_server_missing()
    if missing:
        raise RedisServerMissing(missing)
    if cfg.runs < cfg.front_ends or cfg.front_ends < 1 or cfg.workers < 1:
        raise CherryError("--runs must be at least the number of front ends, and there must be a worker")
    root = Path(tempfile.mkdtemp(prefix="cherry-bench-queue-"))
    server = RedisServer(root / "redis")
    owner = uuid.uuid4().hex
    server.client.set(OWNER_KEY, owner)
    model = root / "model"
    model.mkdir()  # submit checks the model path exists; the stub never loads it
    dataset = root / "pairs.jsonl"
    dataset.write_text(
        "".join(json.dumps({"prompt": f"say {c}:", "chosen": f" {c * 3}", "rejected": " zzz"}) + "\n" for c in "abcd")
    )
    base = {"model": str(model), "dataset": str(dataset), "steps": cfg.steps, "priorities": list(cfg.priorities)}
    procs = _Procs(root, server.url, owner, base)
    saved_env = {k: os.environ.get(k) for k in ("CHERRY_REDIS_URL", "CHERRY_HOST")}
    os.environ["CHERRY_REDIS_URL"] = server.url
    try:
        result = _queue_part(cfg, root, procs, server, echo)
        result["app"] = _app_part(cfg, root, procs, echo)
        result["config"] = asdict(cfg)
        return result
    finally:
        procs.stop_all()
        server.stop()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(root, ignore_errors=True)


def _wait(condition: Callable[[], bool], timeout: float, what: str, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs):
            raise CherryError(f"a bench process exited early while waiting for {what}")
        if time.monotonic() > deadline:
            raise CherryError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def _queue_part(cfg: QueueBenchConfig, root: Path, procs: _Procs, server: RedisServer, echo) -> dict[str, Any]:
    from jobs.shared import open_store

    workers = [procs.start("worker", f"worker-{chr(97 + i)}", {}) for i in range(cfg.workers)]
    observer_store = open_store(root / "observer")
    _wait(lambda: len(observer_store.live_workers()) == cfg.workers, 120, "the workers to start", workers)
    observer_store.close()
    echo(f"{cfg.workers} workers up; {cfg.front_ends} front ends submit {cfg.runs} runs at once")

    shares = [cfg.runs // cfg.front_ends + (i < cfg.runs % cfg.front_ends) for i in range(cfg.front_ends)]
    fronts = [f"front-{chr(97 + i)}" for i in range(cfg.front_ends)]
    submitters = [
        procs.start("submit", host, {"label": host, "count": n, "seed": cfg.seed + i}, pipes=True)
        for i, (host, n) in enumerate(zip(fronts, shares))
    ]
    for proc in submitters:
        if proc.stdout.readline().strip() != "ready":
            raise CherryError("a submitting front end failed to start")
    observer = _Observer(root / "observer")
    observer.start()
    start_at = time.time() + 0.3
    for proc in submitters:
        proc.stdin.write(f"{start_at}\n")
        proc.stdin.flush()
    bursts = []
    for proc in submitters:
        line = proc.stdout.readline()
        if proc.wait() != 0 or not line:
            raise CherryError("a submitting front end failed during the burst")
        bursts.append(json.loads(line))
    queued = {r["id"]: r for burst in bursts for r in burst["runs"]}
    echo(f"submitted {len(queued)} runs; draining")

    def drained() -> bool:
        pipe = server.client.pipeline(transaction=False)
        for run_id in queued:
            pipe.hget(f"cherry:run:{run_id}", "status")
        return all(status in ("completed", "failed", "cancelled") for status in pipe.execute())

    _wait(drained, cfg.drain_timeout, "the workers to drain the queue", workers)
    _wait(lambda: len(observer.status_lag) >= len(queued) or observer.error is not None, 30, "the observer")
    observer.stop.set()
    observer.join(10)
    if observer.error is not None:
        raise observer.error

    stores = [open_store(root / host) for host in fronts]
    rows = stores[0].list_runs()
    finished = [r.row["finished_at"] for r in rows if r.id in queued]
    first_submit = min(b["began"] for b in bursts)
    per_front = []
    for host, store, burst in zip(fronts, stores, bursts):
        ids = {r.id for r in store.list_runs()}
        began = time.monotonic()
        store.ingest(sorted(ids))
        catch_up = time.monotonic() - began
        counts = _row_counts(store)
        store.ingest(sorted(ids))  # reading the streams again must add nothing
        per_front.append(
            {
                "host": host,
                "submitted": len(burst["runs"]),
                "submit_seconds": burst["ended"] - burst["began"],
                "submit_runs_per_s": len(burst["runs"]) / max(burst["ended"] - burst["began"], 1e-9),
                "stored": len(ids),
                "stored_equals_submitted": ids == set(queued),
                "catch_up_ingest_seconds": catch_up,
                "metric_rows": counts["metrics"],
                "ingest_again_adds_nothing": _row_counts(store) == counts,
            }
        )
        store.close()
    executions = {k: int(v) for k, v in server.client.hgetall(EXECUTIONS_KEY).items()}
    taken = [json.loads(t) for t in server.client.lrange(TAKEN_KEY, 0, -1)]
    statuses = [r.status for r in rows if r.id in queued]
    in_redis = set(server.client.zrange("cherry:runs", 0, -1))
    return {
        "runs": len(queued),
        "front_ends": per_front,
        "drain_seconds": max(finished) - first_submit if finished else None,
        "runs_per_s_drained": len(finished) / max(max(finished) - first_submit, 1e-9) if finished else 0.0,
        "in_redis": len(in_redis),
        "redis_equals_submitted": in_redis == set(queued),
        "completed": statuses.count("completed"),
        "lost": len(set(queued) - set(executions)),
        "run_twice": sorted(run_id for run_id, n in executions.items() if n > 1),
        "unknown_executed": sorted(set(executions) - set(queued)),
        "taken_by_worker": {w: sum(t["worker"] == w for t in taken) for w in sorted({t["worker"] for t in taken})},
        "priority_inversions": priority_inversions(taken, queued),
        "expected_metric_rows": len(queued) * cfg.steps * 2,
        "status_lag_s": summary(list(observer.status_lag.values())),
        "ingest_lag_s": summary(list(observer.ingest_lag.values())),
    }


def _row_counts(store) -> dict[str, int]:
    return {t: store.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("metrics", "events", "runs")}


def _app_part(cfg: QueueBenchConfig, root: Path, procs: _Procs, echo) -> dict[str, Any]:
    """The app on front-a's home (the finished runs plus `streams` live ones), headless, measured."""
    streamer = procs.start("stream", "streamer", {"streams": cfg.streams, "interval": cfg.stream_interval}, pipes=True)
    ids = json.loads(streamer.stdout.readline() or "[]")
    if len(ids) != cfg.streams:
        raise CherryError("the streaming process failed to start its runs")
    echo(
        f"{cfg.streams} runs stream metrics every {cfg.stream_interval * 1000:.0f} ms; app measured {cfg.app_seconds:.0f}s"
    )
    try:
        figures = asyncio.run(_measure_app(root / "front-a", ids, cfg.app_seconds))
    finally:
        streamer.stdin.close()
        streamer.wait(30)
    return figures


async def _measure_app(home: Path, live_ids: list[str], seconds: float) -> dict[str, Any]:
    from tuiapp import data
    from tuiapp.app import CherryApp

    app = CherryApp(home)
    reads: list[float] = []
    read = data.StoreReader.read

    def timed_read(reader, want):  # the reader thread's time per snapshot (ingest + queries)
        began = time.perf_counter()
        try:
            return read(reader, want)
        finally:
            reads.append(time.perf_counter() - began)

    data.StoreReader.read = timed_read
    try:
        figures = await _drive_app(app, live_ids, seconds, reads)
    finally:
        data.StoreReader.read = read
    return {**figures, "snapshot_read_s": summary(reads)}


async def _drive_app(app, live_ids: list[str], seconds: float, reads: list[float]) -> dict[str, Any]:
    """Open the app on the live runs (focus + compare), wait for its first snapshot, then measure."""
    applies: list[float] = []
    lags: list[float] = []
    newest: dict[str, float] = {}
    apply = app._apply_snapshot

    def timed_apply(snap) -> None:
        began = time.perf_counter()
        apply(snap)
        applies.append(time.perf_counter() - began)
        now = time.time()
        for run_id, series in snap.compare.items():  # every metric point the UI sees for the first time
            seen = newest.get(run_id, 0.0)
            times = [t for s in series.values() for t in s.times if t > seen]
            lags.extend(now - t for t in times)
            if times:
                newest[run_id] = max(times)

    app._apply_snapshot = timed_apply
    frames: list[float] = []
    async with app.run_test(size=(160, 48)) as pilot:
        app.want.focus = live_ids[0]
        app.want.compare = list(live_ids)
        app.wake_reader()
        opened = time.monotonic()
        while app.reads < 2 and time.monotonic() - opened < 300:  # the cold start: every run's stream ingested
            await pilot.pause(0.1)
        first_snapshots = time.monotonic() - opened
        await pilot.pause(0.5)
        for measured in (lags, applies, reads):
            measured.clear()
        reads_before = app.reads
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            began = time.perf_counter()
            await pilot.pause()  # handled once every pending message, repaint included, is done
            frames.append(time.perf_counter() - began)
            await asyncio.sleep(0.05)
        snapshots = app.reads - reads_before
    return {
        "first_snapshots_s": first_snapshots,
        "frame_s": summary(frames),
        "snapshot_apply_s": summary(applies),
        "ingest_lag_s": summary(lags),
        "snapshots": snapshots,
        "runs_shown": len(app.snapshot.runs) if app.snapshot else 0,
    }


if __name__ == "__main__":
    main()
