"""Pipelines: SFT -> RM -> PPO as three chained jobs from one submission."""

from __future__ import annotations

import pytest

from engine.errors import SpecError
from jobs.pipeline import load_pipeline, submit_pipeline
from jobs.runs import Jobs
from tests.e2e.test_jobs import start_worker, wait_for  # noqa: F401  (fixture)

SMALL = [
    "max_steps=2",
    "eval_steps=0",
    "sample_steps=0",
    "num_samples=0",
    "kl_samples=0",
    "eval_max_examples=8",
    "num_threads=1",
    "save_steps=100",
]


def test_the_rlhf_pipeline_chains_three_runs(home):
    jobs = Jobs(home)
    sft, rm, ppo = submit_pipeline(jobs, "demo_rlhf", SMALL)
    assert [r.spec["algorithm"] for r in (sft, rm, ppo)] == ["sft", "rm", "ppo"]
    # Only the first is on the queue; the others wait in the store for the run before them.
    assert jobs.queue.pending_run_ids() == [sft.id]
    assert (rm.parent, ppo.parent) == (sft.id, rm.id)
    # The reward model starts from the SFT model; PPO starts from the SFT model too and reads the RM run.
    assert rm.spec["model"] == f"{sft.out_dir}/final"
    assert ppo.spec["model"] == f"{sft.out_dir}/final"
    assert ppo.spec["rewards"] == [f"rm:{rm.out_dir}"] and ppo.spec["value_model"] == rm.out_dir


def test_stage_overrides_reach_only_their_stage(home):
    jobs = Jobs(home)
    sft, rm, ppo = submit_pipeline(jobs, "demo_rlhf", SMALL + ["ppo.lr=0.5", "rm.weight_decay=0.25"])
    assert ppo.spec["lr"] == 0.5 and sft.spec["lr"] != 0.5
    assert rm.spec["weight_decay"] == 0.25 and sft.spec["weight_decay"] != 0.25


def test_a_stage_setting_that_contradicts_a_pipeline_wide_one_is_named(home):
    """`--set max_steps=2` for every stage and `rm.epochs=2` for one: max_steps would silently replace
    the epochs asked for, so both are named instead."""
    with pytest.raises(SpecError, match="max_steps=2 and epochs=2.0 are both set"):
        submit_pipeline(Jobs(home), "demo_rlhf", SMALL + ["rm.epochs=2"])


def test_a_bad_stage_submits_nothing(home):
    jobs = Jobs(home)
    with pytest.raises(SpecError, match="beta"):
        submit_pipeline(jobs, "demo_rlhf", SMALL + ["ppo.beta=-1"])
    assert jobs.store.list_runs() == []


def test_pipeline_files_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("stages: {}", "stages"),
        ("stages: {a: {preset: sft, after: b}}", "not an earlier stage"),
        ("stages: {a: {preset: sft}, b: {preset: rm, model_from: a}}", "model_from needs"),
        ("stages: {a: {preset: sft, colour: red}}", "unknown key 'colour'"),
    ]:
        bad.write_text(text)
        with pytest.raises(SpecError, match=message):
            load_pipeline(str(bad))
    with pytest.raises(SpecError, match="did you mean 'rlhf'"):
        load_pipeline("rlfh")


@pytest.mark.slow
def test_the_rlhf_pipeline_runs_to_the_end_on_a_worker(home, start_worker):  # noqa: F811
    jobs = Jobs(home)
    runs = submit_pipeline(jobs, "demo_rlhf", SMALL)
    start_worker()
    for run in runs:
        wait_for(
            lambda: jobs.store.get_run(run.id).status in ("completed", "failed"), 300, f"{run.spec['algorithm']} to end"
        )
        assert jobs.store.get_run(run.id).status == "completed", jobs.store.get_run(run.id).error
    ppo = jobs.store.get_run(runs[2].id)
    names = jobs.store.metric_names(ppo.id)
    assert {"reward/mean", "reward/rm/mean", "value/loss", "kl/mean"} <= set(names)


def test_stage_placeholders_work_in_command_line_overrides(home):
    jobs = Jobs(home)
    sft, rm, ppo = submit_pipeline(
        jobs,
        "demo_rlhf",
        SMALL + ["ppo.rewards=[exact_match, 'rm:{rm}', 'regex:\\d{1,3}']", "ppo.reward_weights=1,0.2,0.1"],
    )
    assert ppo.spec["rewards"] == ["exact_match", f"rm:{rm.out_dir}", "regex:\\d{1,3}"]  # a regex's braces stay
    with pytest.raises(SpecError, match="'{ppo}' is not an earlier stage"):
        submit_pipeline(jobs, "demo_rlhf", SMALL + ["rm.name={ppo}"])
