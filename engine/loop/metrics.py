"""What a run logs about itself: averaged metric sums, the metric log, and the machine's readings."""

from __future__ import annotations

import os
import resource
import time
from collections import defaultdict
from typing import Callable

import torch

from engine.distributed import World, is_shard, merge_metric_sums
from engine.reporting import Reporter


class MetricSums:
    """Accumulates an algorithm's metric sums over micro-batches and eval batches.

    A metric is either a plain sum (averaged over the step's units: pairs, examples or tokens) or
    a `(sum, count)` pair with its own denominator (e.g. KTO's reward of desirable rows only).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, float | tuple[float, float]], units: int) -> None:
        for name, value in metrics.items():
            total, count = value if isinstance(value, tuple) else (value, units)
            self.sums[name] += total
            self.counts[name] += count

    def merged(self, world: World) -> "MetricSums":
        """The sums and counts of every rank added together (the same on every rank); itself in a
        one-process run."""
        if not world.active:
            return self
        merged = MetricSums()
        sums, counts = merge_metric_sums(world.gather((dict(self.sums), dict(self.counts))))
        merged.sums.update(sums)
        merged.counts.update(counts)
        return merged

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items() if self.counts[name] > 0}


# Eval metrics where a smaller value is the better one (the rest: larger is better).
_LOWER_IS_BETTER = ("loss", "perplexity", "nll")


def lower_is_better(name: str) -> bool:
    """eval/loss, eval/perplexity, Chain of Hindsight's NLLs: the best value is the smallest. (A NLL
    *gap*, such as eval/coh/nll_gap, grows as the model learns: larger is better there.)"""
    leaf = name.rsplit("/", 1)[-1]
    return "gap" not in leaf and any(word in leaf for word in _LOWER_IS_BETTER)


class MetricLog:
    """Sends metrics to the reporter and keeps the latest value and the best eval value of each."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.last: dict[str, float] = {}
        self.best: dict[str, float] = {}

    def emit(self, step: int, metrics: dict[str, float]) -> None:
        self.reporter.log_metrics(step, metrics)
        self.last.update(metrics)
        for name, value in metrics.items():
            if name.startswith("eval/"):
                better = min if lower_is_better(name) else max
                self.best[name] = better(self.best.get(name, value), value)


def cpu_percent(before: tuple[float, float] | None, now: tuple[float, float]) -> float | None:
    """CPU use of a process between two (wall seconds, CPU seconds) readings, in percent of one core
    (200 = two cores busy); None without an earlier reading or when no wall time has passed."""
    if before is None:
        return None
    wall = now[0] - before[0]
    if wall <= 0:
        return None
    return max(0.0, (now[1] - before[1]) / wall * 100.0)


class CpuMeter:
    """This process's CPU use since the previous reading (`read`), from its CPU time (user + system)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, cpu_time: Callable[[], float] = time.process_time):
        self.clock, self.cpu_time = clock, cpu_time
        self.last: tuple[float, float] | None = (clock(), cpu_time())

    def read(self) -> float | None:
        now = (self.clock(), self.cpu_time())
        pct, self.last = cpu_percent(self.last, now), now
        return pct


def gpu_util(device: torch.device) -> float | None:
    """The GPU's utilisation (percent of the last sample period busy) from NVML; None without pynvml."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # pynvml missing, or NVML cannot see the device
        return None


def sys_metrics(device: torch.device, cpu_meter: CpuMeter | None = None) -> dict[str, float]:
    """GPU memory and utilisation on a GPU, RSS otherwise; CPU % since the meter's last reading."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        out["sys/gpu_mem_gb"] = torch.cuda.memory_allocated(device) / 2**30
        util = gpu_util(device)
        if util is not None:
            out["sys/gpu_util"] = util
    else:
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            out["sys/rss_gb"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**30
        except OSError:  # not Linux
            pass
    cpu = cpu_meter.read() if cpu_meter is not None else None
    if cpu is not None:
        out["sys/cpu_percent"] = cpu
    return out


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def held_state_gb(parameters: list[torch.Tensor], optimizer) -> float:
    """GiB of trained weights and optimizer state this process holds (a sharded run: its shards only). The
    part of memory that `parallelism: fsdp` divides by the ranks; gradients add the weights' size again
    while a step runs, activations depend on the batch."""

    def local_bytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if is_shard(tensor) else tensor
        return local.numel() * local.element_size()

    held = sum(local_bytes(p) for p in parameters)
    held += sum(local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return held / 2**30
