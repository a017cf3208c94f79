"""The rollout store's shards: written whole, read back in order, loadable with `datasets`."""

from __future__ import annotations

from engine.rollout_store import groups, read_rollouts, shard_path, stored_steps, write_shard


def record(step: int, group: int, sample: int, reward: float) -> dict:
    return {
        "step": step, "group": group, "sample": sample, "prompt": f"p{group}", "messages": None,
        "completion": f"c{sample}", "rewards": {"exact_match": reward}, "reward": reward, "advantage": None,
        "kl": None, "logp_mean": None, "length": 3, "truncated": False, "finish": "eos", "judge": None,
    }  # fmt: skip


def test_shards_round_trip_and_a_partial_shard_is_never_read(tmp_path):
    write_shard(tmp_path, 2, [record(2, 0, 1, 1.0), record(2, 0, 0, 0.0)])
    write_shard(tmp_path, 1, [record(1, 1, 0, 0.5)])
    shard_path(tmp_path, 3).with_suffix(".jsonl.partial").write_text('{"step": 3, "gro')  # a crash mid-write
    assert stored_steps(tmp_path) == [1, 2]
    records = read_rollouts(tmp_path)
    assert [(r["step"], r["sample"]) for r in records] == [(1, 0), (2, 1), (2, 0)]
    assert [r["sample"] for r in groups(records)[(2, 0)]] == [0, 1]
    assert [r["step"] for r in read_rollouts(tmp_path, steps=[2])] == [2, 2]


def test_the_store_loads_with_datasets(tmp_path):
    from datasets import load_dataset

    write_shard(tmp_path, 1, [record(1, 0, 0, 1.0), record(1, 0, 1, 0.0)])
    loaded = load_dataset("json", data_files=str(tmp_path / "rollouts" / "*.jsonl"), split="train")
    assert loaded.num_rows == 2 and loaded[0]["rewards"] == {"exact_match": 1.0}


# ----------------------------------------------------------------------------- records from a rollout


def scored_rollout(messages: bool = False):
    """Two prompts x 2 samples, scored, with what a GRPO-like prepare leaves on the rollout."""
    import torch

    from engine.rollout import Rollout

    prompts = [
        {"prompt": "p0", "prompt_ids": [1], "answer": "a", "messages": [{"role": "user", "content": "q0"}] if messages else None},
        {"prompt": "p1", "prompt_ids": [2], "answer": None, "messages": [{"role": "user", "content": "q1"}] if messages else None},
    ]  # fmt: skip
    rollout = Rollout(
        examples=[prompts[0], prompts[0], prompts[1], prompts[1]],
        completion_ids=[[5, 0], [6, 7, 8], [9], [4, 4]],
        texts=["x", "yy", "z", "ww"],
        truncated=[False, True, False, False],
        group_size=2,
        rewards=torch.tensor([1.0, 0.0, float("nan"), 0.5]),
        components={"exact_match": [1.0, 0.0, None, 0.5]},
    )
    rollout.sample_stats = {"advantage": [0.7, -0.7, None, 0.0], "kl": [0.1, 0.2, 0.3, 0.4]}
    return rollout


def test_records_carry_each_sample_its_group_rewards_and_what_prepare_computed():
    from engine.rollout_store import rollout_records

    records = rollout_records(scored_rollout(), step=3)
    assert [(r["step"], r["group"], r["sample"]) for r in records] == [(3, 0, 0), (3, 0, 1), (3, 1, 0), (3, 1, 1)]
    first, cut, nan = records[0], records[1], records[2]
    assert first["prompt"] == "p0" and first["completion"] == "x" and first["messages"] is None
    assert first["rewards"] == {"exact_match": 1.0} and first["reward"] == 1.0
    assert first["advantage"] == 0.7 and first["kl"] == 0.1 and first["logp_mean"] is None and first["judge"] is None
    assert first["length"] == 2 and first["finish"] == "eos" and first["answer"] == "a"
    assert cut["truncated"] and cut["finish"] == "length" and cut["length"] == 3
    assert nan["reward"] is None and nan["advantage"] is None and nan["rewards"] == {"exact_match": None}  # JSON-safe
    assert [r["sample"] for r in rollout_records(scored_rollout(), 3, limit=3)] == [0, 1, 0]


def test_conversational_records_end_with_the_completion_as_an_assistant_turn():
    from engine.rollout_store import rollout_records

    record = rollout_records(scored_rollout(messages=True), step=1)[1]
    assert record["messages"] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "yy"}]


def test_log_rollouts_setting_keeps_all_the_first_n_or_none():
    import pytest

    from engine.reporting import MemoryReporter
    from engine.rollout_store import keep_rollout, rollout_limit

    assert (rollout_limit("all"), rollout_limit("off"), rollout_limit(5)) == (None, 0, 5)
    for bad in (0, -1, "some", True, 2.5):
        with pytest.raises(ValueError, match="log_rollouts must be all, off or a number"):
            rollout_limit(bad)
    for setting, kept in (("all", 4), (3, 3), ("off", 0)):
        reporter = MemoryReporter()
        keep_rollout(reporter, 7, scored_rollout(), setting)
        assert len(reporter.rollouts) == kept


def test_the_run_dir_reporter_writes_a_shard_per_step_and_a_resume_drops_the_later_ones(tmp_path):
    from engine.reporting import MultiReporter, RunDirReporter
    from engine.rollout_store import rollout_records

    class Hook:  # a reporter without log_rollouts (TensorBoard, a bench hook) is skipped
        def rewind(self, step):
            pass

    reporter = MultiReporter(RunDirReporter(tmp_path), Hook())
    for step in (1, 2, 3):
        reporter.log_rollouts(step, rollout_records(scored_rollout(), step))
    assert stored_steps(tmp_path) == [1, 2, 3] and len(read_rollouts(tmp_path)) == 12
    reporter.rewind(1)
    assert stored_steps(tmp_path) == [1]


# ----------------------------------------------------------------------------- filters and exports


def test_select_filters_by_step_group_reward_and_text():
    from engine.rollout_store import select

    records = [
        record(1, 0, 0, 1.0),
        record(1, 0, 1, 0.0),
        record(2, 1, 0, 0.5),
        {**record(2, 1, 1, 0.0), "reward": None},
    ]
    assert len(select(records)) == 4
    assert [r["step"] for r in select(records, steps=[2])] == [2, 2]
    assert [r["group"] for r in select(records, groups_wanted=[0])] == [0, 0]
    assert [r["reward"] for r in select(records, min_reward=0.5)] == [1.0, 0.5]  # no reward: out of any range
    assert [r["reward"] for r in select(records, max_reward=0.5)] == [0.0, 0.5]
    assert [(r["group"], r["sample"]) for r in select(records, text="C1")] == [(0, 1), (1, 1)]  # completion "c1"
    assert [r["group"] for r in select(records, text="p1")] == [1, 1]  # in the prompt


def test_pairs_are_the_best_against_the_worst_of_each_group_and_ties_are_skipped():
    from engine.rollout_store import best_completions, preference_pairs

    records = [
        record(1, 0, 0, 0.2), record(1, 0, 1, 0.9), record(1, 0, 2, -0.5), record(1, 0, 3, 0.9),  # best: sample 1
        record(1, 1, 0, 1.0), record(1, 1, 1, 1.0),  # zero variance: nothing to prefer
        record(2, 0, 0, 0.0), {**record(2, 0, 1, 1.0), "completion": "c0"},  # the same text both ways
        record(2, 1, 0, 0.3),  # a group of one
    ]  # fmt: skip
    assert preference_pairs(records) == [{"prompt": "p0", "chosen": "c1", "rejected": "c2"}]
    assert best_completions(records) == [
        {"prompt": "p0", "completion": "c1"},
        {"prompt": "p1", "completion": "c0"},
        {"prompt": "p0", "completion": "c0"},
        {"prompt": "p1", "completion": "c0"},
    ]


def test_conversational_exports_use_trls_message_form():
    from engine.rollout_store import best_completions, preference_pairs, rollout_records

    records = rollout_records(scored_rollout(messages=True), step=1)
    user = [{"role": "user", "content": "q0"}]
    assert preference_pairs(records) == [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "yy"}]}
    ]  # fmt: skip
    assert best_completions(records)[0] == {"prompt": user, "completion": [{"role": "assistant", "content": "x"}]}


def test_exported_files_load_as_the_formats_cherry_trains_on(tmp_path):
    """The pairs file is preference data and the sft file prompt/completion data for `cherry train`,
    plain and conversational (engine.data's format detection)."""
    from engine.data.formats import detect_format
    from engine.data.load import load_rows
    from engine.rollout_store import export_rows, rollout_records

    for messages in (False, True):
        records = rollout_records(scored_rollout(messages=messages), step=1)
        for kind, fmt in (("pairs", "preference"), ("sft", "sft")):
            out = tmp_path / f"{kind}-{messages}.jsonl"
            assert export_rows(records, kind, out) >= 1
            assert detect_format(load_rows(str(out))) == (fmt, messages)
    assert export_rows([record(1, 0, 0, 1.0), record(1, 0, 1, 1.0)], "pairs", tmp_path / "none.jsonl") == 0
    assert not (tmp_path / "none.jsonl").exists()
