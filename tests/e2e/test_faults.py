"""Real faults, end to end: NaN weights, a run that diverges, a NaN reward, a full disk, an unreachable Redis."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from engine.diskspace import DiskFullError
from engine.nonfinite import NonFiniteError
from engine.reporting import MemoryReporter
from engine.spec import build_spec
from engine.train import train
from tests.conftest import write_jsonl
from tests.e2e.test_online import online_spec
from tests.e2e.test_train import dpo_spec as train_dpo_spec


def dpo_spec(model_dir, data, **overrides):
    """test_train's DPO run, shorter and with no eval, samples or KL estimate: the faults need only the steps."""
    quiet = dict(max_steps=8, eval_split=0.0, eval_steps=0, sample_steps=0, num_samples=0, kl_samples=0)
    return train_dpo_spec(model_dir, data, **{**quiet, **overrides})


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_model_with_a_nan_weight_is_refused_at_load_naming_the_tensor(tiny_model_dir, tiny_pairs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    damaged = tmp_path / "damaged"
    model.save_pretrained(damaged)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(damaged)

    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds nan"):
        train(dpo_spec(damaged, tiny_pairs, max_steps=1), tmp_path / "run")


def test_a_diverging_run_fails_at_that_step_and_keeps_its_last_good_checkpoint(tiny_model_dir, tiny_pairs, tmp_path):
    # lr 1e30: the first step is finite, the second step's gradients are NaN (a real divergence)
    spec = dpo_spec(tiny_model_dir, tiny_pairs, lr=1e30, max_steps=4, save_steps=1)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^step 2: the (loss|gradient norm) is (nan|inf).*step-0000001") as err:
        train(spec, run)
    summary = summary_of(run)
    assert summary["status"] == "failed" and summary["step"] == 1 and summary["error"] == str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001"]
    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints" / "step-0000001" / "model" / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "failed"


@pytest.fixture
def nan_reward(tmp_path):
    """A reward function file (one per test: a fresh module) that returns NaN for one completion of the
    second training rollout (16 completions a step; the start's evaluation scores 4)."""
    folder = tmp_path / "reward"
    folder.mkdir()
    (folder / "nan_reward.py").write_text(
        "rollouts = []\n"
        "def score(prompts, completions, **kwargs):\n"
        "    out = [float(len(c) % 3) for c in completions]\n"
        "    if len(completions) == 16:\n"
        "        rollouts.append(1)\n"
        "        if len(rollouts) == 2:\n"
        "            out[0] = float('nan')\n"
        "    return out\n"
    )
    prompts = [{"prompt": f"say {c}{i}:", "answer": c * 2} for i, c in enumerate("abcdefghijklmnop")]
    return folder / "nan_reward.py", write_jsonl(folder / "prompts.jsonl", prompts)


def grpo_spec(model_dir, reward_file, prompts, **overrides):
    """The online tests' short GRPO run, scored by `reward_file`, with no samples or KL estimate to draw."""
    return online_spec(
        model_dir, prompts, "grpo", rewards=f"{reward_file}:score", num_samples=0, kl_samples=0, **overrides
    )


def test_a_nan_reward_fails_the_run_at_its_step(tiny_model_dir, nan_reward, tmp_path):
    with pytest.raises(NonFiniteError, match=r"^step 2: reward .*nan_reward\.py:score' returned nan"):
        train(grpo_spec(tiny_model_dir, *nan_reward), tmp_path / "run")
    assert summary_of(tmp_path / "run")["status"] == "failed"


def test_skip_nonfinite_steps_skips_logs_and_counts_them(tiny_model_dir, nan_reward, tmp_path):
    reporter = MemoryReporter()
    summary = train(grpo_spec(tiny_model_dir, *nan_reward, skip_nonfinite_steps=1), tmp_path / "run", reporter)
    assert summary["status"] == "completed" and summary["step"] == 3
    assert summary["skipped_nonfinite_steps"] == [2]
    assert [m["step"] for m in reporter.metrics if "train/skipped_nonfinite_steps" in m] == [2]
    assert [m["step"] for m in reporter.metrics if "train/loss" in m] == [1, 3]  # step 2 took no optimizer step
    skipped = [e for e in reporter.events if e["kind"] == "nonfinite"]
    assert len(skipped) == 1 and "step 2 skipped" in skipped[0]["message"]


def test_skip_nonfinite_steps_is_a_count_a_resume_may_change():
    from engine.errors import SpecError
    from engine.spec import with_resume_settings

    with pytest.raises(SpecError, match="skip_nonfinite_steps"):
        build_spec({"algorithm": "dpo", "model": "m", "dataset": "d", "skip_nonfinite_steps": -1})
    spec = build_spec({"algorithm": "dpo", "model": "m", "dataset": "d"})
    assert spec.skip_nonfinite_steps == 0
    assert with_resume_settings(spec, ["skip_nonfinite_steps=3"]).skip_nonfinite_steps == 3


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_resume_works_once_space_is_freed(
    tiny_model_dir, tiny_pairs, tmp_path, monkeypatch
):
    straight = MemoryReporter()
    train(dpo_spec(tiny_model_dir, tiny_pairs, save_steps=4), tmp_path / "straight", straight)

    real_save = torch.save
    saves = {"n": 0}

    def save_into_a_full_disk(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint (step 8): the disk fills up half-way through
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_into_a_full_disk)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError) as err:
        train(dpo_spec(tiny_model_dir, tiny_pairs, save_steps=4), run)
    message = str(err.value)
    assert "checkpoint step-0000008" in message and str(run / "checkpoints") in message
    assert "it needs about" in message and "is free there" in message and "--out" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004"]  # no partial .tmp
    assert summary_of(run)["status"] == "failed"

    monkeypatch.setattr(torch, "save", real_save)  # space is freed
    resumed = MemoryReporter()
    summary = train(dpo_spec(tiny_model_dir, tiny_pairs, save_steps=4), run, resumed, resume=True)
    assert summary["status"] == "completed" and summary["step"] == 8
    assert resumed.series("train/loss") == pytest.approx(straight.series("train/loss")[4:], abs=1e-6)
    assert (run / "final" / "config.json").exists() and not (run / "final.tmp").exists()


def test_a_full_disk_while_logging_metrics_names_the_file_and_leaves_no_half_line(tmp_path, monkeypatch):
    import engine.reporting
    from engine.reporting import RunDirReporter

    reporter = RunDirReporter(tmp_path)
    reporter.log_metrics(1, {"train/loss": 0.5})

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        real_write = f.write

        def write(data):  # the first bytes land, then the disk is full
            real_write(data[:5])
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        f.write = write
        return f

    monkeypatch.setattr(engine.reporting, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(DiskFullError, match=r"writing metrics\.jsonl to .* failed"):
        reporter.log_metrics(2, {"train/loss": 0.4})
    monkeypatch.undo()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["ls"], ["submit", "--preset", "dpo", "--model", "m", "--dataset", "d.jsonl"]])
def test_front_ends_answer_an_unreachable_redis_within_seconds(command, tmp_path):
    pytest.importorskip("redis")
    env = {**os.environ, "CHERRY_HOME": str(tmp_path), "CHERRY_REDIS_URL": f"redis://127.0.0.1:{_closed_port()}/0"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tuiapp.cli", *command], env=env, capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - started
    assert done.returncode != 0
    assert "cannot reach Redis at" in done.stderr + done.stdout and "Traceback" not in done.stderr
    assert took < 15, took


def test_a_worker_waits_out_an_unreachable_redis_and_says_so(caplog):
    redis = pytest.importorskip("redis")
    from jobs.worker import RedisWatch

    watch = RedisWatch()
    waits = [watch.failed(redis.exceptions.ConnectionError("Connection refused")) for _ in range(7)]
    assert waits == [1, 2, 4, 8, 16, 30, 30]  # backoff, capped
    watch.reached()
    assert watch.down_since is None
    text = caplog.text
    assert "unreachable" in text and "keeps retrying" in text and "reachable again" in text
    assert math.isfinite(waits[-1])


def test_a_worker_started_before_redis_waits_for_it_then_serves(tmp_path):
    from tests.conftest import require_redis_server

    require_redis_server()
    import redis

    port = _closed_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "CHERRY_HOME": str(tmp_path / "home"), "CHERRY_REDIS_URL": url}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "tuiapp.cli", "worker"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = None
    try:
        deadline = time.monotonic() + 30
        while "unreachable" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "unreachable" in log_path.read_text() and "trying again" in log_path.read_text()
        assert worker.poll() is None  # waiting, not gone
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(url, decode_responses=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.hlen("cherry:workers"):
                    break
            except redis.exceptions.ConnectionError:
                pass
            time.sleep(0.2)
        assert client.hlen("cherry:workers") == 1, log_path.read_text()  # it announced itself: serving
        assert "Traceback" not in log_path.read_text()
    finally:
        worker.terminate()
        worker.wait(30)
        if server is not None:
            server.terminate()
            server.wait(10)


def test_export_into_a_full_disk_says_so_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import engine.export
    from engine.export import export_run

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"\0" * 4096)

    def copy_into_a_full_disk(src, dst, **kwargs):
        os.makedirs(dst, exist_ok=True)
        (dst / "model.safetensors").write_bytes(b"\0" * 10)
        raise shutil.Error([(str(src), str(dst), "[Errno 28] No space left on device")])

    monkeypatch.setattr(engine.export.shutil, "copytree", copy_into_a_full_disk)
    with pytest.raises(DiskFullError, match=r"exported model .*it needs about 4\.0 KB.*another --out"):
        export_run(tmp_path / "run", tmp_path / "out", merge=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 600 KB tmpfs (room for one checkpoint of the tiny model, not two); skipped where mounting is not
    permitted (it needs root). `grow()` frees space: the same mount, remounted at 8 MB."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=8m", str(mount_point)], check=True)

    try:
        yield mount_point, grow
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_a_run_on_a_small_tmpfs_fails_with_the_message_and_resumes_once_it_grows(
    tiny_model_dir, tiny_pairs, small_tmpfs
):
    mount_point, grow = small_tmpfs
    run = mount_point / "run"
    with pytest.raises(DiskFullError, match=r"writing checkpoint step-0000008 .* is free there"):
        train(dpo_spec(tiny_model_dir, tiny_pairs, save_steps=4), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004"]
    assert summary_of(run)["status"] == "failed"
    grow()
    summary = train(dpo_spec(tiny_model_dir, tiny_pairs, save_steps=4), run, resume=True)
    assert summary["status"] == "completed" and summary["step"] == 8


@pytest.mark.slow  # two runs through a worker's child processes
def test_a_worker_survives_a_run_that_fills_its_disk_and_resumes_it_once_space_is_freed(
    home, tiny_model_dir, tiny_pairs, small_tmpfs
):
    from jobs.runs import Jobs
    from tests.e2e.test_jobs import WorkerProcess, tiny_spec, wait_for

    mount_point, grow = small_tmpfs
    jobs = Jobs(home)
    run = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, max_steps=8, save_steps=4, batch_size=8))
    shutil.move(home / run.id, mount_point / "run")  # the run's directory (made at submit) moves to the small disk
    (home / run.id).symlink_to(mount_point / "run")
    worker = WorkerProcess(home)
    try:
        wait_for(lambda: jobs.store.get_run(run.id).status == "failed", 120, "the run to fail")
        failed = jobs.store.get_run(run.id)
        assert failed.error.startswith("the disk is full: writing checkpoint step-0000008"), failed.error
        assert sorted(p.name for p in (mount_point / "run" / "checkpoints").iterdir()) == ["step-0000004"]
        assert worker.proc.poll() is None  # the worker goes on
        grow()
        jobs.resume(run.id)
        wait_for(lambda: jobs.store.get_run(run.id).status == "completed", 120, "the resumed run to complete")
        assert worker.proc.poll() is None
    finally:
        worker.stop()
        jobs.close()
