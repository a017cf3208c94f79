"""Training entry point: `train(spec, out_dir)` runs any method into a run directory.

The method's registry row (engine/registry.py) says whether it trains on a fixed dataset (the
offline loop, engine/loop/offline.py) or on its own samples (the online loop,
engine/loop/online.py); both stand on one loop core (engine/loop/core.py). With `num_processes: N`
the run is N data-parallel processes (engine/distributed.py) that PyTorch's elastic agent starts from
this process (engine/launch.py); a process that torchrun, `accelerate launch` or srun started is one
rank of the run they started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from engine.diskspace import disk_full_error, is_disk_full
from engine.distributed import World, backend_for
from engine.launch import check_one_machine, fit_spec, join, launch, launched
from engine.loop.core import StopCheck, start_run
from engine.loop.offline import train_offline
from engine.loop.online import train_online
from engine.registry import algorithm_info
from engine.reporting import Reporter


def train(
    spec,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    *,
    should_stop: StopCheck | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train `spec` into `out_dir`; returns the summary (also written to summary.json).

    `should_stop` is polled once per step (cooperative cancel): the run then saves a checkpoint
    and ends with status "cancelled" (or the status string it returned, e.g. "interrupted").
    `resume=True` continues from the newest checkpoint, or starts over when there is none.
    `cache_dir` keeps tokenised data and precomputed reference log-probs between runs.
    """
    try:
        return _train(spec, out_dir, reporter, should_stop=should_stop, cache_dir=cache_dir, resume=resume)
    except OSError as err:  # a full disk met outside the writes that say so themselves (a log line, a cache)
        if is_disk_full(err):
            raise disk_full_error(err.filename or "the run's files", Path(out_dir)) from None
        raise


def _train(spec, out_dir, reporter, *, should_stop, cache_dir, resume) -> dict[str, Any]:
    place = launched()
    if place is not None:  # torchrun, accelerate launch or srun started this process: one rank of their run
        return _train_launched(
            spec, out_dir, reporter, place, should_stop=should_stop, cache_dir=cache_dir, resume=resume
        )
    check_one_machine(spec)
    if spec.num_processes <= 1:
        return train_rank(spec, out_dir, World(), reporter, should_stop=should_stop, cache_dir=cache_dir, resume=resume)
    return launch(spec, out_dir, reporter, should_stop=should_stop, cache_dir=cache_dir, resume=resume)


def _train_launched(spec, out_dir, reporter, place, *, should_stop, cache_dir, resume) -> dict[str, Any]:
    spec = fit_spec(spec, place)
    world = join(place, backend_for(spec))
    try:
        # rank 0's run is the run: its spec, its run directory (another rank may have drawn another new run
        # id) and whether it resumes
        spec, out_dir, resume = world.broadcast((spec, str(out_dir), resume))
        if not world.is_main:
            reporter, should_stop = None, None
        return train_rank(spec, out_dir, world, reporter, should_stop=should_stop, cache_dir=cache_dir, resume=resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_rank(
    spec,
    out_dir: str | Path,
    world: World,
    reporter: Reporter | None = None,
    *,
    should_stop: StopCheck | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """One process's part of a run (the whole run when `world` is one process)."""
    run = start_run(spec, out_dir, reporter, resume=resume, world=world)
    if algorithm_info(spec.algorithm).online:
        return train_online(run, should_stop=should_stop, cache_dir=cache_dir)
    return train_offline(run, should_stop=should_stop, cache_dir=cache_dir)
