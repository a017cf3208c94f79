"""`cherry bench gradsync`: a data-parallel step with the gradient sum overlapped with backward (what runs use,
engine/distributed.py GradientSync) against the same sum after backward, on 2 CPU processes (gloo), in one run.

Both processes build the same stack of linear layers and time steps (forward, backward, the sum over the
ranks) with the overlap on and off in turn, so whatever else loads the machine falls on both alike; the
report is each one's median step and their ratio. Only the order of the collectives against backward
differs: the same buckets, the same sums."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def compare_gradient_sync(
    steps: int = 10,
    warmup: int = 2,
    threads: int = 1,
    width: int = 1024,
    depth: int = 8,
    batch: int = 64,
    bucket_elements: int | None = None,
) -> dict:
    """Median step seconds with the overlap and without, and their ratio (overlapped / after backward)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as folder:
        init = f"file://{Path(folder) / 'store'}"
        mp.spawn(
            _rank, args=(2, init, steps, warmup, threads, (width, depth, batch, bucket_elements), results), nprocs=2
        )
    overlapped, after = statistics.median(results["overlapped"]), statistics.median(results["after"])
    return {
        "processes": 2,
        "threads_per_process": threads,
        "parameters": results["parameters"],
        "buckets": results["buckets"],
        "steps": steps,
        "overlapped_s": overlapped,
        "after_backward_s": after,
        "ratio": overlapped / after,
    }


def _rank(rank: int, size: int, init: str, steps: int, warmup: int, threads: int, shape: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    from engine.distributed import GRADIENT_BUCKET, GradientSync, World

    width, depth, batch, bucket_elements = shape
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers)
    params = list(net.parameters())
    sync = GradientSync(params, World(rank, size), bucket_elements or GRADIENT_BUCKET)
    rows = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank))
    times: dict[bool, list[float]] = {True: [], False: []}
    for index in range(2 * (warmup + steps)):
        overlapped = index % 2 == 0
        sync.overlap = overlapped
        dist.barrier()  # both ranks start the step together
        started = time.perf_counter()
        sync.arm()
        net(rows).pow(2).mean().backward()
        sync.finish()
        elapsed = time.perf_counter() - started
        for p in params:
            p.grad = None
        if index >= 2 * warmup:
            times[overlapped].append(elapsed)
    if rank == 0:
        results.update(
            overlapped=times[True],
            after=times[False],
            parameters=sum(p.numel() for p in params),
            buckets=len(sync.buckets),
        )
    dist.destroy_process_group()


def report_lines(result: dict) -> list[str]:
    return [
        f"gradient sum on {result['processes']} CPU processes (gloo, {result['threads_per_process']} thread(s) each), "
        f"{result['parameters'] / 1e6:.1f}M parameters in {result['buckets']} buckets, median of {result['steps']} steps:",
        f"  summed after backward     {result['after_backward_s'] * 1000:8.1f} ms/step",
        f"  overlapped with backward  {result['overlapped_s'] * 1000:8.1f} ms/step",
        f"  ratio (overlapped / after) {result['ratio']:.2f}",
    ]
