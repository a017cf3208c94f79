"""`report_to`: TensorBoard event files in the run directory, read back with TensorBoard's own reader;
W&B in offline mode when wandb is installed; a missing package refused at submit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from jobs.reporters import TENSORBOARD_DIR
from jobs.runs import Jobs
from tests.e2e.test_jobs import start_worker, tiny_spec, wait_for  # noqa: F401 (start_worker is a fixture)


def test_a_worker_run_writes_tensorboard_events_that_tensorboard_reads(home, start_worker, tiny_model_dir, tiny_pairs):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    jobs = Jobs(home)
    run = jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, report_to="tensorboard", eval_steps=2))
    start_worker()
    wait_for(lambda: jobs.store.get_run(run.id).status in ("completed", "failed"), 120, "the run to end")
    run = jobs.store.get_run(run.id)
    assert run.status == "completed", run.error
    events = EventAccumulator(str(Path(run.out_dir) / TENSORBOARD_DIR))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags
    logged = {row["step"]: row["value"] for row in jobs.store.metrics(run.id, names=["train/loss"])}
    read = {event.step: event.value for event in events.Scalars("train/loss")}
    assert read.keys() == logged.keys() == {1, 2, 3, 4}
    assert read == {step: pytest.approx(value, rel=1e-6) for step, value in logged.items()}


def test_report_to_a_package_that_is_not_installed_is_refused_at_submit(home, tiny_model_dir, tiny_pairs, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    jobs = Jobs(home)
    with pytest.raises(Exception, match="report_to: wandb needs the wandb package.*pip install wandb"):
        jobs.submit(tiny_spec(tiny_model_dir, tiny_pairs, report_to="wandb"))
    assert jobs.store.list_runs() == []
    with pytest.raises(Exception, match="report_to: 'neptune' is not known; choose from tensorboard, wandb"):
        tiny_spec(tiny_model_dir, tiny_pairs, report_to="neptune")


def test_wandb_offline_logs_the_runs_metrics(home, tiny_model_dir, tiny_pairs, monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    from jobs.local import run_in_process

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir, summary = run_in_process(tiny_spec(tiny_model_dir, tiny_pairs, report_to="wandb"))
    assert summary["status"] == "completed"
    assert list(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
