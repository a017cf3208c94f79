"""Entry point of each rank of a run Cherry starts itself: `python -m engine.rank LAUNCH_JSON`, started by
PyTorch's elastic agent in the run's train() process (engine/launch.py `launch`), which set this process's
RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/MASTER_PORT.

Rank 0 reports and asks the stop check through the link to the train() process; the other ranks report
nothing (rank 0 reports for all) and write their output to <run dir>/ranks/rank-N.log.

Its own module so that engine.launch and engine.distributed (imported by the training loop) never import
engine.train: the import graph stays free of cycles."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from engine.distributed import backend_for
from engine.errors import INTERRUPTED_EXIT, OOM_EXIT, USER_ERROR_EXIT, CherryError
from engine.launch import ParentLink, die_with_parent, join, launched
from engine.spec import load_spec_file
from engine.train import train_rank


def main(argv: list[str]) -> None:
    job = json.loads(Path(argv[0]).read_text())
    die_with_parent(job["parent_pid"])
    place = launched()
    if place.rank > 0:
        os.dup2(2, 1)  # stdout joins stderr in the rank's log
    logging.basicConfig(level=job["log_level"], format=f"[rank {place.rank}] %(message)s")
    link = ParentLink(job["link"], bytes.fromhex(job["key"])) if place.rank == 0 and job["link"] else None
    spec = load_spec_file(Path(job["spec"]))
    try:
        world = join(place, backend_for(spec))
        summary = train_rank(
            spec,
            Path(job["out_dir"]),
            world,
            link,
            should_stop=link.should_stop if link is not None else None,
            cache_dir=job["cache_dir"],
            resume=job["resume"],
        )
        if link is not None:
            link.result(summary)
    except KeyboardInterrupt:  # the train() process hung up: nobody is left to tell
        sys.exit(INTERRUPTED_EXIT)
    except BaseException as err:
        if link is not None:  # the train() process raises it
            link.error(err)
        if isinstance(err, CherryError):
            if link is None:
                print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT)
        if isinstance(err, torch.OutOfMemoryError):
            if link is None:
                print(f"out of memory on rank {place.rank}: {err}", file=sys.stderr, flush=True)
            sys.exit(OOM_EXIT)
        traceback.print_exc()
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
