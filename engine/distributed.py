"""Data-parallel runs: `num_processes: N` runs one process per rank, each on its share of every batch.

How the processes are started and join one process group is engine/launch.py (PyTorch's elastic agent for
Cherry's own runs; torchrun, `accelerate launch` or srun for runs started by those). This module is what the
ranks do together once joined (`World`), whoever started them.

What is the same as one process with an N-times larger batch (`World`):
- every rank holds the whole model; its gradients are summed across ranks (`GradientSync`), so every
  rank takes the same optimizer step and the weights stay equal;
- the loss normalisers are global: the step's pairs, examples or tokens are counted over all ranks
  before any rank divides (`sum`), so a token-mean loss over 2 ranks equals the 1-process loss of the
  same global batch (not a mean of per-rank means), and the logged metrics are global sums / counts;
- the stop check is rank 0's, broadcast every step, so all ranks stop at the same step.
Rank 0 alone evaluates, logs, samples and writes checkpoints and the final model. Checkpoints keep
every rank's random generators and the world size. `parallelism: fsdp` shards the model instead of
copying it (engine/sharding.py); the rest of this holds as it is.

The gradient sum overlaps the step's last backward pass, as DDP's bucketed hooks do: each parameter's
gradient is final once its last accumulation has run, so a bucket of parameters starts its all-reduce as
soon as all of its gradients are, while backward goes on through the earlier layers. Because each rank's
loss was already divided by the step's global units, the collective is a plain sum (never a mean): the
exact normaliser is kept, and the result equals a one-process step to float rounding.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import CherryError

log = logging.getLogger("cherry.engine")

GRADIENT_BUCKET = 2**22  # elements summed in one collective (16 MB of fp32); DDP's default bucket is 25 MB


@dataclass(frozen=True)
class World:
    """This process's place among a run's processes. `World()` is a one-process run: every method is
    then a no-op that returns its input, so the loops call them unconditionally."""

    rank: int = 0
    size: int = 1
    local_rank: int | None = None  # this process's index on its machine (its GPU); None: the same as rank
    local_size: int | None = None  # processes on this machine; None: all of them (one machine)

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

    @property
    def gpu(self) -> int:
        """The index of this rank's GPU among those its process may see."""
        return self.rank if self.local_rank is None else self.local_rank

    def _device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )


def is_shard(p: torch.Tensor) -> bool:
    """Whether `p` is one rank's shard of a tensor (a sharded model's parameter or gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


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


class GradientSync:
    """Sums the gradients of `parameters` over the ranks, in buckets, overlapped with the step's last backward.

    `arm()` before the step's last backward pass: from then on each parameter's gradient is final once
    accumulated (its post-accumulate hook), and a bucket's all-reduce starts, asynchronously, as soon as all
    its gradients are. Buckets start strictly in their order (the parameters' reverse order, roughly the
    order backward reaches them), so every rank issues the same collectives in the same order even when a
    rank's backward reached fewer parameters or did not run at all (no rows this step). `finish()` after
    backward starts what is left (a parameter the last pass did not reach contributes zeros; a rank with
    nothing to do starts everything here), waits, and writes the sums back into `.grad`.

    Unarmed (`overlap=False`, or a step whose backward was not armed), `finish()` is the sum after backward:
    the same collectives, with no overlap. Sharded parameters (parallelism fsdp) are summed by FSDP in
    backward and left out. A one-process world registers nothing; `arm` and `finish` return at once."""

    def __init__(self, parameters: list[torch.nn.Parameter], world: World, bucket_elements: int = GRADIENT_BUCKET):
        self.world = world
        self.buckets: list[list[torch.nn.Parameter]] = []
        self.bucket_of: dict[int, int] = {}
        self.overlap = True
        if not world.active:
            return
        filled = bucket_elements
        for p in reversed([p for p in parameters if not is_shard(p)]):
            if filled >= bucket_elements:
                self.buckets.append([])
                filled = 0
            self.bucket_of[id(p)] = len(self.buckets) - 1
            self.buckets[-1].append(p)
            filled += p.numel()
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for bucket in self.buckets for p in bucket]
        self._reset()

    def _reset(self) -> None:
        self.armed = False
        self.waiting = [len(bucket) for bucket in self.buckets]  # gradients not final yet, per bucket
        self.launched: list[tuple[torch.Tensor, dist.Work]] = []  # (flat sum, its collective), bucket order

    def arm(self) -> None:
        """The next backward pass is the step's last: start each bucket's sum as soon as it is complete."""
        if self.buckets and self.overlap:
            self._reset()
            self.armed = True

    def _ready(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        index = self.bucket_of[id(p)]
        if index < len(self.launched):  # its bucket was already summed: the sum would miss this accumulation
            raise RuntimeError(
                "a parameter's gradient was accumulated twice in one backward pass (a weight shared across "
                "reentrant checkpointed segments?); the overlapped gradient sum needs one accumulation per pass"
            )
        self.waiting[index] -= 1
        while len(self.launched) < len(self.buckets) and self.waiting[len(self.launched)] == 0:
            self._launch(len(self.launched))

    def _launch(self, index: int) -> None:
        grads = []
        for p in self.buckets[index]:
            grads.append(
                p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            )
        flat = torch.cat(grads)
        self.launched.append((flat, dist.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        """After the step's backward passes: every bucket summed over the ranks, written back into `.grad`."""
        if not self.buckets:
            return
        while len(self.launched) < len(self.buckets):
            self._launch(len(self.launched))
        for bucket, (flat, work) in zip(self.buckets, self.launched):
            work.wait()
            offset = 0
            for p in bucket:
                summed = flat[offset : offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = summed.clone()
                else:
                    p.grad.copy_(summed)
                offset += p.numel()
        self._reset()


# ---------------------------------------------------------------------------------------- devices


def rank_device(device: torch.device, world: World) -> torch.device:
    """Rank r computes on GPU r of those its machine's processes may see (its local rank); CPU ranks share
    the CPU. One process on `cuda:N` makes GPU N its current device, so whatever uses the current device
    (PEFT loading an adapter, a library's own allocations) lands there too, not on GPU 0."""
    if device.type != "cuda":
        return device
    if not world.active:
        if device.index is not None:
            torch.cuda.set_device(device)
        return device
    here = world.local_size or world.size
    if here > torch.cuda.device_count():
        raise CherryError(
            f"num_processes is {here} but this machine shows {torch.cuda.device_count()} GPU(s); "
            f"set --set num_processes={torch.cuda.device_count()} (one process per GPU)"
        )
    torch.cuda.set_device(world.gpu)
    return torch.device("cuda", world.gpu)


def backend_for(spec) -> str:
    wants_gpu = spec.device.startswith("cuda") or (spec.device == "auto" and torch.cuda.is_available())
    return "nccl" if wants_gpu else "gloo"
