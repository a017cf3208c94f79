"""Issue 33's attacks on the shared Redis, replayed against a real redis-server: a pickle planted in
the queue, a password in CHERRY_REDIS_URL, malformed stream entries. Fast (no run is trained)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time

import pytest

from tests.e2e.test_jobs import CLI
from tests.unit.test_security import CreatesFileWhenUnpickled


@pytest.fixture
def shared_home(home, redis_url, monkeypatch):
    monkeypatch.setenv("CHERRY_REDIS_URL", redis_url)
    monkeypatch.setenv("CHERRY_HOST", "gpu-a")
    monkeypatch.delenv("CHERRY_ARTIFACTS", raising=False)
    return home


def test_a_pickled_payload_planted_in_redis_is_dropped_not_executed(shared_home, tmp_path, caplog):
    from jobs.queue import JobQueue

    marker = tmp_path / "pwned"
    producer = JobQueue(shared_home)
    producer.enqueue("20260101-000000-good")
    payload = pickle.dumps(CreatesFileWhenUnpickled(marker))
    producer.huey.storage.enqueue(payload, 10)  # the common queue
    producer.huey.storage.enqueue_on("gpu-a", payload, 10)  # and this host's own queue, taken first

    assert producer.pending_run_ids() == ["20260101-000000-good"]
    consumer = JobQueue(shared_home, handler=lambda run_id: None, host="gpu-a")
    with caplog.at_level(logging.WARNING, logger="cherry.queue"):
        taken = [consumer.huey.dequeue() for _ in range(3)]
    assert taken[:2] == [None, None]
    assert taken[2].args == ("20260101-000000-good",)
    assert not marker.exists()
    assert caplog.text.count("dropped a queue message") == 2


def test_a_redis_password_is_never_shown_or_stored(home, redis_url, monkeypatch):
    import redis

    from jobs.shared import open_store
    from jobs.worker import Worker
    from tuiapp.data import StoreReader, Want

    redis.Redis.from_url(redis_url).config_set("requirepass", "hunter2")
    secret_url = redis_url.replace("redis://", "redis://:hunter2@")
    monkeypatch.setenv("CHERRY_REDIS_URL", secret_url)
    monkeypatch.setenv("CHERRY_HOST", "gpu-a")

    worker = Worker(home)
    worker.shutting_down.set()
    worker._beat_loop()  # one beat into the workers hash, then it stops
    raw = redis.Redis.from_url(secret_url).hvals("cherry:workers")
    assert raw and all(b"hunter2" not in value for value in raw)
    assert ":***@" in json.loads(raw[0])["queue"]

    reader = StoreReader(home)
    try:
        assert "hunter2" not in reader.read(Want()).backend  # the app's header
    finally:
        reader.close()
    open_store(home).close()

    wrong = redis_url.replace("redis://", "redis://:wrong-password@")
    done = subprocess.run(
        CLI + ["ls"], env={**os.environ, "CHERRY_REDIS_URL": wrong}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "wrong-password" not in done.stdout + done.stderr


def test_malformed_stream_entries_are_skipped_and_logged(shared_home, caplog):
    import redis

    from jobs.shared import open_store

    store = open_store(shared_home)
    try:
        run_id = "20260101-000000-streamed"
        store.create_run(run_id, {"algorithm": "sft"}, name="streamed", out_dir=None)
        store.add_event(run_id, "start", "first")
        client = redis.Redis.from_url(os.environ["CHERRY_REDIS_URL"])
        key = f"cherry:stream:{run_id}"
        client.xadd(key, {"garbage": "1"})
        client.xadd(key, {"t": "metrics", "seq": "3", "step": "1", "time": "1.0", "data": "not json"})
        client.xadd(key, {"t": "event", "seq": "4", "step": "", "time": "x", "data": "{}"})
        store.add_event(run_id, "later", "after the bad ones")
        with caplog.at_level(logging.WARNING, logger="cherry.shared"):
            messages = [e["message"] for e in store.events(run_id)]
        assert messages == ["first", "after the bad ones"]
        assert caplog.text.count("skipped malformed stream entry") == 3
    finally:
        store.close()
    done = subprocess.run(CLI + ["show", run_id], capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_tls_to_a_plain_redis_port_fails_within_seconds(redis_url, tmp_path):
    """`rediss://` pointed at a Redis that speaks no TLS: the handshake waits for bytes that never come; a front
    end must still answer within seconds, naming the URL (the probe's socket timeout bounds the handshake)."""
    tls_url = redis_url.replace("redis://", "rediss://", 1)
    env = {**os.environ, "CHERRY_HOME": str(tmp_path), "CHERRY_REDIS_URL": tls_url}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tuiapp.cli", "ls"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "cannot reach Redis at rediss://" in done.stderr
    assert time.monotonic() - started < 15
