"""The run lifecycle as front ends see it: submit, cancel, resume, remove, find.

    queued -> running -> completed | failed | cancelled | interrupted | pruned
                    (resume: failed | cancelled | interrupted | pruned -> queued, from the last checkpoint)

A submission is validated completely before anything is written (spec, paths, dataset format),
so a bad spec never reaches the queue. The run row is written first, then the task carrying its
id is queued. A run chained with `after` waits in the store (status queued, no task yet) until
the run it follows completes; the worker then queues it with that run's output as its model.

With a shared Redis (several machines, see jobs/shared.py) a run's directory is on the disk of the
worker that takes it, unless $CHERRY_ARTIFACTS names a directory every host sees: a run to resume,
and a run chained after one, then go to a worker on the host that holds the files.

Torch-free: the TUI and the CLI import this module.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import CherryError, SpecError
from jobs.gang import Board
from jobs.home import artifacts_root, cherry_home, new_run_id, runs_root
from jobs.shared import RunIdTaken, open_store
from jobs.store import RunRow, Store, this_host
from jobs.trust import UntrustedValue, derived_run_dir

if TYPE_CHECKING:
    from engine.spec import RunSpec
    from jobs.queue import JobQueue

RESUMABLE = ("failed", "cancelled", "interrupted", "pruned")


class JobError(CherryError):
    """A request the run's current state does not allow (e.g. resuming a completed run)."""


@dataclass
class Jobs:
    """The store and the queue of one Cherry home."""

    home: Path = field(default_factory=cherry_home)

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        self.store: Store = open_store(self.home)
        self._queue: JobQueue | None = None

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            from jobs.queue import JobQueue  # huey and redis: not for reads (`cherry ls`, `show`, `metrics`)

            self._queue = JobQueue(self.home)
        return self._queue

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        spec: RunSpec,
        *,
        priority: int = 0,
        after: str | None = None,
        retries: int = 0,
        model_from: str | None = None,
        experiment: str | None = None,
        swept: dict | None = None,
        prune: dict | None = None,
    ) -> RunRow:
        """Validate `spec`, store it as a queued run and queue it (or park it after `after`).

        A chained run's model is the output of the run it follows, or of `model_from` (an earlier
        run of the same chain: PPO waits for its reward model but starts from the SFT model).
        `experiment` groups runs (a sweep's points share one); `swept` is the point's values and
        `prune` the sweep's early-stopping rule ({rule, metric, after}).
        """
        spec, parent = self.check(spec, after=after, model_from=model_from)
        run = self._create(
            spec,
            parent=parent.id if parent else None,
            priority=priority,
            retries=retries,
            experiment=experiment,
            swept=swept,
            prune=prune,
        )
        run_id = run.id
        if parent is not None and parent.status != "completed":
            self.store.add_event(
                run_id, "queued", f"waiting for {parent.id} to complete; its output is this run's model"
            )
            return run
        self._enqueue(run)
        return self.store.get_run(run_id)

    def check(
        self, spec: RunSpec, *, after: str | None = None, model_from: str | None = None
    ) -> tuple[RunSpec, RunRow | None]:
        """Every check `submit` makes before it writes anything: the spec as it will be stored (a chained
        run's model is its source's output) and the run it waits for. Raises a CherryError naming the field."""
        # The checks' imports (the data loaders, pyarrow) are paid by submissions, not by reads.
        from engine.data.checks import check_run_data
        from engine.registry import ALGORITHMS
        from engine.spec import build_spec, resolve_paths
        from jobs.reporters import check_report_to

        parent = self.resolve(after) if after else None
        if parent is not None:
            if parent.status in RESUMABLE:
                raise JobError(
                    f"--after {parent.id}: that run ended {parent.status}; resume it first (`cherry resume {parent.id}`)"
                )
            source = self.resolve(model_from) if model_from else parent
            if source.algorithm == "rm":
                raise JobError(
                    f"--after {source.id}: that run trains a reward model, which cannot be the policy of the next run"
                )
            spec = dataclasses.replace(spec, model=str(Path(run_dir(source)) / "final"))
        resolve_paths(spec, check_model=parent is None)
        check_run_data(spec, ALGORITHMS[spec.algorithm].data_kind)  # and the reward functions
        build_spec(spec.to_dict())  # the stored spec must load back exactly as the worker will load it
        check_report_to(spec)
        if spec.num_machines > 1 and not self.store.shared:
            raise SpecError(
                f"num_machines is {spec.num_machines}, and a run over several machines needs workers that share a "
                "queue: set CHERRY_REDIS_URL here and on every machine, start a `cherry worker` on each "
                "(docs/multi-machine.md), or set --set num_machines=1",
                "num_machines",
            )
        self.queue  # a queue file that cannot be used is refused before a run row points at it
        return spec, parent

    def _create(self, spec: RunSpec, **fields) -> RunRow:
        """Store a new queued run under a fresh id (another host may take an id first: try the next)."""
        shared_dirs = artifacts_root() if self.store.shared else None
        root = shared_dirs or self.home
        while True:
            run_id = new_run_id(spec.display_name, root)
            planned = str(root / run_id)
            host_local = self.store.shared and shared_dirs is None
            try:
                run = self.store.create_run(
                    run_id,
                    spec.to_dict(),
                    name=spec.display_name,
                    out_dir=None if host_local else planned,
                    planned_dir=planned,
                    **fields,
                )
            except RunIdTaken:
                continue
            if host_local:  # the worker that takes it makes its directory under its own home
                (root / run_id).rmdir()
            return run

    def _enqueue(self, run: RunRow, host: str | None = None) -> None:
        task_id = self.queue.enqueue(run.id, priority=run.priority or 0, host=host)
        self.store.update_run(run.id, task_id=task_id)
        where = f", for a worker on {host} (its files are there)" if host else ""
        self.store.add_event(run.id, "queued", f"queued (priority {run.priority or 0}){where}")

    def release_dependents(self, run_id: str) -> list[str]:
        """Queue the runs chained after `run_id` (which just completed), where its output is."""
        finished = self.store.get_run(run_id)
        host = finished.files_host if finished is not None else None
        released = []
        for child in self.store.dependents(run_id):
            self._enqueue(child, host)
            released.append(child.id)
        return released

    def requeue_lost(self) -> list[str]:
        """Queue again every run the store knows is queued but no queue holds (a Redis restart without
        persistence). A run a worker took meanwhile is skipped by that worker: never run twice."""
        pending = set(self.queue.pending_run_ids())
        board = Board(self.store.state) if self.store.shared else None  # runs over several machines wait there
        lost = [
            r
            for r in self.store.list_runs(["queued"])
            if r.task_id and r.id not in pending and not (board is not None and board.has(r.id))
        ]
        for run in lost:
            self._enqueue(run, run.files_host)
        return [r.id for r in lost]

    def live_workers(self) -> list[dict]:
        """Workers consuming this home's queue right now (they heartbeat into the store)."""
        return self.store.live_workers()

    # ------------------------------------------------------------------ find

    def resolve(self, text: str) -> RunRow:
        """A run by id, or by a part of its id or name that matches exactly one run."""
        matches = self.store.find_runs(text)
        if not matches:
            raise JobError(f"no run matches '{text}'; `cherry ls` lists the runs in {self.home}")
        if len(matches) > 1:
            shown = ", ".join(r.id for r in matches[:5]) + (" ..." if len(matches) > 5 else "")
            raise JobError(f"'{text}' matches {len(matches)} runs ({shown}); give more of the id")
        return matches[0]

    # ------------------------------------------------------------------ control

    def cancel(self, text: str) -> str:
        """Cancel a queued run (it never starts) or ask a running one to stop at its next step."""
        run = self.resolve(text)
        if run.status == "queued":
            if self.store.set_status(run.id, "cancelled", only_if=["queued"], error="cancelled before it started"):
                if run.task_id:
                    self.queue.revoke(run.task_id)
                self.store.add_event(run.id, "cancelled", "cancelled while queued")
                return f"{run.id}: cancelled (it was queued and will not start)"
            run = self.store.get_run(run.id)  # a worker took it meanwhile: cancel the running run
        if run.status == "running":
            self.store.update_run(run.id, cancel_requested=1)
            self.store.add_event(
                run.id, "cancel", "cancel requested: the run stops at its next step and keeps its checkpoint"
            )
            return f"{run.id}: stopping at its next step (status becomes cancelled; metrics and checkpoint are kept)"
        raise JobError(f"{run.id} already ended ({run.status}); nothing to cancel")

    def resume(self, text: str) -> RunRow:
        """Queue a failed, cancelled, interrupted or pruned run again; it continues from its last checkpoint."""
        run = self.resolve(text)
        if run.status not in RESUMABLE:
            hint = "it is still going" if run.status in ("queued", "running") else "it completed"
            raise JobError(
                f"{run.id} is {run.status}: only a failed, cancelled, interrupted or pruned run can be resumed ({hint})"
            )
        if not self.store.change_run(
            run.id,
            dict(status="queued", resume=1, cancel_requested=0, error=None, finished_at=None, task_id=None),
            only_if=RESUMABLE,
        ):
            raise JobError(
                f"{run.id} changed meanwhile (now {self.store.get_run(run.id).status}); look again with `cherry show {run.id}`"
            )
        self.store.add_event(run.id, "resume", "re-queued; it continues from its last checkpoint")
        run = self.store.get_run(run.id)
        self._enqueue(run, run.files_host)
        return self.store.get_run(run.id)

    def remove(self, text: str) -> RunRow:
        """Delete a run that is not running: its store rows and its run directory."""
        run = self.resolve(text)
        if run.status == "running":
            raise JobError(f"{run.id} is running; cancel it first (`cherry cancel {run.id}`), then remove it")
        if run.status == "queued" and run.task_id:
            self.queue.revoke(run.task_id)
        self.store.delete_run(run.id)
        ours = run.files_host in (None, this_host())  # another host's files are left to that host
        try:  # the directory this home derives from the id, whatever the row says
            out_dir = derived_run_dir(runs_root(self.home, self.store.shared), run.id)
        except UntrustedValue:
            return run
        if ours and out_dir.is_dir() and not out_dir.is_symlink():
            shutil.rmtree(out_dir, ignore_errors=True)
        return run

    def place(self, run: RunRow, home: Path, host: str) -> dict:
        """What a worker with `home` sets when it takes `run`: its directory, derived from the id under this
        worker's home (or $CHERRY_ARTIFACTS), whatever the row said, and the spec with the directories of the
        runs it was chained after as they were placed (at submit they were only planned)."""
        fields: dict = {"out_dir": str(derived_run_dir(runs_root(home, self.store.shared), run.id))}
        if self.store.shared and artifacts_root() is None:
            fields["files_host"] = host
        text = json.dumps(run.spec)
        ancestor = run
        while ancestor.parent:
            ancestor = self.store.get_run(ancestor.parent)
            if ancestor is None:
                break
            if ancestor.planned_dir and ancestor.out_dir and ancestor.planned_dir != ancestor.out_dir:
                text = text.replace(json.dumps(ancestor.planned_dir)[1:-1], json.dumps(ancestor.out_dir)[1:-1])
        if text != json.dumps(run.spec):
            spec = json.loads(text)
            fields.update(spec=text, model=spec.get("model"), dataset=spec.get("dataset"))
        return fields


def run_dir(run: RunRow) -> str:
    """The run's directory, or where it is planned when no worker placed it yet."""
    return run.out_dir or run.planned_dir or ""
