"""What a worker hands out to runs: its GPUs (a run takes `num_processes` of them) or, on a worker without
GPUs, its `--concurrency` CPU slots (a run takes one, however many processes it has), and the environment
a run's process gets in its slot (`child_environment`)."""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path


class GpuPool:
    """Which of a worker's GPUs are free. `acquire(n)` waits until n are free and takes the lowest-numbered
    ones (so single-GPU runs pack together and leave whole blocks free); `release` gives them back."""

    def __init__(self, gpus: list[str]) -> None:
        self.gpus = list(gpus)
        self.free = list(gpus)
        self.changed = threading.Condition()

    def acquire(self, count: int, give_up: threading.Event) -> list[str] | None:
        """`count` free GPUs, or None when `give_up` is set first (the worker shuts down)."""
        if count > len(self.gpus):
            raise ValueError(f"{count} GPUs asked of a pool of {len(self.gpus)}")
        with self.changed:
            while len(self.free) < count:
                if give_up.is_set():
                    return None
                self.changed.wait(timeout=0.5)
            taken = sorted(self.free, key=self.gpus.index)[:count]
            self.free = [g for g in self.free if g not in taken]
            return taken

    def try_acquire(self, count: int) -> list[str] | None:
        """`count` free GPUs now, or None when fewer are free (a run over several machines waits elsewhere)."""
        with self.changed:
            if len(self.free) < count:
                return None
            taken = sorted(self.free, key=self.gpus.index)[:count]
            self.free = [g for g in self.free if g not in taken]
            return taken

    def release(self, gpus: list[str]) -> None:
        with self.changed:
            self.free += gpus
            self.changed.notify_all()


class Slots:
    """A worker's GPUs or CPU slots. `take` waits for what a run needs; `try_take` takes it only if it is
    free now (a run over several machines, jobs/gang_worker.py); both give (the GPUs, the slot: their ids
    joined, or None for a CPU slot)."""

    def __init__(self, gpus: list[str] | None, concurrency: int | None) -> None:
        self.gpu_pool = GpuPool(gpus) if gpus else None
        self.cpu: queue.Queue[None] = queue.Queue()
        self.count = len(gpus) if gpus else concurrency or 1
        for _ in range(0 if gpus else self.count):
            self.cpu.put(None)

    @property
    def gpus(self) -> bool:
        return self.gpu_pool is not None

    def take(self, wanted: int, give_up: threading.Event) -> tuple[list[str], str | None] | None:
        """What a run of `wanted` processes needs, waiting until it is free; None when `give_up` is set first."""
        if self.gpu_pool is None:
            return [], self.cpu.get()
        gpus = self.gpu_pool.acquire(wanted, give_up)
        return (gpus, ",".join(gpus)) if gpus is not None else None

    def try_take(self, wanted: int) -> tuple[list[str], str | None] | None:
        if self.gpu_pool is None:
            try:
                return [], self.cpu.get_nowait()
            except queue.Empty:
                return None
        gpus = self.gpu_pool.try_acquire(wanted) if wanted <= len(self.gpu_pool.gpus) else None
        return (gpus, ",".join(gpus)) if gpus is not None else None

    def release(self, gpus: list[str], slot: str | None) -> None:
        if self.gpu_pool is not None:
            self.gpu_pool.release(gpus)
        else:
            self.cpu.put(slot)

    def free(self) -> int:
        """GPUs (or CPU slots) free now."""
        return len(self.gpu_pool.free) if self.gpu_pool is not None else self.cpu.qsize()


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this worker may use (a container's or taskset's share)
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def child_environment(parent: dict, home: Path, slot: str | None, concurrency: int) -> dict[str, str]:
    """The environment of a run's process in `slot` (its GPU ids, or None for a CPU slot).

    - Threads: each of the `concurrency` slots gets its share of the cores (OMP_NUM_THREADS, which torch
      reads at start; a spec's `num_threads` still wins), so concurrent runs do not oversubscribe the cores.
    - GPUs: `--gpus` ids count among the GPUs the worker itself may see (its own CUDA_VISIBLE_DEVICES,
      as a scheduler sets it), in nvidia-smi's order (PCI bus). CPU slots of a worker with several slots
      see no GPU: each would otherwise pick GPU 0, all of them the same one. One CPU slot keeps them
      visible, so `cherry worker` alone on a GPU machine still trains on its GPUs."""
    env = {**parent, "CHERRY_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env["OMP_NUM_THREADS"] = str(max(1, machine_cores() // max(1, concurrency)))
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    visible = [g.strip() for g in (parent.get("CUDA_VISIBLE_DEVICES") or "").split(",") if g.strip()]
    if slot is not None:
        ids = slot.split(",")
        if visible:
            ids = [visible[int(g)] if g.isdigit() and int(g) < len(visible) else g for g in ids]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    elif concurrency > 1:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env
