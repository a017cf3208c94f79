"""Data-parallel runs: `num_processes: N` runs one process per rank, each on its share of every batch.

How a run becomes N processes (`launch`): the process that `train()` was called in is rank 0 (it keeps
the run's reporter and its stop check); it starts ranks 1..N-1 as `python -m engine.rank`, each
with its own log in `<run dir>/ranks/`, and all join one process group (gloo on the CPU, NCCL on GPUs,
rank r on GPU r of those the run may see).

What is the same as one process with an N-times larger batch (`World`):
- every rank holds the whole model; after backward the gradients are summed across ranks
  (`reduce_gradients`), so every rank takes the same optimizer step and the weights stay equal;
- the loss normalisers are global: the step's pairs, examples or tokens are counted over all ranks
  before any rank divides (`sum`), so a token-mean loss over 2 ranks equals the 1-process loss of the
  same global batch (not a mean of per-rank means), and the logged metrics are global sums / counts;
- the stop check is rank 0's, broadcast every step, so all ranks stop at the same step.
Rank 0 alone evaluates, logs, samples and writes checkpoints and the final model. Checkpoints keep
every rank's random generators and the world size. `parallelism: fsdp` shards the model instead of
copying it (engine/sharding.py); the rest of this holds as it is.

The gradient sum runs after the step's backward passes, not overlapped with them as DDP's bucketed
hooks are: simpler to read and exact, at the cost of the overlap on fast interconnects.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.errors import OOM_EXIT, USER_ERROR_EXIT, CherryError

log = logging.getLogger("cherry.engine")

RANK_ENV = "CHERRY_RANK"  # set in ranks 1..N-1 (rank 0 is the process train() runs in)
TIMEOUT_SECONDS = float(os.environ.get("CHERRY_DIST_TIMEOUT") or 1800)  # rank 0 evaluates while others wait
GRADIENT_BUCKET = 2**24  # elements summed in one collective (64 MB of fp32)


@dataclass(frozen=True)
class World:
    """This process's place among a run's processes. `World()` is a one-process run: every method is
    then a no-op that returns its input, so the loops call them unconditionally."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous share of `items` (sizes differ by at most one; may be empty)."""
        if not self.active:
            return items
        size, extra = divmod(len(items), self.size)
        start = self.rank * size + min(self.rank, extra)
        return items[start : start + size + (1 if self.rank < extra else 0)]

    def micro_shards(self, global_chunks: list[list], lockstep: bool = False) -> list[tuple[list, bool]]:
        """This rank's share of each of a step's global micro-batches, as (rows, counts). An empty share is
        left out; under `lockstep` (a sharded model, whose every pass is a collective all ranks call)
        it becomes a filler instead: the micro-batch's first row, with counts False (its loss times zero)."""
        out = []
        for chunk in global_chunks:
            rows = self.shard(chunk)
            if rows:
                out.append((rows, True))
            elif lockstep and chunk:
                out.append((chunk[:1], False))
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64, so counts and sums stay exact)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (picklable objects; small ones: rollouts, metric sums)."""
        if not self.active:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def reduce_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `parameters` over the ranks, in flat buckets. A parameter a rank did not
        reach (no rows this step, a branch not taken) contributes zeros, so every rank calls the same
        collectives in the same order. Sharded parameters (parallelism fsdp) were summed in backward."""
        if not self.active:
            return
        parameters = [p for p in parameters if not is_shard(p)]
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        filled = 0
        for p in parameters:
            bucket.append(p.grad)
            filled += p.grad.numel()
            if filled >= GRADIENT_BUCKET:
                _sum_bucket(bucket)
                bucket, filled = [], 0
        if bucket:
            _sum_bucket(bucket)

    @contextlib.contextmanager
    def shared_random(self):
        """Inside, every rank draws the same random numbers as rank 0 (the online update's shuffles and
        anything `prepare` draws, which must agree across ranks); afterwards rank 0 goes on from where it
        got to (as one process would) and the other ranks return to their own generators."""
        if not self.active:
            yield
            return
        own = (torch.get_rng_state(), random.getstate())
        torch_state, python_state = self.broadcast((torch.get_rng_state(), random.getstate()))
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        try:
            yield
        finally:
            if not self.is_main:
                torch.set_rng_state(own[0])
                random.setstate(own[1])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )


def is_shard(p: torch.Tensor) -> bool:
    """Whether `p` is one rank's shard of a tensor (a sharded model's parameter or gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _sum_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def merge_metric_sums(per_rank: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Every rank's (sums, counts) of a `MetricSums` added name by name (a rank may lack a name: a KTO
    shard without undesirable rows has no reward of them)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for rank_sums, rank_counts in per_rank:
        for name, value in rank_sums.items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0.0) + rank_counts[name]
    return sums, counts


# ---------------------------------------------------------------------------------------- starting ranks


def rank_device(device: torch.device, world: World) -> torch.device:
    """Rank r computes on GPU r of those the process may see; CPU ranks share the CPU. One process on
    `cuda:N` makes GPU N its current device, so whatever uses the current device (PEFT loading an adapter,
    a library's own allocations) lands there too, not on GPU 0."""
    if device.type != "cuda":
        return device
    if not world.active:
        if device.index is not None:
            torch.cuda.set_device(device)
        return device
    if world.size > torch.cuda.device_count():
        raise CherryError(
            f"num_processes is {world.size} but this machine shows {torch.cuda.device_count()} GPU(s); "
            f"set --set num_processes={torch.cuda.device_count()} (one process per GPU)"
        )
    torch.cuda.set_device(world.rank)
    return torch.device("cuda", world.rank)


def join(rank: int, size: int, address: str, port: int, backend: str) -> World:
    """Join the run's process group; returns this process's `World`."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=TIMEOUT_SECONDS),
    )
    return World(rank=rank, size=size)


def loopback_only() -> dict[str, str]:
    """Environment that keeps a one-machine run's gloo and NCCL sockets on the loopback interface (the
    rendezvous address is 127.0.0.1 already): nothing of the run listens for other machines. A value the
    user set wins."""
    if not Path("/sys/class/net/lo").exists():
        return {}
    return {name: os.environ.get(name) or "lo" for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(spec) -> str:
    wants_gpu = spec.device.startswith("cuda") or (spec.device == "auto" and torch.cuda.is_available())
    return "nccl" if wants_gpu else "gloo"


@dataclass
class Ranks:
    """Ranks 1..N-1 of a run, started by rank 0; `stop()` ends them when rank 0 ends."""

    processes: list[subprocess.Popen]
    logs: list[Path]
    stopping: threading.Event = field(default_factory=threading.Event)

    def failure(self, wait: float = 10.0) -> str | None:
        """A line on the first rank that ended with an error, and its last log lines (None if none did
        within `wait` seconds: rank 0's own error then stands)."""
        deadline = time.monotonic() + wait
        while True:
            for proc, log_path in zip(self.processes, self.logs):
                code = proc.poll()
                if code is not None and code != 0:
                    tail = log_path.read_text(errors="replace").splitlines()[-20:] if log_path.exists() else []
                    return f"rank process {log_path.stem} ended with exit code {code}; its log ends:\n" + "\n".join(
                        tail
                    )
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)

    def exit_code(self) -> int | None:
        return next((p.returncode for p in self.processes if p.returncode not in (None, 0)), None)

    def stop(self, grace: float = 10.0) -> None:
        self.stopping.set()  # from here on a rank that ends is rank 0's doing, not a failure
        deadline = time.monotonic() + grace
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


def start_ranks(spec, out_dir: Path, *, resume: bool, cache_dir) -> tuple[World, Ranks]:
    """Rank 0's side of `launch`: write the spec for the other ranks, start them, join the group."""
    size, backend = spec.num_processes, backend_for(spec)
    folder = Path(out_dir) / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    port = free_port()
    processes, logs = [], []
    for rank in range(1, size):
        log_path = folder / f"rank-{rank}.log"
        command = [sys.executable, "-P", "-m", "engine.rank", str(spec_file), str(out_dir), str(rank), str(size)]
        command += [str(port), backend, "1" if resume else "0", str(cache_dir or "")]
        with open(log_path, "ab") as log_file:
            processes.append(
                subprocess.Popen(
                    command,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **loopback_only(), RANK_ENV: str(rank), "PYTHONUNBUFFERED": "1"},
                    preexec_fn=_die_with_parent,
                )
            )
        logs.append(log_path)
    ranks = Ranks(processes, logs)
    os.environ.update(loopback_only())  # rank 0 joins in this process
    threading.Thread(target=_watch_ranks, args=(ranks,), daemon=True).start()
    return join(0, size, "127.0.0.1", port, backend), ranks


def _watch_ranks(ranks: Ranks) -> None:
    """A rank that dies (a crash, out of memory, killed) usually makes rank 0's next collective fail at once
    (`train` then says which rank and why). Where it would instead leave rank 0 waiting for the group's
    timeout (rank 0 busy evaluating, an NCCL hang), end rank 0 too, with the rank's last log lines. The
    run's metrics, logs and last checkpoint stay; `cherry resume` continues it."""
    while not ranks.stopping.wait(0.5):
        failure = ranks.failure(wait=0)
        if failure is None:
            if all(proc.poll() is not None for proc in ranks.processes):
                return
            continue
        if ranks.stopping.wait(30):  # rank 0 noticed by itself and is ending the run
            return
        print(failure, file=sys.stderr, flush=True)
        for proc in ranks.processes:
            if proc.poll() is None:
                proc.kill()
        # a user error (2) or out of memory (3) in a rank is the run's: the worker reads the exit code
        code = ranks.exit_code()
        os._exit(code if code in (USER_ERROR_EXIT, OOM_EXIT) else 1)


def _die_with_parent() -> None:
    """A rank ends when rank 0's process does (killed by a worker, Ctrl+C): Linux's parent-death signal."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
