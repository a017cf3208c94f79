"""The several-machines store against a real redis-server: atomic run state, per-run streams,
ingest into each host's own SQLite, host queues, and what a Redis restart or wipe leaves behind.

Each "host" here is its own Cherry home (its own SQLite store), as on separate machines.
"""

from __future__ import annotations

import json
import threading

import pytest

from jobs import shared
from jobs.shared import SharedStore, open_store
from jobs.store import Store


@pytest.fixture
def hosts(tmp_path, redis_url, monkeypatch):
    """open(name) -> a SharedStore in its own home, all on one Redis."""
    monkeypatch.setenv("CHERRY_REDIS_URL", redis_url)
    opened: list[Store] = []

    def open_host(name: str) -> SharedStore:
        store = open_store(tmp_path / name)
        assert isinstance(store, SharedStore)
        opened.append(store)
        return store

    yield open_host
    for store in opened:
        store.close()


def new_run(store: Store, run_id: str = "r1", **fields) -> None:
    store.create_run(
        run_id,
        {"algorithm": "dpo", "model": "m", "dataset": "d"},
        name=run_id,
        out_dir=None,
        planned_dir=f"/submitter/{run_id}",
        **fields,
    )


def test_without_redis_the_store_is_the_single_machine_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("CHERRY_REDIS_URL", raising=False)
    store = open_store(tmp_path)
    assert type(store) is Store and not store.shared and store.path == tmp_path / "cherry.db"


def test_only_one_host_takes_a_queued_run(hosts):
    submitter = hosts("laptop")
    new_run(submitter)
    workers = [hosts(f"gpu{i}") for i in range(8)]
    results: list[bool] = []
    barrier = threading.Barrier(len(workers))

    def take(store: SharedStore, i: int) -> None:
        barrier.wait()
        results.append(store.set_status("r1", "running", only_if=["queued"], worker_host=f"gpu{i}"))

    threads = [threading.Thread(target=take, args=(w, i)) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    run = submitter.get_run("r1")
    assert run.status == "running" and run.started_at and run.worker_host.startswith("gpu")
    # ending needs it to be running; a second end does nothing
    assert workers[0].set_status("r1", "completed", only_if=["running"])
    assert not workers[1].set_status("r1", "failed", only_if=["running"], error="late")
    assert submitter.get_run("r1").status == "completed" and submitter.get_run("r1").error is None


def test_the_heartbeat_condition_is_checked_with_the_change(hosts):
    store = hosts("a")
    new_run(store)
    store.set_status("r1", "running", only_if=["queued"])
    store.heartbeat("r1")
    beat = store.get_run("r1").heartbeat_at
    # a sweeper that read an old heartbeat must not interrupt a run that beat since
    assert not store.set_status("r1", "interrupted", only_if=["running"], beat_before=beat - 1)
    assert store.set_status("r1", "interrupted", only_if=["running"], beat_before=beat + 1)
    assert store.get_run("r1").status == "interrupted"


def test_fields_round_trip_with_their_types_and_none_clears(hosts):
    store = hosts("a")
    new_run(store, priority=3, retries=1)
    store.update_run("r1", out_dir="/gpu0/r1", files_host="gpu0", step=7, heartbeat_at=1700000000.123456, error="x")
    store.update_run("r1", error=None)
    run = hosts("b").get_run("r1")
    assert (run.priority, run.retries, run.step, run.out_dir) == (3, 1, 7, "/gpu0/r1")
    assert run.heartbeat_at == 1700000000.123456 and run.error is None
    assert run.spec == {"algorithm": "dpo", "model": "m", "dataset": "d"}


def test_experiments_tags_and_the_prune_rule_are_shared_by_every_host(hosts):
    from jobs.sweep import prune_reason, prune_rule

    a, b = hosts("a"), hosts("b")
    rule = prune_rule("median", "eval/loss", 1)
    new_run(a, "r1", experiment="scan", swept={"lr": "1e-3"})
    new_run(a, "r2", experiment="scan", swept={"lr": "1e-9"}, prune=rule)
    new_run(a, "r3", experiment="other")
    a.set_tags("r1", ["good"])
    b.update_run("r1", note="best")
    assert [r.id for r in b.list_runs(experiment="scan")] == ["r1", "r2"]
    shared = b.get_run("r1")
    assert shared.tags == ["good"] and shared.note == "best" and shared.swept == {"lr": "1e-3"}
    a.add_metrics("r1", 2, {"eval/loss": 0.4})
    a.add_metrics("r2", 2, {"eval/loss": 0.69})
    assert "above the median 0.4" in prune_reason(b, b.get_run("r2"))  # metrics streamed through Redis


def write_run(store: SharedStore) -> None:
    """What a run's process sends: 50 steps, a resume from step 30 that logs 31..40 again, samples, events."""
    for step in range(1, 51):
        store.add_metrics("r1", step, {"train/loss": 1.0 / step, "note": "not a number"})
    store.add_samples("r1", 50, [{"prompt": "p", "reference": "a", "policy": "b", "policy_score": 1.0}])
    store.add_event("r1", "resume", "from step 30", step=30)
    store.rewind("r1", 30)
    for step in range(31, 41):
        store.add_metrics("r1", step, {"train/loss": 2.0 / step})
    store.add_log("r1", "line one\nline two\n")


def test_a_front_end_ingests_every_event_once_and_resumes_where_it_stopped(hosts, tmp_path):
    submitter, worker = hosts("laptop"), hosts("gpu0")
    new_run(submitter)
    write_run(worker)
    expected = {step: (1.0 / step if step <= 30 else 2.0 / step) for step in range(1, 41)}

    rows = submitter.metrics("r1")
    assert {r["step"]: r["value"] for r in rows} == expected and len(rows) == 40
    assert submitter.get_run("r1").step == 40
    assert submitter.samples("r1") == []  # the samples at step 50 were rewound away
    assert [e["kind"] for e in submitter.events("r1")] == ["resume"] and submitter.events("r1")[0]["data"] == {
        "step": 30
    }
    assert submitter.log_text("r1") == "line one\nline two\n"

    # Re-reading the whole stream (a second process of the same host, its position not yet known to it)
    # applies nothing twice.
    again = SharedStore(submitter.path, submitter.state)
    again.ingest(["r1"])
    submitter.ingest(["r1"])
    assert len(Store(submitter.path).metrics("r1")) == 40

    # New events after the position are applied; a follower passing the last id sees only them.
    last = rows[-1]["id"]
    worker.add_metrics("r1", 41, {"train/loss": 0.5})
    assert [(r["step"], r["value"]) for r in submitter.metrics("r1", after_id=last)] == [(41, 0.5)]

    # A front end that was offline the whole time catches up on everything.
    late = hosts("late-laptop")
    assert len(late.metrics("r1")) == 41 and late.latest_metrics("r1") == {"train/loss": 0.5}
    assert [r.id for r in late.list_runs()] == ["r1"]


def test_rollouts_stream_to_other_hosts_a_step_logged_again_replaces_its_records_and_a_rewind_drops_later_ones(
    hosts,
):
    from jobs.store import StoreReporter

    submitter, worker = hosts("laptop"), hosts("gpu0")
    new_run(submitter)
    reporter = StoreReporter(worker, "r1")  # what a run's process on the worker's host reports through
    for step in (1, 2, 3):
        reporter.log_rollouts(step, [{"step": step, "group": 0, "sample": i, "reward": float(i)} for i in range(2)])
    assert [(r["step"], r["sample"]) for r in submitter.rollouts("r1")] == [(s, i) for s in (1, 2, 3) for i in (0, 1)]
    reporter.rewind(1)  # a resume from the step-1 checkpoint replays steps 2 and 3
    reporter.log_rollouts(2, [{"step": 2, "group": 0, "sample": 0, "reward": 9.0}])
    assert [(r["step"], r["reward"]) for r in submitter.rollouts("r1")] == [(1, 0.0), (1, 1.0), (2, 9.0)]
    submitter.delete_run("r1")
    assert Store(submitter.path).rollouts("r1") == []


def test_streams_stay_bounded_and_a_reader_that_fell_behind_is_told(hosts, monkeypatch):
    monkeypatch.setattr(shared, "STREAM_MAXLEN", 100)
    store = hosts("a")
    new_run(store)
    for step in range(1, 2001):
        store.add_metrics("r1", step, {"x": float(step)})
    assert store.state.r.xlen(store.state.stream_key("r1")) < 400  # approximate trimming, whole nodes at a time
    reader = hosts("b")
    steps = [r["step"] for r in reader.metrics("r1")]
    assert steps == list(range(steps[0], 2001)) and steps[0] > 1
    (gap,) = reader.events("r1")
    assert gap["kind"] == "gap" and gap["message"].startswith(f"{steps[0] - 1} live event(s) were trimmed")


def test_a_run_removed_on_one_host_disappears_from_the_others(hosts):
    a, b = hosts("a"), hosts("b")
    new_run(a, "r1")
    new_run(a, "r2")
    a.add_metrics("r2", 1, {"x": 1.0})
    assert [r.id for r in b.list_runs()] == ["r1", "r2"] and b.metrics("r2")
    a.delete_run("r2")
    a.add_metrics("r2", 2, {"x": 2.0})  # a late write of the removed run's process creates nothing
    assert [r.id for r in b.list_runs()] == ["r1"] and Store(b.path).metrics("r2") == []
    assert b.get_run("r2") is None and not a.state.r.exists(a.state.stream_key("r2"))


def test_a_run_id_taken_on_another_host_is_refused(hosts):
    new_run(hosts("a"))
    with pytest.raises(shared.RunIdTaken):
        new_run(hosts("b"))


def test_workers_beat_into_redis(hosts):
    a, b = hosts("a"), hosts("b")
    a.worker_beat("gpu0:1", host="gpu0", pid=1, slots=2, busy=1, queue="redis")
    (seen,) = b.live_workers()
    assert (seen["host"], seen["slots"], seen["busy"]) == ("gpu0", 2, 1)
    assert b.live_workers(stale_after=-1) == []
    a.remove_worker("gpu0:1")
    assert b.live_workers() == []


def test_a_run_pinned_to_a_host_is_taken_only_there(redis_url, monkeypatch, tmp_path):
    from jobs.queue import JobQueue

    monkeypatch.setenv("CHERRY_REDIS_URL", redis_url)
    front = JobQueue(tmp_path / "laptop")
    front.enqueue("anywhere", priority=0)
    front.enqueue("on-gpu1", priority=0, host="gpu1")
    assert sorted(front.pending_run_ids()) == ["anywhere", "on-gpu1"]
    gpu0 = JobQueue(tmp_path / "gpu0", host="gpu0").huey.storage
    gpu1 = JobQueue(tmp_path / "gpu1", host="gpu1").huey.storage
    gpu0.blocking = gpu1.blocking = False
    assert gpu0.dequeue() is not None  # "anywhere"
    assert gpu0.dequeue() is None  # the pinned run is not gpu0's
    assert gpu1.dequeue() is not None and gpu1.dequeue() is None
    assert front.pending_run_ids() == []


def test_queued_runs_survive_a_redis_restart(hosts, redis_url, monkeypatch, tiny_model_dir, tiny_pairs, tmp_path):
    from jobs.runs import Jobs
    from tests.conftest import restart_redis
    from tests.e2e.test_jobs import tiny_spec

    monkeypatch.setenv("CHERRY_HOME", str(tmp_path / "laptop"))
    jobs = Jobs(tmp_path / "laptop")
    runs = [jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name=f"q{i}"), priority=i) for i in range(3)]
    restart_redis(redis_url)  # appendonly yes: the queue and the run state come back from the AOF
    assert jobs.queue.pending_run_ids() == [r.id for r in reversed(runs)]
    assert [r.status for r in jobs.store.list_runs()] == ["queued"] * 3
    assert jobs.requeue_lost() == []


def test_a_wiped_redis_gets_back_the_runs_a_host_knows_and_their_queue(
    hosts, redis_url, monkeypatch, tiny_model_dir, tiny_pairs, tmp_path
):
    from jobs.runs import Jobs
    from tests.e2e.test_jobs import tiny_spec

    monkeypatch.setenv("CHERRY_HOME", str(tmp_path / "laptop"))
    jobs = Jobs(tmp_path / "laptop")
    queued = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name="queued"))
    done = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name="done"))
    jobs.store.set_status(done.id, "completed")
    jobs.store.list_runs()  # this host's copy is up to date
    jobs.store.state.r.flushall()  # Redis restarted with no persistence at all

    assert {r.id: r.status for r in jobs.store.list_runs()} == {queued.id: "queued", done.id: "completed"}
    assert jobs.store.state.r.exists(jobs.store.state.run_key(queued.id))  # put back for every host
    assert jobs.requeue_lost() == [queued.id]
    assert jobs.queue.pending_run_ids() == [queued.id]
    assert [r.id for r in hosts("other").list_runs()] == [queued.id, done.id]


def test_a_chained_run_goes_to_the_host_holding_its_parents_output(
    hosts, redis_url, monkeypatch, tiny_model_dir, tiny_pairs, tmp_path
):
    from engine.spec import resolve_spec
    from jobs.runs import Jobs
    from tests.e2e.test_jobs import tiny_spec

    monkeypatch.setenv("CHERRY_HOME", str(tmp_path / "laptop"))
    jobs = Jobs(tmp_path / "laptop")
    sft = jobs.submit(resolve_spec("sft", ["max_steps=1"], model=str(tiny_model_dir), dataset=str(tiny_pairs)))
    dpo = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs), after=sft.id)
    assert sft.out_dir is None and dpo.model == f"{tmp_path / 'laptop' / sft.id}/final"  # planned, not placed
    assert not (tmp_path / "laptop" / sft.id).exists()

    # a worker on gpu-a takes the SFT run: its directory goes under gpu-a's home
    placed = jobs.place(sft, tmp_path / "gpu-a", "gpu-a")
    assert placed == {"out_dir": str(tmp_path / "gpu-a" / sft.id), "files_host": "gpu-a"}
    assert jobs.store.set_status(sft.id, "running", only_if=["queued"], worker_host="gpu-a", **placed)
    assert jobs.store.set_status(sft.id, "completed", only_if=["running"])
    assert jobs.release_dependents(sft.id) == [dpo.id]
    assert jobs.queue.huey.storage.conn.zcard(jobs.queue.huey.storage.host_queue_key("gpu-a")) == 1

    # the DPO run reads the SFT model where it is
    placed = jobs.place(jobs.store.get_run(dpo.id), tmp_path / "gpu-a", "gpu-a")
    assert placed["model"] == f"{tmp_path / 'gpu-a' / sft.id}/final"
    assert json.loads(placed["spec"])["model"] == placed["model"]
