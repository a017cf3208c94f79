"""The processes `cherry bench queue` starts, each as `python -m benchmarks.queue_load ROLE CONFIG_JSON` with its own
home and host name: a worker whose run process is a stub, that stub run, a front end submitting its burst, and a
streamer of live runs. Each refuses any Redis but the bench's own (the key the bench writes at start)."""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

KEY = "cherrybench"  # every key the bench itself writes starts with this (the run keys are Cherry's own)
OWNER_KEY = f"{KEY}:owner"  # written at start: bench workers refuse a Redis without it
EXECUTIONS_KEY = f"{KEY}:executions"  # run id -> how many times its process ran
TAKEN_KEY = f"{KEY}:taken"  # the order workers took tasks in: {"run", "worker", "at"}


def _bench_redis():
    import redis

    client = redis.Redis.from_url(os.environ["CHERRY_REDIS_URL"], decode_responses=True)
    if client.get(OWNER_KEY) != os.environ.get("CHERRY_BENCH_OWNER"):
        raise SystemExit("benchmarks.queue_load: this Redis is not the benchmark's own; refusing to touch its queue")
    return client


def _worker_role(config: dict) -> None:
    import logging

    from jobs.worker import Worker

    bench = _bench_redis()

    class BenchWorker(Worker):
        """A real worker whose run process is the stub below; it notes the order it takes tasks in."""

        def child_command(self, run_id: str) -> list[str]:
            return [sys.executable, "-P", "-m", "benchmarks.queue_load", "child", json.dumps({"run": run_id, **config})]

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            storage, self.pop_started = self.queue.huey.storage, 0.0
            pop = storage.dequeue

            def timed_pop():
                # When the pop that returned the task began: anything queued before then was there to choose.
                started = time.time()
                data = pop()
                if data is not None:
                    self.pop_started = started
                return data

            storage.dequeue = timed_pop

        def execute(self, run_id: str) -> None:
            bench.rpush(TAKEN_KEY, json.dumps({"run": run_id, "worker": self.host, "at": self.pop_started}))
            super().execute(run_id)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    BenchWorker(Path(os.environ["CHERRY_HOME"]), grace=5).run()


def _child_role(config: dict) -> None:
    """The stub run: counted, a few metric rows and an event through the run's stream, completed."""
    from jobs.home import cherry_home
    from jobs.shared import open_store

    bench = _bench_redis()
    run_id = config["run"]
    bench.hincrby(EXECUTIONS_KEY, run_id, 1)
    store = open_store(cherry_home())
    for step in range(1, config["steps"] + 1):
        store.add_metrics(run_id, step, {"train/loss": 1.0 / step, "train/lr": 1e-3})
    store.add_event(run_id, "bench", "stub run: no training (cherry bench queue)")
    store.set_status(run_id, "completed", only_if=["running"])
    store.close()


def _bench_spec(config: dict, name: str):
    from engine.spec import resolve_spec

    return resolve_spec("dpo", [f"name={name}", "max_steps=5"], model=config["model"], dataset=config["dataset"])


def _submit_role(config: dict) -> None:
    """One front end's burst: specs built first, then every `Jobs.submit` at the agreed moment."""
    from jobs.runs import Jobs

    rng = random.Random(config["seed"])
    specs = [_bench_spec(config, f"{config['label']}-{i}") for i in range(config["count"])]
    priorities = [rng.choice(config["priorities"]) for _ in specs]
    jobs = Jobs(Path(os.environ["CHERRY_HOME"]))
    jobs.queue  # connected before the burst, as a running front end is
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    time.sleep(max(0.0, start_at - time.time()))
    runs, began = [], time.time()
    for spec, priority in zip(specs, priorities):
        run = jobs.submit(spec, priority=priority)
        runs.append({"id": run.id, "priority": priority, "enqueued_at": time.time()})
    ended = time.time()
    jobs.close()
    print(json.dumps({"label": config["label"], "began": began, "ended": ended, "runs": runs}), flush=True)


def _stream_role(config: dict) -> None:
    """Synthetic live runs on another host: each logs 4 metrics every `interval` until stdin closes."""
    from jobs.home import cherry_home
    from jobs.shared import open_store

    _bench_redis()
    store = open_store(cherry_home())
    spec = _bench_spec(config, "live").to_dict()
    ids = [f"live-{i}-{uuid.uuid4().hex[:6]}" for i in range(config["streams"])]
    for run_id in ids:
        store.create_run(run_id, spec, name=run_id, out_dir=None, planned_dir=f"/elsewhere/{run_id}")
        store.set_status(run_id, "running", only_if=["queued"], worker_host="streamer", started_at=time.time())
    print(json.dumps(ids), flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    step, next_at = 0, time.monotonic()
    while not stop.is_set():
        step += 1
        for run_id in ids:
            loss = 1.0 / step
            metrics = {"train/loss": loss, "train/lr": 1e-3, "rewards/margin": 1 - loss, "train/grad_norm": 0.5}
            store.add_metrics(run_id, step, metrics)
        if step % 20 == 0:
            for run_id in ids:
                store.heartbeat(run_id)
        next_at += config["interval"]
        stop.wait(max(0.0, next_at - time.monotonic()))
    for run_id in ids:
        store.set_status(run_id, "completed", only_if=["running"])
    store.close()


ROLES: dict[str, Callable[[dict], None]] = {
    "worker": _worker_role,
    "child": _child_role,
    "submit": _submit_role,
    "stream": _stream_role,
}
