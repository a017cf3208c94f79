"""`cherry worker`: a Huey consumer that executes queued runs, each in its own child process.

One consumer thread per GPU (`--gpus 0,1` gives two; without GPUs, `--concurrency` slots share the
machine). A run asks for `num_processes` GPUs: it starts when that many of the worker's GPUs are free
(`GpuPool`: single-GPU runs are packed onto the lowest free GPUs, nothing is ever oversubscribed, and a
run asking for more GPUs than the worker has fails at once, saying so); its processes see only its
GPUs through CUDA_VISIBLE_DEVICES. For each run the thread:
1. waits for its GPUs, then moves it queued -> running (a run cancelled meanwhile is skipped),
2. starts `python -m jobs.child RUN_ID` in a new process group, its output in `runs/<id>/log.txt`,
3. heartbeats the run row while the child lives, and enforces stops: a cancel request or a
   worker shutdown gives the child `grace` seconds to stop at its next step (it checkpoints),
   then the whole process group is killed,
4. records how it ended when the child could not (killed, crashed), with the log's last lines,
   queues the runs chained after a completed one, and retries crashes that are not the user's
   fault when the run asked for retries.

The worker process itself never imports torch: forking or threading after torch has started
its OpenMP pool can hang, and a clean child per run gives a clean CUDA context.

On start (and every minute) the worker marks runs orphaned by a dead worker as interrupted:
same host and neither the worker nor the run's process is alive, or (other hosts sharing a
Redis queue) no heartbeat for $CHERRY_HEARTBEAT_TIMEOUT seconds (default 60). With Redis it
also streams each run's log to the other hosts and queues again what a Redis restart lost.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from huey.consumer import Consumer

from engine.errors import OOM_EXIT, USER_ERROR_EXIT, CherryError
from engine.spec import build_spec
from jobs.gang import Room
from jobs.gang_worker import GangDuty
from jobs.home import runs_root
from jobs.queue import JobQueue, queue_backend
from jobs.runs import Jobs
from jobs.shared import open_store, redis_unreachable, redis_url, ride_out_outages
from jobs.slots import Slots, child_environment
from jobs.store import Store, pid_alive, this_host
from jobs.trust import UntrustedValue, check_run_id, derived_run_dir

HEARTBEAT_SECONDS = 2.0
STALE_SECONDS = 60.0  # default heartbeat timeout of a run on another host ($CHERRY_HEARTBEAT_TIMEOUT)
SWEEP_SECONDS = 60.0
LOG_CHUNK_BYTES = 64_000  # at most this much new log text is streamed per heartbeat
LOG_TAIL_LINES = 40

log = logging.getLogger("cherry.worker")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Worker:
    def __init__(
        self,
        home: Path,
        *,
        gpus: list[str] | None = None,
        concurrency: int | None = None,
        grace: float = 30.0,
        name: str | None = None,
    ) -> None:
        self.home = Path(home).resolve()
        ride_out_outages()  # an unreachable Redis is waited for (with backoff, in the log), not an error
        self.redis = RedisWatch()
        open_store(self.home).close()  # a store that cannot be used stops the worker before it takes a task
        self.grace = grace
        if gpus and concurrency and concurrency != len(gpus):
            raise ValueError("--concurrency must equal the number of --gpus (a GPU runs one job at a time)")
        self.slots = Slots(gpus, concurrency)
        self.gpu_pool = self.slots.gpu_pool
        self.concurrency = self.slots.count
        self.host = name or this_host()  # `--name`: tells apart workers (hosts) that share one Redis
        self.pid = os.getpid()
        self.shutting_down = threading.Event()
        self.children: dict[str, subprocess.Popen] = {}
        self.children_lock = threading.Lock()
        self.stale_seconds = float(os.environ.get("CHERRY_HEARTBEAT_TIMEOUT") or STALE_SECONDS)
        self.queue = JobQueue(self.home, handler=self.execute, host=self.host)
        self.queue.huey.dequeue = self._patient_dequeue(self.queue.huey.dequeue)
        self.gangs = GangDuty(self) if redis_url() else None  # runs over several machines (num_machines)

    def _patient_dequeue(self, dequeue):
        """Huey's dequeue, waiting out an unreachable Redis with backoff (one log line each try, no traceback)."""

        def patient():
            try:
                task = dequeue()
            except Exception as err:
                if not redis_unreachable(err):
                    raise
                self.shutting_down.wait(self.redis.failed(err))
                return None
            self.redis.reached()
            return task

        return patient

    # ------------------------------------------------------------------ orphans

    def sweep_orphans(self) -> list[str]:
        """Mark runs left `running` by a dead worker as interrupted; returns their ids."""
        store = open_store(self.home)
        marked = []
        try:
            for run in store.list_runs(["running"]):
                if run.worker_host == self.host and run.worker_pid == self.pid:
                    continue  # ours
                beat_before = None
                if run.worker_host == self.host:
                    orphaned = not pid_alive(run.worker_pid) and not pid_alive(run.pid)
                else:  # checked again atomically with the change: a beat meanwhile keeps it running
                    beat_before = time.time() - self.stale_seconds
                    orphaned = (run.heartbeat_at or run.started_at or 0) < beat_before
                if orphaned and store.set_status(
                    run.id,
                    "interrupted",
                    only_if=["running"],
                    beat_before=beat_before,
                    error=f"its worker on {run.worker_host} stopped while it ran (killed, the machine restarted "
                    f"or was cut off); continue it with `cherry resume {run.id}`",
                    log_tail=self.log_tail(store, run.id) or None,
                ):
                    store.add_event(run.id, "interrupted", "marked interrupted: its worker is gone")
                    marked.append(run.id)
                    log.warning("run %s was orphaned by a dead worker: marked interrupted", run.id)
        finally:
            store.close()
        return marked

    # ------------------------------------------------------------------ one run

    def run_dir(self, store: Store, run_id: str) -> Path:
        """The run's directory on this host: derived from its id, never taken from its row."""
        return derived_run_dir(runs_root(self.home, store.shared), run_id)

    def log_tail(self, store: Store, run_id: str, name: str = "log.txt") -> str:
        try:
            return log_tail(self.run_dir(store, run_id) / name)
        except UntrustedValue:
            return ""

    def execute(self, run_id: str) -> None:
        """The Huey task: run `run_id` to its end. Runs in a consumer thread."""
        try:
            check_run_id(run_id)
        except UntrustedValue as err:
            log.warning("dropped a task: %s", err)
            return
        store = open_store(self.home)
        try:
            self._execute(store, run_id)
        except Exception as err:  # a bug here must not leave the run "running" forever
            log.exception("worker error on run %s", run_id)
            store.set_status(run_id, "failed", only_if=["queued", "running"], error=f"worker error: {err}")
        finally:
            store.close()

    def _execute(self, store: Store, run_id: str) -> None:
        """Run one queued run: check it, wait for its GPUs (or a CPU slot), start its process, watch it
        to its end, then record how it ended."""
        run = store.get_run(run_id)
        if run is None or run.status != "queued" or self.shutting_down.is_set():
            return  # removed, cancelled while queued, or a duplicate task
        wanted = self._processes_wanted(store, run)
        if wanted is None:
            return
        taken = self.slots.take(wanted, self.shutting_down)
        if taken is None:
            return  # the worker shut down while the run waited for GPUs: it stays queued
        gpus, slot = taken
        try:
            run = self._claim(store, run_id, slot)
            if run is None:
                return
            proc = self._start_child(store, run, slot, wanted)
            with self.children_lock:
                self.children[run_id] = proc
            try:
                self._watch(store, run_id, proc, self.run_dir(store, run_id) / "log.txt")
            finally:
                with self.children_lock:
                    self.children.pop(run_id, None)
        finally:
            self.slots.release(gpus, slot)
        self._record_end(store, run_id, proc.returncode)

    def _processes_wanted(self, store: Store, run) -> int | None:
        """How many processes (GPUs) the run asks for; None when this worker does not start it here: it
        cannot run it (the run then fails with a message saying why), or the run needs several machines
        (it goes on the board, jobs/gang.py)."""
        try:  # a row from a shared store is checked here again, as `cherry submit` checked it
            spec = build_spec(run.spec)
        except (CherryError, TypeError, ValueError) as err:
            self._refuse(store, run.id, f"the run's settings do not validate on the worker on {self.host}: {err}")
            return None
        wanted = spec.num_processes
        if spec.num_machines > 1:
            if self.gangs is None:
                self._refuse(store, run.id, f"num_machines={spec.num_machines} needs a queue in Redis: {NO_REDIS}")
            else:
                self.gangs.post(store, run, spec)
            return None
        if self.gpu_pool is not None and wanted > len(self.gpu_pool.gpus):
            self._refuse(
                store,
                run.id,
                f"num_processes={wanted} asks for {wanted} GPUs and the worker on {self.host} has "
                f"{len(self.gpu_pool.gpus)} (--gpus {','.join(self.gpu_pool.gpus)}); submit again with "
                f"--set num_processes={len(self.gpu_pool.gpus)} or start a worker with more --gpus",
            )
            return None
        return wanted

    def _refuse(self, store: Store, run_id: str, message: str) -> None:
        if store.set_status(run_id, "failed", only_if=["queued"], error=message):
            store.add_event(run_id, "failed", message)

    def room(self) -> Room:
        """This worker as the gang decision sees it (jobs/gang.py)."""
        return Room(self.worker_id, self.host, self.slots.gpus, self.slots.count, self.slots.free())

    def _claim(self, store: Store, run_id: str, slot: str | None, **more):
        """Move the run queued -> running on this worker (placing its directory, setting `more` too); None
        when it was cancelled or taken while it waited for its slot."""
        run = store.get_run(run_id)
        if run is None or run.status != "queued":
            return None
        jobs = Jobs(self.home)
        try:
            placed = jobs.place(run, self.home, self.host)
        finally:
            jobs.close()
        moved = store.set_status(
            run_id,
            "running",
            only_if=["queued"],
            worker_host=self.host,
            worker_pid=self.pid,
            pid=None,
            heartbeat_at=time.time(),
            attempts=(run.attempts or 0) + 1,
            cancel_requested=0,
            error=None,
            log_tail=None,
            started_at=time.time(),
            finished_at=None,
            gpus=slot,
            **placed,
            **more,
        )
        return run if moved else None  # not moved: another worker took it first

    def _start_child(
        self, store: Store, run, slot: str | None, wanted: int, machine: tuple[int, int, str] | None = None
    ) -> subprocess.Popen:
        """The run's process, in its own process group, its output appended to `runs/<id>/log.txt`.
        `machine`: (its rank, the machines, the rendezvous) for one machine of a run over several; a machine
        other than 0 writes `log-machine-K.txt` and leaves the run's row to machine 0."""
        out_dir = self.run_dir(store, run.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        env = {**child_environment(os.environ, self.home, slot, self.concurrency), "CHERRY_HOST": self.host}
        where = f"GPU {slot}" if slot is not None else "CPU" + (f", {wanted} processes" if wanted > 1 else "")
        rank, machines, rendezvous = machine or (0, 1, "")
        if machines > 1:
            where = f"machine {rank} of {machines}, {where}, rendezvous {rendezvous}"
        attempt = run.attempts or 1 if machine else (run.attempts or 0) + 1  # a machine's row is read after the claim
        store.add_event(run.id, "worker", f"started on {self.host} ({where}), attempt {attempt}")
        log.info("run %s started (%s)", run.id, where)
        extra = ["--machine", str(rank), "--machines", str(machines), "--rendezvous", rendezvous] if machine else []
        with open(out_dir / ("log.txt" if rank == 0 else f"log-machine-{rank}.txt"), "ab") as log_file:
            proc = subprocess.Popen(
                self.child_command(run.id) + extra,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        if rank == 0:
            store.update_run(run.id, pid=proc.pid)
        return proc

    def child_command(self, run_id: str) -> list[str]:
        """The process that runs `run_id` (jobs/child.py: the engine, for every real run)."""
        # -P: the worker's working directory is not on the child's sys.path (a planted module there never loads)
        return [sys.executable, "-P", "-m", "jobs.child", run_id, str(os.getpid())]

    def _watch(self, store: Store, run_id: str, proc: subprocess.Popen, log_path: Path, lost=None) -> None:
        """Beat for the run while its process lives; a cancel, a shutdown or (`lost()`, machine 0 of a run over
        several machines) a lost machine gives it --grace seconds to stop before its process group is killed."""
        kill_at = None
        beat_at = 0.0
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        while proc.poll() is None:
            now = time.monotonic()
            if now - beat_at >= HEARTBEAT_SECONDS:
                beat_at = now
                try:
                    store.heartbeat(run_id)
                    if store.shared:
                        log_offset = _stream_log(store, run_id, log_path, log_offset)
                    run = store.get_run(run_id)
                    self.redis.reached()
                except Exception as err:  # Redis away: the run goes on; its beats and stop checks resume with it
                    if not redis_unreachable(err):
                        raise
                    self.redis.failed(err)
                    run = RUN_UNKNOWN
                stop_asked = run is None or bool(run.cancel_requested) or bool(lost and lost())
                if kill_at is None and (stop_asked or self.shutting_down.is_set()):
                    kill_at = now + self.grace
            if kill_at is not None and now >= kill_at:
                store.add_event(run_id, "killed", f"did not stop within {self.grace:.0f}s: process group killed")
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
        while store.shared and log_offset != (log_offset := _stream_log(store, run_id, log_path, log_offset)):
            pass  # the rest of the log, written as the process ended

    def _record_end(self, store: Store, run_id: str, returncode: int | None, lost: str | None = None) -> None:
        """How the run ended, when its process could not say (`lost`: why a run over several machines lost
        one: it ends interrupted); then the runs chained after it, or its retry."""
        run = store.get_run(run_id)
        if run is None:
            return
        tail = self.log_tail(store, run_id)
        if run.status == "running":  # the child could not record its ending: killed or crashed hard
            if run.cancel_requested:
                status, error = "cancelled", None
            elif lost:
                status, error = "interrupted", f"{lost}; continue with `cherry resume {run_id}`"
            elif self.shutting_down.is_set():
                status, error = "interrupted", f"the worker shut down; continue with `cherry resume {run_id}`"
            else:
                status, error = (
                    "failed",
                    f"the run's process died ({describe_exit(returncode)}); see `cherry logs {run_id}`",
                )
            store.set_status(run_id, status, only_if=["running"], error=error, log_tail=tail)
            store.add_event(run_id, status, error or "stopped")
        elif run.status == "failed":
            store.update_run(run_id, log_tail=tail)
        run = store.get_run(run_id)
        log.info("run %s ended %s (%s)", run_id, run.status, describe_exit(returncode))
        jobs = Jobs(self.home)
        try:
            if run.status == "completed":
                for child in jobs.release_dependents(run_id):
                    log.info("run %s queued: it was chained after %s", child, run_id)
            elif (
                run.status == "failed"
                and returncode not in (USER_ERROR_EXIT, OOM_EXIT)
                and (run.attempts or 0) <= (run.retries or 0)
                and not self.shutting_down.is_set()
            ):
                store.add_event(
                    run_id,
                    "retry",
                    f"retrying after a crash ({describe_exit(returncode)}), "
                    f"attempt {(run.attempts or 0) + 1} of {(run.retries or 0) + 1}",
                )
                jobs.resume(run_id)
        finally:
            jobs.close()

    # ------------------------------------------------------------------ the consumer

    def begin_shutdown(self, signum: int) -> None:
        """First SIGTERM/SIGINT: children stop at their next step (checkpoint, interrupted)."""
        if self.shutting_down.is_set():
            return
        self.shutting_down.set()
        with self.children_lock:
            children = list(self.children.values())
        log.warning(
            "%s: stopping %d run(s) at their next step (at most %.0fs), then exiting",
            signal.Signals(signum).name,
            len(children),
            self.grace,
        )
        for proc in children:
            _kill_group(proc, signal.SIGTERM)

    @property
    def worker_id(self) -> str:
        return f"{self.host}:{self.pid}"

    def _beat_loop(self) -> None:
        """Announce this worker in the store (slots, busy) until it stops."""
        store = open_store(self.home)
        try:
            while True:
                with self.children_lock:
                    busy = len(self.children)
                room = self.room()
                try:
                    store.worker_beat(
                        self.worker_id,
                        host=self.host,
                        pid=self.pid,
                        slots=self.concurrency,
                        busy=busy,
                        queue=queue_backend(),
                        free=room.free,
                        gpus=room.gpus,
                    )
                except Exception as err:  # Redis restarting, a locked store: beat again next time
                    if redis_unreachable(err):
                        self.redis.failed(err)
                    else:
                        log.exception("worker heartbeat failed")
                if self.shutting_down.wait(HEARTBEAT_SECONDS):
                    break
        finally:
            store.close()

    def run(self) -> None:
        self.sweep_orphans()
        threading.Thread(target=self._beat_loop, daemon=True, name="worker-heartbeat").start()
        if self.gangs is not None:
            threading.Thread(target=self.gangs.loop, daemon=True, name="gang-scheduling").start()
        try:
            self._consume()
        finally:
            self.shutting_down.set()
            store = open_store(self.home)
            store.remove_worker(self.worker_id)
            store.close()

    def _consume(self) -> None:
        consumer = _Consumer(
            self,
            self.queue.huey,
            workers=self.concurrency,
            worker_type="thread",
            periodic=False,
            initial_delay=0.1,
            max_delay=1.0,
            backoff=1.15,
            check_worker_health=True,
            shutdown_timeout=self.grace + 15,
        )
        sweeper = threading.Thread(target=self._sweep_loop, daemon=True, name="orphan-sweep")
        sweeper.start()
        consumer.run()

    def _sweep_loop(self) -> None:
        # A host gone from a shared Redis is noticed within about one and a third heartbeat timeouts.
        while not self.shutting_down.wait(min(SWEEP_SECONDS, self.stale_seconds / 3)):
            try:
                self.sweep_orphans()
                if redis_url():
                    self.requeue_lost()
            except Exception:
                log.exception("orphan sweep failed")

    def requeue_lost(self) -> None:
        jobs = Jobs(self.home)
        try:
            for run_id in jobs.requeue_lost():
                log.warning("run %s was queued but no queue held it (Redis restarted?): queued again", run_id)
        finally:
            jobs.close()


class RedisWatch:
    """A worker's view of its Redis: one log line when it becomes unreachable and at each retry (with a
    growing wait), one when it is back. Thread-safe: consumer threads and the heartbeat share it."""

    MAX_WAIT_S = 30.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.down_since: float | None = None
        self.wait = 1.0

    def failed(self, err: BaseException) -> float:
        """Record a failed contact; returns how long the caller waits before trying again."""
        with self.lock:
            now = time.monotonic()
            if self.down_since is None:
                self.down_since, self.wait = now, 1.0
            wait = self.wait
            self.wait = min(self.wait * 2, self.MAX_WAIT_S)
            log.warning(
                "Redis (CHERRY_REDIS_URL) unreachable for %.0fs (%s): the worker keeps retrying, next in %.0fs",
                now - self.down_since,
                str(err).splitlines()[0][:160],
                wait,
            )
            return wait

    def reached(self) -> None:
        with self.lock:
            if self.down_since is not None:
                log.warning("Redis reachable again after %.0fs", time.monotonic() - self.down_since)
                self.down_since = None


class _RunUnknown:
    cancel_requested = 0  # Redis unreachable: no stop request can be read, so none is assumed


RUN_UNKNOWN = _RunUnknown()


class _Consumer(Consumer):
    """Huey's consumer, with SIGTERM and SIGINT both a bounded graceful stop of the runs."""

    def __init__(self, worker: Worker, *args, **kwargs) -> None:
        self.cherry_worker = worker
        super().__init__(*args, **kwargs)

    def _handle_signal(self, signum, frame) -> None:
        self.cherry_worker.begin_shutdown(signum)
        self._signum = signum
        self._restart = False
        self._graceful = True


def _stream_log(store: Store, run_id: str, path: Path, offset: int) -> int:
    """Send the log text written since `offset` to the other hosts; returns the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(LOG_CHUNK_BYTES)
    except OSError:
        return offset
    if data:
        store.add_log(run_id, data.decode("utf-8", errors="replace"))
    return offset + len(data)


NO_REDIS = (
    "set CHERRY_REDIS_URL on every machine and start a `cherry worker` on each (docs/multi-machine.md), "
    "or resubmit with --set num_machines=1"
)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
