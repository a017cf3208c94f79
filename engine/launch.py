"""How a run becomes processes, and how each process joins its run.

Two ways in, one kind of rank: every rank is a process that a launcher started with RANK, LOCAL_RANK,
WORLD_SIZE and MASTER_ADDR/MASTER_PORT in its environment, and `join` joins the process group they name.

1. Cherry starts the processes (`num_processes: N`, `launch`). The process that `train()` was called in
   runs PyTorch's elastic agent (`torch.distributed.launcher`, the agent `torchrun` runs) in a thread: its
   static TCP rendezvous (machine 0 holds the store) assigns the ranks and local ranks, it starts the
   machine's N processes (`python -m engine.rank`), and when one fails it stops the others and says which
   and how (`_failure`). The train() process is no rank itself: it keeps the run's reporter and stop check,
   and rank 0 reaches them through `ParentLink`, a local authenticated connection. Each report and each
   step's stop check is a call answered in the train() process's main thread, where the store's
   connection lives; rank 0 waits for each answer, so the reporter sees the calls of a one-process run in
   their order, an error it raises (a full disk) ends the run as it would there, and the stop check stays
   rank 0's, broadcast to the others every step.
   Why the train() process is not rank 0: the agent starts every rank of its machine itself (the
   rendezvous decides who is who), and a parent that is no rank never waits in a collective, so when a
   rank dies it is free to say which. A second machine runs the same `launch` with its machine rank and
   the first machine's rendezvous address; only machine 0 has a rank 0 and so a link.
2. Another launcher started this process (`torchrun`, `accelerate launch`, `srun`): `launched` reads its
   variables (SLURM's when the torch ones are absent), `fit_spec` checks them against the spec, `join`
   joins its group. Rank 0 is the `cherry train` that keeps the reporter and the stop check; the other
   ranks run the same command and report nothing (tuiapp/cli/train.py).
Either way rank 0 alone writes the run directory (and, through its reporter, the store).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import secrets
import signal
import socket
import sys
import threading
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable

from engine.errors import OOM_EXIT, USER_ERROR_EXIT, CherryError, SpecError, first_line

TIMEOUT_SECONDS = float(os.environ.get("CHERRY_DIST_TIMEOUT") or 1800)  # a collective's wait: rank 0 evaluates alone
RENDEZVOUS_SECONDS = float(os.environ.get("CHERRY_RENDEZVOUS_TIMEOUT") or 300)  # every rank reaching MASTER_ADDR
TORCH_VARIABLES = "RANK/WORLD_SIZE"
SLURM_VARIABLES = "SLURM_PROCID/SLURM_NTASKS"
REPORTER_CALLS = ("log_metrics", "log_samples", "log_event", "rewind", "log_rollouts")


@dataclass(frozen=True)
class Launched:
    """A process's place in a run as its launcher's environment gives it."""

    rank: int
    local_rank: int
    size: int
    local_size: int  # processes on this machine
    address: str  # the rendezvous: rank 0's machine
    port: int
    variables: str  # which launcher variables said so (TORCH_VARIABLES or SLURM_VARIABLES)

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


def launched(env: dict[str, str] | None = None) -> Launched | None:
    """This process's rank, world and rendezvous when a launcher started it as one of a run's processes:
    torchrun's (and accelerate's, and Cherry's own agent's) RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; else, inside an `srun` step, SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and
    SLURM_NTASKS_PER_NODE with MASTER_ADDR (MASTER_PORT defaults to 29500). None when there is none."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        size = _number(env, "WORLD_SIZE")
        found = Launched(
            rank=_number(env, "RANK"),
            local_rank=_number(env, "LOCAL_RANK", "0"),
            size=size,
            local_size=_number(env, "LOCAL_WORLD_SIZE", str(size)),
            address=env.get("MASTER_ADDR", ""),
            port=_number(env, "MASTER_PORT", "0"),
            variables=TORCH_VARIABLES,
        )
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:  # a task of an srun step
        size = _number(env, "SLURM_NTASKS")
        per_node = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or "")
        found = Launched(
            rank=_number(env, "SLURM_PROCID"),
            local_rank=_number(env, "SLURM_LOCALID", "0"),
            size=size,
            local_size=int(per_node.group()) if per_node else size,
            address=env.get("MASTER_ADDR", ""),
            port=_number(env, "MASTER_PORT", "29500"),
            variables=SLURM_VARIABLES,
        )
    else:
        return None
    if found.size > 1 and (not found.address or not found.port):
        raise CherryError(
            f"{found.variables} say this is rank {found.rank} of {found.size}, but MASTER_ADDR/MASTER_PORT do not "
            "say where the ranks meet; set them to rank 0's machine and a free port (e.g. in an sbatch script: "
            "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) MASTER_PORT=29500)"
        )
    return found


def _number(env, name: str, fallback: str | None = None) -> int:
    value = env.get(name, fallback)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CherryError(f"the launcher variable {name} is {value!r}; it must be a whole number") from None


def fit_spec(spec, found: Launched, env: dict[str, str] | None = None):
    """The spec as the launcher runs it: `num_processes` is the launcher's processes per machine and
    `num_machines` its machines. A spec that asks for another count (other than 1, which follows the
    launcher), or a dtype other than the mixed precision an accelerate config asks for, is refused, naming both."""
    env = os.environ if env is None else env
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")  # accelerate's "no" is its default, not a request
    if precision in ("fp16", "bf16") and spec.dtype not in ("auto", precision):
        raise SpecError(
            f"dtype is {spec.dtype} but the accelerate config asks for mixed_precision {precision} "
            f"(ACCELERATE_MIXED_PRECISION); set --set dtype={precision}, or change the config's mixed_precision",
            "dtype",
        )
    machines = max(1, found.size // max(1, found.local_size))
    if spec.num_machines not in (1, machines):
        raise SpecError(
            f"num_machines is {spec.num_machines} but the launcher started {machines} machine(s) of "
            f"{found.local_size} process(es) ({found.variables}: WORLD_SIZE={found.size}); start it on "
            f"{spec.num_machines} machines, or set --set num_machines={machines} (or leave it out: 1 follows the launcher)",
            "num_machines",
        )
    spec = replace(spec, num_machines=machines)
    if spec.num_processes == found.local_size:
        return spec
    if spec.num_processes != 1:
        per_machine = f", LOCAL_WORLD_SIZE={found.local_size}" if found.local_size != found.size else ""
        raise SpecError(
            f"num_processes is {spec.num_processes} but the launcher started {found.local_size} process(es) on "
            f"this machine ({found.variables}: WORLD_SIZE={found.size}{per_machine}); start the launcher with "
            f"{spec.num_processes} processes per machine, or set --set num_processes={found.local_size} "
            "(or leave it out: 1 follows the launcher)",
            "num_processes",
        )
    return replace(spec, num_processes=found.local_size)


def check_one_machine(spec) -> None:
    """Refuse `num_machines` > 1 where nothing starts the other machines (`cherry train` without a launcher)."""
    if spec.num_machines > 1:
        raise SpecError(
            f"num_machines is {spec.num_machines}: a run over several machines starts from the queue (`cherry submit` "
            "with CHERRY_REDIS_URL set, on that many `cherry worker`s) or under torchrun/srun on each machine; "
            "here it runs on this machine alone: set --set num_machines=1",
            "num_machines",
        )


def join(found: Launched, backend: str):
    """Join the process group `found` names; returns this process's `World`. A rendezvous not reached within
    CHERRY_RENDEZVOUS_TIMEOUT seconds (300) is an error naming its address."""
    import torch.distributed as dist

    from engine.distributed import World

    if found.size == 1:
        return World()
    if found.address in ("127.0.0.1", "localhost", "::1"):
        os.environ.update(loopback_only())  # one machine: nothing of the run listens for others
    # torchrun's ranks use the store its agent holds (env:// knows how); srun's meet at MASTER_ADDR
    url = "env://" if found.variables == TORCH_VARIABLES else f"tcp://{found.endpoint}"
    try:
        store, rank, size = next(
            dist.rendezvous(url, found.rank, found.size, timeout=timedelta(seconds=RENDEZVOUS_SECONDS))
        )
    except (RuntimeError, TimeoutError, ValueError, OSError) as err:
        raise CherryError(
            f"rank {found.rank} of {found.size} could not reach the run's rendezvous at {found.endpoint} "
            f"(MASTER_ADDR/MASTER_PORT) within {RENDEZVOUS_SECONDS:.0f}s: {first_line(err)}. Check that rank 0 "
            "started, that the address is its machine's and reachable from here, and that the port is open "
            "(CHERRY_RENDEZVOUS_TIMEOUT sets the wait)"
        ) from None
    store.set_timeout(timedelta(seconds=TIMEOUT_SECONDS))
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=TIMEOUT_SECONDS)
    )
    return World(rank=rank, size=size, local_rank=found.local_rank, local_size=found.local_size)


def loopback_only() -> dict[str, str]:
    """Environment that keeps a one-machine run's gloo and NCCL sockets on the loopback interface (the
    rendezvous address is 127.0.0.1 already). A value the user set wins."""
    if not Path("/sys/class/net/lo").exists():
        return {}
    return {name: os.environ.get(name) or "lo" for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- starting a run's ranks


def launch(
    spec,
    out_dir: str | Path,
    reporter=None,
    *,
    should_stop: Callable[[], Any] | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    machines: int = 1,
    machine_rank: int = 0,
    rendezvous: str | None = None,
) -> dict[str, Any] | None:
    """Start this machine's `spec.num_processes` ranks of a run through PyTorch's elastic agent and wait for
    them. Machine 0 (the default: a one-machine run on 127.0.0.1) holds the rendezvous store at
    `rendezvous` ("host:port", a free local port when None) and rank 0, whose reports reach `reporter` and
    whose stop check asks `should_stop`; returns rank 0's summary there (None on the other machines).
    A rank that fails ends the run: raised as CherryError (a user error), torch.OutOfMemoryError or
    RuntimeError, naming the rank and quoting its log."""
    out_dir = Path(out_dir)
    folder = out_dir / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    # each machine's own job files: several machines may share one run directory (CHERRY_ARTIFACTS)
    own = "" if machine_rank == 0 else f"-machine-{machine_rank}"
    spec_file = folder / f"spec{own}.yaml"
    spec_file.write_text(spec.to_yaml())
    key = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), authkey=key) if machine_rank == 0 else None
    endpoint = rendezvous or f"127.0.0.1:{free_port()}"
    job = {
        "spec": str(spec_file),
        "out_dir": str(out_dir),
        "resume": resume,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "link": list(listener.address) if listener is not None else None,
        "key": key.hex(),
        "parent_pid": os.getpid(),
        "log_level": _log_level(),
    }
    job_file = folder / f"launch{own}.json"
    with open(os.open(job_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:  # the link's key
        json.dump(job, f)
    config = _launch_config(spec.num_processes, folder, endpoint, machines, machine_rank, out_dir.name)
    outcome: dict[str, BaseException] = {}
    agent = threading.Thread(
        target=_run_agent, args=(config, job_file, outcome), daemon=True, name="cherry-elastic-agent"
    )
    agent.start()
    rank_zero = _RankZero()
    try:
        if listener is not None:
            _serve(listener, key, agent, reporter, should_stop, rank_zero)
        agent.join()
    finally:
        if listener is not None:
            listener.close()
        job_file.unlink(missing_ok=True)
    return _outcome(outcome, rank_zero, folder, endpoint, machine_rank)


def _log_level() -> int:
    return logging.getLogger("cherry.engine").getEffectiveLevel()


def _launch_config(processes: int, folder: Path, endpoint: str, machines: int, machine_rank: int, run_id: str):
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        min_nodes=machines,
        max_nodes=machines,
        nproc_per_node=processes,
        run_id=re.sub(r"[^A-Za-z0-9_.-]", "_", run_id) or "cherry",
        # static: machine 0 is node 0, so global rank 0 (the reporting rank) is on the machine with the link
        rdzv_backend="static",
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": machine_rank, "timeout": int(RENDEZVOUS_SECONDS)},
        max_restarts=0,  # a failed rank ends the run; `cherry resume` continues it from its checkpoint
        monitor_interval=0.5,
        logs_specs=_rank_logs(folder),
    )


class _ThreadedAgent(logging.Filter):
    """The agent runs in a thread, where it cannot install its signal handlers, and warns that its workers
    could be orphaned. Cherry's ranks end with the train() process by their parent-death signal
    (`die_with_parent`) instead, so the warning is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to register signal handlers" not in record.getMessage()


def _run_agent(config, job_file: Path, outcome: dict) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    if not any(isinstance(f, _ThreadedAgent) for f in agent_log.filters):
        agent_log.addFilter(_ThreadedAgent())
    try:
        elastic_launch(config, sys.executable)("-P", "-m", "engine.rank", str(job_file))
    except ChildFailedError as err:
        outcome["failed"] = err
    except BaseException as err:  # the rendezvous timed out, a process could not start
        outcome["error"] = err


def _rank_logs(folder: Path):
    """Where the agent sends each rank's output: ranks 1.. to <run dir>/ranks/rank-N.log (a rank sends its
    stdout there too: engine.rank), rank 0 to where the train() process writes."""
    from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs

    class RankLogs(LogsSpecs):
        @property
        def root_log_dir(self) -> str:
            return str(folder)

        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            ranks = {local: int(env["RANK"]) for local, env in envs.items()}
            return LogsDest(
                stdouts={local: "" for local in envs},
                stderrs={local: str(folder / f"rank-{rank}.log") if rank else "" for local, rank in ranks.items()},
                error_files={local: str(folder / f"error-{rank}.json") for local, rank in ranks.items()},
            )

    return RankLogs(log_dir=str(folder))


@dataclass
class _RankZero:
    """What rank 0 sent back: its summary, or the exception it ended with."""

    summary: dict | None = None
    error: BaseException | None = None


def _serve(
    listener: Listener, key: bytes, agent: threading.Thread, reporter, should_stop, rank_zero: _RankZero
) -> None:
    """Answer rank 0's calls (reports, stop checks, its result) in this thread until rank 0 hangs up."""
    accepted: Queue = Queue()
    threading.Thread(target=lambda: accepted.put(_accept(listener)), daemon=True).start()
    conn: Connection | None = None
    try:
        while conn is None:
            try:
                conn = accepted.get(timeout=0.2)
            except Empty:
                if not agent.is_alive():  # the ranks ended before rank 0 called (a failed start)
                    with suppress(OSError, EOFError):  # release the accepting thread
                        Client(listener.address, authkey=key).close()
                    return
                continue
            if conn is None:
                return
        while True:
            if not conn.poll(0.2):
                continue
            try:
                method, args, kwargs = conn.recv()
            except (EOFError, OSError):  # rank 0 ended (after its result, or killed)
                return
            except Exception as err:  # what rank 0 sent does not unpickle here
                rank_zero.error = RuntimeError(f"rank 0 sent what the train() process cannot read: {first_line(err)}")
                return
            _answer(conn, method, args, kwargs, reporter, should_stop, rank_zero)
    finally:
        if conn is not None:
            conn.close()


def _accept(listener: Listener) -> Connection | None:
    try:
        return listener.accept()
    except (OSError, EOFError):  # closed, or a caller without the key
        return None


def _answer(conn: Connection, method: str, args, kwargs, reporter, should_stop, rank_zero: _RankZero) -> None:
    try:
        if method == "should_stop":
            value = should_stop() if should_stop is not None else None
        elif method == "result":
            rank_zero.summary, value = args[0], None
        elif method == "error":
            rank_zero.error, value = args[0], None
        elif method in REPORTER_CALLS:
            # log_rollouts is optional on a reporter (engine/reporting.py): one without it keeps none
            call = getattr(reporter, method, None) if reporter is not None else None
            value = call(*args, **kwargs) if call is not None else None
        else:
            raise ValueError(f"rank 0 called {method!r}, which the link does not answer")
        reply = (True, value)
    except Exception as err:  # raised in rank 0, where the call was made
        reply = (False, portable(err))
    conn.send(reply)


class ParentLink:
    """Rank 0's reporter and stop check when the run's train() is its parent process (`launch`): each call
    is answered there."""

    def __init__(self, address: tuple[str, int], key: bytes) -> None:
        self.conn = Client(tuple(address), authkey=key)

    def _call(self, method: str, *args, **kwargs):
        try:
            self.conn.send((method, args, kwargs))
            ok, value = self.conn.recv()
        except (EOFError, OSError):
            # the train() process is gone or gave up (a second Ctrl+C, a killed worker): quit at once, as
            # Ctrl+C does in a one-process run (its summary says interrupted; no new checkpoint)
            raise KeyboardInterrupt("the run's train() process hung up") from None
        if not ok:
            raise value
        return value

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._call("log_metrics", step, metrics)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self._call("log_samples", step, samples)

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        self._call("log_event", kind, message, **data)

    def rewind(self, step: int) -> None:
        self._call("rewind", step)

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        self._call("log_rollouts", step, records)

    def should_stop(self):
        return self._call("should_stop")

    def result(self, summary: dict) -> None:
        self._call("result", summary)

    def error(self, err: BaseException) -> None:
        """Hand rank 0's exception to the parent (which raises it); a parent already gone is no matter."""
        with suppress(Exception, KeyboardInterrupt):
            self._call("error", portable(err))


def portable(err: BaseException) -> BaseException:
    """`err` if it crosses a process boundary intact (pickles and unpickles), else one of its kind with its
    words: a CherryError stays a user error, out of memory stays out of memory."""
    import torch

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        words = f"{type(err).__name__}: {err}"
        if isinstance(err, CherryError):
            return CherryError(str(err))
        return torch.OutOfMemoryError(words) if isinstance(err, torch.OutOfMemoryError) else RuntimeError(words)


def _outcome(outcome: dict, rank_zero: _RankZero, folder: Path, endpoint: str, machine_rank: int):
    """Rank 0's summary, or the exception that says why the run ended."""
    import torch

    if "error" in outcome:
        err = outcome["error"]
        raise CherryError(
            f"the run's processes could not start or meet at the rendezvous {endpoint} (machine {machine_rank}): "
            f"{first_line(err)}"
        ) from err
    own = rank_zero.error
    failed = outcome.get("failed")
    if failed is None:
        if own is not None:
            raise own
        if machine_rank == 0 and rank_zero.summary is None:
            raise RuntimeError("rank 0 ended without a summary and without an error; see the output above")
        return rank_zero.summary
    rank, failure = _first_failure(failed.failures)
    # rank 0's own error (a user error, out of memory, a bug) stands; a collective that failed because
    # another rank died is explained by that rank
    if own is not None and (rank == 0 or not isinstance(own, RuntimeError) or isinstance(own, torch.OutOfMemoryError)):
        raise own
    log_path = folder / f"rank-{rank}.log"
    tail = log_path.read_text(errors="replace").splitlines()[-20:] if log_path.exists() else []
    where = "its log ends:\n" + "\n".join(tail) if tail else "its output is above"
    message = f"rank process rank-{rank} ended with exit code {failure.exitcode}; {where}"
    if failure.exitcode == OOM_EXIT:
        raise torch.OutOfMemoryError(message)
    if failure.exitcode == USER_ERROR_EXIT:
        raise CherryError(message)
    raise RuntimeError(message)


def _first_failure(failures: dict) -> tuple[int, Any]:
    """The failure that ended the run: not one the agent stopped (SIGTERM) after it, another rank's before
    rank 0's (rank 0 fails in the collective the dead rank left), then the earliest."""
    return min(
        failures.items(),
        key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[0] == 0, item[1].timestamp, item[0]),
    )


# ---------------------------------------------------------------------------------------- a rank's process


def die_with_parent(parent_pid: int) -> None:
    """A rank started by `launch` ends when the train() process does (killed by a worker, a second Ctrl+C):
    Linux's parent-death signal; a parent gone before it was set ends the rank at once."""
    import ctypes

    with suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        sys.exit(1)
