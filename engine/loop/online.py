"""The online loop: prompts -> sample -> score -> prepare -> update -> repeat.

Read `train_online` (the set-up), then `OnlineStep` (one step, a method per stage). One step is one
rollout: `batch_size` prompts, each sampled `num_generations` times from the current policy
(engine/rollout.py, `OnlineStep.sample`), scored by the run's reward sources (engine/rewards, `score`),
turned into training rows by the algorithm (`prepare`: advantages, preference pairs or kept samples),
then trained on (`update`) for `num_iterations` passes of `num_mini_batches` optimizer steps, each
accumulating `grad_accum` micro-batches. The lr schedule
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.algorithms.base import Phase
from engine.algorithms.online_rows import split
from engine.episodes import sample_episodes
from engine.errors import CherryError
from engine.loop.clock import run_steps
from engine.loop.core import Run, StopCheck, accumulate, clip_gradients
from engine.loop.evaluation import estimate_kl, evaluate_prompts, reference_completions, sample_comparisons
from engine.loop.metrics import MetricSums
from engine.nonfinite import check_rollout, check_step
from engine.rewards import build_reward, required_columns
from engine.rewards.judge import LLMJudge
from engine.rollout import Rollout, Sampling, merge_rollouts, reward_columns, sample_rollout, score_rollout
from engine.rollout_store import keep_rollout
from engine.tools import episode_factory


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
    """Set the run up (prompts, rewards, eval prompts, optimiser), then hand one step to the step clock."""
    run.models.value = run.algo.build_value_model(run.device, torch.float32)  # it trains: fp32 weights
    params = run.parameter_counts()
    data = run.load_data("prompt", cache_dir=cache_dir)  # tokenised once, then loaded from the cache by later runs
    reward = build_scoring(run, data.train)
    eval_prompts, eval_reward = pick_eval_prompts(run, data, reward)

    # one step = one rollout of `batch_size` prompts; the value model trains with the policy
    run.set_up_optimisation(len(data.train), chunks_per_step=1)
    if reward is not None:  # reward functions get step= and epoch= (TRL's trainer state); the start's eval sees these
        reward.step, reward.epoch = run.state.step, run.schedule.epoch(run.state.step)
    log_start(run, len(data.train), params)

    step = OnlineStep(run, data.train, reward)
    evaluation = OnlineEvaluation(run, eval_prompts, eval_reward, reward)
    return run_steps(run, step, evaluation.evaluate, evaluation.log_samples, should_stop)


def build_scoring(run: Run, prompts: list[dict]):
    """The run's reward (None when only an LLM judge decides), and the judge on `run.models` when there is one."""
    spec, device = run.spec, run.device
    judge_source = run.algo.llm_judge()
    reward = None
    try:
        check_columns(spec, prompts, f"dataset {spec.dataset}")
        reward = build_reward(
            reward_sources(spec),
            spec.reward_weights,
            tokenizer=run.models.tokenizer,
            device=str(device),
            safety_model=spec.safety_reward_model,
            safety_threshold=spec.safety_threshold,
            timeout=spec.reward_timeout,
        )
    except CherryError as err:
        if judge_source is None:
            raise
        # An LLM judge decides online DPO's pairs on its own; the rewards would only be logged.
        run.reporter.log_event("warning", f"no reward/* metrics: {err}")
    if judge_source is not None:
        run.models.judge = LLMJudge(
            judge_source, device=str(device), template=spec.judge_template, trust_remote_code=spec.trust_remote_code
        )
    return reward


def pick_eval_prompts(run: Run, data, reward) -> tuple[list[dict], bool]:
    """The prompts evaluation answers greedily, and whether it scores them with the reward (eval/reward)."""
    spec = run.spec
    eval_prompts = run.load_eval_prompts() if spec.eval_prompts else data.eval[: spec.eval_max_examples]
    eval_reward = reward is not None
    try:
        check_columns(spec, eval_prompts, "eval prompts")
    except CherryError:
        eval_reward = False  # no eval/reward without the columns; exact match still runs where answers exist
    lacking = sorted(reward.needs_columns - set(reward_columns(eval_prompts))) if reward and eval_prompts else []
    if eval_reward and "environment_reward" in lacking:  # eval answers in one greedy turn (docs/tools.md)
        eval_reward = False
        run.reporter.log_event("warning", "no eval/reward: evaluation answers in one turn, without the environment")
    elif eval_reward and lacking:  # eval prompts from another file may lack a column a reward function reads
        eval_reward = False
        run.reporter.log_event("warning", f"no eval/reward: the eval prompts have no {', '.join(lacking)} column")
    return eval_prompts, eval_reward


def log_start(run: Run, n_prompts: int, params: dict[str, int]) -> None:
    spec = run.spec
    run.reporter.log_event(
        "start",
        f"{spec.algorithm}: {run.schedule.total_steps} steps x {spec.batch_size} prompts x {spec.num_generations} samples "
        f"on {n_prompts} prompts ({run.device}, {run.dtype})" + spec.followed_note,
        total_steps=run.schedule.total_steps,
        step=run.state.step,
        **params,
        samples_per_step=spec.batch_size * spec.num_generations,
    )


@dataclass
class Update:
    """What one step's update did: its loss and metric sums, optimizer steps, tokens and last gradient norm."""

    sums: MetricSums = field(default_factory=MetricSums)
    optimizer_steps: int = 0
    tokens: int = 0
    grad_norm: float = 0.0


class OnlineStep:
    """One step of the online loop, called by the step clock as `step(index)` -> (metrics, tokens).

    Its stages, in order: `sample` this rank's prompts, `score` the samples, gather the ranks' rollouts,
    `prepare` the training rows, `update` the policy on them, then `step_metrics`."""

    def __init__(self, run: Run, prompts: list[dict], reward) -> None:
        self.run, self.prompts, self.reward = run, prompts, reward
        self.make_env = episode_factory(run.spec)  # None: one completion per sample, no environment

    def __call__(self, index: int) -> tuple[dict[str, float], int]:
        run, world = self.run, self.run.world
        started = time.time()
        examples = [self.prompts[i] for i in world.shard(run.schedule.micro_batches(index)[0])]

        # sampling, scoring and preparing are forward passes only; each rank samples its own prompts, to its
        # own lengths, so a sharded policy samples with its full weights gathered
        with run.precision.autocast(), run.full_weights():
            rollout = self.sample(examples)
            scoring_started = time.time()
            self.score(rollout, index)
            score_seconds = time.time() - scoring_started
            rollout = merge_rollouts(world.gather(rollout))

        update_started = time.time()
        rows, metrics = self.prepare(rollout, index)
        update = self.update(rows, metrics)
        seconds = {"rollout": rollout.seconds, "score": score_seconds, "update": time.time() - update_started}
        lr = self.advance_schedule()
        return self.step_metrics(metrics, update, lr, len(rows), seconds, started), update.tokens

    def sample(self, examples: list[dict]) -> Rollout:
        """`num_generations` completions of each prompt from the current policy; with an environment or
        tools, `num_generations` multi-turn episodes (engine/episodes.py)."""
        spec, models = self.run.spec, self.run.models
        if self.make_env is not None:
            return sample_episodes(
                models.policy,
                models.tokenizer,
                examples,
                self.make_env,
                k=spec.num_generations,
                sampling=Sampling.of(spec),
                max_turns=spec.max_turns,
                timeout=spec.tool_timeout,
            )
        return sample_rollout(
            models.policy,
            models.tokenizer,
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

    def score(self, rollout: Rollout, index: int) -> None:
        """The reward of each sample, written into the rollout (none without a reward: a judge decides)."""
        if self.reward is None:
            return
        self.reward.step, self.reward.epoch = index, self.run.schedule.epoch(index)
        if rollout.texts:
            score_rollout(rollout, self.reward, self.run.spec.missing_eos_penalty)

    def prepare(self, rollout: Rollout, index: int) -> tuple[list[dict], dict[str, float]]:
        """The algorithm's training rows (advantages, pairs or kept samples) and its rollout metrics, with
        what they need computed once without gradients; the same random numbers on every rank."""
        run = self.run
        with run.world.shared_random(), run.precision.autocast():
            rows, metrics = run.algo.prepare(rollout, run.models)
        check_rollout(rollout.rewards, metrics)  # host values: no sync of its own
        if run.world.is_main:  # the rollout store: every sample, scored and prepared (engine/rollout_store.py)
            keep_rollout(run.reporter, index + 1, rollout, run.spec.log_rollouts)
        return rows, metrics

    def update(self, rows: list[dict], metrics: dict[str, float]) -> Update:
        """Each phase's rows, `passes` passes of mini-batches (this rank's shard of each), one optimizer
        step per mini-batch. A phase's own metrics go into `metrics`."""
        run, update = self.run, Update()
        with run.world.shared_random():
            for phase in run.algo.phases(rows):
                metrics.update(phase.metrics)
                for mini_batch in mini_batches(phase, run.spec):
                    update.tokens += self.forward_backward(mini_batch, update.sums)
                    update.grad_norm = clip_and_step(run, update.sums)
                    update.optimizer_steps += 1
        update.tokens = int(run.world.sum([update.tokens])[0])
        update.sums = update.sums.merged(run.world)
        return update

    def forward_backward(self, mini_batch: list[dict], sums: MetricSums) -> int:
        """Forward and backward over one mini-batch, `grad_accum` micro-batches; returns the tokens seen."""
        run, algo = self.run, self.run.algo
        pad_id, device = run.models.tokenizer.pad_token_id, run.device
        micro = [
            ({k: v.to(device) for k, v in algo.collate(rows, pad_id).items()}, rows, counts)
            for rows, counts in run.world.micro_shards(split(mini_batch, run.spec.grad_accum), run.sharded)
        ]
        return accumulate(algo, run.models, micro, sums, precision=run.precision, world=run.world)

    def advance_schedule(self) -> float:
        """Move the lr schedule once per step; returns the lr the step trained with."""
        lr = self.run.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # a step with nothing to train on still moves the schedule
            warnings.simplefilter("ignore", UserWarning)
            self.run.scheduler.step()
        return lr

    def step_metrics(
        self, metrics: dict, update: Update, lr: float, n_rows: int, seconds: dict[str, float], started: float
    ) -> dict[str, float]:
        """The rollout's metrics, the update's means, the algorithm's own after-step figures and the timings."""
        metrics.update({f"train/{k}" if k == "loss" else k: v for k, v in update.sums.means().items()})
        metrics.update(self.run.algo.after_step(metrics))
        metrics.update(
            {
                "train/grad_norm": update.grad_norm,
                "train/lr": lr,
                "train/tokens_per_s": update.tokens / max(seconds["update"], 1e-9),
                "train/optimizer_steps": update.optimizer_steps,
                "train/rows": n_rows,
                "time/rollout_s": seconds["rollout"],
                "time/score_s": seconds["score"],
                "time/update_s": seconds["update"],
                "time/step_s": time.time() - started,
            }
        )
        return metrics


def clip_and_step(run: Run, sums: MetricSums) -> float:
    """Clip the accumulated gradients, check them, take the optimizer step; returns the norm before clipping."""
    grad_norm = clip_gradients(run)
    check_step(sums.sums.get("loss", 0.0), grad_norm, scaled=run.precision.scaler is not None, world=run.world)
    run.precision.step(run.optimizer)
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


class OnlineEvaluation:
    """Greedy exact match and reward on the eval prompts, KL to the reference, and sample comparisons.

    Built on every rank (the reference's completions gather a sharded policy's weights); rank 0 alone
    evaluates and logs samples."""

    def __init__(self, run: Run, eval_prompts: list[dict], with_reward: bool, reward) -> None:
        spec, models = run.spec, run.models
        self.run, self.eval_prompts, self.with_reward, self.reward = run, eval_prompts, with_reward, reward
        self.sample_prompts = eval_prompts[: spec.num_samples]
        self.kl_prompts = eval_prompts[: spec.kl_samples]
        with run.full_weights():
            self.reference_texts = (
                reference_completions(
                    models.policy, models.reference, models.tokenizer, self.sample_prompts, spec.max_new_tokens
                )
                if run.world.is_main
                else []
            )

    @torch.no_grad()
    def evaluate(self, step_index: int) -> None:
        run, spec, models = self.run, self.run.spec, self.run.models
        metrics = evaluate_prompts(
            models.policy, models.tokenizer, self.eval_prompts, self.with_reward, self.reward, spec
        )
        if models.reference is not None and self.kl_prompts and spec.kl_samples:
            metrics.update(
                estimate_kl(models.policy, models.reference, models.tokenizer, self.kl_prompts, spec, run.device)
            )
        if metrics:
            run.metric_log.emit(step_index, metrics)

    def log_samples(self, step_index: int) -> None:
        if self.sample_prompts:
            models = self.run.models
            comparisons = sample_comparisons(
                models.policy, models.tokenizer, self.sample_prompts, self.reference_texts, self.run.spec
            )
            self.run.reporter.log_samples(step_index, comparisons)


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
