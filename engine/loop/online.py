"""The online loop: prompts -> sample -> score -> prepare -> update -> repeat.

Read `train_online` top to bottom. One step is one rollout: `batch_size` prompts, each sampled
`num_generations` times from the current policy (engine/rollout.py), scored by the run's reward
sources (engine/rewards), turned into training rows by the algorithm (`prepare`: advantages,
preference pairs or kept samples), then trained on for `num_iterations` passes of
`num_mini_batches` optimizer steps, each accumulating `grad_accum` micro-batches. The lr schedule
moves once per step. Set-up, the step clock, checkpoints and the summary are the loop core
(engine/loop/core.py), shared with the offline loop; a run directory has the same files.

Data-parallel (`num_processes: N`): each rank samples and scores its shard of the step's prompts; the
rollouts are gathered so that `prepare` sees the whole step on every rank (group and batch statistics,
PPO's whitening and ReST's thresholds are those of the global batch), and each mini-batch is sharded
again for the update. Everything after sampling draws rank 0's random numbers on every rank.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from engine.algorithms.base import Phase
from engine.algorithms.online_rows import split
from engine.errors import CherryError
from engine.loop.core import Run, StopCheck, accumulate, clip_gradients, run_steps
from engine.loop.evaluation import estimate_kl, evaluate_prompts, reference_completions, sample_comparisons
from engine.loop.metrics import MetricSums
from engine.nonfinite import check_rollout, check_step
from engine.rewards import build_reward, required_columns
from engine.rewards.judge import LLMJudge
from engine.rollout import merge_rollouts, reward_columns, sample_rollout, score_rollout
from engine.rollout_store import keep_rollout


def reward_sources(spec) -> list[str]:
    return [spec.rewards] if isinstance(spec.rewards, str) else list(spec.rewards)


def check_columns(spec, examples: list[dict], what: str) -> None:
    """Every reward source finds the columns it reads (exact_match needs an answer on every row)."""
    for column in sorted(required_columns(reward_sources(spec))):
        missing = sum(1 for ex in examples if ex.get(column) is None)
        if missing:
            raise CherryError(
                f"{what}: {missing} of {len(examples)} rows have no '{column}' column, which rewards={spec.rewards} needs; "
                f'add it to the data (e.g. {{"prompt": ..., "{column}": ...}}) or choose another reward source'
            )


def train_online(
    run: Run, *, should_stop: StopCheck | None = None, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    spec, algo, models, reporter, device, world = run.spec, run.algo, run.models, run.reporter, run.device, run.world
    policy, tokenizer, reference = models.policy, models.tokenizer, models.reference
    models.value = algo.build_value_model(device, torch.float32)  # it trains: fp32 weights
    params = run.parameter_counts()

    # --- prompts (tokenised once, then loaded from the cache by later runs) and how samples are scored
    data = run.load_data("prompt", cache_dir=cache_dir)
    judge_source = algo.llm_judge()
    reward = None
    try:
        check_columns(spec, data.train, f"dataset {spec.dataset}")
        reward = build_reward(
            reward_sources(spec),
            spec.reward_weights,
            tokenizer=tokenizer,
            device=str(device),
            safety_model=spec.safety_reward_model,
            safety_threshold=spec.safety_threshold,
            timeout=spec.reward_timeout,
        )
    except CherryError as err:
        if judge_source is None:
            raise
        # An LLM judge decides online DPO's pairs on its own; the rewards would only be logged.
        reporter.log_event("warning", f"no reward/* metrics: {err}")
    if judge_source is not None:
        models.judge = LLMJudge(
            judge_source, device=str(device), template=spec.judge_template, trust_remote_code=spec.trust_remote_code
        )

    eval_prompts = run.load_eval_prompts() if spec.eval_prompts else data.eval[: spec.eval_max_examples]
    eval_reward = reward is not None
    try:
        check_columns(spec, eval_prompts, "eval prompts")
    except CherryError:
        eval_reward = False  # no eval/reward without the columns; exact match still runs where answers exist
    lacking = sorted(reward.needs_columns - set(reward_columns(eval_prompts))) if reward and eval_prompts else []
    if eval_reward and lacking:  # eval prompts from another file may lack a column a reward function reads
        eval_reward = False
        reporter.log_event("warning", f"no eval/reward: the eval prompts have no {', '.join(lacking)} column")
    sample_prompts = eval_prompts[: spec.num_samples]
    kl_prompts = eval_prompts[: spec.kl_samples]

    # --- optimisation: one step = one rollout of `batch_size` prompts; the value model trains with the policy
    run.set_up_optimisation(len(data.train), chunks_per_step=1)
    if reward is not None:  # reward functions get step= and epoch= (TRL's trainer state); the start's eval sees these
        reward.step, reward.epoch = run.state.step, run.schedule.epoch(run.state.step)
    reporter.log_event(
        "start",
        f"{spec.algorithm}: {run.schedule.total_steps} steps x {spec.batch_size} prompts x {spec.num_generations} samples "
        f"on {len(data.train)} prompts ({device}, {run.dtype})" + spec.followed_note,
        total_steps=run.schedule.total_steps,
        step=run.state.step,
        **params,
        samples_per_step=spec.batch_size * spec.num_generations,
    )

    def step(index: int) -> tuple[dict[str, float], int]:
        step_started = time.time()
        examples = [data.train[i] for i in world.shard(run.schedule.micro_batches(index)[0])]

        # sampling, scoring and preparing are forward passes only; each rank samples its own prompts, to its
        # own lengths, so a sharded policy samples with its full weights gathered
        with run.precision.autocast(), run.full_weights():
            rollout = sample_rollout(
                policy,
                tokenizer,
                examples,
                k=spec.num_generations,
                max_new_tokens=spec.max_new_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                top_k=spec.top_k,
                min_p=spec.min_p,
                repetition_penalty=spec.repetition_penalty,
                stop=spec.stop,
            )
            scoring_started = time.time()
            if reward is not None:
                reward.step, reward.epoch = index, run.schedule.epoch(index)
            if reward is not None and rollout.texts:
                score_rollout(rollout, reward, spec.missing_eos_penalty)
            score_seconds = time.time() - scoring_started
            rollout = merge_rollouts(world.gather(rollout))

        with world.shared_random(), run.precision.autocast():
            # prepare: advantages, pairs or kept samples, with what they need computed once without gradients
            update_started = time.time()
            rows, metrics = algo.prepare(rollout, models)
        check_rollout(rollout.rewards, metrics)  # host values: no sync of its own
        if world.is_main:  # the rollout store: every sample, scored and prepared (engine/rollout_store.py)
            keep_rollout(reporter, index + 1, rollout, spec.log_rollouts)

        # update: each phase's rows, `passes` passes of mini-batches (this rank's shard of each), one
        # optimizer step per mini-batch
        sums, optimizer_steps, tokens, grad_norm = MetricSums(), 0, 0, 0.0
        with world.shared_random():
            for phase in algo.phases(rows):
                metrics.update(phase.metrics)
                for mini_batch in mini_batches(phase, spec):
                    micro = [
                        ({k: v.to(device) for k, v in algo.collate(rows, tokenizer.pad_token_id).items()}, rows, counts)
                        for rows, counts in world.micro_shards(split(mini_batch, spec.grad_accum), run.sharded)
                    ]
                    tokens += accumulate(algo, models, micro, sums, precision=run.precision, world=world)
                    grad_norm = clip_gradients(run)
                    check_step(
                        sums.sums.get("loss", 0.0), grad_norm, scaled=run.precision.scaler is not None, world=world
                    )
                    run.precision.step(run.optimizer)
                    run.optimizer.zero_grad(set_to_none=True)
                    optimizer_steps += 1
        update_seconds = time.time() - update_started
        tokens = int(world.sum([tokens])[0])
        sums = sums.merged(world)
        lr = run.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # a step with nothing to train on still moves the schedule
            warnings.simplefilter("ignore", UserWarning)
            run.scheduler.step()

        metrics.update({f"train/{k}" if k == "loss" else k: v for k, v in sums.means().items()})
        metrics.update(algo.after_step(metrics))
        metrics.update(
            {
                "train/grad_norm": grad_norm,
                "train/lr": lr,
                "train/tokens_per_s": tokens / max(update_seconds, 1e-9),
                "train/optimizer_steps": optimizer_steps,
                "train/rows": len(rows),
                "time/rollout_s": rollout.seconds,
                "time/score_s": score_seconds,
                "time/update_s": update_seconds,
                "time/step_s": time.time() - step_started,
            }
        )
        return metrics, tokens

    # --- evaluation: greedy exact match and reward on the eval prompts, KL, sample comparisons
    with run.full_weights():  # rank 0 alone evaluates and logs samples
        reference_texts = (
            reference_completions(policy, reference, tokenizer, sample_prompts, spec.max_new_tokens)
            if world.is_main
            else []
        )

    @torch.no_grad()
    def evaluate(step_index: int) -> None:
        metrics = evaluate_prompts(policy, tokenizer, eval_prompts, eval_reward, reward, spec)
        if reference is not None and kl_prompts and spec.kl_samples:
            metrics.update(estimate_kl(policy, reference, tokenizer, kl_prompts, spec, device))
        if metrics:
            run.metric_log.emit(step_index, metrics)

    def log_samples(step_index: int) -> None:
        if sample_prompts:
            reporter.log_samples(
                step_index, sample_comparisons(policy, tokenizer, sample_prompts, reference_texts, spec)
            )

    return run_steps(run, step, evaluate, log_samples, should_stop)


def mini_batches(phase: Phase, spec):
    """`phase.passes` passes over the phase's rows, each cut into `num_mini_batches` mini-batches.

    The first pass keeps the rollout's order (the partition old log-probs were computed in, so the
    first ratio is exactly 1); later passes shuffle. A fractional pass stops part-way through.
    """
    per_pass = phase.mini_batches or spec.num_mini_batches
    total = max(1, round(phase.passes * per_pass)) if phase.rows else 0
    done, rows = 0, list(phase.rows)
    while done < total:
        for mini_batch in split(rows, per_pass):
            if done == total:
                return
            yield mini_batch
            done += 1
        rows = [phase.rows[i] for i in torch.randperm(len(phase.rows)).tolist()]
