"""The offline loop: batches from a fixed dataset, one optimizer step at a time.

Read `train_offline` top to bottom: data, the reference's log-probs (precomputed once, or per
batch), then one step = the step's micro-batches -> loss -> backward -> clip -> optimizer step.
Evaluation runs the eval split's loss, the verifier on greedy answers and a KL estimate. Everything
else (set-up, the step clock, checkpoints, the summary) is the loop core (engine/loop/core.py).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine.batching import example_length
from engine.loop.clock import run_steps
from engine.loop.core import Run, StopCheck, accumulate, clip_gradients
from engine.loop.evaluation import estimate_kl, exact_match_accuracy, reference_completions, sample_comparisons
from engine.loop.metrics import MetricSums
from engine.nonfinite import check_step
from engine.reference import PrecomputedReference, fingerprint_examples, fingerprint_model
from engine.registry import algorithm_info

log = logging.getLogger("cherry.engine")


def train_offline(
    run: Run, *, should_stop: StopCheck | None = None, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    spec, algo, models, reporter, world = run.spec, run.algo, run.models, run.reporter, run.world
    policy, tokenizer, reference, device = models.policy, models.tokenizer, models.reference, run.device
    info = algorithm_info(spec.algorithm)
    if info.model_kind == "reward":
        policy.config.pad_token_id = tokenizer.pad_token_id  # so a saved RM pools right in other tools
    params = run.parameter_counts()

    # --- data: the training examples, the eval split, and prompts for greedy answers and samples
    data = run.load_data(info.data_kind, cache_dir=cache_dir)
    eval_split = data.eval[: spec.eval_max_examples]
    algo.prepare_examples(data.train, tokenizer)
    algo.prepare_examples(eval_split, tokenizer)
    for warning in algo.warnings(data.train):
        reporter.log_event("warning", warning)
        log.warning("warning: %s", warning)
    if not info.generates:
        prompt_set = []
    elif spec.eval_prompts:
        prompt_set = run.load_eval_prompts()
    else:
        # Language-modeling rows ({"text": ...}) have no prompt: nothing to answer, so no greedy samples of them.
        prompt_set = [{"prompt_ids": ex["prompt_ids"], "prompt": ex["prompt"]} for ex in eval_split if ex["prompt_ids"]]
    prompt_set = [{**p, "prompt_ids": algo.generation_prompt(p["prompt_ids"])} for p in prompt_set]
    scored_prompts = [p for p in prompt_set if p.get("answer") is not None]
    sample_prompts = prompt_set[: spec.num_samples]
    kl_prompts = prompt_set[: spec.kl_samples]
    pair_samples = eval_split[: spec.num_samples]  # preference methods: chosen vs rejected with their rewards

    # --- the reference's log-probs: once for the whole dataset (cached between runs), or per batch
    collate = partial(algo.collate, pad_id=tokenizer.pad_token_id)
    to_device = lambda batch: {k: v.to(device) for k, v in batch.items()}  # noqa: E731
    ref_table = None
    if algo.needs_reference and spec.precompute_ref_logps:
        # Every token list the algorithm batches (KTO: a completion and its mismatched partner) is in the key.
        key_keys = tuple(sorted(k for k in data.train[0] if k.endswith("_ids"))) if data.train else ()
        key = "-".join(
            [
                fingerprint_model(spec.ref_model or spec.model, run.dtype)
                + ("-base" if spec.lora.r and not spec.ref_model else ""),
                fingerprint_examples(data.train, key_keys),
                fingerprint_examples(eval_split, key_keys),
            ]
        )
        cache_file = Path(cache_dir) / "ref_logps" / f"{key}.safetensors" if cache_dir else None
        with run.precision.autocast():  # as the per-batch reference computes them
            ref_table = PrecomputedReference.build(
                {"train": data.train, "eval": eval_split},
                collate,
                reference,
                rows_per_example=algo.rows_per_example,
                batch_size=spec.batch_size,
                device=device,
                cache_file=cache_file,
                world=world,
            )

    def reference_logps(batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        if ref_table is not None:
            return ref_table.lookup(split, batch["index"].cpu()).to(device)
        return reference.logps(batch)

    lengths = [example_length(ex) for ex in data.train] if spec.group_by_length else None
    run.set_up_optimisation(len(data.train), chunks_per_step=spec.grad_accum, lengths=lengths)
    reporter.log_event(
        "start",
        f"{spec.algorithm}: {run.schedule.total_steps} steps on {len(data.train)} examples ({device}, {run.dtype})"
        + spec.followed_note,
        total_steps=run.schedule.total_steps,
        step=run.state.step,
        **params,
    )

    # --- one step: the step's micro-batches (this rank's shard of each) -> loss -> backward -> clip -> step
    train_reference = partial(reference_logps, split="train") if algo.needs_reference else None

    def step(index: int) -> tuple[dict[str, float], int]:
        chunks = [[data.train[i] for i in idx] for idx in run.schedule.micro_batches(index)]
        micro = [(to_device(collate(rows)), rows, counts) for rows, counts in world.micro_shards(chunks, run.sharded)]
        sums = MetricSums()
        tokens = accumulate(algo, models, micro, sums, train_reference, run.precision, world)
        grad_norm = clip_gradients(run)
        check_step(sums.sums.get("loss", 0.0), grad_norm, scaled=run.precision.scaler is not None, world=world)
        lr = run.scheduler.get_last_lr()[0]
        run.precision.step(run.optimizer)
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        means = sums.merged(world).means()
        means.update(algo.derived_metrics(means))
        metrics = {f"train/{name}" if name == "loss" else name: value for name, value in means.items()}
        metrics.update({"train/grad_norm": grad_norm, "train/lr": lr})
        positions = sum(algo.body_positions(models, batch) for batch, _, counts in micro if counts)
        tokens, positions = world.sum([tokens, positions])  # over every rank's shard
        metrics["batch/pad_fraction"] = 1.0 - tokens / positions if positions else 0.0  # tokens: the real positions
        return metrics, int(tokens)

    # --- evaluation: the eval split's loss, exact match, KL, and sample comparisons
    with run.full_weights():  # rank 0 alone evaluates and logs samples
        reference_texts = (
            reference_completions(policy, reference, tokenizer, sample_prompts, spec.max_new_tokens)
            if world.is_main
            else []
        )

    @torch.no_grad()
    def evaluate(step_index: int) -> None:
        policy.eval()
        metrics: dict[str, float] = {}
        if eval_split:
            sums = MetricSums()
            for start in range(0, len(eval_split), spec.eval_rows):
                rows = eval_split[start : start + spec.eval_rows]
                batch = to_device(collate(rows))
                if algo.needs_reference:
                    batch["ref_logps"] = reference_logps(batch, "eval")
                loss_sum, metric_sums = algo.loss(models, batch, rows)
                sums.add({"loss": loss_sum.item(), **metric_sums}, algo.units(batch))
            means = sums.means()
            means.update(algo.derived_metrics(means))
            means.update(algo.eval_metrics(models, eval_split, collate))
            metrics.update({f"eval/{name}": value for name, value in means.items()})
        if scored_prompts:
            result = exact_match_accuracy(
                policy, tokenizer, scored_prompts, max_new_tokens=spec.max_new_tokens, stop=spec.stop
            )
            metrics["eval/exact_match"] = result["accuracy"]
        if reference is not None and kl_prompts and spec.kl_samples:
            metrics.update(estimate_kl(policy, reference, tokenizer, kl_prompts, spec, device))
        policy.train()
        if metrics:
            run.metric_log.emit(step_index, metrics)

    def log_samples(step_index: int) -> None:
        rows: list[dict] = []
        policy.eval()
        if sample_prompts:
            rows += sample_comparisons(policy, tokenizer, sample_prompts, reference_texts, spec)
        if pair_samples:
            rows += algo.preference_samples(models, pair_samples, collate, lambda batch: reference_logps(batch, "eval"))
        policy.train()
        if rows:
            reporter.log_samples(step_index, rows)

    return run_steps(run, step, evaluate, log_samples, should_stop)
