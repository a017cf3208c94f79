"""The step clock both loops share: `run_steps` drives a run from its current step to its end.

Read `run_steps` top to bottom: evaluation before training, then `step_until_done` (stop checks, one
step at a time, its metrics, evaluation, samples and checkpoints at their intervals), then `finish`
(the last checkpoint, the last evaluation, final/ and the summary). The loops (engine/loop/offline.py,
engine/loop/online.py) say what one step is and how they evaluate; the run's set-up is the loop core
(engine/loop/core.py). Every rank of a data-parallel run runs this same code; rank 0 alone evaluates,
reports and writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Callable

from engine.diskspace import tensor_bytes, write_folder, write_text
from engine.errors import CherryError
from engine.loop.core import Run, StopCheck
from engine.loop.metrics import held_state_gb, peak_memory_gb, sys_metrics
from engine.nonfinite import NonFiniteError, skip_step

log = logging.getLogger("cherry.engine")
StepFn = Callable[[int], "tuple[dict[str, float], int]"]
EvalFn = Callable[[int], None]


def run_steps(run: Run, step: StepFn, evaluate: EvalFn, log_samples: EvalFn, should_stop: StopCheck | None) -> dict:
    """The step clock: `step(i)` does step i and returns (its metrics, tokens trained on).

    Evaluates (unless eval_strategy is no) and logs samples at the start, every `eval_steps` / `sample_steps`
    and at the end; checkpoints every `save_steps` and when the run stops. `should_stop` is polled before
    each step (cooperative cancel): a string names the ending ("interrupted" when a worker shuts down),
    True means cancelled. Ctrl+C (KeyboardInterrupt) writes the summary and re-raises without a checkpoint:
    it may land mid-step, so the last checkpoint saved stays the one to resume from (a polite stop,
    such as the foreground's first Ctrl+C, goes through `should_stop`). A NaN/inf in a step
    (engine.nonfinite) skips it while `skip_nonfinite_steps` allows, else ends the run as failed without
    a checkpoint from that step; a full disk (engine.diskspace) ends it as failed too.
    """
    if run.spec.eval_strategy == "no":  # no eval/ metric at all, not even at the start and the end
        evaluate = _no_evaluation
    before: dict[str, float] = {}  # the eval metrics before training: the summary's "before"
    try:
        if run.state.step == 0:
            on_rank_zero(run, partial(evaluate, 0), partial(log_samples, 0))
        before.update(run.metric_log.last)
        try:
            status = step_until_done(run, step, evaluate, log_samples, should_stop)
        except KeyboardInterrupt:
            if run.world.is_main:
                write_summary(run, "interrupted", before)
            raise
        return finish(run, status, evaluate, log_samples, before)
    except CherryError as err:  # NaN/inf, a full disk, a reward function's error: the summary says so
        if run.world.is_main:
            with contextlib.suppress(OSError, CherryError):  # the disk may be the one that is full
                write_summary(run, "failed", before, error=str(err))
        raise


def _no_evaluation(step: int) -> None:
    return None


def step_until_done(run: Run, step: StepFn, evaluate: EvalFn, log_samples: EvalFn, should_stop) -> str:
    """Step until the schedule ends ("completed") or a stop is asked (its status). A NaN/inf that may not
    be skipped ends the run here: the last checkpoint saved stays the one to resume from."""
    state = run.state
    while state.step < run.schedule.total_steps:
        stop = stop_asked(run, should_stop)
        if stop:
            return stop
        step_started = time.time()
        try:
            metrics, tokens = step(state.step)
        except NonFiniteError as err:  # raised on every rank alike, before the optimizer step
            fail_or_skip(run, err)
            metrics, tokens = {}, 0
        state.step += 1
        state.tokens += tokens
        step_seconds = time.time() - step_started
        state.train_seconds += step_seconds
        log_step(run, metrics, tokens, step_seconds)
        at_intervals(run, evaluate, log_samples)
    return "completed"


def stop_asked(run: Run, should_stop: StopCheck | None) -> str | None:
    """Rank 0 polls `should_stop`; every rank gets its answer, so all stop at the same step."""
    stop = should_stop() if should_stop is not None and run.world.is_main else None
    stop = run.world.broadcast(stop)
    if not stop:
        return None
    return stop if isinstance(stop, str) else "cancelled"


def fail_or_skip(run: Run, err: NonFiniteError) -> None:
    """Skip the step that met a NaN/inf (one metrics row says so), or end the run as failed."""
    failure = skip_step(run, err)
    if failure is not None:
        if run.world.is_main:
            run.reporter.log_event("end", f"failed: {failure}", status="failed", step=run.state.step)
        raise NonFiniteError(failure)
    if run.world.is_main:  # the skipped step's one row, whatever logging_steps is
        run.metric_log.emit(run.state.step + 1, {"train/skipped_nonfinite_steps": len(run.state.skipped_nonfinite)})


def log_step(run: Run, metrics: dict[str, float], tokens: int, step_seconds: float) -> None:
    """The step's metrics (with the epoch and the machine's figures) every `logging_steps` and at the end."""
    last = run.state.step == run.schedule.total_steps
    if run.world.is_main and metrics and (run.due(run.spec.logging_steps) or last):
        metrics.setdefault("train/tokens_per_s", tokens / max(step_seconds, 1e-9))
        metrics["train/epoch"] = run.schedule.epoch(run.state.step)
        metrics.update(sys_metrics(run.device, run.cpu_meter))
        run.metric_log.emit(run.state.step, metrics)


def at_intervals(run: Run, evaluate: EvalFn, log_samples: EvalFn) -> None:
    """Evaluation, samples and a checkpoint when the step just done is due one (the last step's come
    with the end of the run, in `finish`)."""
    spec, step = run.spec, run.state.step
    if step == run.schedule.total_steps:
        return
    work = [partial(evaluate, step)] if run.due(spec.eval_steps) else []
    if run.due(spec.sample_steps):
        work.append(partial(log_samples, step))
    on_rank_zero(run, *work)
    if run.due(spec.save_steps):
        run.save_checkpoint()


def finish(run: Run, status: str, evaluate: EvalFn, log_samples: EvalFn, before: dict[str, float]) -> dict:
    """The run's end: a checkpoint, and for a completed run the last evaluation and samples and final/;
    then (rank 0) the end event and the summary, which is returned."""
    state, world = run.state, run.world
    final_state = run.save_checkpoint()  # a sharded policy's full weights, gathered once for both
    if status == "completed":
        on_rank_zero(run, partial(evaluate, state.step), partial(log_samples, state.step))
    if not world.is_main:  # its log (<run dir>/ranks/rank-N.log) says what this rank's process held at most
        log.info(
            "rank %d: %s at step %d, peak memory %.3f GB, weights and optimizer state held %.3f GB",
            world.rank,
            status,
            state.step,
            peak_memory_gb(run.device),
            held_state_gb(run.trainable, run.optimizer),
        )
        return {"status": status, "step": state.step}
    if status == "completed":
        save_final(run, final_state)
    run.reporter.log_event("end", f"{status} at step {state.step}", status=status, step=state.step)
    return write_summary(run, status, before)


def save_final(run: Run, final_state: dict | None) -> None:
    """final/ (and final_value/), each written whole to a .tmp folder and renamed (engine.diskspace)."""
    if final_state is not None:  # the gathered weights, in the model's own dtype
        final_state = {k: v.to(run.save_dtype) if v.is_floating_point() else v for k, v in final_state.items()}
    elif run.spec.lora.r == 0:  # training is over: the fp32 weights go back to the model's own dtype
        run.models.policy.to(run.save_dtype)

    def write(folder: Path) -> None:
        run.models.policy.save_pretrained(folder, state_dict=final_state)
        run.models.tokenizer.save_pretrained(folder)

    policy = run.models.policy
    needed = tensor_bytes(final_state or [p for p in policy.parameters() if p.requires_grad or run.spec.lora.r == 0])
    write_folder(run.out_dir / "final", write, "the final model", needed)
    if run.models.value is not None:
        write_folder(run.out_dir / "final_value", run.models.value.save_pretrained, "the final value model")


def on_rank_zero(run: Run, *work: Callable[[], None]) -> None:
    """Rank 0 runs `work` (evaluation, samples) alone, under the run's autocast, while the other ranks wait.
    Every rank calls it: with a sharded policy every rank first gathers the full weights, which rank 0's
    lone forwards need."""
    if not work:
        return
    with run.full_weights():
        if run.world.is_main:
            with run.precision.autocast():
                for job in work:
                    job()


def write_summary(run: Run, status: str, before: dict[str, float], error: str | None = None) -> dict:
    spec, state = run.spec, run.state
    summary = {
        "status": status,
        "algorithm": spec.algorithm,
        "model": spec.model,
        "dataset": spec.dataset,
        "step": state.step,
        "total_steps": run.schedule.total_steps,
        "wall_seconds": round(time.time() - run.started, 2),
        "train_seconds": round(state.train_seconds, 2),
        "tokens": state.tokens,
        "tokens_per_s": round(state.tokens / max(state.train_seconds, 1e-9), 1),
        "peak_memory_gb": round(peak_memory_gb(run.device), 3),
        "held_state_gb": round(held_state_gb(run.trainable, run.optimizer), 6),  # weights + optimizer state, per rank
        "device": str(run.device),
        "world_size": run.world.size,
        "parallelism": spec.parallelism,
        "dtype": str(run.dtype).removeprefix("torch."),
        "save_dtype": str(run.save_dtype).removeprefix("torch."),
        "before": {k: v for k, v in before.items() if k.startswith("eval/")},
        "final": run.metric_log.last,
        "best": run.metric_log.best,
        "data": run.data_stats,
        "final_dir": str(run.out_dir / "final") if status == "completed" else None,
        "adapter_base": spec.model if spec.lora.r > 0 else None,
        "skipped_nonfinite_steps": state.skipped_nonfinite,  # steps skipped for a NaN/inf (skip_nonfinite_steps)
        "error": error,
        **run.algo.summary(),  # an algorithm's own run-level figures (online DPO's judge block)
    }
    write_text(run.out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
