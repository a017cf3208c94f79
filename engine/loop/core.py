"""The loop core: what every run does, whatever its method.

`start_run` sets a run up (run directory, seeds, device, models, the algorithm); `Run.set_up_optimisation`
builds the optimizer and schedule and restores a checkpoint; `run_steps` (engine/loop/clock.py) is the
step clock both loops share (stop checks, logging, evaluation, samples and checkpoints at their
intervals, the end of the run and its summary). The offline loop (engine/loop/offline.py) and the online loop
(engine/loop/online.py) only say what one step is and how they evaluate.

A run directory holds: spec.yaml, metrics.jsonl, samples.jsonl, events.jsonl, summary.json,
checkpoints/step-NNNNNNN/ (weights or adapter + optimizer, scheduler, RNG, step) and final/.

A data-parallel run (`num_processes: N`, engine/distributed.py) runs this same code in every rank:
`run.world` says which rank this is; the schedule cuts global batches (N x `batch_size` per micro-batch)
that each rank shards; `accumulate` divides by the step's global units; `clip_gradients` first sums
the gradients over the ranks; rank 0 alone evaluates, reports and writes files. With `parallelism: fsdp`
(engine/sharding.py) each rank holds a shard of the policy: every rank then runs the same passes (filler
micro-batches where its share is empty), and gathers the full weights around what rank 0 runs alone.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from engine.algorithms import build_algorithm
from engine.algorithms.base import Algorithm, Models
from engine.data import prepare
from engine.data.sources import mixture_eval_split, spec_sources
from engine.diskspace import write_text
from engine.distributed import GradientSync, World, rank_device
from engine.errors import CherryError
from engine.loop.checkpoint import (
    TrainState,
    read_checkpoint_state,
    restore,
    resume_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from engine.loop.metrics import CpuMeter, MetricLog, MetricSums
from engine.loop.schedule import Schedule, build_optimizer
from engine.manifest import write_manifest
from engine.models import (
    DTYPE_NAMES,
    Precision,
    count_parameters,
    freeze,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    source_dtype,
    upcast_trainable,
    wrap_lora,
)
from engine.nonfinite import NonFiniteError, first_nonfinite
from engine.reference import Reference
from engine.registry import algorithm_info
from engine.reporting import MultiReporter, NullReporter, Reporter, RunDirReporter
from engine.sharding import (
    clip_sharded_gradients,
    full_model_state,
    full_optimizer_state,
    full_weights,
    is_sharded,
    load_full_optimizer_state,
    load_sharded,
    shard_model,
)

log = logging.getLogger("cherry.engine")
StopCheck = Callable[[], "bool | str | None"]


def build_models(
    spec,
    device: torch.device,
    precision: Precision,
    checkpoint: Path | None,
    algo: Algorithm,
    world: World = World(),
):
    """(policy, reference or None). A checkpoint replaces the starting weights of the policy.

    What trains is in fp32 (a full fine-tune's weights, LoRA adapters); what is frozen (the LoRA base,
    the reference) is in `precision.frozen_dtype`. Under `parallelism: fsdp` the policy comes sharded,
    its weights read by rank 0 alone (engine.sharding.load_sharded).
    """
    use_lora = spec.lora.r > 0
    reward = algorithm_info(spec.algorithm).model_kind == "reward"
    load = load_reward_model if reward else load_causal_lm
    dtype = precision.frozen_dtype
    if use_lora:
        policy = load(spec.model, dtype=dtype, device=device, trust_remote_code=spec.trust_remote_code)
        if checkpoint is not None:
            from peft import PeftModel

            policy = PeftModel.from_pretrained(policy, checkpoint / "model", is_trainable=True)
        else:
            policy = wrap_lora(policy, spec, reward_head=reward)
    else:
        source = str(checkpoint / "model") if checkpoint is not None else spec.model
        if spec.parallelism == "fsdp":
            policy = load_sharded(load, source, world, device, precision.compute, spec.trust_remote_code)
        else:
            policy = load(source, dtype=torch.float32, device=device, trust_remote_code=spec.trust_remote_code)
    upcast_trainable(policy)
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


@dataclass
class Run:
    """One run's shared state: set up by `start_run`, then `set_up_optimisation`, driven by `run_steps`."""

    spec: Any
    out_dir: Path
    reporter: Reporter
    device: torch.device
    dtype: torch.dtype  # the compute dtype (autocast); trainable weights are fp32
    precision: Precision
    save_dtype: torch.dtype  # the final weights' dtype
    algo: Algorithm
    models: Models
    checkpoint: Path | None
    resume: bool
    started: float
    cpu_meter: CpuMeter
    metric_log: MetricLog
    world: World = field(default_factory=World)
    data_stats: dict = field(default_factory=dict)
    schedule: Schedule | None = None
    trainable: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    state: TrainState = field(default_factory=TrainState)

    def set_up_optimisation(self, n_examples: int, chunks_per_step: int, lengths: list[int] | None = None) -> None:
        """The schedule over `n_examples` (length-grouped when given their `lengths`), AdamW over what
        trains (the policy, and a value model when there is one), and the state to continue from."""
        spec, world = self.spec, self.world
        self.schedule = Schedule(
            n_examples,
            batch_size=spec.batch_size * world.size,  # a global micro-batch: each rank takes its shard
            chunks_per_step=chunks_per_step,
            seed=spec.seed,
            epochs=spec.epochs,
            max_steps=spec.max_steps,
            lengths=lengths,
        )
        self.trainable = [p for p in self.models.policy.parameters() if p.requires_grad]
        if self.models.value is not None:
            self.trainable += [p for p in self.models.value.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(spec, self.trainable, self.schedule.total_steps)
        self.models.gradient_sync = GradientSync(self.trainable, world)
        load_optimizer = (
            (lambda state: load_full_optimizer_state(self.trained_models, self.optimizer, state))
            if self.sharded
            else None
        )
        # state.pt is read once: a second read would hold a second copy of the optimizer state
        saved = read_checkpoint_state(self.checkpoint) if self.checkpoint is not None else None
        self.state = restore(
            self.checkpoint, self.resume, self.optimizer, self.scheduler, self.reporter, load_optimizer, saved
        )
        if saved is not None:
            extra = saved["extra"]
            self.algo.load_state_dict(extra.get("algorithm", {}))
            if self.models.value is not None and "value" in extra:
                self.models.value.load_state_dict(extra["value"])
            if self.precision.scaler is not None and "grad_scaler" in extra:
                self.precision.scaler.load_state_dict(extra["grad_scaler"])
        self._continue_world(chunks_per_step, extra if self.checkpoint is not None else {})

    def _continue_world(self, chunks_per_step: int, extra: dict) -> None:
        """Check the global batch against the checkpoint's and give each rank its random generators.

        A resume may change `num_processes` (and `batch_size` / `grad_accum` with it) when the global
        batch stays the same: every step then sees the same examples. Another global batch would change
        which examples each step sees, so it is refused."""
        spec, world, state = self.spec, self.world, self.state
        global_batch = spec.batch_size * world.size * chunks_per_step
        if self.checkpoint is not None and state.global_batch and state.global_batch != global_batch:
            raise CherryError(
                f"this run's checkpoints were written with a global batch of {state.global_batch} "
                f"(batch_size x num_processes x grad_accum) and the resume asks for {global_batch} "
                f"(batch_size={spec.batch_size}, num_processes={world.size}, grad_accum={spec.grad_accum}); "
                "keep the product the same (e.g. halve batch_size when doubling num_processes)"
            )
        if self.checkpoint is not None and state.world_size != world.size:
            self.reporter.log_event(
                "resume",
                f"resumed with {world.size} process(es); the checkpoint was written by {state.world_size} "
                f"(the same global batch of {global_batch}: every step sees the same examples)",
                world_size=world.size,
            )
        same_world = self.checkpoint is not None and state.world_size == world.size and "rank_rng" in extra
        if world.rank > 0:
            if same_world:
                set_rng_states(extra["rank_rng"][world.rank])
            else:  # each rank samples its own completions: its own stream, reproducible from the seed
                torch.manual_seed(spec.seed + 1000 * world.rank + state.step)
                random.seed(spec.seed + 1000 * world.rank + state.step)
        state.world_size, state.global_batch = world.size, global_batch

    def load_data(self, kind: str, cache_dir: str | Path | None = None):
        """The run's dataset as `kind` examples (engine.data.prepare), its train/eval split and stats;
        with `cache_dir`, tokenised once and loaded from `cache_dir/tokenised/` by later runs."""
        spec = self.spec
        data = prepare(
            spec_sources(spec),
            self.models.tokenizer,
            kind=kind,
            max_length=spec.max_length,
            max_prompt_length=spec.max_prompt_length,
            eval_split=mixture_eval_split(spec),
            eval_source=spec.eval_dataset,
            seed=spec.seed,
            overlong=spec.overlong,
            max_rows=spec.max_rows,
            cache_dir=cache_dir,
        )
        self.data_stats = data.stats
        write_manifest(self, data)  # RUN_DIR/manifest.json: versions, commit, data fingerprint (rank 0)
        self.reporter.log_event("data", data.summary(), **data.stats)
        if len(data.sources) > 1 or any(s["column_map"] or s["weight"] < 1 for s in data.sources):
            for line in data.source_lines():
                self.reporter.log_event("data", f"source {line}")
                log.info("data: source %s", line)
        if data.cache_file:
            self.reporter.log_event("data", f"tokenised data loaded from the cache ({data.cache_file})")
        log.info("data: %s", data.summary())
        return data

    def load_eval_prompts(self) -> list[dict]:
        """`eval_prompts` rows (prompt + answer) for greedy exact match, reward and samples."""
        spec = self.spec
        return prepare(
            spec.eval_prompts,
            self.models.tokenizer,
            kind="prompt",
            max_length=spec.max_length,
            max_prompt_length=spec.max_prompt_length,
            eval_split=0.0,
            seed=spec.seed,
        ).train[: spec.eval_max_examples]

    @property
    def sharded(self) -> bool:
        return is_sharded(self.models.policy)

    @property
    def trained_models(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.models.policy, "value": self.models.value}

    def full_weights(self):
        """Every rank enters it; inside, rank 0 (or each rank) may run the policy alone (engine.sharding)."""
        return full_weights(self.models.policy)

    def save_checkpoint(self) -> dict | None:
        """Every rank calls this (their random generators are gathered, a sharded model's shards too);
        rank 0 writes. Returns a sharded model's gathered full state (rank 0's; None when not sharded)."""
        rank_rng = self.world.gather(rng_states())
        model_state = optimizer_state = None
        if self.sharded:
            model_state = full_model_state(self.models.policy)
            optimizer_state = full_optimizer_state(self.trained_models, self.optimizer)
        if not self.world.is_main:
            return model_state
        weights = model_state.items() if model_state is not None else self.models.policy.named_parameters()
        found = first_nonfinite((name, w) for name, w in weights if model_state is not None or w.requires_grad)
        if found is not None:  # never reached through the step checks; a checkpoint must stay a good one
            raise NonFiniteError(f"weight {found[0]} holds {found[1]}; no checkpoint was written from it")
        extra = {"algorithm": self.algo.state_dict()}
        if self.world.active:
            extra["rank_rng"] = rank_rng
        if self.precision.scaler is not None:  # fp16: the loss scale it has grown or shrunk to
            extra["grad_scaler"] = self.precision.scaler.state_dict()
        if self.models.value is not None:
            extra["value"] = self.models.value.state_dict()
        save_checkpoint(
            self.out_dir,
            self.models.policy,
            self.optimizer,
            self.scheduler,
            self.state,
            self.spec.save_total_limit,
            extra,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
        return model_state

    def parameter_counts(self) -> dict[str, int]:
        total, trainable = count_parameters(self.models.policy)
        return {"params": total, "trainable_params": trainable}

    def due(self, every: int) -> bool:
        return every > 0 and self.state.step % every == 0


def run_reporter(spec, out_dir: Path, reporter: Reporter | None, world: World) -> Reporter:
    """Rank 0 writes the run directory (spec.yaml, then metrics, samples and events) besides `reporter`;
    the other ranks report nothing."""
    if not world.is_main:
        return NullReporter()
    run_files = RunDirReporter(out_dir)
    write_text(out_dir / "spec.yaml", spec.to_yaml())
    return MultiReporter(run_files, reporter) if reporter is not None else run_files


def set_threads(spec, world: World) -> None:
    """torch's CPU threads: the spec's `num_threads`, else each CPU rank its share of the run's cores."""
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    elif world.active:  # CPU ranks share the run's cores (a worker slot's share, else the machine's)
        cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // world.size))


def start_run(spec, out_dir: str | Path, reporter: Reporter | None, *, resume: bool, world: World = World()) -> Run:
    """Seed, device and precision, the algorithm, the tokenizer, the policy and its reference.

    Every rank seeds the same way, so each builds the same starting weights (LoRA adapters, a value
    head); rank 0 alone writes the run directory's files."""
    started = time.time()
    out_dir = Path(out_dir)
    reporter = run_reporter(spec, out_dir, reporter, world)
    set_threads(spec, world)
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    device = rank_device(pick_device(spec.device), world)
    dtype = pick_dtype(spec.dtype, device)
    precision = Precision(dtype, device)
    algo = build_algorithm(spec)
    # rank 0 checks the checkpoints (moving an unreadable one aside); every rank resumes from its pick
    checkpoint = resume_checkpoint(out_dir, reporter) if resume and world.is_main else None
    checkpoint = world.broadcast(checkpoint)
    cpu_meter = CpuMeter()  # this run's CPU use between two logged steps

    tokenizer = load_tokenizer(spec.model, spec.trust_remote_code, spec.chat_template)
    policy, reference = build_models(spec, device, precision, checkpoint, algo, world)
    if spec.parallelism == "fsdp" and not is_sharded(policy):
        shard_model(policy, world, device, precision.compute)
    save_dtype = (
        source_dtype(spec.model, spec.trust_remote_code) if spec.save_dtype == "auto" else DTYPE_NAMES[spec.save_dtype]
    )
    models = Models(
        policy=policy,
        tokenizer=tokenizer,
        device=device,
        reference=reference,
        world=world,
        lockstep=spec.parallelism == "fsdp" and world.active,
    )
    return Run(
        spec=spec,
        out_dir=out_dir,
        reporter=reporter,
        device=device,
        dtype=dtype,
        precision=precision,
        save_dtype=save_dtype,
        algo=algo,
        models=models,
        checkpoint=checkpoint,
        resume=resume,
        started=started,
        cpu_meter=cpu_meter,
        metric_log=MetricLog(reporter),
        world=world,
    )


def accumulate(
    algo: Algorithm,
    models: Models,
    micro_batches: list[tuple[dict, list[dict], bool]],
    sums: MetricSums,
    reference_logps: Callable[[dict], torch.Tensor] | None = None,
    precision: Precision | None = None,
    world: World = World(),
) -> int:
    """Forward and backward over one optimizer step's micro-batches (batch, rows, counts); returns the
    tokens seen.

    Each micro-batch adds its share of the step's loss (its sum over the step's units, counted over
    every rank), so accumulation equals one big batch whatever the split into micro-batches and ranks.
    A filler (counts False: a sharded run's stand-in for an empty share, `World.micro_shards`) runs its
    passes with its loss times zero and adds no units, metrics or tokens. `reference_logps(batch)` adds
    the frozen reference's log-probs as batch["ref_logps"] (offline methods that need a reference).
    Forward passes run under the run's autocast; backward outside it, through the fp16 gradient scaler
    when there is one.
    """
    precision = precision or Precision(torch.float32, models.device)
    total_units = world.sum([sum(algo.units(batch) for batch, _, counts in micro_batches if counts)])[0]
    tokens = 0
    for index, (batch, rows, counts) in enumerate(micro_batches):
        if index == len(micro_batches) - 1 and models.gradient_sync is not None:
            models.gradient_sync.arm()  # the step's last backward: its gradients are summed as they become final
        with precision.autocast():
            if reference_logps is not None:
                batch["ref_logps"] = reference_logps(batch)
            loss_sum, metric_sums = algo.loss(models, batch, rows)
        if not counts:
            precision.backward(loss_sum * 0.0)
            continue
        precision.backward(loss_sum / max(total_units, 1e-9))
        sums.add({"loss": loss_sum.item(), **metric_sums}, algo.units(batch))
        tokens += int(batch["attention_mask"].sum())
    return tokens


def clip_gradients(run: Run) -> float:
    """Sum the gradients over the ranks (each rank's loss was already divided by the global units), then
    clip; returns the norm before clipping, the same on every rank. A sharded policy's gradients were
    summed and scattered in backward; the norm then adds every rank's shard."""
    run.models.gradient_sync.finish()
    run.precision.unscale(run.optimizer)
    max_norm = run.spec.max_grad_norm or float("inf")
    if run.sharded:
        return clip_sharded_gradients(run.trainable, max_norm, run.world)
    return float(torch.nn.utils.clip_grad_norm_(run.trainable, max_norm))
