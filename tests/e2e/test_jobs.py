"""The queue, the worker and the run lifecycle with real processes: no mocks of Huey or SQLite.

Each test gets its own Cherry home; workers run as `cherry worker` subprocesses, and every run
executes in the worker's child process exactly as it would for a user.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.spec import resolve_spec
from jobs.runs import JobError, Jobs

CLI = [sys.executable, "-m", "tuiapp.cli"]


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class WorkerProcess:
    """`cherry worker` in its own session, so signals reach only the worker itself."""

    def __init__(self, home: Path, *args: str) -> None:
        self.log = open(home / f"worker-{time.monotonic_ns()}.log", "w")
        env = {**os.environ, "CHERRY_HOME": str(home)}
        self.proc = subprocess.Popen(
            CLI + ["worker", "--grace", "10", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture
def start_worker(home):
    workers: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        worker = WorkerProcess(home, *args)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.proc.poll() is None:
            worker.stop()


def tiny_spec(tiny_model_dir, tiny_pairs, **overrides):
    values = dict(
        lr=1e-3,
        batch_size=4,
        max_steps=4,
        eval_steps=0,
        sample_steps=0,
        num_samples=0,
        kl_samples=0,
        save_steps=5,
        logging_steps=1,
        num_threads=1,
        max_length=64,
        max_prompt_length=32,
        max_new_tokens=4,
    )
    values.update(overrides)
    return resolve_spec(
        "dpo", [f"{k}={v}" for k, v in values.items()], model=str(tiny_model_dir), dataset=str(tiny_pairs)
    )


def status(jobs: Jobs, run_id: str) -> str:
    return jobs.store.get_run(run_id).status


def losses(jobs: Jobs, run_id: str) -> dict[int, float]:
    return {row["step"]: row["value"] for row in jobs.store.metrics(run_id, names=["train/loss"])}


def test_worker_runs_in_order_and_cancels_queued_and_running(home, start_worker, tiny_model_dir, tiny_pairs):
    jobs = Jobs(home)
    first = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name="first"))
    never = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name="never"))
    long = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name="long", max_steps=100_000, save_steps=20))
    assert jobs.queue.pending_run_ids() == [first.id, never.id, long.id]
    assert "will not start" in jobs.cancel(never.id)

    start_worker()
    wait_for(lambda: (jobs.store.get_run(long.id).step or 0) >= 25, 120, "the long run to log 25 steps")
    assert "next step" in jobs.cancel(long.id)
    asked = time.monotonic()
    wait_for(lambda: status(jobs, long.id) == "cancelled", 30, "the running run to stop")
    assert time.monotonic() - asked < 15

    runs = {r.name: r for r in jobs.store.list_runs()}
    assert runs["first"].status == "completed"
    assert runs["never"].status == "cancelled" and runs["never"].started_at is None
    assert runs["first"].finished_at <= runs["long"].started_at  # one slot: strictly in order
    kept = losses(jobs, long.id)
    assert len(kept) >= 25 and sorted(kept) == list(range(1, len(kept) + 1))  # metrics kept, none missing
    checkpoints = sorted((Path(runs["long"].out_dir) / "checkpoints").glob("step-*"))
    assert checkpoints and int(checkpoints[-1].name.split("-")[1]) == runs["long"].step  # saved where it stopped
    assert (Path(runs["first"].out_dir) / "final" / "config.json").exists()
    assert any(e["kind"] == "cancel" for e in jobs.store.events(long.id))


def test_killed_worker_leaves_an_interrupted_run_that_resumes_with_identical_losses(
    home, start_worker, tiny_model_dir, tiny_pairs, tmp_path
):
    from engine.reporting import MemoryReporter
    from engine.train import train

    spec = tiny_spec(tiny_model_dir, tiny_pairs, max_steps=60, save_steps=5)
    straight = MemoryReporter()
    train(spec, tmp_path / "straight", straight)
    expected = dict(zip(range(1, 61), straight.series("train/loss")))

    jobs = Jobs(home)
    run = jobs.submit(spec)
    worker = start_worker()
    wait_for(lambda: (jobs.store.get_run(run.id).step or 0) >= 12, 120, "12 steps")
    child_pid = jobs.store.get_run(run.id).pid
    # A machine crash: the worker and the run's process die at once, nothing gets to clean up.
    # (The worker is frozen first so it cannot record the child's death.)
    worker.proc.send_signal(signal.SIGSTOP)
    os.kill(child_pid, signal.SIGKILL)
    worker.kill()
    assert status(jobs, run.id) == "running"

    start_worker()  # a new worker notices the orphan
    wait_for(lambda: status(jobs, run.id) == "interrupted", 30, "the orphaned run to be marked interrupted")
    assert "cherry resume" in jobs.store.get_run(run.id).error

    result = subprocess.run(
        CLI + ["resume", run.id[-12:]], capture_output=True, text=True, env={**os.environ, "CHERRY_HOME": str(home)}
    )
    assert result.returncode == 0, result.stderr
    wait_for(lambda: status(jobs, run.id) == "completed", 120, "the resumed run to complete")
    assert losses(jobs, run.id) == expected  # every step once, equal to an uninterrupted run
    on_disk = [json.loads(line) for line in (Path(run.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in on_disk if "train/loss" in r] == list(range(1, 61))
    assert jobs.store.get_run(run.id).attempts == 2


def test_sigterm_stops_the_worker_gracefully_and_the_run_resumes(home, start_worker, tiny_model_dir, tiny_pairs):
    jobs = Jobs(home)
    run = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, max_steps=100_000, save_steps=1000))
    worker = start_worker()
    wait_for(lambda: (jobs.store.get_run(run.id).step or 0) >= 10, 120, "10 steps")
    (announced,) = jobs.store.live_workers()
    assert announced["pid"] == worker.proc.pid and announced["busy"] == 1 and announced["slots"] == 1
    asked = time.monotonic()
    assert worker.stop(timeout=30) == 0
    assert jobs.store.live_workers() == []  # it signed off
    assert time.monotonic() - asked < 20  # bounded: the run stops at its next step
    stopped = jobs.store.get_run(run.id)
    assert stopped.status == "interrupted"
    checkpoint = Path(stopped.out_dir) / "checkpoints" / f"step-{stopped.step:07d}"
    assert checkpoint.is_dir()  # nothing lost: checkpoint at the step it stopped

    jobs.resume(run.id)
    start_worker()
    wait_for(lambda: (jobs.store.get_run(run.id).step or 0) > stopped.step + 3, 120, "the resumed run to go on")
    assert sorted(losses(jobs, run.id)) == list(range(1, jobs.store.get_run(run.id).step + 1))
    jobs.cancel(run.id)
    wait_for(lambda: status(jobs, run.id) == "cancelled", 30, "cancel")


class ForegroundTrain:
    """`cherry train` in a real process, as a user runs it in a terminal; Ctrl+C is a real SIGINT."""

    def __init__(self, home: Path, tiny_model_dir, tiny_pairs, values: dict) -> None:
        sets = [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]
        self.proc = subprocess.Popen(
            CLI + ["train", "--preset", "dpo", "--model", str(tiny_model_dir), "--dataset", str(tiny_pairs), *sets],
            env={**os.environ, "CHERRY_HOME": str(home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def ctrl_c(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def wait_for_line(self, text: str, timeout: float = 30) -> list[str]:
        """stderr lines up to the first one holding `text` (the process keeps writing after it)."""
        deadline, lines = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            lines.append(line)
            if text in line or not line:
                return lines
        raise AssertionError(f"no line with {text!r} in {timeout}s: {lines}")


FOREGROUND = dict(
    lr=1e-3,
    batch_size=4,
    max_steps=40,
    eval_steps=0,
    sample_steps=0,
    num_samples=0,
    kl_samples=0,
    logging_steps=1,
    num_threads=1,
    max_length=64,
    max_prompt_length=32,
    max_new_tokens=4,
)


def _the_run(jobs: Jobs, at_least_step: int):
    return wait_for(
        lambda: next((r for r in jobs.store.list_runs() if (r.step or 0) >= at_least_step), None),
        120,
        f"the foreground run to log {at_least_step} steps",
    )


@pytest.mark.slow
def test_ctrl_c_in_the_foreground_saves_a_checkpoint_and_a_worker_resumes_it_exactly(
    home, start_worker, tiny_model_dir, tiny_pairs, tmp_path
):
    from engine.reporting import MemoryReporter
    from engine.train import train

    values = {**FOREGROUND, "save_steps": 1000}
    straight = MemoryReporter()
    train(tiny_spec(tiny_model_dir, tiny_pairs, **values), tmp_path / "straight", straight)
    expected = dict(zip(range(1, 41), straight.series("train/loss")))

    jobs = Jobs(home)
    foreground = ForegroundTrain(home, tiny_model_dir, tiny_pairs, values)
    run = _the_run(jobs, 8)
    foreground.ctrl_c()
    _, err = foreground.proc.communicate(timeout=60)
    assert foreground.proc.returncode == 130, err
    assert "Ctrl+C: stopping after this step" in err and "Traceback" not in err
    stopped = jobs.store.get_run(run.id)
    assert stopped.status == "interrupted" and stopped.finished_at and "stopped by Ctrl+C" in stopped.error
    assert 8 <= stopped.step < 40
    assert (Path(stopped.out_dir) / "checkpoints" / f"step-{stopped.step:07d}" / "state.pt").exists()
    assert f"cherry resume {run.id}" in err

    result = subprocess.run(
        CLI + ["resume", run.id], capture_output=True, text=True, env={**os.environ, "CHERRY_HOME": str(home)}
    )
    assert result.returncode == 0, result.stderr
    start_worker()
    wait_for(lambda: status(jobs, run.id) == "completed", 120, "the resumed run to complete on the worker")
    assert losses(jobs, run.id) == expected  # every step once, equal to the uninterrupted run


@pytest.mark.slow
def test_a_second_ctrl_c_quits_at_once_and_leaves_the_store_consistent(
    home, start_worker, tiny_model_dir, tiny_pairs, tmp_path
):
    import sqlite3

    from engine.reporting import MemoryReporter
    from engine.train import train

    values = {**FOREGROUND, "save_steps": 5}
    straight = MemoryReporter()
    train(tiny_spec(tiny_model_dir, tiny_pairs, **values), tmp_path / "straight", straight)
    expected = dict(zip(range(1, 41), straight.series("train/loss")))

    jobs = Jobs(home)
    foreground = ForegroundTrain(home, tiny_model_dir, tiny_pairs, values)
    run = _the_run(jobs, 12)
    foreground.ctrl_c()
    foreground.wait_for_line("Ctrl+C: stopping after this step")  # the first one was taken: a stop is pending
    foreground.ctrl_c()
    asked = time.monotonic()
    _, err = foreground.proc.communicate(timeout=30)
    assert time.monotonic() - asked < 5  # at once: no waiting for the step, no checkpoint
    assert foreground.proc.returncode == 130 and "second Ctrl+C" in err and "Traceback" not in err, err

    quit_run = jobs.store.get_run(run.id)
    assert quit_run.status == "interrupted" and quit_run.finished_at and "second Ctrl+C" in quit_run.error
    assert any(e["kind"] == "interrupted" for e in jobs.store.events(run.id))
    with sqlite3.connect(str(home / "cherry.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    jobs.resume(run.id)  # from the last checkpoint saved before the quit
    start_worker()
    wait_for(lambda: status(jobs, run.id) == "completed", 120, "the resumed run to complete on the worker")
    assert losses(jobs, run.id) == expected


def test_after_chains_a_run_onto_the_output_of_another(home, start_worker, tiny_model_dir, tiny_pairs):
    jobs = Jobs(home)
    sft = jobs.submit(
        resolve_spec(
            "sft",
            [
                "max_steps=3",
                "num_samples=0",
                "kl_samples=0",
                "eval_steps=0",
                "batch_size=4",
                "max_length=64",
                "max_prompt_length=32",
                "num_threads=1",
            ],
            model=str(tiny_model_dir),
            dataset=str(tiny_pairs),
        )
    )
    dpo = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, max_steps=2), after=sft.id)
    assert dpo.task_id is None and dpo.model == str(Path(sft.out_dir) / "final")
    assert jobs.queue.pending_run_ids() == [sft.id]  # the chained run waits in the store, not on the queue
    start_worker()
    wait_for(lambda: status(jobs, dpo.id) in ("completed", "failed"), 120, "the chained run")
    assert status(jobs, dpo.id) == "completed", jobs.store.get_run(dpo.id).error
    assert jobs.store.get_run(dpo.id).started_at >= jobs.store.get_run(sft.id).finished_at


def test_a_failing_run_keeps_its_error_and_log(home, start_worker, tiny_model_dir, tiny_pairs, tmp_path):
    jobs = Jobs(home)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    spec = tiny_spec(tiny_model_dir, tiny_pairs)
    spec.model = str(broken)
    run = jobs.submit(spec)
    start_worker()
    wait_for(lambda: jobs.store.get_run(run.id).log_tail, 60, "the run to fail and its log tail to be stored")
    failed = jobs.store.get_run(run.id)
    assert failed.status == "failed" and "config.json" in failed.error and "config.json" in failed.log_tail
    env = {**os.environ, "CHERRY_HOME": str(home)}
    shown = subprocess.run(CLI + ["logs", run.id], capture_output=True, text=True, env=env)
    assert failed.error in shown.stdout


def test_reader_polling_while_a_run_writes_sees_every_step(home):
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys; from jobs.store import Store, StoreReporter\n"
                "r = StoreReporter(Store(sys.argv[1]), 'w')\n"
                "r.store.create_run('w', {'algorithm': 'dpo'}, name='w', out_dir='.')\n"
                "for step in range(1, 1501):\n"
                "    r.log_metrics(step, {f'm{i}': float(step) for i in range(8)})\n"
            ),
            str(home / "cherry.db"),
        ],
    )
    jobs = Jobs(home)
    seen: list[int] = []
    last_id = 0
    while True:
        done = writer.poll() is not None
        rows = jobs.store.metrics("w", after_id=last_id, names=["m0"])  # raises on any lock error
        if rows:
            last_id = rows[-1]["id"]
            seen += [row["step"] for row in rows]
        if done and not rows:
            break
    assert writer.returncode == 0
    assert seen == list(range(1, 1501))


def _submit_many(home: str, tiny_model_dir: str, tiny_pairs: str, label: str, n: int) -> None:
    os.environ["CHERRY_HOME"] = home
    jobs = Jobs(Path(home))
    for i in range(n):
        quick = ["max_steps=1", "eval_strategy=no", "num_samples=0", "kl_samples=0", "num_threads=1"]
        spec = resolve_spec("dpo", [f"name={label}-{i:03d}", *quick], model=tiny_model_dir, dataset=tiny_pairs)
        jobs.submit(spec)


def test_a_burst_of_200_submissions_is_stored_and_queued_in_order(home, start_worker, tiny_model_dir, tiny_pairs):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_submit_many, args=(str(home), str(tiny_model_dir), str(tiny_pairs), f"p{k}", 50))
        for k in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    jobs = Jobs(home)
    runs = jobs.store.list_runs()
    assert len(runs) == 200 and len({r.id for r in runs}) == 200
    assert all(r.status == "queued" and r.task_id for r in runs)
    for k in range(4):  # each submitter's runs are queued in its own submission order
        mine = [r.name for r in runs if r.name.startswith(f"p{k}-")]
        assert mine == sorted(mine) and len(mine) == 50
    queue_order = jobs.queue.pending_run_ids()
    assert sorted(queue_order) == sorted(r.id for r in runs)
    by_id = {r.id: r.name for r in runs}
    for k in range(4):  # concurrent submitters interleave, each one's runs stay in its order
        mine = [by_id[run_id] for run_id in queue_order if by_id[run_id].startswith(f"p{k}-")]
        assert mine == sorted(mine)

    # The worker takes them in queue order: stop it after a few and check which ran.
    worker = start_worker()
    # each run is a process that imports the training stack: loose on a loaded 2-core machine
    wait_for(lambda: len(jobs.store.list_runs(["completed"])) >= 3, 300, "three runs")
    worker.stop()
    started = [r.id for r in sorted(jobs.store.list_runs(), key=lambda r: r.started_at or 1e18) if r.started_at]
    assert len(started) >= 3 and started == queue_order[: len(started)]


def test_bad_submissions_are_refused_before_the_queue(home, tiny_model_dir, tiny_pairs, tmp_path):
    from tests.conftest import write_jsonl

    env = {**os.environ, "CHERRY_HOME": str(home)}

    def submit(*args: str):
        return subprocess.run(CLI + ["submit", *args], capture_output=True, text=True, env=env)

    bad_value = submit("--model", str(tiny_model_dir), "--dataset", str(tiny_pairs), "--set", "beta=-1")
    assert bad_value.returncode == 2 and "beta" in bad_value.stderr
    missing = submit("--model", str(tiny_model_dir), "--dataset", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unpaired = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True}] * 4)
    wrong_kind = submit("--model", str(tiny_model_dir), "--dataset", str(unpaired))
    assert wrong_kind.returncode == 2 and "kto" in wrong_kind.stderr
    jobs = Jobs(home)
    assert jobs.store.list_runs() == [] and jobs.queue.pending_run_ids() == []

    ok = submit("--model", str(tiny_model_dir), "--dataset", str(tiny_pairs), "--set", "max_steps=1")
    assert ok.returncode == 0
    run_id = ok.stdout.strip()
    assert jobs.queue.pending_run_ids() == [run_id]
    with pytest.raises(JobError, match="only a failed, cancelled, interrupted or pruned"):
        jobs.resume(run_id)
    listing = json.loads(subprocess.run(CLI + ["ls", "--json"], capture_output=True, text=True, env=env).stdout)
    assert [r["id"] for r in listing] == [run_id] and listing[0]["status"] == "queued"
    removed = subprocess.run(CLI + ["rm", run_id, "--yes"], capture_output=True, text=True, env=env)
    assert removed.returncode == 0 and jobs.store.list_runs() == []
    assert not (home / run_id).exists()


def test_a_crashed_run_with_retries_resumes_by_itself(home, start_worker, tiny_model_dir, tiny_pairs):
    jobs = Jobs(home)
    run = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, max_steps=40, save_steps=5), retries=1)
    start_worker()
    wait_for(lambda: (jobs.store.get_run(run.id).step or 0) >= 8, 120, "8 steps")
    os.kill(jobs.store.get_run(run.id).pid, signal.SIGKILL)  # a crash that is not the user's fault
    wait_for(lambda: status(jobs, run.id) == "completed", 120, "the retried run to complete")
    done = jobs.store.get_run(run.id)
    assert done.attempts == 2
    assert sorted(losses(jobs, run.id)) == list(range(1, 41))
    assert any(e["kind"] == "retry" and "SIGKILL" in e["message"] for e in jobs.store.events(run.id))


def test_two_workers_share_one_redis_queue(home, start_worker, tiny_model_dir, tiny_pairs, monkeypatch, redis_url):
    """Workers sharing one home and one Redis (the several-machines test gives each its own home)."""
    monkeypatch.setenv("CHERRY_REDIS_URL", redis_url)
    jobs = Jobs(home)
    runs = [jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, max_steps=3, name=f"r{i}")) for i in range(4)]
    assert jobs.queue.pending_run_ids() == [r.id for r in runs]
    start_worker()
    start_worker()
    wait_for(lambda: all(status(jobs, r.id) == "completed" for r in runs), 180, "four runs over two workers")
    assert all(jobs.store.get_run(r.id).attempts == 1 for r in runs)  # each ran exactly once
    assert all(jobs.store.get_run(r.id).out_dir == str(home / r.id) for r in runs)


def test_a_gpu_worker_gives_each_run_its_gpus_and_refuses_more_than_it_has(
    home, start_worker, tiny_model_dir, tiny_pairs
):
    """`--gpus 0,1` on this CPU-only machine: the worker allocates the GPU ids (the children see them in
    CUDA_VISIBLE_DEVICES, find no CUDA, and run on the CPU), so the allocation is what is checked here."""
    jobs = Jobs(home)
    too_many = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name="three", num_processes=3))
    pair = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name="pair", num_processes=2, batch_size=2))
    single = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name="single"))
    start_worker("--gpus", "0,1")
    wait_for(lambda: status(jobs, too_many.id) == "failed", 60, "the 3-GPU run to be refused")
    error = jobs.store.get_run(too_many.id).error
    assert "num_processes=3" in error and "has 2" in error and "--set num_processes=2" in error
    wait_for(lambda: status(jobs, pair.id) == "completed" and status(jobs, single.id) == "completed", 240, "both runs")
    assert jobs.store.get_run(pair.id).gpus == "0,1"
    assert jobs.store.get_run(single.id).gpus == "0"
    summary = json.loads((Path(jobs.store.get_run(pair.id).out_dir) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    shown = subprocess.run(CLI + ["ls"], env={**os.environ, "CHERRY_HOME": str(home)}, capture_output=True, text=True)
    assert "GPU 0,1" in shown.stdout
