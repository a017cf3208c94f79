"""The gang-scheduling decision of runs over several machines (jobs/gang.py `plan`): which live workers take
which run on the board, and why a run waits."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from jobs.gang import Entry, Gang, Room, lost_machine, machine_order, plan


def cpu(name: str, free: int = 1, slots: int = 1, host: str | None = None) -> Room:
    return Room(name, host or name, False, slots, free)


def gpu(name: str, gpus: int, free: int) -> Room:
    return Room(name, name, True, gpus, free)


def test_free_workers_fill_runs_in_board_order_and_one_run_each():
    board = [Gang("first", 2, 1), Gang("second", 2, 1)]
    decided = plan(board, [cpu("a"), cpu("b"), cpu("c")])
    assert decided.take == {"first": ["a", "b"], "second": ["c"]}
    assert "first" not in decided.waiting
    assert decided.waiting["second"].startswith("waiting for 1 more of 2 machines (joined: c)")


def test_workers_that_could_take_an_unfilled_run_wait_for_it_instead_of_joining_one_behind_it():
    # "big" needs two machines with 2 GPUs; b has 2 GPUs, both busy: it waits for "big", and so does a.
    # c has one GPU: it can never take "big", so it goes to "small" behind it.
    board = [Gang("big", 2, 2), Gang("small", 2, 1)]
    decided = plan(board, [gpu("a", 2, 2), gpu("b", 2, 0), gpu("c", 1, 1)])
    assert decided.take == {"big": ["a"], "small": ["c"]}
    assert "busy" in decided.waiting["big"]


def test_a_run_no_set_of_live_workers_could_take_holds_nobody_and_says_why():
    board = [Gang("three", 3, 1), Gang("two", 2, 1)]
    decided = plan(board, [cpu("a"), cpu("b")])
    assert "three" not in decided.take and decided.take == {"two": ["a", "b"]}
    reason = decided.waiting["three"]
    assert "waiting for 3 workers (num_machines=3); 2 live" in reason and "start more `cherry worker`s" in reason
    # GPUs: a worker with fewer GPUs than num_processes can never take it
    too_big = plan([Gang("wide", 2, 4)], [gpu("a", 8, 8), gpu("b", 2, 2)])
    assert too_big.take == {} and "1 of them can take it" in too_big.waiting["wide"]


def test_members_stay_whatever_is_free_and_a_gone_member_is_replaced():
    board = [Gang("run", 2, 1, members=("a", "gone"))]
    decided = plan(board, [cpu("a", free=0), cpu("b")])  # a holds its slot for the run: nothing else free
    assert decided.take == {"run": ["a", "b"]}


def test_a_cpu_worker_gives_one_slot_however_many_processes():
    decided = plan([Gang("run", 2, 4)], [cpu("a"), cpu("b", slots=2, free=1)])
    assert decided.take == {"run": ["a", "b"]}


def test_a_resumed_run_starts_machine_zero_on_the_host_holding_its_checkpoint():
    board = [Gang("resumed", 2, 1, host="gpu-a")]
    busy_holder = plan(board, [cpu("a", free=0, host="gpu-a"), cpu("b", host="gpu-b"), cpu("c", host="gpu-c")])
    assert busy_holder.take == {"resumed": []}  # nobody joins before a worker on gpu-a can
    assert "machine 0 must be on gpu-a" in busy_holder.waiting["resumed"]
    free_holder = plan(board, [cpu("b", host="gpu-b"), cpu("a", host="gpu-a"), cpu("c", host="gpu-c")])
    assert free_holder.take == {"resumed": ["a", "b"]}
    gone = plan(board, [cpu("b", host="gpu-b"), cpu("c", host="gpu-c")])
    assert gone.take == {} and "waiting for a worker on gpu-a" in gone.waiting["resumed"]


def test_machine_zero_is_the_member_on_the_checkpoint_host_else_the_first_to_join():
    members = [{"worker": "b", "host": "gpu-b"}, {"worker": "a", "host": "gpu-a"}]
    assert [m["worker"] for m in machine_order(members, "gpu-a")] == ["a", "b"]
    assert [m["worker"] for m in machine_order(members, None)] == ["b", "a"]


def test_a_machine_is_lost_when_marked_or_when_its_worker_stops_beating():
    members = [{"worker": "a:1", "host": "gpu-a"}, {"worker": "b:2", "host": "gpu-b"}]
    entry = Entry("run", 2, 1, None, "ready", members, "gpu-a:29500", None, 1.0)
    assert lost_machine(entry, {"a:1", "b:2"}) is None
    assert lost_machine(entry, {"a:1"}) == "machine 1 (gpu-b) was lost: its worker b:2 stopped beating"
    entry.lost = "machine 1 (gpu-b) was lost: its run process got SIGTERM"
    assert lost_machine(entry, {"a:1", "b:2"}) == entry.lost
    assert lost_machine(None, set()) is None  # the run ended: its entry is gone


def test_without_a_shared_queue_num_machines_is_refused_naming_the_field_and_the_fix(home, tmp_path):
    from engine.errors import SpecError
    from engine.spec import demo_dir, resolve_spec
    from engine.train import train
    from jobs.runs import Jobs
    from jobs.shared import open_store
    from tuiapp.cli import app

    spec = resolve_spec(str(demo_dir() / "dpo.yaml"), ["num_machines=2"])
    jobs = Jobs(home)
    try:
        with pytest.raises(SpecError, match="num_machines is 2.*set CHERRY_REDIS_URL") as refused:
            jobs.submit(spec)
        assert refused.value.field == "num_machines" and jobs.store.list_runs() == []
    finally:
        jobs.close()
    with pytest.raises(SpecError, match="num_machines is 2: a run over several machines starts from the queue"):
        train(spec, tmp_path / "run")  # `cherry train` runs on this machine alone
    refused = CliRunner().invoke(app, ["train", "--preset", "demo/dpo", "--set", "num_machines=2"])
    assert refused.exit_code == 2 and "set --set num_machines=1" in refused.output
    assert open_store(home).list_runs() == []  # refused before anything was recorded
    with pytest.raises(SpecError, match="num_machines must be >= 1"):
        resolve_spec(str(demo_dir() / "dpo.yaml"), ["num_machines=0"])
