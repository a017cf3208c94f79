"""A worker's part in runs over several machines (jobs/gang.py says how they are scheduled): it puts the
runs it takes from the queue on the board, makes the decision about once a second, holds the slot of the
run it joined until that run starts, and runs its machine of each run it is in."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

from engine.launch import free_port
from jobs.gang import Board, Room, board_order, lost_machine, machine_order, machines_field, plan, rendezvous_host
from jobs.home import artifacts_root
from jobs.shared import open_store, redis_unreachable
from jobs.store import ENDED, Store

TICK_SECONDS = 1.0

log = logging.getLogger("cherry.worker")


class GangDuty:
    """The runs over several machines a worker takes part in: those it joined and holds a slot for until
    they start (`held`), and those whose machine it runs (`running`, each watched in its own thread)."""

    def __init__(self, worker) -> None:
        self.worker = worker  # the jobs.worker.Worker it is part of (its slots, children, claims and watches)
        self.lock = threading.Lock()
        self.held: dict[str, tuple[list[str], str | None]] = {}  # run id -> the slot it holds (gpus, slot id)
        self.running: set[str] = set()  # runs whose machine this worker runs now
        self.reasons: dict[str, str] = {}  # the waiting reasons this worker last wrote

    # ------------------------------------------------------------------ from the queue

    def post(self, store: Store, run, spec) -> None:
        """Put `run` (queued, num_machines > 1) on the board; the workers' decision starts it."""
        resumes_here = run.files_host if run.resume and artifacts_root() is None else None
        order = board_order(run.priority or 0, run.created_at or time.time())
        Board(store.state).post(run.id, spec.num_machines, spec.num_processes, resumes_here, order)
        store.add_event(
            run.id,
            "queued",
            f"waits for {spec.num_machines} workers with room for {spec.num_processes} process(es) each"
            + (f"; machine 0 on {resumes_here}, which holds its checkpoint" if resumes_here else ""),
        )
        log.info("run %s needs %d machines: on the board", run.id, spec.num_machines)

    # ------------------------------------------------------------------ the decision, every second

    def loop(self) -> None:
        w = self.worker
        store = open_store(w.home)
        try:
            while not w.shutting_down.wait(TICK_SECONDS):
                try:
                    self.tick(store)
                except Exception as err:  # Redis restarting: decide again next time
                    if redis_unreachable(err):
                        w.redis.failed(err)
                    else:
                        log.exception("gang scheduling failed")
            self.leave_all(store)
        finally:
            store.close()

    def tick(self, store: Store) -> None:
        w = self.worker
        board = Board(store.state)
        entries = board.entries()
        rows = dict(zip([e.run_id for e in entries], store.state.get_many([e.run_id for e in entries])))
        statuses = {run_id: (row or {}).get("status") for run_id, row in rows.items()}
        live = store.live_workers(w.stale_seconds)
        live_ids = {row["id"] for row in live}
        rooms = [_room(row) for row in live if row["id"] != w.worker_id] + [w.room()]
        gathering = []
        for entry in entries:
            status = statuses.get(entry.run_id)
            if status is None or status in ENDED:
                board.drop(entry.run_id)  # cancelled while it gathered, or its machine 0 was lost
            elif entry.state == "gathering" and status == "queued":
                for member in entry.members:
                    if member["worker"] not in live_ids:  # gone before the run started
                        board.leave(entry.run_id, member["worker"])
                gathering.append(entry)
        decision = plan([e.gang() for e in gathering], rooms)
        if w.worker_id == min(live_ids | {w.worker_id}):  # one worker says why runs wait
            self._say_why(store, decision.waiting)
        else:
            self.reasons = {}
        for entry in gathering:
            if entry.rank_of(w.worker_id) is None:
                continue
            if w.worker_id not in decision.take.get(entry.run_id, []):
                board.leave(entry.run_id, w.worker_id)
                self._release(entry.run_id)
            elif len(entry.members) == entry.machines:
                order = machine_order(entry.members, entry.host)
                if order[0]["worker"] == w.worker_id:
                    self._lead(store, board, entry, order)
        joined = self._join(board, gathering, decision.take)
        by_id = {e.run_id: e for e in entries}
        with self.lock:  # (the entries were read before this tick's join)
            waiting = [run_id for run_id in self.held if run_id not in self.running and run_id != joined]
        for run_id in waiting:
            entry = by_id.get(run_id)
            rank = entry.rank_of(w.worker_id) if entry is not None else None
            if rank is None:
                self._release(run_id)  # dropped, or it left us out
            elif entry.state == "ready" and rank > 0 and statuses.get(run_id) == "running":
                self._start(entry, rank)

    def _say_why(self, store: Store, waiting: dict[str, str]) -> None:
        for run_id, reason in waiting.items():
            if self.reasons.get(run_id) != reason:
                store.change_run(run_id, {"waiting": reason}, only_if=["queued"])
        self.reasons = dict(waiting)

    def _join(self, board: Board, gathering, take: dict[str, list[str]]) -> str | None:
        """Join the run the plan gives this worker, taking its slot; returns its id when it joined."""
        w = self.worker
        with self.lock:
            if any(e.run_id in self.held for e in gathering):
                return None  # one gathering run at a time
        target = next(
            (e for e in gathering if w.worker_id in take.get(e.run_id, []) and e.rank_of(w.worker_id) is None), None
        )
        taken = w.slots.try_take(target.processes) if target is not None else None
        if taken is None:
            return None
        if not board.join(target.run_id, w.worker_id, w.host, taken[1]):
            w.slots.release(*taken)
            return None
        with self.lock:
            self.held[target.run_id] = taken
        log.info("joined run %s (needs %d machines)", target.run_id, target.machines)
        return target.run_id

    def _release(self, run_id: str) -> None:
        with self.lock:
            taken = self.held.pop(run_id, None) if run_id not in self.running else None
        if taken is not None:
            self.worker.slots.release(*taken)

    def leave_all(self, store: Store) -> None:
        """The worker stops: leave the runs still gathering, free their slots."""
        board = Board(store.state)
        with self.lock:
            waiting = [run_id for run_id in self.held if run_id not in self.running]
        for run_id in waiting:
            board.leave(run_id, self.worker.worker_id)
            self._release(run_id)

    # ------------------------------------------------------------------ starting this worker's machine

    def _lead(self, store: Store, board: Board, entry, order: list[dict]) -> None:
        """Machine 0: publish the rendezvous, move the run to running, start its processes."""
        w = self.worker
        if entry.run_id not in self.held:
            return
        address = f"{rendezvous_host()}:{free_port()}"
        if not board.start(entry.run_id, order, address):
            return  # a member left meanwhile: it gathers again
        gpus, slot = self.held[entry.run_id]
        run = w._claim(store, entry.run_id, slot, machines=machines_field(order), waiting=None)
        if run is None:  # cancelled meanwhile
            board.drop(entry.run_id)
            self._release(entry.run_id)
            return
        entry.members, entry.rendezvous = order, address
        self._start(entry, 0)

    def _start(self, entry, rank: int) -> None:
        with self.lock:
            self.running.add(entry.run_id)
        threading.Thread(
            target=self._run_machine, args=(entry, rank), daemon=True, name=f"machine-{rank}-{entry.run_id}"
        ).start()

    def _run_machine(self, entry, rank: int) -> None:
        w = self.worker
        store = open_store(w.home)
        gpus, slot = self.held[entry.run_id]
        machine = (rank, entry.machines, entry.rendezvous)
        try:
            run = store.get_run(entry.run_id)
            proc = w._start_child(store, run, slot, entry.processes, machine=machine)
            with w.children_lock:
                w.children[entry.run_id] = proc
            try:
                if rank == 0:
                    w._watch(
                        store, run.id, proc, w.run_dir(store, run.id) / "log.txt", lost=lambda: self.lost(store, run.id)
                    )
                else:
                    self._follow(store, run.id, proc)
            finally:
                with w.children_lock:
                    w.children.pop(entry.run_id, None)
            if rank == 0:
                w._record_end(store, run.id, proc.returncode, lost=self.lost(store, run.id))
                Board(store.state).drop(run.id)
            elif proc.returncode:
                _machine_ended(store, run.id, rank, w.host, w.log_tail(store, run.id, f"log-machine-{rank}.txt"))
        except Exception as err:
            log.exception("worker error on machine %d of run %s", rank, entry.run_id)
            if rank == 0:
                store.set_status(entry.run_id, "failed", only_if=["queued", "running"], error=f"worker error: {err}")
        finally:
            with self.lock:
                self.running.discard(entry.run_id)
                self.held.pop(entry.run_id, None)
            w.slots.release(gpus, slot)
            store.close()

    def _follow(self, store: Store, run_id: str, proc) -> None:
        """Machine K > 0: its processes end with the run; once the run is no longer running (ended on
        machine 0, or marked interrupted when machine 0 was lost) they get --grace seconds, then are killed."""
        w = self.worker
        kill_at, checked = None, 0.0
        while proc.poll() is None:
            now = time.monotonic()
            if kill_at is None and now - checked >= 2.0:
                checked = now
                try:
                    run = store.get_run(run_id)
                    over = run is None or run.status != "running"
                except Exception as err:
                    if not redis_unreachable(err):
                        raise
                    over = False  # Redis away: no verdict; the processes go on
                if over:
                    kill_at = now + w.grace
            if kill_at is not None and now >= kill_at:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)

    def lost(self, store: Store, run_id: str) -> str | None:
        """Why machine 0's run lost a machine (marked on the board for its stop check), or None."""
        board = Board(store.state)
        entry = board.get(run_id)
        reason = lost_machine(entry, {row["id"] for row in store.live_workers(self.worker.stale_seconds)})
        if reason and entry is not None and entry.lost is None:
            board.mark_lost(run_id, reason)
        return reason


def _room(row: dict) -> Room:
    """Another live worker, from its heartbeat (an older Cherry's beat says nothing free)."""
    slots = int(row.get("slots") or 1)
    return Room(row["id"], row["host"], bool(row.get("gpus")), slots, int(row.get("free") or 0))


def _machine_ended(store: Store, run_id: str, rank: int, host: str, tail: str) -> None:
    """Machine K's processes failed while the run still runs: say so, with its log's last lines (machine 0
    ends the run when its processes fail in the collective machine K left)."""
    run = store.get_run(run_id)
    if run is not None and run.status == "running":
        last = "\n".join(tail.splitlines()[-5:])
        store.add_event(run_id, "machine", f"machine {rank} on {host} ended; its log ends:\n{last}")
