"""`python -m jobs.child RUN_ID`: one run, in its own process, started by a worker.

A fresh process per run gives each run a clean CUDA context and lets the worker stop it by
process group without touching its own state; torch is imported here, never in the worker.

The child owns its run's rows while it lives: metrics, samples and events through the store
reporter, and its final status. It stops cooperatively at the next step when
- the run's `cancel_requested` flag is set (`cherry cancel`)        -> status cancelled
- it receives SIGTERM/SIGINT (the worker is shutting down)          -> status interrupted
- its worker dies (parent-death signal, or its parent pid changes)  -> status interrupted
- its sweep's early-stopping rule judges it weak at an eval point   -> status pruned (jobs/sweep.py)
Either way it saves a checkpoint first, so `cherry resume` continues with identical losses.

A run over several machines (`num_machines`, jobs/gang.py) has one such process per machine, started with
`--machine K --machines M --rendezvous HOST:PORT`: machine 0's is the run's process as above, starting its
processes through `engine.launch.launch`; another machine's starts its processes and writes nothing to the run
but, when it is told to stop (its worker was killed or stops), the mark that the run lost a machine, which ends
the run `interrupted` on machine 0.

Exit codes: 0 completed, 2 a user error (message in the store), 3 out of memory, 1 a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
import traceback

from engine.errors import OOM_EXIT, USER_ERROR_EXIT, CherryError
from engine.reporting import MultiReporter, ProgressReporter
from engine.spec import build_spec
from jobs.gang import Board, lost_machine
from jobs.home import cache_dir, cherry_home, runs_root
from jobs.reporters import build_reporters, close_all
from jobs.shared import open_store, ride_out_outages
from jobs.store import Store, StoreReporter, this_host
from jobs.sweep import prune_reason
from jobs.trust import derived_run_dir, keep_files_private

POLL_SECONDS = 0.5  # how often the stop check reads the store (it runs once per step)
OOM_ADVICE = (
    "out of memory: lower batch_size (raise grad_accum to keep the effective batch), set max_length lower, "
    "turn on LoRA (--set lora.r=16) or gradient_checkpointing=true, then `cherry resume`"
)


class StopCheck:
    """The engine's `should_stop`: None to go on, else the status to end with."""

    def __init__(self, store: Store, run_id: str, parent_pid: int, lost=None) -> None:
        self.store = store
        self.lost = lost  # a run over several machines: why it lost one, or None
        self.run_id = run_id
        self.parent_pid = parent_pid
        self.signalled = False
        self._checked_at = 0.0
        self._verdict: str | None = None
        self.prune_reason: str | None = None

    def on_signal(self, signum: int, frame) -> None:
        self.signalled = True

    def __call__(self) -> str | None:
        if self.signalled or os.getppid() != self.parent_pid:
            return "interrupted"
        now = time.monotonic()
        if now - self._checked_at >= POLL_SECONDS:
            self._checked_at = now
            run = self.store.get_run(self.run_id)
            if run is None or run.cancel_requested:
                self._verdict = "cancelled"
            elif self.lost is not None and self.lost():
                self._verdict = "interrupted"
            elif run.prune:
                self.prune_reason = prune_reason(self.store, run)
                self._verdict = "pruned" if self.prune_reason else None
        return self._verdict


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` when the worker dies (a SIGKILLed worker cannot forward anything)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the parent-pid check in StopCheck covers it


def run_child(run_id: str, parent_pid: int, machine: tuple[int, int, str] | None = None) -> int:
    """Run `run_id` to its end (`machine`: this machine's rank, the machines and the rendezvous of a run over
    several machines); returns the exit code."""
    ride_out_outages()  # a run's writes to Redis ride out a restart, as its worker's do
    try:
        store = open_store(cherry_home())
    except CherryError as err:  # the worker records the failure from the exit code and this log line
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    run = store.get_run(run_id)
    if run is None:
        print(
            f"error: run {run_id} is not in the store {store.path}" + (" (or in Redis)" if store.shared else ""),
            file=sys.stderr,
        )
        return USER_ERROR_EXIT
    rank, machines, rendezvous = machine or (0, 1, None)
    if rank > 0:
        return run_other_machine(store, run, parent_pid, rank, machines, rendezvous)
    board = Board(store.state) if machines > 1 else None
    stop = StopCheck(store, run_id, parent_pid, lost=(lambda: (board.get(run_id) or _NO_ENTRY).lost) if board else None)
    signal.signal(signal.SIGTERM, stop.on_signal)
    signal.signal(signal.SIGINT, stop.on_signal)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    extra: list = []  # report_to: TensorBoard, W&B
    try:
        from engine.launch import launch
        from engine.train import train  # the heavy imports happen here, in the run's own process

        spec = build_spec(run.spec)
        out_dir = str(derived_run_dir(runs_root(cherry_home(), store.shared), run_id))  # never the row's path
        extra = build_reporters(spec, out_dir, run_id=run_id, group=run.experiment)
        reporter = MultiReporter(StoreReporter(store, run_id), ProgressReporter(sys.stdout), *extra)
        if machines > 1:
            summary = launch(
                spec,
                out_dir,
                reporter,
                should_stop=stop,
                cache_dir=cache_dir(),
                resume=bool(run.resume),
                machines=machines,
                machine_rank=0,
                rendezvous=rendezvous,
            )
        else:
            summary = train(spec, out_dir, reporter, should_stop=stop, cache_dir=cache_dir(), resume=bool(run.resume))
    except CherryError as err:
        _fail(store, run_id, str(err))  # first: the log below may be on the disk that is full
        with contextlib.suppress(OSError):
            print(f"error: {err}", flush=True)
        return USER_ERROR_EXIT
    except Exception as err:  # a crash: the traceback goes to the run's log, the gist to the store
        traceback.print_exc()
        sys.stdout.flush()
        lost = _lost_machine(store, run_id) if board is not None else None
        if lost:  # its processes failed in a collective that a lost machine left
            error = f"{lost}; continue with `cherry resume {run_id}`"
            store.add_event(run_id, "interrupted", error)
            store.set_status(run_id, "interrupted", only_if=["running"], error=error)
            print(f"[interrupted] {lost}", flush=True)
            return 0
        if "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError":
            _fail(store, run_id, OOM_ADVICE)
            return OOM_EXIT
        _fail(store, run_id, f"{type(err).__name__}: {err}")
        return 1
    finally:
        close_all(extra)
    status = summary["status"]
    lost = stop.lost() if status == "interrupted" and stop.lost is not None else None
    if lost:
        store.set_status(run_id, status, only_if=["running"], error=f"{lost}; continue with `cherry resume {run_id}`")
    if status == "pruned":
        store.add_event(run_id, "pruned", f"stopped early: {stop.prune_reason}; `cherry resume {run_id}` continues it")
    store.set_status(run_id, status, only_if=["running"])
    print(f"[{status}] step {summary['step']}/{summary['total_steps']} in {summary['wall_seconds']:.0f}s", flush=True)
    return 0


def run_other_machine(store: Store, run, parent_pid: int, rank: int, machines: int, rendezvous: str) -> int:
    """Machine `rank` > 0 of a run over several machines: its processes, nothing written to the run (machine 0's
    rank 0 reports for every rank). Stopped (its worker was killed or stops), it marks the run lost first."""
    board = Board(store.state)

    def stopped(signum: int, frame) -> None:
        board.mark_lost(
            run.id,
            f"machine {rank} ({this_host()}) was lost: its run process got {signal.Signals(signum).name} "
            "(its worker stopped or was killed)",
        )
        raise SystemExit(1)  # its processes end with it (their parent-death signal)

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        from engine.launch import launch

        spec = build_spec(run.spec)
        out_dir = derived_run_dir(runs_root(cherry_home(), store.shared), run.id)
        launch(
            spec,
            out_dir,
            None,
            cache_dir=cache_dir(),
            resume=bool(run.resume),
            machines=machines,
            machine_rank=rank,
            rendezvous=rendezvous,
        )
    except CherryError as err:
        print(f"error: {err}", flush=True)
        return USER_ERROR_EXIT
    except Exception:
        traceback.print_exc()
        return 1
    print(f"machine {rank} of {machines}: its processes ended", flush=True)
    return 0


class _NoEntry:
    lost = None  # the run's board entry is gone: it ended


_NO_ENTRY = _NoEntry()


def _lost_machine(store: Store, run_id: str) -> str | None:
    """Why the run lost a machine, waiting until a gone machine's worker would have missed its heartbeats:
    the processes fail in a collective at once, the beats stop only later."""
    stale = float(os.environ.get("CHERRY_HEARTBEAT_TIMEOUT") or 60)
    deadline = time.monotonic() + stale + 5
    board = Board(store.state)
    while True:
        live = {row["id"] for row in store.live_workers(stale)}
        reason = lost_machine(board.get(run_id), live)
        if reason or time.monotonic() >= deadline:
            return reason
        time.sleep(0.5)


def _fail(store: Store, run_id: str, error: str) -> None:
    store.add_event(run_id, "error", error)
    store.set_status(run_id, "failed", only_if=["running"], error=error)


def main() -> None:
    args = sys.argv[1:]
    flags = dict(zip(args[2::2], args[3::2]))
    if len(args) not in (2, 8) or (len(args) == 8 and set(flags) != {"--machine", "--machines", "--rendezvous"}):
        print("usage: python -m jobs.child RUN_ID PARENT_PID [--machine K --machines M --rendezvous HOST:PORT]")
        sys.exit(USER_ERROR_EXIT)
    run_id, parent_pid = args[0], int(args[1])
    machine = (int(flags["--machine"]), int(flags["--machines"]), flags["--rendezvous"]) if flags else None
    keep_files_private()
    _die_with_parent()
    if os.getppid() != parent_pid:  # the worker died before the death signal was armed
        sys.exit(1)
    sys.exit(run_child(run_id, parent_pid, machine))


if __name__ == "__main__":
    main()
