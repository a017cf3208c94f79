"""The online training loop: prompts -> sample -> score -> advantages or pairs -> update -> repeat.

Read `train_online` top to bottom. One step is one rollout: `batch_size` prompts, each sampled
`num_generations` times from the current policy (engine/rollout.py), scored by the run's reward
sources (engine/rewards.py), turned into training rows by the algorithm (GRPO, RLOO, PPO, online
DPO, best-of-K, ReST: engine/algorithms), then trained on for `num_iterations` passes of
`num_mini_batches` optimizer steps, each accumulating `grad_accum` micro-batches. The lr schedule
moves once per step. Evals, sample comparisons and checkpoints work as in the offline loop
(engine/train.py), whose pieces this loop reuses; a run directory has the same files.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from engine.algorithms import build_algorithm
from engine.algorithms.online_base import OnlineModels, Phase, split
from engine.data import prepare
from engine.errors import CherryError
from engine.generation import decode_completions, generate
from engine.models import count_parameters, load_tokenizer, pick_device, pick_dtype
from engine.reporting import MultiReporter, Reporter, RunDirReporter
from engine.rewards import build_reward, exact_match, required_columns
from engine.rollout import reward_columns, sample_rollout, score_rollout
from engine.spec import RunSpec
from engine.train import (
    CpuMeter,
    MetricLog,
    MetricSums,
    Schedule,
    _sys_metrics,
    _write_summary,
    build_models,
    estimate_kl,
    load_extra_state,
    lr_factor,
    reference_completions,
    restore,
    resume_checkpoint,
    sample_comparisons,
    save_checkpoint,
)

log = logging.getLogger("cherry.engine")


def reward_sources(spec: RunSpec) -> list[str]:
    return [spec.rewards] if isinstance(spec.rewards, str) else list(spec.rewards)


def check_columns(spec: RunSpec, examples: list[dict], what: str) -> None:
    """Every reward source finds the columns it reads (exact_match needs an answer on every row)."""
    for column in sorted(required_columns(reward_sources(spec))):
        missing = sum(1 for ex in examples if ex.get(column) is None)
        if missing:
            raise CherryError(
                f"{what}: {missing} of {len(examples)} rows have no '{column}' column, which rewards={spec.rewards} needs; "
                f"add it to the data (e.g. {{\"prompt\": ..., \"{column}\": ...}}) or choose another reward source"
            )


def train_online(
    spec: RunSpec,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    *,
    should_stop: Callable[[], bool | str | None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train an online method; the same contract as engine.train.train (summary dict, summary.json)."""
    started = time.time()
    out_dir = Path(out_dir)
    run_files = RunDirReporter(out_dir)
    reporter = MultiReporter(run_files, reporter) if reporter is not None else run_files
    (out_dir / "spec.yaml").write_text(spec.to_yaml())

    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    algo = build_algorithm(spec)
    checkpoint = resume_checkpoint(out_dir, reporter) if resume else None
    cpu_meter = CpuMeter()

    # --- models, data, reward
    tokenizer = load_tokenizer(spec.model, spec.trust_remote_code)
    policy, reference = build_models(spec, device, dtype, checkpoint, algo)
    value = algo.build_value_model(device, dtype) if algo.uses_value_model else None
    total_params, trainable_params = count_parameters(policy)
    data = prepare(
        spec.dataset, tokenizer, kind="prompt", max_length=spec.max_length, max_prompt_length=spec.max_prompt_length,
        eval_split=spec.eval_split, eval_source=spec.eval_dataset, seed=spec.seed, overlong=spec.overlong,
        max_rows=spec.max_rows,
    )
    reporter.log_event("data", data.summary(), **data.stats)
    reward = None
    try:
        check_columns(spec, data.train, f"dataset {spec.dataset}")
        reward = build_reward(
            reward_sources(spec), spec.reward_weights, tokenizer=tokenizer, device=str(device),
            safety_model=spec.safety_reward_model, safety_threshold=spec.safety_threshold,
        )
    except CherryError as err:
        if not (algo.uses_judge and spec.judge != "reward"):
            raise
        # An LLM judge decides online DPO's pairs on its own; the rewards would only be logged.
        reporter.log_event("warning", f"no reward/* metrics: {err}")
    judge = None  # judge = reward compares the rollout's own rewards (engine/algorithms/online_dpo.py)
    if algo.uses_judge and spec.judge != "reward":
        from engine.rewards import LLMJudge

        judge = LLMJudge(spec.judge, device=str(device), trust_remote_code=spec.trust_remote_code)
    models = OnlineModels(policy=policy, tokenizer=tokenizer, device=device, reference=reference, value=value, judge=judge)

    if spec.eval_prompts:
        eval_prompts = prepare(
            spec.eval_prompts, tokenizer, kind="prompt", max_length=spec.max_length,
            max_prompt_length=spec.max_prompt_length, eval_split=0.0, seed=spec.seed,
        ).train[: spec.eval_max_examples]
    else:
        eval_prompts = data.eval[: spec.eval_max_examples]
    eval_reward = reward is not None
    try:
        check_columns(spec, eval_prompts, "eval prompts")
    except CherryError:
        eval_reward = False  # no eval/reward without the columns; exact match still runs where answers exist
    sample_prompts = eval_prompts[: spec.num_samples]
    kl_prompts = eval_prompts[: spec.kl_samples]

    # --- optimisation: one lr value per step (rollout); the value model trains with the policy
    schedule = Schedule(len(data.train), dataclasses.replace(spec, grad_accum=1))
    warmup_steps = spec.warmup_steps or int(spec.warmup_ratio * schedule.total_steps)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    if value is not None:
        trainable += [p for p in value.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, betas=(spec.adam_beta1, spec.adam_beta2), weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule.total_steps, warmup_steps, spec.lr_scheduler)
    )
    state = restore(checkpoint, resume, optimizer, scheduler, reporter)
    if checkpoint is not None:
        extra = load_extra_state(checkpoint)
        algo.load_state_dict(extra.get("algorithm", {}))
        if value is not None and "value" in extra:
            value.load_state_dict(extra["value"])

    def checkpoint_now() -> None:
        extra = {"algorithm": algo.state_dict()}
        if value is not None:
            extra["value"] = value.state_dict()
        save_checkpoint(out_dir, policy, optimizer, scheduler, state, spec.save_total_limit, extra)

    samples_per_step = spec.batch_size * spec.num_generations
    reporter.log_event(
        "start",
        f"{spec.algorithm}: {schedule.total_steps} steps x {spec.batch_size} prompts x {spec.num_generations} samples "
        f"on {len(data.train)} prompts ({device}, {dtype})" + spec.followed_note,
        total_steps=schedule.total_steps, step=state.step, params=total_params, trainable_params=trainable_params,
        samples_per_step=samples_per_step,
    )

    # --- evaluation: greedy exact match and reward on the eval prompts, KL, sample comparisons
    metric_log = MetricLog(reporter)
    emit = metric_log.emit
    reference_texts = reference_completions(policy, reference, tokenizer, sample_prompts, spec.max_new_tokens)

    @torch.no_grad()
    def evaluate(step: int) -> None:
        metrics = evaluate_prompts(policy, tokenizer, eval_prompts, eval_reward, reward, spec)
        if reference is not None and kl_prompts and spec.kl_samples:
            metrics.update(estimate_kl(policy, reference, tokenizer, kl_prompts, spec, device))
        if metrics:
            emit(step, metrics)

    def log_samples(step: int) -> None:
        if sample_prompts:
            reporter.log_samples(step, sample_comparisons(policy, tokenizer, sample_prompts, reference_texts, spec))

    def due(every: int) -> bool:
        return every > 0 and state.step % every == 0

    if state.step == 0:
        evaluate(0)
        log_samples(0)
    before = dict(metric_log.last)

    # --- the loop
    status = "completed"
    try:
        while state.step < schedule.total_steps:
            stop = should_stop() if should_stop is not None else None
            if stop:
                status = stop if isinstance(stop, str) else "cancelled"
                break
            step_started = time.time()
            examples = [data.train[i] for i in schedule.micro_batches(state.step)[0]]

            rollout = sample_rollout(
                policy, tokenizer, examples, k=spec.num_generations, max_new_tokens=spec.max_new_tokens,
                temperature=spec.temperature, top_p=spec.top_p,
            )
            scoring_started = time.time()
            if reward is not None:
                score_rollout(rollout, reward, spec.missing_eos_penalty)
            score_seconds = time.time() - scoring_started

            update_started = time.time()
            rows, metrics = algo.prepare(rollout, models)
            sums, optimizer_steps, tokens, grad_norm = MetricSums(), 0, 0, 0.0
            for phase in algo.phases(rows):
                metrics.update(phase.metrics)
                for mini_batch in _mini_batches(phase, spec):
                    micro = split(mini_batch, spec.grad_accum)
                    batches = [{k: v.to(device) for k, v in algo.collate(m, tokenizer.pad_token_id).items()} for m in micro]
                    total_units = sum(algo.units(b) for b in batches)
                    for batch, chunk in zip(batches, micro):
                        loss_sum, metric_sums = algo.loss(models, batch, chunk)
                        (loss_sum / max(total_units, 1e-9)).backward()  # each micro-batch adds its share
                        sums.add({"loss": loss_sum.item(), **metric_sums}, algo.units(batch))
                        tokens += int(batch["attention_mask"].sum())
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, spec.max_grad_norm or float("inf")))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    optimizer_steps += 1
            update_seconds = time.time() - update_started
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # a step with nothing to train on still moves the schedule
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            state.step += 1
            state.tokens += tokens
            step_seconds = time.time() - step_started
            state.train_seconds += step_seconds

            metrics.update({f"train/{k}" if k == "loss" else k: v for k, v in sums.means().items()})
            metrics.update(algo.after_rollout(metrics))
            metrics.update(
                {
                    "train/grad_norm": grad_norm,
                    "train/lr": lr,
                    "train/epoch": schedule.epoch(state.step),
                    "train/tokens_per_s": tokens / max(update_seconds, 1e-9),
                    "train/optimizer_steps": optimizer_steps,
                    "train/rows": len(rows),
                    "time/rollout_s": rollout.seconds,
                    "time/score_s": score_seconds,
                    "time/update_s": update_seconds,
                    "time/step_s": step_seconds,
                    **_sys_metrics(device, cpu_meter),
                }
            )
            if due(spec.logging_steps) or state.step == schedule.total_steps:
                emit(state.step, metrics)
            if due(spec.eval_steps) and state.step < schedule.total_steps:
                evaluate(state.step)
            if due(spec.sample_steps) and state.step < schedule.total_steps:
                log_samples(state.step)
            if due(spec.save_steps) and state.step < schedule.total_steps:
                checkpoint_now()
    except KeyboardInterrupt:  # as in engine.train: no checkpoint from the middle of a step
        _write_summary(out_dir, "interrupted", spec, state, schedule, before, metric_log.last, metric_log.best, started, device, data.stats)
        raise

    checkpoint_now()
    if status == "completed":
        evaluate(state.step)
        log_samples(state.step)
        final = out_dir / "final"
        policy.save_pretrained(final)
        tokenizer.save_pretrained(final)
        if value is not None:
            value.save_pretrained(out_dir / "final_value")
    reporter.log_event("end", f"{status} at step {state.step}", status=status, step=state.step)
    return _write_summary(out_dir, status, spec, state, schedule, before, metric_log.last, metric_log.best, started, device, data.stats)


def _mini_batches(phase: Phase, spec: RunSpec):
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


@torch.no_grad()
def evaluate_prompts(policy, tokenizer, prompts: list[dict], with_reward: bool, reward, spec: RunSpec) -> dict[str, float]:
    """Greedy completions of the eval prompts: eval/exact_match where answers exist, eval/reward where the
    reward sources have what they need (`with_reward`), eval/length_mean."""
    if not prompts:
        return {}
    ids = generate(policy, tokenizer, [p["prompt_ids"] for p in prompts], max_new_tokens=spec.max_new_tokens)
    texts = decode_completions(tokenizer, ids)
    # Scored as sampled completions are: a completion that stopped keeps its EOS (a reward model reads it).
    ids = [i + [tokenizer.eos_token_id] if len(i) < spec.max_new_tokens else i for i in ids]
    metrics = {"eval/length_mean": sum(len(i) for i in ids) / len(ids)}
    answered = [(t, p["answer"]) for t, p in zip(texts, prompts) if p.get("answer") is not None]
    if answered:
        metrics["eval/exact_match"] = sum(exact_match(t, a) for t, a in answered) / len(answered)
    if with_reward:
        result = reward.reward([p["prompt"] for p in prompts], texts, [p["prompt_ids"] for p in prompts], ids,
                               reward_columns(prompts))
        metrics["eval/reward"] = sum(result.total) / len(result.total)
    return metrics

