"""The Huey queue that carries run ids from front ends to workers.

Default: SqliteHuey in Cherry's home (`queue.db`), embedded, nothing to start. With
`CHERRY_REDIS_URL` set (e.g. `redis://gpu-box:6379/0`) the queue lives in Redis, so workers on
several machines consume one queue (each with its own home; see jobs/shared.py for the store).
A Redis queue also has one queue per host: a run whose checkpoint is on one worker's disk is
resumed there, and a worker takes its host's runs before the common queue's.

A task carries only a run id; the store holds everything else. Tasks are taken highest
priority first, then first in, first out.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import time
from pathlib import Path
from typing import Callable, Iterator

from huey import Huey, SqliteHuey
from huey.storage import PriorityRedisStorage

from jobs.home import sqlite_file_error

TASK_NAME = "cherry.run"  # producers and consumers agree on this name, not on a function object
QUEUE_FILE = "queue.db"
AFTER_MOVING_QUEUE = (
    "Cherry then starts an empty queue. Runs that were waiting in it still show as queued in `cherry ls`: "
    "`cherry cancel RUN` then `cherry resume RUN` queues each again"
)


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
    if url:
        return Huey("cherry", results=False, storage_class=HostQueueStorage, url=url, host=host)
    with explained_queue_errors(home):
        return SqliteHuey("cherry", filename=str(Path(home) / QUEUE_FILE), results=False, timeout=30)


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
    return f"redis ({url})" if url else "sqlite"


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
