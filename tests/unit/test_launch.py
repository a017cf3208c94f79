"""Runs started by launchers (engine/launch.py) and the overlapped gradient sum (engine/distributed.py
GradientSync): the launcher variables Cherry reads, the spec checked against them, a rendezvous that cannot
be reached, and bucketed sums that equal the plain sum whatever each rank's backward reached."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed import GradientSync, World
from engine.errors import CherryError, SpecError
from engine.launch import SLURM_VARIABLES, TORCH_VARIABLES, fit_spec, free_port, join, launch, launched
from engine.spec import RunSpec

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1"}


def test_torch_variables_place_the_process():
    place = launched({**TORCHRUN, "MASTER_PORT": "29400"})
    assert (place.rank, place.local_rank, place.size, place.local_size) == (3, 1, 4, 2)
    assert place.endpoint == "n1:29400" and place.variables == TORCH_VARIABLES
    assert launched({"PATH": "/bin"}) is None


def test_slurm_variables_count_only_inside_an_srun_step():
    slurm = {"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)"}
    assert launched(slurm) is None  # the batch script itself (no step): one process, not a rank
    place = launched({**slurm, "SLURM_STEP_ID": "0", "MASTER_ADDR": "n1"})
    assert (place.rank, place.local_rank, place.size, place.local_size) == (2, 0, 4, 2)
    assert place.endpoint == "n1:29500" and place.variables == SLURM_VARIABLES
    # torch's variables win when both are set (torchrun inside an srun step)
    assert launched({**slurm, "SLURM_STEP_ID": "0", **TORCHRUN, "MASTER_PORT": "1"}).variables == TORCH_VARIABLES
    with pytest.raises(CherryError, match="MASTER_ADDR/MASTER_PORT do not say where"):
        launched({**slurm, "SLURM_STEP_ID": "0"})
    with pytest.raises(CherryError, match="SLURM_NTASKS is 'x'"):
        launched({**slurm, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "x"})


def test_the_spec_follows_the_launcher_or_is_refused_naming_both():
    place = launched({**TORCHRUN, "MASTER_PORT": "29400"})
    assert fit_spec(RunSpec(num_processes=1), place).num_processes == 2  # 1 (the default) follows the launcher
    assert fit_spec(RunSpec(num_processes=2), place).num_processes == 2
    with pytest.raises(SpecError, match=r"num_processes is 4 .* WORLD_SIZE=4, LOCAL_WORLD_SIZE=2") as caught:
        fit_spec(RunSpec(num_processes=4), place)
    assert caught.value.field == "num_processes" and "--set num_processes=2" in str(caught.value)
    assert fit_spec(RunSpec(num_machines=1), place).num_machines == 2  # 4 processes, 2 per machine
    with pytest.raises(SpecError, match=r"num_machines is 3 but the launcher started 2 machine\(s\)") as caught:
        fit_spec(RunSpec(num_machines=3), place)
    assert caught.value.field == "num_machines"
    bf16 = {"ACCELERATE_MIXED_PRECISION": "bf16"}  # an accelerate config's mixed_precision
    assert fit_spec(RunSpec(dtype="auto"), place, bf16).dtype == "auto"
    with pytest.raises(SpecError, match="dtype is fp16 but the accelerate config asks for mixed_precision bf16"):
        fit_spec(RunSpec(dtype="fp16"), place, bf16)


def test_a_rendezvous_that_cannot_be_reached_times_out_naming_its_address(monkeypatch):
    port = free_port()  # nothing listens there: rank 0 never started
    monkeypatch.setattr("engine.launch.RENDEZVOUS_SECONDS", 2.0)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(CherryError, match=f"rendezvous at 127.0.0.1:{port} .* within 2s"):
        join(launched(), "gloo")
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------- GradientSync


def _rank_sums(rank: int, size: int, init: str, results) -> None:
    """Rank `rank`: a small net's gradients over its own rows summed by GradientSync (overlapped, armed
    before the last of two backward passes) and by the plain sum (unarmed); rank 1 runs no backward at all
    in the second step (an empty share), and buckets of about 3 elements make four of them."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    unused = torch.nn.Parameter(torch.ones(2))  # trained but never reached: zeros
    params = [*net.parameters(), unused]
    world = World(rank, size)
    sync = GradientSync(params, world, bucket_elements=3)
    assert len(sync.buckets) > 3
    torch.manual_seed(1 + rank)
    rows = [torch.randn(5, 3), torch.randn(5, 3)]
    out = []
    for overlapped, backward_passes in ((True, 2), (False, 2), (True, 2 if rank == 0 else 0)):
        sync.overlap = overlapped
        for i, x in enumerate(rows[:backward_passes]):
            if i == backward_passes - 1:
                sync.arm()
            net(x).pow(2).sum().backward()
        sync.finish()
        out.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    results[rank] = out
    dist.destroy_process_group()


def test_overlapped_bucket_sums_equal_the_plain_sum_even_when_a_rank_ran_no_backward(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank_sums, args=(2, f"file://{tmp_path / 'store'}", results), nprocs=2)
    for rank in (0, 1):
        overlapped, plain, one_sided = results[rank]
        for a, b in zip(overlapped, plain):
            assert torch.allclose(a, b)
        assert torch.equal(plain[-1], torch.zeros(2))  # the parameter no backward reached
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))  # the same sum on both ranks
    # the third step: only rank 0 ran backward; the sum is its own gradients on both ranks
    for a, b in zip(results[0][2], results[1][2]):
        assert torch.equal(a, b)
    assert not torch.allclose(results[0][2][0], results[0][0][0])


# ---------------------------------------------------------------------------------------- rank 0's link


class _NeedsTwo(Exception):
    def __init__(self, message, extra):  # does not unpickle: pickle calls it with the message alone
        super().__init__(message)


def test_rank_zero_reports_and_asks_the_stop_check_through_the_link():
    """Rank 0's calls reach the train() process's reporter and stop check in their order; a reporter error
    goes back to rank 0 (which raises it there); rank 0's result and error come back to the parent."""
    import threading
    from multiprocessing.connection import Listener

    from engine.launch import ParentLink, _RankZero, _serve
    from engine.reporting import MemoryReporter

    class FullDisk(MemoryReporter):
        def log_samples(self, step, samples):
            raise CherryError("the disk is full")

    key = b"k" * 32
    listener = Listener(("127.0.0.1", 0), authkey=key)
    reporter, rank_zero, seen = FullDisk(), _RankZero(), {}

    def rank_0():
        link = ParentLink(listener.address, key)
        link.log_event("start", "go", total_steps=2)
        link.log_metrics(1, {"train/loss": 0.5})
        seen["stop"] = link.should_stop()
        with pytest.raises(CherryError, match="the disk is full"):
            link.log_samples(1, [{"prompt": "p"}])
        link.error(_NeedsTwo("a bug", 1))
        link.result({"status": "cancelled"})
        link.conn.close()

    client = threading.Thread(target=rank_0)
    client.start()
    _serve(listener, key, client, reporter, lambda: "cancelled", rank_zero)
    client.join()
    listener.close()
    assert reporter.events == [{"kind": "start", "message": "go", "total_steps": 2}]
    assert reporter.series("train/loss") == [0.5] and seen["stop"] == "cancelled"
    assert rank_zero.summary == {"status": "cancelled"}
    assert isinstance(rank_zero.error, RuntimeError) and "_NeedsTwo: a bug" in str(rank_zero.error)


def test_a_machine_that_cannot_reach_machine_zero_times_out_naming_the_rendezvous(tmp_path, monkeypatch):
    port = free_port()  # nothing listens there: machine 0 never started
    monkeypatch.setattr("engine.launch.RENDEZVOUS_SECONDS", 2.0)
    started = time.monotonic()
    with pytest.raises(CherryError, match=f"meet at the rendezvous 127.0.0.1:{port} \\(machine 1\\)"):
        launch(RunSpec(), tmp_path, machines=2, machine_rank=1, rendezvous=f"127.0.0.1:{port}")
    assert time.monotonic() - started < 30
    assert (tmp_path / "ranks" / "spec-machine-1.yaml").exists()  # its own job files: a shared run dir is safe
