"""Several machines on one: a real redis-server, two workers with their own homes and host names
(as two GPU boxes would have), and a submitter with a third home (a laptop). Nothing is shared
but Redis; every check goes through the submitter's own `cherry` commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.test_jobs import CLI, tiny_spec, wait_for

HEARTBEAT_TIMEOUT = 8  # seconds without a heartbeat before a run on another host counts as orphaned


class Host:
    """One machine: its own home, its own name, the shared Redis."""

    def __init__(self, root: Path, name: str, redis_url: str) -> None:
        self.name = name
        self.home = root / name
        self.home.mkdir()
        self.env = {
            **os.environ,
            "CHERRY_HOME": str(self.home),
            "CHERRY_HOST": name,
            "CHERRY_REDIS_URL": redis_url,
            "CHERRY_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
        }
        self.env.pop("CHERRY_ARTIFACTS", None)
        self.worker: subprocess.Popen | None = None

    def cherry(self, *args: str) -> str:
        done = subprocess.run(CLI + list(args), capture_output=True, text=True, env=self.env, timeout=120)
        assert done.returncode == 0, f"cherry {' '.join(args)} on {self.name}: {done.stderr}"
        return done.stdout

    def runs(self) -> dict[str, dict]:
        return {r["name"]: r for r in json.loads(self.cherry("ls", "--json"))}

    def start_worker(self) -> None:
        log = open(self.home / f"worker-{time.monotonic_ns()}.log", "w")
        self.worker = subprocess.Popen(
            CLI + ["worker", "--grace", "10"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def crash(self, child_pid: int) -> None:
        """The machine vanishes: the worker and the run's process die at once, nothing gets to record it."""
        self.worker.send_signal(signal.SIGSTOP)  # frozen first, so it cannot write the child's death
        os.kill(child_pid, signal.SIGKILL)
        self.worker.kill()
        self.worker.wait()

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(40)
            except subprocess.TimeoutExpired:
                self.worker.kill()


class Follower:
    """`cherry metrics RUN --follow --json` on the laptop, its lines collected as they come."""

    def __init__(self, host: Host, run_id: str) -> None:
        self.proc = subprocess.Popen(
            CLI + ["metrics", run_id, "--follow", "--json", "--interval", "0.3"],
            env=host.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.rows: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.rows.append(json.loads(line))

    def steps(self) -> list[int]:
        return [row["step"] for row in self.rows if "train/loss" in row]


@pytest.fixture
def machines(tmp_path, redis_url):
    hosts = {name: Host(tmp_path, name, redis_url) for name in ("laptop", "gpu-a", "gpu-b")}
    yield hosts
    for host in hosts.values():
        host.stop()


@pytest.mark.slow  # about 2.5 minutes on 2 shared CPU cores; `make test` runs it
def test_two_worker_hosts_and_a_laptop_share_only_redis(machines, tiny_model_dir, tiny_pairs, tmp_path, monkeypatch):
    from engine.reporting import MemoryReporter
    from engine.train import train
    from jobs.runs import Jobs

    laptop, gpu_a, gpu_b = machines["laptop"], machines["gpu-a"], machines["gpu-b"]
    for name, value in laptop.env.items():
        if name.startswith("CHERRY_"):
            monkeypatch.setenv(name, value)
    jobs = Jobs(laptop.home)  # submitting in-process is `cherry submit` without a Python start per run
    long_runs = [
        jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, name=f"long-{i}", max_steps=100_000, save_steps=50))
        for i in range(2)
    ]
    gpu_a.start_worker()
    gpu_b.start_worker()

    # Both workers take a run; the laptop sees both live, with their metrics and host:path.
    wait_for(lambda: all((r["step"] or 0) >= 5 for r in laptop.runs().values()), 180, "both runs to log 5 steps")
    runs = laptop.runs()
    assert {runs["long-0"]["worker_host"], runs["long-1"]["worker_host"]} == {"gpu-a", "gpu-b"}
    for run in runs.values():
        host = machines[run["worker_host"]]
        assert run["status"] == "running" and run["latest_metrics"]["train/loss"] > 0
        assert run["location"] == f"{host.name}:{host.home / run['id']}"
        assert (host.home / run["id"] / "log.txt").exists() and not (laptop.home / run["id"]).exists()
    follower = Follower(laptop, long_runs[0].id)
    wait_for(lambda: len(follower.steps()) >= 10, 60, "the laptop's follower to see 10 steps")

    # Cancel from the laptop stops the run on either worker, at its next step.
    for run in long_runs:
        assert "next step" in laptop.cherry("cancel", run.id)
    wait_for(lambda: all(r["status"] == "cancelled" for r in laptop.runs().values()), 60, "both runs to stop")
    follower.proc.wait(30)
    assert "run cancelled" in follower.proc.stderr.read()
    followed = follower.steps()
    assert followed == list(range(1, len(followed) + 1)) and len(followed) == laptop.runs()["long-0"]["step"]
    shown = laptop.cherry("show", long_runs[1].id)
    assert f"directory {machines[laptop.runs()['long-1']['worker_host']].name}:" in shown
    assert "[cancel]" in laptop.cherry("logs", long_runs[0].id, "--events")
    assert "step" in laptop.cherry("logs", long_runs[0].id)  # the run's output, streamed from its host

    # A worker host vanishes mid-run: the other host marks its run interrupted by heartbeat timeout.
    spec = tiny_spec(tiny_model_dir, tiny_pairs, name="crash", max_steps=60, save_steps=5)
    crash = jobs.submit(spec)
    wait_for(lambda: (jobs.store.get_run(crash.id).step or 0) >= 12, 120, "the crash run to log 12 steps")
    taken = jobs.store.get_run(crash.id)
    doomed, survivor = (gpu_a, gpu_b) if taken.worker_host == "gpu-a" else (gpu_b, gpu_a)
    doomed.crash(taken.pid)
    assert jobs.store.get_run(crash.id).status == "running"
    wait_for(lambda: laptop.runs()["crash"]["status"] == "interrupted", 4 * HEARTBEAT_TIMEOUT, "the heartbeat timeout")
    interrupted = jobs.store.get_run(crash.id)
    assert f"its worker on {doomed.name} stopped" in interrupted.error
    assert interrupted.finished_at - interrupted.heartbeat_at >= HEARTBEAT_TIMEOUT

    # Resumed from the laptop, it waits for a worker on the host that holds its checkpoint.
    assert "resume" in laptop.cherry("resume", crash.id)
    time.sleep(5)
    assert jobs.store.get_run(crash.id).status == "queued"  # the survivor did not take it
    doomed.start_worker()  # the machine is back
    wait_for(lambda: jobs.store.get_run(crash.id).status in ("completed", "failed"), 180, "the resumed run")
    done = jobs.store.get_run(crash.id)
    assert done.status == "completed" and done.worker_host == doomed.name and done.attempts == 2, done.error
    assert survivor.worker.poll() is None

    straight = MemoryReporter()
    train(spec, tmp_path / "straight", straight)
    expected = dict(zip(range(1, 61), straight.series("train/loss")))
    lines = laptop.cherry("metrics", crash.id, "--json", "--names", "train/loss").splitlines()
    got = {row["step"]: row["train/loss"] for row in map(json.loads, lines)}
    assert got == expected  # every step once, equal to an uninterrupted run
