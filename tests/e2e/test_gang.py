"""One run over two machines from the queue (`num_machines: 2`), on one host: a real redis-server, workers
with their own homes and `--name`s, a submitter with a third home. The run waits (and says why) until two
workers are live, then its losses equal a one-process run's with the same global batch; SIGKILL of one
machine's worker ends a run `interrupted` within a bounded time, and `cherry resume` completes it on another
pair of machines with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_jobs import CLI, tiny_spec, wait_for

HEARTBEAT_TIMEOUT = 8  # seconds without a heartbeat before a worker (and its machine) counts as gone


class Machine:
    """One machine: its own home and worker name, the shared Redis; the rendezvous on the loopback."""

    def __init__(self, root: Path, name: str, redis_url: str) -> None:
        self.name = name
        self.home = root / name
        self.home.mkdir()
        self.env = {
            **os.environ,
            "CHERRY_HOME": str(self.home),
            "CHERRY_REDIS_URL": redis_url,
            "CHERRY_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "CHERRY_ADDRESS": "127.0.0.1",
        }
        for name_ in ("CHERRY_ARTIFACTS", "CHERRY_HOST"):
            self.env.pop(name_, None)
        self.worker: subprocess.Popen | None = None

    def cherry(self, *args: str) -> str:
        done = subprocess.run(CLI + list(args), capture_output=True, text=True, env=self.env, timeout=120)
        assert done.returncode == 0, f"cherry {' '.join(args)} on {self.name}: {done.stderr}"
        return done.stdout

    def start_worker(self) -> None:
        log = open(self.home / f"worker-{time.monotonic_ns()}.log", "w")
        self.worker = subprocess.Popen(
            CLI + ["worker", "--name", self.name, "--grace", "10"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(40)
            except subprocess.TimeoutExpired:
                self.worker.kill()


@pytest.fixture
def machines(tmp_path, redis_url):
    made = {name: Machine(tmp_path, name, redis_url) for name in ("laptop", "gpu-a", "gpu-b", "gpu-c")}
    yield made
    for machine in made.values():
        machine.stop()


def one_process_losses(spec, out: Path) -> dict[int, float]:
    from engine.reporting import MemoryReporter
    from engine.train import train

    straight = MemoryReporter()
    train(spec, out, straight)
    return dict(enumerate(straight.series("train/loss"), start=1))


def stored_losses(jobs, run_id: str) -> dict[int, float]:
    return {row["step"]: row["value"] for row in jobs.store.metrics(run_id, names=["train/loss"])}


@pytest.mark.slow  # two machines' processes start (torch imports) three times on shared CPU cores: minutes
def test_a_run_over_two_machines_waits_for_them_equals_one_process_and_survives_losing_one(
    machines, tiny_model_dir, tiny_pairs, tmp_path, monkeypatch
):
    from jobs.runs import Jobs

    laptop, gpu_a, gpu_b, gpu_c = (machines[name] for name in ("laptop", "gpu-a", "gpu-b", "gpu-c"))
    for name, value in laptop.env.items():
        if name.startswith("CHERRY_"):
            monkeypatch.setenv(name, value)
    jobs = Jobs(laptop.home)

    # Two machines of one process with batch 2 each: the global batch of one process with batch 4.
    pair = tiny_spec(tiny_model_dir, tiny_pairs, name="pair", batch_size=2, max_steps=3, num_machines=2)
    run = jobs.submit(pair)
    gpu_a.start_worker()
    wait_for(lambda: "waiting for 2 workers" in laptop.cherry("ls"), 60, "the run to say it waits for 2 workers")
    assert jobs.store.get_run(run.id).status == "queued"
    gpu_b.start_worker()
    wait_for(lambda: jobs.store.get_run(run.id).ended, 240, "the two-machine run")
    done = jobs.store.get_run(run.id)
    assert done.status == "completed", done.error
    assert (
        sorted(m["host"] for m in done.machines) == ["gpu-a", "gpu-b"] and done.worker_host == done.machines[0]["host"]
    )
    assert f"machines  {done.machines[0]['host']} + {done.machines[1]['host']}" in laptop.cherry("show", run.id)
    expected = one_process_losses(tiny_spec(tiny_model_dir, tiny_pairs, batch_size=4, max_steps=3), tmp_path / "one")
    assert stored_losses(jobs, run.id) == pytest.approx(expected, abs=1e-5)

    # Machine 1's worker is killed mid-run: the run ends interrupted on both machines, within a bound.
    long = tiny_spec(tiny_model_dir, tiny_pairs, name="long", batch_size=2, max_steps=30, save_steps=2, num_machines=2)
    run = jobs.submit(long)
    wait_for(lambda: (jobs.store.get_run(run.id).step or 0) >= 4, 240, "the long run to reach step 4")
    taken = jobs.store.get_run(run.id)
    holder, lost = (machines[m["host"]] for m in taken.machines)
    lost.worker.kill()
    killed_at = time.monotonic()
    wait_for(lambda: jobs.store.get_run(run.id).ended, 60, "the run to end after losing a machine")
    assert time.monotonic() - killed_at < 60
    interrupted = jobs.store.get_run(run.id)
    assert interrupted.status == "interrupted", interrupted.error
    assert f"machine 1 ({lost.name}) was lost" in interrupted.error
    assert interrupted.step < 30

    # Resumed: machine 0 where its checkpoint is, machine 1 on a worker it never ran on.
    gpu_c.start_worker()
    assert "queued to resume" in laptop.cherry("resume", run.id)
    wait_for(lambda: jobs.store.get_run(run.id).ended, 240, "the resumed run")
    resumed = jobs.store.get_run(run.id)
    assert resumed.status == "completed", resumed.error
    assert [m["host"] for m in resumed.machines] == [holder.name, "gpu-c"]
    expected = one_process_losses(tiny_spec(tiny_model_dir, tiny_pairs, batch_size=4, max_steps=30), tmp_path / "long")
    assert stored_losses(jobs, run.id) == pytest.approx(expected, abs=1e-5)
    listed = {r["id"]: r for r in json.loads(laptop.cherry("ls", "--json"))}
    assert [m["host"] for m in listed[run.id]["machines"]] == [holder.name, "gpu-c"]
