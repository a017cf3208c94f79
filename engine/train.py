"""The offline training loop: batches from a fixed dataset, one optimizer step at a time.

Read `train` top to bottom: set up, then a plain loop of (micro-batches -> loss -> backward ->
clip -> step), with eval, sample comparisons and checkpoints at their intervals. An algorithm
(engine/algorithms) supplies only the data kind it needs, its batching and its loss.

A run directory holds: spec.yaml, metrics.jsonl, samples.jsonl, events.jsonl, summary.json,
checkpoints/step-NNNNNNN/ (weights or adapter + optimizer, scheduler, RNG, step) and final/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from engine.algorithms import build_algorithm
from engine.data import prepare
from engine.errors import CherryError
from engine.evaluate import exact_match_accuracy
from engine.generation import decode_completions, generate
from engine.logprobs import completion_logps
from engine.batching import collate_completions
from engine.models import (
    count_parameters,
    freeze,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    wrap_lora,
)
from engine.reference import PrecomputedReference, Reference, fingerprint_examples, fingerprint_model
from engine.reporting import MultiReporter, Reporter, RunDirReporter
from engine.rewards import exact_match
from engine.spec import ONLINE_ALGORITHMS, RunSpec

log = logging.getLogger("cherry.engine")


# ----------------------------------------------------------------------------- data order


class Schedule:
    """Which examples each optimizer step sees. A pure function of the step, so resume is exact."""

    def __init__(self, n_examples: int, spec: RunSpec):
        self.n = n_examples
        self.batch_size = spec.batch_size
        self.grad_accum = spec.grad_accum
        self.seed = spec.seed
        self.chunks_per_epoch = math.ceil(n_examples / spec.batch_size)
        self.steps_per_epoch = math.ceil(self.chunks_per_epoch / spec.grad_accum)
        self.total_steps = spec.max_steps or max(1, math.ceil(spec.epochs * self.steps_per_epoch))
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n, generator=generator).tolist())
        return self._order[1]

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        first = position * self.grad_accum
        last = min(first + self.grad_accum, self.chunks_per_epoch)
        return [order[c * self.batch_size : (c + 1) * self.batch_size] for c in range(first, last)]

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """The lr multiplier of optimizer step `step` (0-based): linear warmup, then by `kind`

    - linear / cosine: decay to 0 at `total_steps`; constant: 1;
    - inverse_sqrt (the ORPO paper's schedule): sqrt(warmup / s) at the 1-based step s, so 1 at the
      end of the warmup and half of it at 4x the warmup, whatever `total_steps` is. Without warmup it
      decays as if the warmup were one step: 1, 1/sqrt(2), 1/sqrt(3), ...
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "inverse_sqrt":
        return math.sqrt(max(1, warmup_steps) / (step + 1))
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


class MetricSums:
    """Accumulates an algorithm's metric sums over micro-batches and eval batches.

    A metric is either a plain sum (averaged over the step's units: pairs, examples or tokens) or
    a `(sum, count)` pair with its own denominator (e.g. KTO's reward of desirable rows only).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, float | tuple[float, float]], units: int) -> None:
        for name, value in metrics.items():
            total, count = value if isinstance(value, tuple) else (value, units)
            self.sums[name] += total
            self.counts[name] += count

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items() if self.counts[name] > 0}


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(CherryError):
    """A checkpoint cannot be read back (truncated, tampered with, or from another run)."""


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0


_CHECKPOINT_NAME = re.compile(r"step-\d+")
STATE_KEYS = ("state", "optimizer", "scheduler", "rng", "extra")


def checkpoints(out_dir: Path) -> list[Path]:
    """A run's complete checkpoints, oldest first (not a half-written `.tmp` nor one moved aside)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name))


def save_checkpoint(out_dir: Path, policy, optimizer, scheduler, state: TrainState, keep: int, extra: dict | None = None) -> Path:
    """`extra`: more state to restore on resume (an online method's value model, KL coefficient).

    state.pt holds only tensors and plain values (dicts, lists, tuples, numbers, strings), so it
    loads with `torch.load(weights_only=True)`: reading a checkpoint never runs code from the file.
    """
    folder = Path(out_dir) / "checkpoints"
    final = folder / f"step-{state.step:07d}"
    tmp = folder / f"step-{state.step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp / "model")
    torch.save(
        {
            "state": asdict(state),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "extra": extra or {},
        },
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a save killed half-way leaves only a .tmp folder, never a broken checkpoint
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_state(checkpoint: Path, *, mmap: bool = False) -> dict:
    """state.pt as saved, read with weights_only=True (tensors and plain values; any other object in
    the file is refused, never constructed). `mmap` maps tensors lazily onto the CPU: a cheap full check
    of the file that allocates nothing on a GPU."""
    path = Path(checkpoint) / "state.pt"
    try:
        saved = torch.load(path, weights_only=True, mmap=mmap, map_location="cpu" if mmap else None)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint} has no state.pt") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, a pickle naming code, bad bytes: all one answer
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint file {path} cannot be read safely ({reason})") from None
    if not isinstance(saved, dict) or not set(STATE_KEYS) <= set(saved):
        raise CheckpointError(f"checkpoint file {path} is not a Cherry checkpoint (no {', '.join(STATE_KEYS)})")
    return saved


def check_checkpoint(checkpoint: Path) -> None:
    """Raise CheckpointError unless `checkpoint` reads back whole: its state.pt and its weights' headers."""
    from safetensors import safe_open

    read_checkpoint_state(checkpoint, mmap=True)
    model = Path(checkpoint) / "model"
    weights = sorted(model.glob("*.safetensors"))
    if not weights or not any((model / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise CheckpointError(f"checkpoint {checkpoint} has no saved model in {model}")
    for file in weights:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint weights {file} cannot be read ({err})") from None


def resume_checkpoint(out_dir: Path, reporter: Reporter) -> Path | None:
    """The newest checkpoint that reads back whole. A newer one that does not (truncated, tampered) is
    moved aside to `step-N.unreadable`, kept for inspection, and the run continues from the one before."""
    for checkpoint in reversed(checkpoints(out_dir)):
        try:
            check_checkpoint(checkpoint)
            return checkpoint
        except CheckpointError as err:
            aside = checkpoint.with_name(checkpoint.name + ".unreadable")
            shutil.rmtree(aside, ignore_errors=True)
            checkpoint.rename(aside)
            message = f"{err}; moved it aside to {aside.name} and resuming from the checkpoint before it"
            reporter.log_event("warning", message, checkpoint=checkpoint.name)
            log.warning("warning: %s", message)
    return None


def load_extra_state(checkpoint: Path) -> dict:
    """What `save_checkpoint(..., extra=...)` stored ({} for offline runs)."""
    return read_checkpoint_state(checkpoint)["extra"]


def load_training_state(checkpoint: Path, optimizer, scheduler) -> TrainState:
    saved = read_checkpoint_state(checkpoint)
    try:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        return TrainState(**saved["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit this run ({err}); move it aside "
            f"(mv {checkpoint} {checkpoint}.unreadable) and resume again to continue from the one before"
        ) from None


# ----------------------------------------------------------------------------- models


def build_models(spec: RunSpec, device: torch.device, dtype: torch.dtype, checkpoint: Path | None, algo):
    """(policy, reference or None). A checkpoint replaces the starting weights of the policy."""
    use_lora = spec.lora.r > 0
    reward = algo.model_kind == "reward"
    load = load_reward_model if reward else load_causal_lm
    if use_lora:
        policy = load(spec.model, dtype=dtype, device=device, trust_remote_code=spec.trust_remote_code)
        if checkpoint is not None:
            from peft import PeftModel

            policy = PeftModel.from_pretrained(policy, checkpoint / "model", is_trainable=True)
        else:
            policy = wrap_lora(policy, spec, reward_head=reward)
    else:
        source = str(checkpoint / "model") if checkpoint is not None else spec.model
        policy = load(source, dtype=dtype, device=device, trust_remote_code=spec.trust_remote_code)
    if spec.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if use_lora:
            policy.enable_input_require_grads()
    policy.train()

    if not algo.needs_reference:
        return policy, None
    if use_lora and not spec.ref_model:
        return policy, Reference(adapter_policy=policy)
    ref_source = spec.ref_model or spec.model
    ref = freeze(load_causal_lm(ref_source, dtype=dtype, device=device, trust_remote_code=spec.trust_remote_code))
    return policy, Reference(model=ref)


# ----------------------------------------------------------------------------- eval pieces


def cpu_percent(before: tuple[float, float] | None, now: tuple[float, float]) -> float | None:
    """CPU use of a process between two (wall seconds, CPU seconds) readings, in percent of one core
    (200 = two cores busy); None without an earlier reading or when no wall time has passed."""
    if before is None:
        return None
    wall = now[0] - before[0]
    if wall <= 0:
        return None
    return max(0.0, (now[1] - before[1]) / wall * 100.0)


class CpuMeter:
    """This process's CPU use since the previous reading (`read`), from its CPU time (user + system)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, cpu_time: Callable[[], float] = time.process_time):
        self.clock, self.cpu_time = clock, cpu_time
        self.last: tuple[float, float] | None = (clock(), cpu_time())

    def read(self) -> float | None:
        now = (self.clock(), self.cpu_time())
        pct, self.last = cpu_percent(self.last, now), now
        return pct


def _gpu_util(device: torch.device) -> float | None:
    """The GPU's utilisation (percent of the last sample period busy) from NVML; None without pynvml."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # pynvml missing, or NVML cannot see the device
        return None


def _sys_metrics(device: torch.device, cpu_meter: CpuMeter | None = None) -> dict[str, float]:
    """GPU memory and utilisation on a GPU, RSS otherwise; CPU % since the meter's last reading."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        out["sys/gpu_mem_gb"] = torch.cuda.memory_allocated(device) / 2**30
        util = _gpu_util(device)
        if util is not None:
            out["sys/gpu_util"] = util
    else:
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            out["sys/rss_gb"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**30
        except OSError:  # not Linux
            pass
    cpu = cpu_meter.read() if cpu_meter is not None else None
    if cpu is not None:
        out["sys/cpu_percent"] = cpu
    return out


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@torch.no_grad()
def estimate_kl(policy, reference: Reference, tokenizer, prompts: list[dict], spec: RunSpec, device) -> dict[str, float]:
    """KL(policy || reference) on policy samples: mean over sequences of sum_t k1, and of sum_t k3."""
    prompt_ids = [p["prompt_ids"] for p in prompts]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        completions = generate(policy, tokenizer, prompt_ids, max_new_tokens=spec.max_new_tokens, temperature=1.0)
    eos = tokenizer.eos_token_id
    # A completion shorter than the limit stopped at EOS, which is part of what was sampled.
    completions = [c + [eos] if len(c) < spec.max_new_tokens else c for c in completions]
    keep = [i for i, c in enumerate(completions) if c]
    if not keep:
        return {}
    batch = collate_completions([prompt_ids[i] for i in keep], [completions[i] for i in keep], tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = policy.training
    policy.eval()
    pol = completion_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    policy.train(was_training)
    with reference.model() as ref:
        ref_out = completion_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    log_ratio = pol.token_logps - ref_out.token_logps
    k1 = torch.zeros_like(pol.sums).index_add(0, pol.token_rows, log_ratio)
    k3 = torch.zeros_like(pol.sums).index_add(0, pol.token_rows, torch.expm1(-log_ratio) + log_ratio)
    return {"kl/mean": k1.mean().item(), "kl/k3_mean": k3.mean().item()}


class MetricLog:
    """Sends metrics to the reporter and keeps the latest value and the best eval value of each."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.last: dict[str, float] = {}
        self.best: dict[str, float] = {}

    def emit(self, step: int, metrics: dict[str, float]) -> None:
        self.reporter.log_metrics(step, metrics)
        self.last.update(metrics)
        for name, value in metrics.items():
            if name.startswith("eval/"):
                better = min if "loss" in name else max
                self.best[name] = better(self.best.get(name, value), value)


def restore(checkpoint: Path | None, resume: bool, optimizer, scheduler, reporter: Reporter) -> TrainState:
    """The state to continue from: the checkpoint's (metrics after it are dropped), or a fresh start."""
    if checkpoint is not None:
        state = load_training_state(checkpoint, optimizer, scheduler)
        reporter.rewind(state.step)
        reporter.log_event("resume", f"resumed from {checkpoint.name}", step=state.step)
        return state
    if resume:
        reporter.rewind(-1)  # stopped before its first checkpoint: start over without duplicate rows
        reporter.log_event("resume", "no checkpoint yet: starting from step 0")
    return TrainState()


def reference_completions(policy, reference: Reference | None, tokenizer, prompts: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy completions of the reference (the policy itself when there is none) for sample comparisons."""
    if not prompts:
        return []
    ref_ctx = reference.model() if reference is not None else contextlib.nullcontext(policy)
    with ref_ctx as ref_model:
        return decode_completions(tokenizer, generate(ref_model, tokenizer, [p["prompt_ids"] for p in prompts], max_new_tokens=max_new_tokens))


def sample_comparisons(policy, tokenizer, prompts: list[dict], reference_texts: list[str], spec: RunSpec) -> list[dict]:
    """Greedy policy completions beside the reference's, with verifier scores when answers exist."""
    ids = generate(policy, tokenizer, [p["prompt_ids"] for p in prompts], max_new_tokens=spec.max_new_tokens)
    policy_texts = decode_completions(tokenizer, ids)
    rows = []
    for prompt, ref_text, pol_text in zip(prompts, reference_texts, policy_texts):
        row = {"prompt": prompt["prompt"], "reference": ref_text, "policy": pol_text, "answer": prompt.get("answer")}
        if prompt.get("answer") is not None:
            row["reference_score"] = exact_match(ref_text, prompt["answer"])
            row["policy_score"] = exact_match(pol_text, prompt["answer"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the loop


def train(
    spec: RunSpec,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    *,
    should_stop: Callable[[], bool | str | None] | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train `spec` into `out_dir`; returns the summary (also written to summary.json).

    `should_stop` is polled once per step (cooperative cancel): the run then saves a checkpoint
    and ends with status "cancelled" (or the status string it returned, e.g. "interrupted").
    `resume=True` continues from the newest checkpoint, or starts over when there is none.
    """
    if spec.algorithm in ONLINE_ALGORITHMS:  # sample -> score -> update: its own loop
        from engine.online import train_online

        return train_online(spec, out_dir, reporter, should_stop=should_stop, resume=resume)
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
    cpu_meter = CpuMeter()  # this run's CPU use between two logged steps

    # --- models and data
    tokenizer = load_tokenizer(spec.model, spec.trust_remote_code)
    policy, reference = build_models(spec, device, dtype, checkpoint, algo)
    if algo.model_kind == "reward":
        policy.config.pad_token_id = tokenizer.pad_token_id  # so a saved RM pools right in other tools
    total_params, trainable_params = count_parameters(policy)
    data = prepare(
        spec.dataset, tokenizer, kind=algo.kind, max_length=spec.max_length, max_prompt_length=spec.max_prompt_length,
        eval_split=spec.eval_split, eval_source=spec.eval_dataset, seed=spec.seed, overlong=spec.overlong,
        max_rows=spec.max_rows,
    )
    reporter.log_event("data", data.summary(), **data.stats)
    log.info("data: %s", data.summary())
    eval_split = data.eval[: spec.eval_max_examples]
    algo.prepare_examples(data.train, tokenizer)
    algo.prepare_examples(eval_split, tokenizer)
    for warning in algo.warnings(data.train):
        reporter.log_event("warning", warning)
        log.warning("warning: %s", warning)
    if not algo.generates:
        prompt_set = []
    elif spec.eval_prompts:
        prompt_set = prepare(
            spec.eval_prompts, tokenizer, kind="prompt", max_length=spec.max_length,
            max_prompt_length=spec.max_prompt_length, eval_split=0.0, seed=spec.seed,
        ).train[: spec.eval_max_examples]
    else:
        prompt_set = [{"prompt_ids": ex["prompt_ids"], "prompt": ex["prompt"]} for ex in eval_split]
    prompt_set = [{**p, "prompt_ids": algo.generation_prompt(p["prompt_ids"])} for p in prompt_set]
    scored_prompts = [p for p in prompt_set if p.get("answer") is not None]
    sample_prompts = prompt_set[: spec.num_samples]
    kl_prompts = prompt_set[: spec.kl_samples]

    collate = partial(algo.collate, pad_id=tokenizer.pad_token_id)
    to_device = lambda batch: {k: v.to(device) for k, v in batch.items()}  # noqa: E731
    ref_table = None
    if algo.needs_reference and spec.precompute_ref_logps:
        key_keys = ("prompt_ids", "chosen_ids", "rejected_ids")
        key = "-".join(
            [
                fingerprint_model(spec.ref_model or spec.model, dtype) + ("-base" if spec.lora.r and not spec.ref_model else ""),
                fingerprint_examples(data.train, key_keys),
                fingerprint_examples(eval_split, key_keys),
            ]
        )
        cache_file = Path(cache_dir) / "ref_logps" / f"{key}.safetensors" if cache_dir else None
        ref_table = PrecomputedReference.build(
            {"train": data.train, "eval": eval_split}, collate, reference, rows_per_example=algo.rows_per_example,
            batch_size=spec.batch_size, device=device, cache_file=cache_file,
        )

    def reference_logps(batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        if ref_table is not None:
            return ref_table.lookup(split, batch["index"].cpu()).to(device)
        return reference.logps(batch)

    # --- optimisation
    schedule = Schedule(len(data.train), spec)
    warmup_steps = spec.warmup_steps or int(spec.warmup_ratio * schedule.total_steps)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=spec.lr, betas=(spec.adam_beta1, spec.adam_beta2), weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule.total_steps, warmup_steps, spec.lr_scheduler)
    )
    state = restore(checkpoint, resume, optimizer, scheduler, reporter)
    reporter.log_event(
        "start", f"{spec.algorithm}: {schedule.total_steps} steps on {len(data.train)} examples ({device}, {dtype})"
        + spec.followed_note,
        total_steps=schedule.total_steps, step=state.step, params=total_params, trainable_params=trainable_params,
    )

    # --- evaluation: the eval split's loss, exact match, KL, and sample comparisons
    metric_log = MetricLog(reporter)
    emit = metric_log.emit
    reference_texts = reference_completions(policy, reference, tokenizer, sample_prompts, spec.max_new_tokens)

    @torch.no_grad()
    def evaluate(step: int) -> None:
        policy.eval()
        metrics: dict[str, float] = {}
        if eval_split:
            sums = MetricSums()
            for start in range(0, len(eval_split), spec.batch_size):
                batch = to_device(collate(eval_split[start : start + spec.batch_size]))
                ref_logps = reference_logps(batch, "eval") if algo.needs_reference else None
                loss_sum, metric_sums = algo.loss(policy, batch, ref_logps)
                units = algo.units(batch)
                sums.add({"loss": loss_sum.item(), **metric_sums}, units)
            means = sums.means()
            means.update(algo.derived_metrics(means))
            means.update(algo.eval_metrics(policy, eval_split, collate))
            metrics.update({f"eval/{name}": value for name, value in means.items()})
        if scored_prompts:
            result = exact_match_accuracy(policy, tokenizer, scored_prompts, max_new_tokens=spec.max_new_tokens)
            metrics["eval/exact_match"] = result["accuracy"]
        if reference is not None and kl_prompts and spec.kl_samples:
            metrics.update(estimate_kl(policy, reference, tokenizer, kl_prompts, spec, device))
        policy.train()
        if metrics:
            emit(step, metrics)

    pair_samples = eval_split[: spec.num_samples]  # preference methods: chosen vs rejected with their rewards

    def log_samples(step: int) -> None:
        rows: list[dict] = []
        policy.eval()
        if sample_prompts:
            rows += sample_comparisons(policy, tokenizer, sample_prompts, reference_texts, spec)
        if pair_samples:
            rows += algo.preference_samples(policy, pair_samples, collate, lambda batch: reference_logps(batch, "eval"))
        policy.train()
        if rows:
            reporter.log_samples(step, rows)

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
                # A string names the ending ("interrupted" when a worker shuts down); True means cancelled.
                status = stop if isinstance(stop, str) else "cancelled"
                break
            step_started = time.time()
            micro_batches = [to_device(collate([data.train[i] for i in idx])) for idx in schedule.micro_batches(state.step)]
            total_units = sum(algo.units(b) for b in micro_batches)
            sums = MetricSums()
            step_tokens = 0
            for batch in micro_batches:
                ref_logps = reference_logps(batch, "train") if algo.needs_reference else None
                loss_sum, metric_sums = algo.loss(policy, batch, ref_logps)
                # Each micro-batch adds its share, so accumulation equals one big batch.
                (loss_sum / total_units).backward()
                sums.add({"loss": loss_sum.item(), **metric_sums}, algo.units(batch))
                step_tokens += int(batch["attention_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, spec.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += step_tokens
            step_seconds = time.time() - step_started
            state.train_seconds += step_seconds

            if due(spec.logging_steps) or state.step == schedule.total_steps:
                means = sums.means()
                means.update(algo.derived_metrics(means))
                metrics = {f"train/{name}" if name == "loss" else name: value for name, value in means.items()}
                metrics.update(
                    {
                        "train/grad_norm": float(grad_norm),
                        "train/lr": lr,
                        "train/epoch": schedule.epoch(state.step),
                        "train/tokens_per_s": step_tokens / max(step_seconds, 1e-9),
                        **_sys_metrics(device, cpu_meter),
                    }
                )
                emit(state.step, metrics)
            if due(spec.eval_steps) and state.step < schedule.total_steps:
                evaluate(state.step)
            if due(spec.sample_steps) and state.step < schedule.total_steps:
                log_samples(state.step)
            if due(spec.save_steps) and state.step < schedule.total_steps:
                save_checkpoint(out_dir, policy, optimizer, scheduler, state, spec.save_total_limit)
    except KeyboardInterrupt:
        # An interrupt may land mid-step (weights half-updated, RNG advanced): a checkpoint taken now
        # would not resume exactly, so the last one saved stays the one to resume from. A polite
        # stop goes through `should_stop` instead (the foreground's first Ctrl+C does).
        _write_summary(out_dir, "interrupted", spec, state, schedule, before, metric_log.last, metric_log.best, started, device, data.stats)
        raise

    save_checkpoint(out_dir, policy, optimizer, scheduler, state, spec.save_total_limit)
    if status == "completed":
        evaluate(state.step)
        log_samples(state.step)
        final = out_dir / "final"
        policy.save_pretrained(final)
        tokenizer.save_pretrained(final)
    reporter.log_event("end", f"{status} at step {state.step}", status=status, step=state.step)
    return _write_summary(out_dir, status, spec, state, schedule, before, metric_log.last, metric_log.best, started, device, data.stats)


def _write_summary(out_dir, status, spec, state, schedule, before, last, best, started, device, data_stats) -> dict:
    summary = {
        "status": status,
        "algorithm": spec.algorithm,
        "model": spec.model,
        "dataset": spec.dataset,
        "step": state.step,
        "total_steps": schedule.total_steps,
        "wall_seconds": round(time.time() - started, 2),
        "train_seconds": round(state.train_seconds, 2),
        "tokens": state.tokens,
        "tokens_per_s": round(state.tokens / max(state.train_seconds, 1e-9), 1),
        "peak_memory_gb": round(_peak_memory_gb(device), 3),
        "device": str(device),
        "before": {k: v for k, v in before.items() if k.startswith("eval/")},
        "final": last,
        "best": best,
        "data": data_stats,
        "final_dir": str(Path(out_dir) / "final") if status == "completed" else None,
        "adapter_base": spec.model if spec.lora.r > 0 else None,
    }
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
