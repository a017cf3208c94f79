"""The Huey queue that carries run ids from front ends to workers.

Default: SqliteHuey in Cherry's home (`queue.db`), embedded, nothing to start. With
`CHERRY_REDIS_URL` set (e.g. `redis://gpu-box:6379/0`) the queue lives in Redis, so workers on
several machines consume one queue (they must then share Cherry's home, e.g. over NFS, for the
store and the run directories).

A task carries only a run id; the store holds everything else. Tasks are taken highest
priority first, then first in, first out.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Callable, Iterator

from huey import Huey, PriorityRedisHuey, SqliteHuey

from jobs.home import sqlite_file_error

TASK_NAME = "cherry.run"  # producers and consumers agree on this name, not on a function object
QUEUE_FILE = "queue.db"
AFTER_MOVING_QUEUE = (
    "Cherry then starts an empty queue. Runs that were waiting in it still show as queued in `cherry ls`: "
    "`cherry cancel RUN` then `cherry resume RUN` queues each again"
)


def make_huey(home: Path) -> Huey:
    url = os.environ.get("CHERRY_REDIS_URL")
    if url:
        return PriorityRedisHuey("cherry", url=url, results=False)
    with explained_queue_errors(home):
        return SqliteHuey("cherry", filename=str(Path(home) / QUEUE_FILE), results=False, timeout=30)


@contextlib.contextmanager
def explained_queue_errors(home: Path) -> Iterator[None]:
    """A damaged, read-only or locked queue file becomes one message naming it and the fix."""
    try:
        yield
    except (sqlite3.Error, OSError) as err:
        raise sqlite_file_error(Path(home) / QUEUE_FILE, err, "the queue file", after_moving=AFTER_MOVING_QUEUE) from err


def queue_backend() -> str:
    url = os.environ.get("CHERRY_REDIS_URL")
    return f"redis ({url})" if url else "sqlite"


class JobQueue:
    """Enqueue, revoke and (in a worker) execute run tasks."""

    def __init__(self, home: Path, handler: Callable[[str], None] | None = None) -> None:
        self.home = Path(home)
        self.huey = make_huey(home)
        # A producer never executes the task; a worker passes the handler that runs it. Huey names
        # a task by the module of its function plus `name`, so both sides register one from here.
        execute = handler or _producer_only

        def run_task(run_id: str) -> None:
            execute(run_id)

        self.task = self.huey.task(name=TASK_NAME)(run_task)

    def enqueue(self, run_id: str, priority: int = 0) -> str:
        task = self.task.s(run_id, priority=priority)
        with explained_queue_errors(self.home):
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
