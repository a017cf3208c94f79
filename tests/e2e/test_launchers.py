"""A run started by another launcher is one run: `torchrun --nproc-per-node 2 -m tuiapp.cli train ...` on the
demo (gloo, one host) equals a one-process run with the same global batch, step by step; rank 0 alone wrote
the run directory and the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.reporting import MemoryReporter
from engine.spec import demo_dir, resolve_spec
from engine.train import train

# three steps of the demo's DPO, with a small evaluation at the start and the end
LEAN = ["max_steps=3", "eval_steps=0", "sample_steps=0", "save_steps=0", "eval_max_examples=4", "num_samples=2"]
LEAN += ["kl_samples=2", "num_threads=1"]


def test_torchrun_with_two_processes_is_one_run_equal_to_one_process(tmp_path):
    preset = str(demo_dir() / "dpo.yaml")
    one = MemoryReporter()
    train(resolve_spec(preset, [*LEAN, "batch_size=8"]), tmp_path / "one", one)

    out, home = tmp_path / "two", tmp_path / "home"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    command += ["-m", "tuiapp.cli", "train", "--preset", preset, "--out", str(out)]
    for setting in [*LEAN, "batch_size=4"]:
        command += ["--set", setting]
    env = {**os.environ, "CHERRY_HOME": str(home), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in metrics if "train/loss" in row]
    assert len(losses) == 3
    assert losses == pytest.approx(one.series("train/loss"), abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert "num_processes: 2" in (out / "spec.yaml").read_text()  # the launcher's count, recorded
    assert done.stderr.count("completed: 3/3 steps") + done.stdout.count("completed: 3/3 steps") == 1  # rank 0 only

    from jobs.shared import open_store

    store = open_store(home)
    try:
        runs = store.list_runs()
        assert len(runs) == 1 and runs[0].status == "completed"
    finally:
        store.close()
