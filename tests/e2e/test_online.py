"""The online family (GRPO, RLOO, PPO, online DPO, best-of-K, ReST): rollouts, the first-ratio check,
end-to-end runs on a tiny model, resume, and (slow) the demo gains docs/demo.md reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.algorithms import build_algorithm
from engine.algorithms.base import Models
from engine.algorithms.online_rows import micro_batches
from engine.errors import CherryError
from engine.models import freeze, load_causal_lm, load_tokenizer
from engine.reference import Reference
from engine.registry import ONLINE_ALGORITHMS
from engine.rewards import build_reward
from engine.rollout import sample_rollout, score_rollout
from engine.rollout_store import read_rollouts
from engine.spec import build_spec, demo_dir, resolve_spec
from engine.train import train
from tests.conftest import write_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_prompts(tmp_path_factory):
    """Prompts with answers: the tiny random model will rarely hit them, but every method must run."""
    rows = [{"prompt": f"say {c}{i}:", "answer": c * 2} for i, c in enumerate("abcdefghijklmnop")]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def online_spec(model_dir, data, algorithm: str, **overrides):
    values = dict(
        algorithm=algorithm,
        model=str(model_dir),
        dataset=str(data),
        batch_size=4,
        num_generations=4,
        max_new_tokens=6,
        max_length=32,
        max_prompt_length=16,
        eval_split=0.25,
        max_steps=3,
        lr=1e-3,
        rewards="length:3",
        eval_steps=0,
        sample_steps=0,
        num_samples=2,
        kl_samples=2,
        save_steps=100,
        logging_steps=1,
        num_threads=1,
    )
    if algorithm == "online_dpo":
        values.update(num_generations=2, judge_tie_margin=0.0)
    values.update(overrides)
    return build_spec(values)


def models_for(spec, model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    policy = load_causal_lm(str(model_dir), dtype=torch.float32, device=CPU)
    algo = build_algorithm(spec)
    reference = (
        Reference(model=freeze(load_causal_lm(str(model_dir), dtype=torch.float32, device=CPU)))
        if algo.needs_reference
        else None
    )
    value = algo.build_value_model(CPU, torch.float32)
    return algo, Models(policy=policy, tokenizer=tokenizer, device=CPU, reference=reference, value=value)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- rollouts


def test_rollout_groups_samples_keeps_eos_and_flags_truncation(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    examples = [{"prompt": t, "prompt_ids": tokenizer(t)["input_ids"]} for t in ("a", "longer prompt here", "xy")]
    model.train()
    torch.manual_seed(0)
    rollout = sample_rollout(model, tokenizer, examples, k=3, max_new_tokens=5, temperature=1.0, batch_size=4)
    assert len(rollout.completion_ids) == 9
    assert [ex["prompt"] for ex in rollout.examples] == ["a"] * 3 + ["longer prompt here"] * 3 + ["xy"] * 3
    eos = tokenizer.eos_token_id
    for ids, cut in zip(rollout.completion_ids, rollout.truncated):
        assert 1 <= len(ids) <= 5
        assert (eos not in ids) == cut  # a finished sample ends with its EOS, a truncated one has none
        if not cut:
            assert ids[-1] == eos and eos not in ids[:-1]
    assert model.training  # generation restores the mode it found


def test_the_decoding_loop_shares_a_groups_prompt_and_matches_generate(tiny_model_dir):
    """Each prompt runs through the model once for its k samples, and the loop's cache and positions give
    `generate`'s tokens on the prompts repeated k times: with a top-p nucleus of one token both are greedy."""
    from engine.batching import left_pad
    from engine.rollout import decode_groups

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=CPU).eval()
    prompts = [tokenizer(t)["input_ids"] for t in ("a", "a longer prompt here", "xyz")]  # left padding too
    input_ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    eos = [tokenizer.eos_token_id]
    settings = dict(max_new_tokens=8, temperature=1.0, top_p=1e-6, eos_ids=eos, pad_id=tokenizer.pad_token_id)
    calls = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        ours = decode_groups(model, input_ids, mask, 4, **settings)
    finally:
        hook.remove()
    assert calls[0] == input_ids.shape  # the prefill: 3 prompt rows, not 12
    assert all(shape == (12, 1) for shape in calls[1:])
    greedy = model.generate(
        input_ids=input_ids.repeat_interleave(4, 0),
        attention_mask=mask.repeat_interleave(4, 0),
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )[:, input_ids.shape[1] :]
    assert ours.shape[0] == 12 and torch.equal(ours, greedy)


def test_missing_eos_penalty_lowers_only_truncated_samples(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    examples = [{"prompt": "q", "prompt_ids": tokenizer("q")["input_ids"], "answer": "x"}]
    torch.manual_seed(1)
    rollout = sample_rollout(model, tokenizer, examples, k=8, max_new_tokens=2, temperature=1.0)
    reward = build_reward(["length:1"], tokenizer=tokenizer)
    score_rollout(rollout, reward, missing_eos_penalty=0.0)
    plain = rollout.rewards.clone()
    score_rollout(rollout, reward, missing_eos_penalty=1.5)
    expected = plain - 1.5 * torch.tensor(rollout.truncated, dtype=torch.float32)
    assert torch.equal(rollout.rewards, expected)


def test_micro_batches_cover_every_row_once_in_order():
    spec = build_spec(
        {"algorithm": "grpo", "batch_size": 3, "num_generations": 4, "num_mini_batches": 2, "grad_accum": 3}
    )
    rows = list(range(12))
    chunks = micro_batches(rows, spec)
    assert [r for chunk in chunks for r in chunk] == rows and len(chunks) == 6


# ----------------------------------------------------------------------------- the first ratio


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo", "grpo:gspo", "grpo:cispo"])
def test_first_minibatch_ratio_is_exactly_one(tiny_model_dir, tiny_prompts, algorithm):
    """Rollout and update forward passes agree (temperature, dropout, padding, positions): ratio == 1 exactly."""
    algorithm, _, loss_type = algorithm.partition(":")
    extra = {"loss_type": loss_type} if loss_type else {}
    spec = online_spec(
        tiny_model_dir,
        tiny_prompts,
        algorithm,
        num_iterations=2,
        num_mini_batches=2,
        grad_accum=2,
        temperature=0.7,
        beta=0.05,
        **extra,
    )
    algo, models = models_for(spec, tiny_model_dir)
    examples = [
        {"prompt": f"p{i}", "prompt_ids": models.tokenizer(f"p{i} long" * (i + 1))["input_ids"]} for i in range(4)
    ]
    torch.manual_seed(0)
    rollout = sample_rollout(models.policy, models.tokenizer, examples, k=4, max_new_tokens=6, temperature=0.7)
    score_rollout(rollout, build_reward(["length:3"], tokenizer=models.tokenizer))
    rows, _ = algo.prepare(rollout, models)
    first = micro_batches(rows, spec)[0]
    batch = algo.collate(first, models.tokenizer.pad_token_id)
    _, metrics = algo.loss(models, batch, first)
    total, count = metrics["policy/ratio_mean"]
    assert count > 0 and total == count  # every ratio is exactly 1.0
    assert metrics["policy/clipfrac"][0] == 0


# ----------------------------------------------------------------------------- end to end on a tiny model


@pytest.mark.parametrize("algorithm", ONLINE_ALGORITHMS)
def test_each_online_method_trains_end_to_end(tiny_model_dir, tiny_prompts, tmp_path, algorithm, monkeypatch):
    import engine.loop.core as engine_train

    loads = []
    real_load = engine_train.load_causal_lm
    monkeypatch.setattr(engine_train, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    beta = {"online_dpo": 0.1, "rloo": 0.05, "ppo": 0.05}.get(algorithm, 0.0)
    # A reward random samples hit about a quarter of the time, so groups disagree and every method has rows to train on.
    spec = online_spec(tiny_model_dir, tiny_prompts, algorithm, beta=beta, rewards="regex:.*[a-m].*")
    summary = train(spec, tmp_path / "run")
    assert summary["status"] == "completed" and summary["step"] == 3
    assert (tmp_path / "run" / "final" / "config.json").exists()
    metrics = read_metrics(tmp_path / "run")
    names = set().union(*(m.keys() for m in metrics))
    assert {"reward/mean", "gen/length_mean", "gen/truncated_frac", "train/loss", "time/rollout_s"} <= names
    expected = {
        "grpo": {"frac_reward_zero_std", "advantage/std", "policy/clipfrac", "policy/entropy"},
        "rloo": {"kl/mean", "reward/rlhf", "advantage/mean"},
        "ppo": {
            "kl/mean",
            "value/loss",
            "value/clipfrac",
            "value/explained_variance",
            "ppo/kl_coef",
            "policy/approx_kl",
        },
        "online_dpo": {"judge/skip_frac", "judge/prob_mean"},
        "best_of_k": {"bon/kl", "reward/max_median_gap"},
        "rest": {"rest/threshold_1", "rest/kept_frac_3"},
    }[algorithm]
    assert expected <= names, expected - names
    # The reference exists only where a KL term needs it (beta = 0 loads one model: the policy).
    assert len(loads) == (2 if beta > 0 else 1)
    for m in metrics:
        assert all(math.isfinite(v) for k, v in m.items() if isinstance(v, float)), m
    # every sample is in the rollout store, with what its method computed for it (engine/rollout_store.py)
    records = read_rollouts(tmp_path / "run")
    assert len(records) == 3 * spec.batch_size * spec.num_generations
    assert all(r["reward"] is not None and r["judge"] is None for r in records)
    filled = {key for key in ("advantage", "kl", "logp_mean", "chosen") if all(r[key] is not None for r in records)}
    empty = {key for key in ("advantage", "kl", "logp_mean", "chosen") if all(r[key] is None for r in records)}
    assert (filled, empty) == {
        "grpo": ({"advantage"}, {"kl", "logp_mean", "chosen"}),  # beta 0, one pass: no log-probs computed
        "rloo": ({"advantage", "kl", "logp_mean"}, {"chosen"}),
        "ppo": ({"advantage", "kl", "logp_mean"}, {"chosen"}),
        "online_dpo": (set(), {"advantage", "kl", "logp_mean"}),  # chosen: null where the rewards tie
        "best_of_k": (set(), {"advantage", "kl", "logp_mean", "chosen"}),
        "rest": (set(), {"advantage", "kl", "logp_mean", "chosen"}),
    }[algorithm]
    if algorithm == "online_dpo":
        for a, b in zip(records[::2], records[1::2]):
            tie = a["reward"] == b["reward"]
            assert (a["chosen"], b["chosen"]) == (
                (None, None) if tie else (a["reward"] > b["reward"], b["reward"] > a["reward"])
            )


@pytest.mark.parametrize("loss_type", ["gspo", "cispo"])
def test_grpo_loss_variants_train_on_reused_rollouts(tiny_model_dir, tiny_prompts, tmp_path, loss_type):
    """GSPO and CISPO through the GRPO loop, with a second pass over each rollout (ratios away from 1) and a KL term."""
    spec = online_spec(
        tiny_model_dir,
        tiny_prompts,
        "grpo",
        loss_type=loss_type,
        num_iterations=2,
        beta=0.05,
        rewards="regex:.*[a-m].*",
    )
    assert (spec.epsilon, spec.epsilon_high) == {"gspo": (3e-4, 4e-4), "cispo": (1.0, 4.0)}[loss_type]
    summary = train(spec, tmp_path / "run")
    assert summary["status"] == "completed" and summary["step"] == 3
    metrics = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    for m in metrics:
        assert all(math.isfinite(v) for k, v in m.items() if isinstance(v, float)), m
        assert {"policy/clipfrac", "policy/ratio_mean", "policy/approx_kl", "kl/k3_mean"} <= m.keys()
    if loss_type == "gspo":  # the paper's clip range is so narrow that the second pass clips whole sequences
        assert max(m["policy/clipfrac"] for m in metrics) > 0


def test_grpo_with_lora_uses_the_adapter_disabled_base_as_reference(
    tiny_model_dir, tiny_prompts, tmp_path, monkeypatch
):
    import engine.loop.core as engine_train

    loads = []
    real_load = engine_train.load_causal_lm
    monkeypatch.setattr(engine_train, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    spec = online_spec(
        tiny_model_dir, tiny_prompts, "grpo", beta=0.04, rewards="regex:.*[a-m].*", lora={"r": 4, "alpha": 8}
    )
    summary = train(spec, tmp_path / "run")
    assert summary["status"] == "completed" and len(loads) == 1  # no second copy for the reference
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
    kls = [m["kl/mean"] for m in read_metrics(tmp_path / "run") if "kl/mean" in m and "train/loss" in m]
    assert kls[0] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero: policy == reference on step 1


def test_grpo_learns_a_format_reward(tiny_model_dir, tiny_prompts, tmp_path):
    """A learnable reward on a random model: more samples come to contain a letter a-m."""
    spec = online_spec(
        tiny_model_dir,
        tiny_prompts,
        "grpo",
        rewards="regex:.*[a-m].*",
        max_steps=40,
        lr=1e-2,
        num_generations=8,
        eval_split=0.0,
    )
    train(spec, tmp_path / "run")
    rewards = [m["reward/mean"] for m in read_metrics(tmp_path / "run") if "reward/mean" in m]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, (first, last)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_online_resume_repeats_the_uninterrupted_run(tiny_model_dir, tiny_prompts, tmp_path, algorithm):
    """RNG, optimizer, and for PPO the value model and the adaptive KL coefficient come back from the checkpoint."""
    extra = {"beta": 0.05, "kl_target": 1.0, "kl_horizon": 10, "num_iterations": 2} if algorithm == "ppo" else {}
    spec = online_spec(
        tiny_model_dir,
        tiny_prompts,
        algorithm,
        max_steps=4,
        save_steps=2,
        eval_split=0.0,
        rewards="regex:.*[a-m].*",
        **extra,
    )
    train(spec, tmp_path / "straight")
    calls = iter(range(100))
    summary = train(spec, tmp_path / "stopped", should_stop=lambda: next(calls) >= 2)
    assert summary["status"] == "cancelled" and summary["step"] == 2
    train(spec, tmp_path / "stopped", resume=True)

    def by_step(run):
        keys = ("reward/mean", "train/loss", "ppo/kl_coef", "value/loss")
        return {m["step"]: tuple(m.get(k) for k in keys) for m in read_metrics(tmp_path / run) if "train/loss" in m}

    assert by_step("stopped") == by_step("straight")
    # the rollout store of the resumed run: the replayed steps' shards, as in the uninterrupted run
    assert read_rollouts(tmp_path / "stopped") == read_rollouts(tmp_path / "straight")


def test_exact_match_without_answers_names_the_column(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(8)])
    spec = online_spec(tiny_model_dir, data, "grpo", rewards="exact_match")
    with pytest.raises(CherryError, match="'answer' column"):
        train(spec, tmp_path / "run")


def test_online_specs_refuse_impossible_settings():
    from engine.errors import SpecError

    for values, field in [
        ({"algorithm": "rloo", "num_generations": 1}, "num_generations"),
        ({"algorithm": "online_dpo", "num_generations": 4}, "num_generations must be 2"),
        ({"algorithm": "grpo", "loss_type": "ipo"}, "loss_type"),
        ({"algorithm": "grpo", "temperature": 0}, "temperature"),
        ({"algorithm": "grpo", "rewards": "length:abc"}, "length:abc"),
        ({"algorithm": "grpo", "rewards": ["exact_match"], "reward_weights": [1, 2]}, "reward_weights"),
        ({"algorithm": "online_dpo", "num_generations": 2, "beta": 0}, "beta"),
        ({"algorithm": "grpo", "batch_size": 3, "num_generations": 2, "num_mini_batches": 4}, "num_mini_batches"),
        ({"algorithm": "grpo", "loss_type": "gspo_token"}, "loss_type must be one of grpo, dapo, dr_grpo, gspo, cispo"),
        (
            {"algorithm": "grpo", "loss_type": "cispo", "epsilon": 1.5},
            r"epsilon must be in \(0, 1\] for loss_type=cispo",
        ),
        ({"algorithm": "grpo", "loss_type": "gspo", "epsilon": 1.0}, r"epsilon must be in \(0, 1\)"),
        (
            {
                "algorithm": "online_dpo",
                "num_generations": 2,
                "judge": "some/judge",
                "judge_template": "{prompt} {answer_1}",
            },
            r"judge_template lacks \{answer_2\}",
        ),
        (
            {"algorithm": "online_dpo", "num_generations": 2, "judge_template": "{prompt} {answer_1} {answer_2}"},
            "judge_template is the prompt of an LLM judge, but judge is 'reward'",
        ),
    ]:
        with pytest.raises(SpecError, match=field):
            build_spec(values)
    assert build_spec({"algorithm": "grpo", "beta": 0}).beta == 0  # no KL, no reference: allowed


def test_clip_range_defaults_follow_the_loss_type():
    """A null epsilon / epsilon_high takes the loss_type's paper values; grpo, dapo, dr_grpo, PPO and RLOO keep 0.2."""

    def clip(preset, *overrides):
        spec = resolve_spec(preset, list(overrides), check_paths=False)
        return spec.epsilon, spec.epsilon_high

    assert clip("grpo") == (0.2, None)  # dapo, as before: epsilon_high None = epsilon
    for loss_type in ("grpo", "dr_grpo"):
        assert clip("grpo", f"loss_type={loss_type}") == (0.2, None)
    assert clip("grpo", "loss_type=gspo") == (3e-4, 4e-4)  # GSPO section 5.1
    assert clip("grpo", "loss_type=cispo") == (1.0, 4.0)  # no lower bound, weight capped at 5
    assert clip("grpo", "loss_type=gspo", "epsilon=1e-3") == (1e-3, 4e-4)  # a set value wins, field by field
    assert clip("grpo", "loss_type=cispo", "epsilon_high=2") == (1.0, 2.0)
    assert clip("ppo") == (0.2, None) and clip("rloo") == (0.2, None)
    assert build_spec({"algorithm": "grpo", "loss_type": "gspo"}).epsilon == 3e-4


def test_judge_template_reaches_the_spec_from_the_command_line_verbatim():
    template = "{prompt} -> 1: {answer_1} 2: {answer_2}\\nShorter is better. Answer"
    spec = resolve_spec("online_dpo", ["judge=some/judge", f"judge_template={template}"], check_paths=False)
    assert spec.judge_template == "{prompt} -> 1: {answer_1} 2: {answer_2}\nShorter is better. Answer"


# ----------------------------------------------------------------------------- the demo (slow)


def demo_run(method: str, tmp_path, *overrides: str) -> dict:
    # One thread (the preset's 2 oversubscribe a core per test worker; the numbers are the same):
    spec = resolve_spec(
        str(demo_dir() / f"{method}.yaml"), ["num_threads=1", "num_samples=0", "kl_samples=0", *overrides]
    )
    return train(spec, tmp_path / method)


# Evaluated before the first step and after the last only: evaluation is greedy (it draws no random
# number), so the run trains exactly as with the preset's evaluations every 10 steps.
ENDS_ONLY = ("eval_steps=0", "save_steps=0")

# Steps each demo test trains: a prefix of the preset's 60 (their lr schedules are constant, so a shorter
# run is the same run stopped earlier). Held-out exact match measured every 10 steps of the presets (seed 0,
# one thread; 47.5% before), where the test stops marked *:
#   grpo, cispo  58.0 59.0 57.5 *65.0 66.5 62.5   (cispo = grpo's dapo loss at one pass: the same run)
#   gspo         62.0 55.0 64.0 *65.5 67.0 63.5
#   rloo         58.0 62.5 *67.0 65.5 67.5 67.0
#   ppo          57.0 *64.5 66.0 68.0 66.5 69.5
#   online_dpo   50.5 55.5 *57.5 57.0 57.5 59.5
#   best_of_k    55.5 53.0 *62.0 62.0 66.5 68.0
# ReST's 20 steps are kept whole (55.5% at 15, 59.5% at 20).
TEST_STEPS = {"grpo": 40, "cispo": 40, "gspo": 40, "rloo": 30, "ppo": 20, "online_dpo": 30, "best_of_k": 30}


def short_demo_run(method: str, tmp_path):
    steps = [f"max_steps={TEST_STEPS[method]}"] if method in TEST_STEPS else []
    return demo_run(method, tmp_path, *ENDS_ONLY, *steps)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "gspo", "cispo", "rloo"])
def test_demo_grpo_its_loss_variants_and_rloo_gain_at_least_10_points(method, tmp_path):
    # Seed to seed the demo's gain moves by about 10 points (GRPO +15.0 / +23.0 / +12.5 and RLOO
    # +13.5 / +10.5 / +22.5 with seeds 0, 1, 2; the seed picks the samples): 10 points is what every
    # seed reached, far above a run that does not learn (about 0).
    summary = short_demo_run(method, tmp_path)
    before, after = summary["before"]["eval/exact_match"], summary["final"]["eval/exact_match"]
    assert after - before >= 0.10, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo", "online_dpo", "best_of_k", "rest"])
def test_demo_other_online_methods_raise_accuracy(method, tmp_path):
    summary = short_demo_run(method, tmp_path)
    before, after = summary["before"]["eval/exact_match"], summary["final"]["eval/exact_match"]
    assert after - before >= 0.05, (before, after)


def test_online_dpo_with_an_llm_judge_logs_position_consistency(tiny_model_dir, tiny_prompts, tmp_path):
    spec = online_spec(tiny_model_dir, tiny_prompts, "online_dpo", judge=str(tiny_model_dir), rewards="regex:.*[a-m].*")
    summary = train(spec, tmp_path / "run")
    assert summary["status"] == "completed"
    consistency = [
        m["judge/position_consistency"] for m in read_metrics(tmp_path / "run") if "judge/position_consistency" in m
    ]
    assert len(consistency) == 3 and all(0.0 <= c <= 1.0 for c in consistency)
    judged = summary["judge"]  # the whole run's rates, with the template that produced them (None = the built-in one)
    assert judged["judge"] == str(tiny_model_dir) and judged["judge_template"] is None and judged["pairs"] == 3 * 4
    assert judged["position_consistency"] == pytest.approx(sum(consistency) / 3)
    assert {"decided_frac", "shorter_preferred_frac", "reward_agreement"} <= judged.keys()
    # the store keeps the verdicts of both orders: each order's probability for A and for B add up to 1
    records = read_rollouts(tmp_path / "run")
    assert len(records) == 3 * 4 * 2
    for a, b in zip(records[::2], records[1::2]):
        assert [v["shown"] for v in a["judge"]] == [1, 2] == [v["shown"] for v in b["judge"]]
        assert a["judge"][0]["p_better"] + b["judge"][1]["p_better"] == pytest.approx(1.0)
        assert b["judge"][0]["p_better"] + a["judge"][1]["p_better"] == pytest.approx(1.0)


def test_judge_template_changes_the_llm_judges_preferences_on_the_same_pairs(tmp_path, monkeypatch):
    """Two demo online-DPO runs with the demo model as a tiny LLM judge, differing only in judge_template: the first
    step judges the same pairs (same seed, untrained policy), and the two templates prefer differently on some."""
    import engine.rewards as rewards

    first_step: dict[str | None, tuple] = {}
    real_prefer = rewards.LLMJudge.prefer

    def spy(judge, prompts, completions_a, completions_b, *args, **kwargs):
        verdict = real_prefer(judge, prompts, completions_a, completions_b, *args, **kwargs)
        first_step.setdefault(judge.template, (list(prompts), list(completions_a), list(completions_b), verdict.prob_a))
        return verdict

    monkeypatch.setattr(rewards.LLMJudge, "prefer", spy)
    brevity = (
        "Prefer the SHORTER answer.\\n\\nRequest:\\n{prompt}\\n\\nAnswer 1:\\n{answer_1}\\n\\nAnswer 2:\\n{answer_2}"
        "\\n\\nWhich answer is better? Reply with one digit: 1 or 2."
    )
    summaries = {}
    for name, template in (("built-in", None), ("brevity", brevity)):
        overrides = [
            "max_steps=1",
            "batch_size=32",
            "eval_steps=0",
            "eval_max_examples=4",
            f"judge={demo_dir() / 'model'}",
            "judge_tie_margin=0",
        ] + ([f"judge_template={template}"] if template else [])
        summaries[name] = demo_run("online_dpo", tmp_path / name, "num_threads=1", "sample_steps=0", *overrides)
    assert summaries["brevity"]["judge"]["judge_template"] == brevity.replace("\\n", "\n")
    assert summaries["built-in"]["judge"]["judge_template"] is None
    (builtin, steered) = first_step[rewards.DEFAULT_JUDGE_TEMPLATE], first_step[brevity.replace("\\n", "\n")]
    assert builtin[:3] == steered[:3]  # the same prompts and the same two completions per pair
    winners = [[p >= 0.5 for p in probs] for probs in (builtin[3], steered[3])]
    assert sum(x != y for x, y in zip(*winners)) > 0
    for summary in summaries.values():
        judged = summary["judge"]
        assert judged["pairs"] == 32 and 0 < judged["decided_frac"] <= 1 and "shorter_preferred_frac" in judged


def test_online_dpo_with_an_llm_judge_needs_no_reward_columns(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(8)])  # no answers for exact_match
    spec = online_spec(
        tiny_model_dir, data, "online_dpo", judge=str(tiny_model_dir), rewards="exact_match", eval_split=0.0
    )
    summary = train(spec, tmp_path / "run")
    assert summary["status"] == "completed"
    metrics = read_metrics(tmp_path / "run")
    assert any("judge/skip_frac" in m for m in metrics) and not any("reward/mean" in m for m in metrics)
    events = (tmp_path / "run" / "events.jsonl").read_text()
    assert "no reward/* metrics" in events and "'answer' column" in events


def test_recomputed_logps_match_the_samplers_own_for_left_padded_prompts(tiny_model_dir, monkeypatch):
    """What the update scores is what was sampled: same temperature, positions from the mask, padding ignored."""
    import engine.rollout as rollout_module
    from engine.algorithms.online_rows import token_logps
    from engine.batching import collate_completions

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=CPU).eval()
    prompts = [tokenizer(t)["input_ids"] for t in ("a", "a much longer prompt", "mid size")]
    drawn = []  # the sampler's log-prob of each token it drew, step by step
    real_sample = rollout_module.sample_next

    def recording(logits, temperature, top_p=1.0, generator=None, **truncation):
        token = real_sample(logits, temperature, top_p, generator, **truncation)
        drawn.append((logits / temperature).log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))
        return token

    monkeypatch.setattr(rollout_module, "sample_next", recording)
    examples = [{"prompt": str(i), "prompt_ids": ids} for i, ids in enumerate(prompts)]
    torch.manual_seed(0)
    rollout = sample_rollout(model, tokenizer, examples, k=2, max_new_tokens=5, temperature=0.7)
    sampler = torch.stack(drawn, 1)
    # EOS ends a sample; the tiny random model rarely samples it: compare rows without one, all tokens.
    keep = [i for i, cut in enumerate(rollout.truncated) if cut]
    assert keep
    batch = collate_completions(
        [rollout.prompt_ids[i] for i in keep], [rollout.completion_ids[i] for i in keep], tokenizer.pad_token_id
    )
    recomputed, mask, _ = token_logps(model, batch, temperature=0.7)
    assert mask.all() and torch.allclose(recomputed, sampler[keep], atol=1e-4)


def test_on_policy_rloo_without_kl_scores_no_old_logps(tiny_model_dir, tiny_prompts, monkeypatch):
    """beta 0 and one pass: the loss is -A log pi with ratio exactly 1, so prepare runs no forward pass."""
    import engine.algorithms.rloo as rloo_module

    spec = online_spec(tiny_model_dir, tiny_prompts, "rloo", beta=0.0, num_iterations=1)
    algo, models = models_for(spec, tiny_model_dir)
    examples = [{"prompt": f"p{i}", "prompt_ids": models.tokenizer(f"p{i} x")["input_ids"]} for i in range(2)]
    torch.manual_seed(0)
    rollout = sample_rollout(models.policy, models.tokenizer, examples, k=4, max_new_tokens=4, temperature=1.0)
    score_rollout(rollout, build_reward(["length:3"], tokenizer=models.tokenizer))

    def no_forward(*args, **kwargs):
        raise AssertionError("prepare scored the samples")

    monkeypatch.setattr(rloo_module, "sample_logps", no_forward)
    rows, _ = algo.prepare(rollout, models)
    assert rows and all("old_logp" not in row for row in rows)
    _, metrics = algo.loss(models, algo.collate(rows, models.tokenizer.pad_token_id), rows)
    total, count = metrics["policy/ratio_mean"]
    assert count == len(rows) and total == count
