"""The Huey queue that carries run ids from front ends to workers.

Default: SqliteHuey in Cherry's home (`queue.db`), embedded, nothing to start. With
`CHERRY_REDIS_URL` set (e.g. `redis://gpu-box:6379/0`) the queue lives in Redis, so workers on
several machines consume one queue (they must then share Cherry's home, e.g. over NFS, for the
store and the run directories).

A task carries only a run id; the store holds everything else. Tasks are taken highest
priority first, then first in, first out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from huey import Huey, PriorityRedisHuey, SqliteHuey

TASK_NAME = "cherry.run"  # producers and consumers agree on this name, not on a function object


def make_huey(home: Path) -> Huey:
    url = os.environ.get("CHERRY_REDIS_URL")
    if url:
        return PriorityRedisHuey("cherry", url=url, results=False)
    return SqliteHuey("cherry", filename=str(Path(home) / "queue.db"), results=False, timeout=30)


def queue_backend() -> str:
    url = os.environ.get("CHERRY_REDIS_URL")
    return f"redis ({url})" if url else "sqlite"


class JobQueue:
    """Enqueue, revoke and (in a worker) execute run tasks."""

    def __init__(self, home: Path, handler: Callable[[str], None] | None = None) -> None:
        self.huey = make_huey(home)
        # A producer never executes the task; a worker passes the handler that runs it. Huey names
        # a task by the module of its function plus `name`, so both sides register one from here.
        execute = handler or _producer_only

        def run_task(run_id: str) -> None:
            execute(run_id)

        self.task = self.huey.task(name=TASK_NAME)(run_task)

    def enqueue(self, run_id: str, priority: int = 0) -> str:
        task = self.task.s(run_id, priority=priority)
        self.huey.enqueue(task)
        return task.id

    def revoke(self, task_id: str) -> None:
        self.huey.revoke_by_id(task_id, revoke_once=True)

    def pending_run_ids(self) -> list[str]:
        """Queued run ids in the order a worker will take them."""
        return [task.args[0] for task in self.huey.pending()]


def _producer_only(run_id: str) -> None:
    raise RuntimeError("run tasks execute in `cherry worker`, not in the process that queued them")
