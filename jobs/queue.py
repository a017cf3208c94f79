"""The Huey queue that carries run ids from front ends to workers.

Default: SqliteHuey in Cherry's home (`queue.db`), embedded, nothing to start. With
`CHERRY_REDIS_URL` set (e.g. `redis://gpu-box:6379/0`) the queue lives in Redis, so workers on
several machines consume one queue (each with its own home; see jobs/shared.py for the store).
A Redis queue also has one queue per host: a run whose checkpoint is on one worker's disk is
resumed there, and a worker takes its host's runs before the common queue's.

A task carries only a run id; the store holds everything else. Tasks are taken highest
priority first, then first in, first out.

Messages are JSON (a task id, its kind, a run id, a priority), never pickle: whoever can write to the
queue can name a run, not run code in the worker. A message that does not parse, names another kind
of task or carries a malformed run id is logged and dropped. With $CHERRY_QUEUE_KEY set, messages
carry an HMAC-SHA256 of their body under that key, and workers drop any message whose signature
does not match (only holders of the key can queue runs).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import struct
import time
from pathlib import Path
from typing import Callable, Iterator

from huey import Huey
from huey.registry import Message
from huey.serializer import Serializer
from huey.storage import PriorityRedisStorage, SqliteStorage

from jobs.home import sqlite_file_error
from jobs.trust import UntrustedValue, check_run_id, mask_url

TASK_NAME = "cherry.run"  # producers and consumers agree on this name, not on a function object
QUEUE_FILE = "queue.db"
AFTER_MOVING_QUEUE = (
    "Cherry then starts an empty queue. Runs that were waiting in it still show as queued in `cherry ls`: "
    "`cherry cancel RUN` then `cherry resume RUN` queues each again"
)


QUEUE_KEY_ENV = "CHERRY_QUEUE_KEY"
MAX_MESSAGE_BYTES = 4096  # a run id and a few numbers; anything longer is not ours

log = logging.getLogger("cherry.queue")


class BadMessage(ValueError):
    """A queue message that is not one Cherry wrote (not JSON, unsigned, wrong kind, bad run id)."""


class JsonSerializer(Serializer):
    """Huey's messages as JSON: a run task as {kind, id, run_id, priority}, a revocation as {kind, once, until}.

    With a key, the body is wrapped as {"body": ..., "sig": HMAC-SHA256(key, body)}."""

    def __init__(self, key: str | None = None) -> None:
        super().__init__()
        self.key = key.encode() if key else None

    def _serialize(self, data) -> bytes:
        if isinstance(data, Message):
            if len(data.args or ()) != 1 or data.kwargs or data.on_complete or data.on_error or data.eta:
                raise TypeError("a Cherry queue message carries one run id and nothing else")
            body = {"kind": data.name, "id": data.id, "run_id": data.args[0], "priority": data.priority or 0}
        elif isinstance(data, tuple) and len(data) == 2:  # Huey's revocation record: (until, once)
            until, once = data
            body = {"kind": "revoke", "once": bool(once), "until": until.isoformat() if until else None}
        else:
            raise TypeError(f"the Cherry queue carries run tasks and revocations, not {type(data).__name__}")
        text = json.dumps(body, separators=(",", ":"))
        if self.key:
            text = json.dumps({"body": text, "sig": self._sign(text)}, separators=(",", ":"))
        return text.encode()

    def _sign(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def _deserialize(self, data: bytes):
        if len(data) > MAX_MESSAGE_BYTES:
            raise BadMessage(f"a message of {len(data)} bytes (Cherry's are under {MAX_MESSAGE_BYTES})")
        try:
            outer = json.loads(data.decode())
            if self.key:
                text = outer.get("body") if isinstance(outer, dict) else None
                sig = outer.get("sig") if isinstance(outer, dict) else None
                if (
                    not isinstance(text, str)
                    or not isinstance(sig, str)
                    or not hmac.compare_digest(sig, self._sign(text))
                ):
                    raise BadMessage(f"a message without a valid signature (${QUEUE_KEY_ENV} is set on this host)")
                outer = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadMessage("a message that is not JSON (an older Cherry's pickle, or not Cherry's)") from None
        if not isinstance(outer, dict):
            raise BadMessage("a message that is not a JSON object")
        return self._message(outer)

    @staticmethod
    def _message(body: dict):
        kind = body.get("kind")
        if kind == "revoke":
            until = body.get("until")
            return (datetime.datetime.fromisoformat(until) if isinstance(until, str) else None, bool(body.get("once")))
        if not isinstance(kind, str) or not kind.endswith(TASK_NAME):
            raise BadMessage(f"a message of kind {kind!r}, not a Cherry run")
        priority, task_id = body.get("priority", 0), body.get("id")
        if not isinstance(priority, int) or not isinstance(task_id, str):
            raise BadMessage("a run message with a malformed id or priority")
        try:
            run_id = check_run_id(body.get("run_id"))
        except UntrustedValue as err:
            raise BadMessage(str(err)) from None
        return Message(task_id, kind, None, 0, 0, priority, (run_id,), {})


class CherryHuey(Huey):
    """Huey with JSON messages: one that does not parse is logged and dropped, never executed."""

    def dequeue(self):
        data = self.storage.dequeue()
        if data is None:
            return None
        try:
            return self.deserialize_task(data)
        except Exception as err:  # BadMessage, or a kind this process has not registered
            log.warning("dropped a queue message: %s", err)
            return None

    def pending(self, limit=None):
        tasks = []
        for data in self.storage.enqueued_items(limit):
            try:
                tasks.append(self.deserialize_task(data))
            except Exception as err:
                log.warning("skipped a queue message that is not a Cherry run: %s", err)
        return tasks

    def is_revoked(self, task, timestamp=None, peek=True):
        try:
            return super().is_revoked(task, timestamp, peek)
        except Exception as err:  # a revocation record that does not parse counts as none
            log.warning("ignored a revocation record: %s", err)
            return False


class HostQueueStorage(PriorityRedisStorage):
    """Huey's Redis priority queue plus one queue per host; a worker on `host` pops its own first."""

    def __init__(self, name: str = "huey", host: str | None = None, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.host = host

    def host_queue_key(self, host: str) -> str:
        return f"{self.queue_key}.host.{host}"

    def enqueue_on(self, host: str, data: bytes, priority: int | None = None) -> None:
        # The same message layout as Huey's priority queue: a timestamp prefix keeps FIFO order per priority.
        prefix = struct.pack(">Q", int(time.time() * 1e6))
        self.conn.zadd(self.host_queue_key(host), {prefix + data: -(priority or 0)})

    def dequeue(self):
        if not self.host:
            return super().dequeue()
        keys = [self.host_queue_key(self.host), self.queue_key]
        if not self.blocking:
            for key in keys:
                items = self.conn.zpopmin(key, count=1)
                if items:
                    return items[0][0][8:]
            return None
        try:
            _, data, _ = self.conn.bzpopmin(keys, timeout=self.read_timeout)  # the first non-empty key
        except (TimeoutError, TypeError, IndexError):
            return None
        return data[8:]

    def enqueued_items(self, limit=None):
        items = []
        for key in sorted(self.conn.scan_iter(match=self.queue_key + ".host.*")):
            items += [item[8:] for item in self.conn.zrange(key, 0, -1)]
        return items + super().enqueued_items(limit)


def make_huey(home: Path, host: str | None = None) -> Huey:
    url = os.environ.get("CHERRY_REDIS_URL")
    serializer = JsonSerializer(os.environ.get(QUEUE_KEY_ENV) or None)
    if url:
        return CherryHuey(
            "cherry", results=False, storage_class=HostQueueStorage, url=url, host=host, serializer=serializer
        )
    with explained_queue_errors(home):
        return CherryHuey(
            "cherry",
            results=False,
            storage_class=SqliteStorage,
            filename=str(Path(home) / QUEUE_FILE),
            timeout=30,
            serializer=serializer,
        )


@contextlib.contextmanager
def explained_queue_errors(home: Path) -> Iterator[None]:
    """A damaged, read-only or locked queue file becomes one message naming it and the fix."""
    try:
        yield
    except (sqlite3.Error, OSError) as err:
        raise sqlite_file_error(
            Path(home) / QUEUE_FILE, err, "the queue file", after_moving=AFTER_MOVING_QUEUE
        ) from err


def queue_backend() -> str:
    url = os.environ.get("CHERRY_REDIS_URL")
    return f"redis ({mask_url(url)})" if url else "sqlite"


class JobQueue:
    """Enqueue, revoke and (in a worker) execute run tasks."""

    def __init__(self, home: Path, handler: Callable[[str], None] | None = None, host: str | None = None) -> None:
        self.home = Path(home)
        self.huey = make_huey(home, host)
        # A producer never executes the task; a worker passes the handler that runs it. Huey names
        # a task by the module of its function plus `name`, so both sides register one from here.
        execute = handler or _producer_only

        def run_task(run_id: str) -> None:
            execute(run_id)

        self.task = self.huey.task(name=TASK_NAME)(run_task)

    def enqueue(self, run_id: str, priority: int = 0, host: str | None = None) -> str:
        """Queue `run_id`; with `host` (a Redis queue), only a worker on that host takes it."""
        task = self.task.s(run_id, priority=priority)
        with explained_queue_errors(self.home):
            if host and isinstance(self.huey.storage, HostQueueStorage):
                self.huey.storage.enqueue_on(host, self.huey.serialize_task(task), priority)
            else:
                self.huey.enqueue(task)
        return task.id

    def revoke(self, task_id: str) -> None:
        with explained_queue_errors(self.home):
            self.huey.revoke_by_id(task_id, revoke_once=True)

    def pending_run_ids(self) -> list[str]:
        """Queued run ids in the order a worker will take them."""
        with explained_queue_errors(self.home):
            return [task.args[0] for task in self.huey.pending()]


def _producer_only(run_id: str) -> None:
    raise RuntimeError("run tasks execute in `cherry worker`, not in the process that queued them")
