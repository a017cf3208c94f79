"""`cherry bench`: Cherry against TRL on the same model, rows and settings (`--against trl`, each side
in a fresh process, benchmarks/training/against.py); ablations that switch one engine optimisation off
(`--against ablation`); time to the first step, cold and warm (`start`, benchmarks/training/start.py); the
overlapped gradient sum on 2 CPU processes (`gradsync`, benchmarks/training/gradient_sync.py); the
several-machines queue under load (benchmarks/queue_load.py); a GPU check. `cherry bench ARGS` reaches
this command line through the thin entry tuiapp/cli/bench.py, which hands it ARGS."""

from __future__ import annotations

import json

import typer

from jobs import CherryError
from tuiapp.cli.options import friendly

bench_app = typer.Typer(
    help="Benchmarks: Cherry against TRL (same model, rows and settings), ablations, the queue under load.",
    context_settings={"help_option_names": ["-h", "--help"]},  # as `cherry`'s own
    add_completion=False,
)

SHAPE_OPTION = typer.Option(
    "tiny",
    "--shape",
    help="tiny (seconds) | head-heavy (151,936 vocabulary, small body) | body-heavy (32k vocabulary, 8 layers x 512)"
    " | prompt-heavy (8k vocabulary, 4 layers x 256, prompts 3x the completions)"
    " | varied-lengths (prompt-heavy's model, row lengths varying tenfold; Cherry padded as well).",
)
STEPS_OPTION = typer.Option(3, "--steps", help="Timed steps per side (median reported), after the warm-up.")
WARMUP_OPTION = typer.Option(1, "--warmup", help="Untimed warm-up steps per side.")
THREADS_OPTION = typer.Option(1, "--threads", help="CPU threads, the same on both sides.")
DEVICE_OPTION = typer.Option("auto", "--device", help="auto | cpu | cuda")
JSON_OPTION = typer.Option(False, "--json", help="Print the full result as JSON.")


def against_trl(
    method: str,
    shape: str,
    steps: int,
    warmup: int,
    threads: int,
    device: str,
    as_json: bool,
    new_tokens: int | None = None,
) -> None:
    """Run `method` on Cherry and on TRL at `shape` (online: at each completion length) and print the table."""
    from benchmarks.training import bench_device
    from benchmarks.training.against import SHAPES, compare, report_lines, trl_missing, versions
    from engine.registry import is_online

    if shape not in SHAPES:
        raise CherryError(f"--shape must be one of {', '.join(SHAPES)} (got {shape!r})")
    for name, value in (("--steps", steps), ("--threads", threads)):
        if value < 1:
            raise CherryError(f"{name} must be >= 1 (got {value})")
    if warmup < 0:
        raise CherryError(f"--warmup must be >= 0 (got {warmup})")
    if new_tokens is not None and new_tokens < 1:
        raise CherryError(f"--new-tokens must be >= 1 (got {new_tokens})")
    missing = trl_missing()
    if missing:
        raise CherryError(f"cherry bench {method} --against trl: {missing}; nothing was measured")
    lengths = [new_tokens] if new_tokens else list(SHAPES[shape].new_tokens) if is_online(method) else [None]
    results = []
    for length in lengths:
        try:
            result = compare(
                method,
                shape,
                steps=steps,
                warmup=warmup,
                threads=threads,
                device=str(bench_device(device)),
                new_tokens=length,
            )
        except RuntimeError as err:
            raise CherryError(str(err)) from None
        results.append(result)
        if not as_json:
            for line in report_lines(result):
                typer.echo(line)
    if as_json:
        typer.echo(json.dumps({"versions": versions(), "results": results}, indent=2))
    else:
        typer.echo(", ".join(f"{name} {version}" for name, version in versions().items()))


def check_against(against: str, ablation: bool) -> None:
    allowed = ("trl", "ablation") if ablation else ("trl",)
    if against not in allowed:
        raise CherryError(f"--against must be {' or '.join(allowed)} (got {against!r})")


@bench_app.command("dpo")
@friendly
def bench_dpo(
    against: str = typer.Option(
        "trl", "--against", help="trl: Cherry vs TRL's DPOTrainer | ablation: completion-only log-probs switched off."
    ),
    shape: str = SHAPE_OPTION,
    steps: int = STEPS_OPTION,
    warmup: int = WARMUP_OPTION,
    threads: int = THREADS_OPTION,
    device: str = DEVICE_OPTION,
    seq_len: int = typer.Option(256, help="Ablation only: tokens per sequence (prompt + completion)."),
    prompt_len: int = typer.Option(192, help="Ablation only: prompt tokens per sequence."),
    pairs: int = typer.Option(8, help="Ablation only: preference pairs per step."),
    vocab: int = typer.Option(32000, help="Ablation only: vocabulary size of the tiny model."),
    hidden: int = typer.Option(256, help="Ablation only: hidden size of the tiny model."),
    layers: int = typer.Option(2, help="Ablation only: transformer layers."),
    as_json: bool = JSON_OPTION,
) -> None:
    """DPO: Cherry vs TRL's DPOTrainer (tokens/s, step time, peak memory, first-step losses), or the
    completion-only log-prob ablation."""
    check_against(against, ablation=True)
    if against == "trl":
        against_trl("dpo", shape, steps, warmup, threads, device, as_json)
        return
    from benchmarks.training.dpo import BenchConfig, compare

    if not 0 < prompt_len < seq_len:
        raise CherryError(f"--prompt-len must be between 1 and --seq-len - 1 (got {prompt_len} with seq-len {seq_len})")
    cfg = BenchConfig(
        seq_len=seq_len,
        prompt_len=prompt_len,
        pairs=pairs,
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        steps=steps,
        warmup=warmup,
        threads=threads,
        device=device,
    )
    result = compare(cfg)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    kept, full = result["completion_only"], result["full_logits"]
    typer.echo(
        f"Ablation (not a comparison with another tool): a DPO step with the LM head on completion positions only, "
        f"then with full logits at every position; {pairs} pairs x {seq_len} tokens (prompt {prompt_len}), "
        f"vocab {vocab}, hidden {hidden} x {layers} layers, {kept['device']}; median of {steps} steps"
    )
    typer.echo(f"{'path':16s} {'tokens/s':>10s} {'step s':>8s} {'peak GB':>8s}")
    for row in (kept, full):
        typer.echo(
            f"{row['path']:16s} {row['tokens_per_s']:10.0f} {row['step_seconds']:8.3f} {row['peak_mem_gb']:8.3f}"
        )
    typer.echo(
        f"full logits: {1 / result['throughput_ratio']:.2f}x the completion-only tokens/s, "
        f"{result['memory_ratio']:.2f}x its memory ({kept['memory']}); |loss difference| {result['loss_abs_diff']:.2e}"
    )


@bench_app.command("kto")
@friendly
def bench_kto(
    against: str = typer.Option("trl", "--against", help="trl: Cherry vs TRL's KTOTrainer."),
    shape: str = SHAPE_OPTION,
    steps: int = STEPS_OPTION,
    warmup: int = WARMUP_OPTION,
    threads: int = THREADS_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """KTO: Cherry vs TRL's KTOTrainer (the mismatched KL rows are trained tokens on both sides)."""
    check_against(against, ablation=False)
    against_trl("kto", shape, steps, warmup, threads, device, as_json)


@bench_app.command("sft")
@friendly
def bench_sft(
    against: str = typer.Option("trl", "--against", help="trl: Cherry vs TRL's SFTTrainer (completion-only loss)."),
    shape: str = SHAPE_OPTION,
    steps: int = STEPS_OPTION,
    warmup: int = WARMUP_OPTION,
    threads: int = THREADS_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """SFT: Cherry vs TRL's SFTTrainer, loss on completion tokens."""
    check_against(against, ablation=False)
    against_trl("sft", shape, steps, warmup, threads, device, as_json)


NEW_TOKENS_OPTION = typer.Option(
    None, "--new-tokens", help="Tokens sampled per completion; default: each of the shape's (8, and 64 past tiny)."
)


@bench_app.command("grpo")
@friendly
def bench_grpo(
    against: str = typer.Option(
        "trl", "--against", help="trl: Cherry vs TRL's GRPOTrainer | ablation: completion-only log-probs switched off."
    ),
    shape: str = SHAPE_OPTION,
    new_tokens: int | None = NEW_TOKENS_OPTION,
    steps: int = STEPS_OPTION,
    warmup: int = WARMUP_OPTION,
    threads: int = THREADS_OPTION,
    device: str = DEVICE_OPTION,
    prompts: int = typer.Option(8, help="Ablation only: prompts per step."),
    k: int = typer.Option(8, "--k", help="Ablation only: samples per prompt."),
    prompt_len: int = typer.Option(64, help="Ablation only: longest prompt."),
    vocab: int = typer.Option(32000, help="Ablation only: vocabulary size of the tiny model."),
    hidden: int = typer.Option(256, help="Ablation only: hidden size of the tiny model."),
    layers: int = typer.Option(2, help="Ablation only: transformer layers."),
    as_json: bool = JSON_OPTION,
) -> None:
    """GRPO: Cherry vs TRL's GRPOTrainer (completions/s, rollout and update timed apart), or the
    completion-only log-prob ablation of the update."""
    check_against(against, ablation=True)
    if against == "trl":
        against_trl("grpo", shape, steps, warmup, threads, device, as_json, new_tokens)
        return
    from benchmarks.training.grpo import GRPOBenchConfig, run

    max_new = new_tokens or 32
    for name, value in (("--prompts", prompts), ("--k", k), ("--prompt-len", prompt_len), ("--steps", steps)):
        if value < 1:
            raise CherryError(f"{name} must be >= 1 (got {value})")
    cfg = GRPOBenchConfig(
        prompts=prompts,
        k=k,
        prompt_len=prompt_len,
        max_new_tokens=max_new,
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        repeats=steps,
        threads=threads,
        device=device,
    )
    result = run(cfg)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"Ablation (not a comparison with another tool): a GRPO update with the LM head on completion positions "
        f"only, then with full logits; {prompts} prompts x {k} samples x {max_new} new tokens, vocab {vocab}, "
        f"hidden {hidden} x {layers} layers, {result['device']}; median of {steps}"
    )
    typer.echo(f"{'phase':24s} {'samples/s':>10s} {'tokens/s':>10s} {'seconds':>8s}")
    for name in ("rollout", "update_completion_only", "update_full_logits"):
        row = result[name]
        typer.echo(f"{name:24s} {row['samples_per_s']:10.1f} {row['tokens_per_s']:10.0f} {row['seconds']:8.3f}")
    typer.echo(f"update with full logits: {1 / result['update_ratio']:.2f}x the completion-only tokens/s")


@bench_app.command("rloo")
@friendly
def bench_rloo(
    against: str = typer.Option("trl", "--against", help="trl: Cherry vs TRL's RLOOTrainer."),
    shape: str = SHAPE_OPTION,
    new_tokens: int | None = NEW_TOKENS_OPTION,
    steps: int = STEPS_OPTION,
    warmup: int = WARMUP_OPTION,
    threads: int = THREADS_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """RLOO: Cherry vs TRL's RLOOTrainer (completions/s, rollout and update timed apart)."""
    check_against(against, ablation=False)
    against_trl("rloo", shape, steps, warmup, threads, device, as_json, new_tokens)


@bench_app.command("start")
@friendly
def bench_start(
    against: str = typer.Option(
        "trl", "--against", help="trl: also TRL's DPOTrainer set-up on the same file | none: Cherry cold and warm only."
    ),
    rows: int = typer.Option(60000, "--rows", help="Rows of the generated conversational preference file."),
    threads: int = THREADS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Time from process start to the first DPO step on a large conversational preference file: Cherry
    with an empty tokenised-data cache (cold), with it filled (warm), and TRL's DPOTrainer (each a fresh process)."""
    from benchmarks.training.against import trl_missing, versions
    from benchmarks.training.start import compare_start, report_lines

    if against not in ("trl", "none"):
        raise CherryError(f"--against must be trl or none (got {against!r})")
    for name, value in (("--rows", rows), ("--threads", threads)):
        if value < 1:
            raise CherryError(f"{name} must be >= 1 (got {value})")
    missing = trl_missing() if against == "trl" else None
    if missing:
        raise CherryError(f"cherry bench start --against trl: {missing}; or use --against none")
    try:
        result = compare_start(rows, against_trl=against == "trl", threads=threads)
    except RuntimeError as err:
        raise CherryError(str(err)) from None
    if as_json:
        typer.echo(json.dumps({"versions": versions(), "result": result}, indent=2))
        return
    for line in report_lines(result):
        typer.echo(line)
    typer.echo(", ".join(f"{name} {version}" for name, version in versions().items()))


@bench_app.command("gradsync")
@friendly
def bench_gradsync(
    steps: int = typer.Option(10, "--steps", help="Timed steps of each kind (median reported), after 2 warm-up steps."),
    threads: int = THREADS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """The gradient sum overlapped with backward against the sum after backward: 2 CPU processes (gloo),
    the same model and buckets, steps of the two kinds in turn, one run."""
    from benchmarks.training.gradient_sync import compare_gradient_sync, report_lines

    for name, value in (("--steps", steps), ("--threads", threads)):
        if value < 1:
            raise CherryError(f"{name} must be >= 1 (got {value})")
    result = compare_gradient_sync(steps=steps, threads=threads)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for line in report_lines(result):
        typer.echo(line)


@bench_app.command("queue")
@friendly
def bench_queue(
    runs: int = typer.Option(200, help="Runs submitted in one burst, split over the front ends."),
    front_ends: int = typer.Option(2, help="Front ends submitting at the same moment (separate processes)."),
    workers: int = typer.Option(2, help="Workers draining the queue (separate processes, one slot each)."),
    streams: int = typer.Option(8, help="Live runs streaming metrics while the app is measured."),
    interval: float = typer.Option(0.1, help="Seconds between the metric rows of each live run."),
    app_seconds: float = typer.Option(20.0, help="How long the app's frame time is measured."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
) -> None:
    """Several machines on one: a private redis-server, two workers, two front ends submitting a burst
    of runs at once (stub runs: no training), then the app's frame time while runs stream metrics."""
    from benchmarks.queue_load import QueueBenchConfig, redis_server_missing, run_queue_bench

    missing = redis_server_missing()
    if missing:
        typer.echo(f"cherry bench queue needs a local redis-server to start: {missing}. Nothing was measured.")
        return
    for name, value in (("--runs", runs), ("--front-ends", front_ends), ("--workers", workers)):
        if value < 1:
            raise CherryError(f"{name} must be >= 1 (got {value})")
    if runs < front_ends:
        raise CherryError(f"--runs ({runs}) must be at least --front-ends ({front_ends})")
    if streams < 1 or interval <= 0 or app_seconds <= 0:
        raise CherryError("--streams must be >= 1 and --interval, --app-seconds > 0")
    cfg = QueueBenchConfig(
        runs=runs,
        front_ends=front_ends,
        workers=workers,
        streams=streams,
        stream_interval=interval,
        app_seconds=app_seconds,
    )
    result = run_queue_bench(cfg, echo=(lambda line: None) if as_json else typer.echo)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for line in queue_report(result):
        typer.echo(line)


def queue_report(result: dict) -> list[str]:
    """The figures of `cherry bench queue`, one line each."""

    def ms(s: dict) -> str:
        return f"median {s['median'] * 1000:.0f} ms, p95 {s['p95'] * 1000:.0f} ms, max {s['max'] * 1000:.0f} ms"

    lines = []
    for front in result["front_ends"]:
        lines.append(
            f"{front['host']}: submitted {front['submitted']} in {front['submit_seconds']:.1f}s "
            f"({front['submit_runs_per_s']:.1f} runs/s); its store holds {front['stored']} runs "
            f"({'all' if front['stored_equals_submitted'] else 'NOT the'} submitted ones), "
            f"{front['metric_rows']} metric rows, caught up in {front['catch_up_ingest_seconds']:.2f}s, "
            f"re-ingest {'adds nothing' if front['ingest_again_adds_nothing'] else 'ADDED ROWS'}"
        )
    lines += [
        f"drained {result['completed']}/{result['runs']} runs in {result['drain_seconds']:.1f}s from the first submit "
        f"({result['runs_per_s_drained']:.1f} runs/s), taken per worker {result['taken_by_worker']}",
        f"Redis holds {result['in_redis']} runs; lost {result['lost']}, run twice {len(result['run_twice'])}; "
        f"priority inversions per worker {result['priority_inversions']}",
        f"a front end polling every 0.25s saw each run end {ms(result['status_lag_s'])} after it ended; "
        f"its events ingested {ms(result['ingest_lag_s'])} after",
    ]
    app = result["app"]
    lines += [
        f"app with {app['runs_shown']} runs, {result['config']['streams']} streaming: frame {ms(app['frame_s'])}; "
        f"snapshot applied on the UI thread {ms(app['snapshot_apply_s'])}; read by the app's reader thread "
        f"{ms(app['snapshot_read_s'])}; the first two snapshots took {app['first_snapshots_s']:.1f}s",
        f"metric point shown {ms(app['ingest_lag_s'])} after it was logged ({app['snapshots']} snapshots read)",
    ]
    return lines


@bench_app.command("gpu")
@friendly
def bench_gpu(
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Run the same code on a tiny model (on the CPU when there is no GPU): a quick self-test.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
) -> None:
    """DPO and GRPO steps on a random-init model with Qwen2-0.5B's shape (151k vocabulary) in bf16 mixed
    precision: tokens/s, MFU, peak GPU memory and the bf16-vs-fp32 weight-update check (a few minutes)."""
    import torch

    from benchmarks.training.gpu import GPUBenchConfig, run

    if not dry_run and not torch.cuda.is_available():
        typer.echo(
            "cherry bench gpu: SKIPPED: no CUDA GPU is visible, so nothing was measured. "
            "`cherry bench gpu --dry-run` runs the same code on the CPU with a tiny model."
        )
        return
    result = run(GPUBenchConfig.dry_run() if dry_run else GPUBenchConfig())
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_gpu_bench(result)
    if not result["weight_update_check"]["passed"]:
        raise typer.Exit(1)


def _print_gpu_bench(result: dict) -> None:
    from benchmarks.training.gpu import UPDATE_CHECK

    cfg, dpo, grpo, check = result["config"], result["dpo"], result["grpo"], result["weight_update_check"]
    shape = "tiny dry-run model" if cfg["tiny"] else "Qwen2-0.5B shape"
    typer.echo(
        f"GPU check on {result['device']}: random-init {shape}, {result['params'] / 1e6:.1f}M parameters, bf16 mixed precision"
    )
    peak = result["peak_bf16_flops"]
    typer.echo(
        "MFU = model FLOPs/s (6 x body weights x positions + 6 x head weights x completion positions + attention) "
        "/ peak dense bf16 FLOP/s"
        + (f" ({peak / 1e12:.0f} TFLOP/s)" if peak else " (peak unknown for this device: MFU not given)")
    )

    def pct(value) -> str:
        return f"{100 * value:.1f}%" if value is not None else "n/a"

    typer.echo(
        f"DPO   {cfg['pairs']} pairs x {cfg['seq_len']} tokens: {dpo['tokens_per_s']:,.0f} tokens/s, "
        f"{dpo['step_seconds']:.3f} s/step, MFU {pct(dpo['mfu'])}"
    )
    typer.echo(
        f"GRPO  {cfg['prompts']} prompts x {cfg['k']} samples x {cfg['max_new_tokens']} new tokens: rollout "
        f"{grpo['rollout_tokens_per_s']:,.0f} sampled tokens/s; update {grpo['update_tokens_per_s']:,.0f} tokens/s, "
        f"MFU {pct(grpo['update_mfu'])}"
    )
    memory = result["peak_memory_gb"]
    typer.echo(f"peak GPU memory: {memory:.2f} GB" if memory is not None else "peak GPU memory: n/a (no GPU)")
    typer.echo(
        f"weight update, bf16 mixed vs fp32, {check['steps']} DPO steps at lr {check['lr']:g}: "
        f"cosine {check['cosine']:.4f}, norm ratio {check['norm_ratio']:.4f} (1 and 1 = the same update): "
        + ("PASS" if check["passed"] else "FAIL")
        + f" (needs cosine >= {UPDATE_CHECK['min_cosine']} and a ratio in {list(UPDATE_CHECK['norm_ratio'])})"
    )
