"""Entry point of ranks 1..N-1 of a data-parallel run: `python -m engine.rank SPEC OUT RANK SIZE PORT BACKEND
RESUME CACHE_DIR`, started by rank 0 (engine/distributed.py `start_ranks`).

Its own module so that engine.distributed (imported by the training loop) never imports engine.train: the
import graph stays free of cycles."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from engine.distributed import join
from engine.errors import OOM_EXIT, USER_ERROR_EXIT, CherryError
from engine.spec import load_spec_file
from engine.train import train_rank


def main(argv: list[str]) -> None:
    """Ranks 1..N-1: the same run, without a reporter (rank 0 reports) and without a stop check (rank 0's
    is broadcast)."""
    spec_file, out_dir, rank, size, port, backend, resume, cache_dir = argv
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    spec = load_spec_file(Path(spec_file))
    world = join(int(rank), int(size), "127.0.0.1", int(port), backend)
    try:
        train_rank(spec, Path(out_dir), world, resume=resume == "1", cache_dir=cache_dir or None)
    except CherryError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    except torch.OutOfMemoryError as err:
        print(f"out of memory on rank {rank}: {err}", file=sys.stderr, flush=True)
        sys.exit(OOM_EXIT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
