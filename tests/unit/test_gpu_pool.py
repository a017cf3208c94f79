"""The worker's GPU allocation: runs get the lowest free GPUs, wait for enough, and never share one."""

from __future__ import annotations

import threading
import time

import pytest

from jobs.slots import GpuPool


def test_single_gpu_runs_pack_onto_the_lowest_free_gpus():
    pool, never = GpuPool(["0", "1", "2", "3"]), threading.Event()
    assert pool.acquire(1, never) == ["0"]
    assert pool.acquire(1, never) == ["1"]
    pool.release(["0"])
    assert pool.acquire(1, never) == ["0"]  # back to the lowest, leaving 2-3 free as a block
    assert pool.acquire(2, never) == ["2", "3"]
    assert pool.free == []


def test_a_run_waits_until_enough_gpus_are_free_and_none_is_shared():
    pool, never = GpuPool(["0", "1"]), threading.Event()
    first = pool.acquire(1, never)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(2, never)))
    waiter.start()
    time.sleep(0.3)
    assert got == []  # one GPU is free, the run needs two: it waits rather than oversubscribe
    pool.release(first)
    waiter.join(timeout=5)
    assert got == [["0", "1"]]


def test_waiting_ends_when_the_worker_shuts_down_and_impossible_requests_are_refused():
    pool, stop = GpuPool(["0"]), threading.Event()
    pool.acquire(1, stop)
    stop.set()
    assert pool.acquire(1, stop) is None
    with pytest.raises(ValueError, match="2 GPUs asked of a pool of 1"):
        pool.acquire(2, stop)
