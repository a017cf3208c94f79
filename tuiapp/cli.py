"""The `cherry` command line.

Only typer and the torch-free spec module are imported at start-up, so `cherry --help` answers
at once; the training stack is imported inside the commands that need it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from jobs import CherryError
from tuiapp.common import DATASET_OPTION, MODEL_OPTION, PRESET_OPTION, SET_OPTION, friendly, margin_stats
from tuiapp.pipeline_cli import register as register_pipeline_command
from tuiapp.runs_cli import register as register_run_commands

app = typer.Typer(
    help="Cherry: preference training of language models from the terminal.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
demo_app = typer.Typer(help="The embedded demo: a tiny model learning verifiable tasks, offline.")
bench_app = typer.Typer(help="Benchmarks of the engine against naive baselines, measured in one run.")
app.add_typer(demo_app, name="demo")
app.add_typer(bench_app, name="bench")
register_run_commands(app)
register_pipeline_command(app)


@app.callback()
@friendly
def _open_app(ctx: typer.Context) -> None:
    """With no command, open the Textual app."""
    if ctx.invoked_subcommand is None:
        from tuiapp.app import run_app

        run_app()


def _progress():
    from engine.reporting import ProgressReporter

    return ProgressReporter(sys.stderr)


def _print_samples(samples: list[dict[str, Any]], limit: int) -> None:
    def mark(score):
        return "" if score is None else (" ✓" if score >= 1 else " ✗")

    for row in samples[:limit]:
        prompt = row["prompt"].replace("\n", " ")
        typer.echo(f"  prompt    {prompt}")
        typer.echo(f"  reference {row['reference']!r}{mark(row.get('reference_score'))}")
        typer.echo(f"  policy    {row['policy']!r}{mark(row.get('policy_score'))}   (answer {row.get('answer')!r})")
        typer.echo("")


def _pairs_line(samples: list[dict[str, Any]]) -> str | None:
    """One line on the preference pairs logged beside the samples: how often the chosen side wins."""
    stats = margin_stats(samples)
    if stats is None:
        return None
    n, ahead, mean = stats
    return f"implicit reward on {n} held-out pairs: chosen ahead on {ahead}/{n}, mean margin {mean:+.3g} (cherry samples RUN shows them)"


# ----------------------------------------------------------------------------- train


@app.command()
@friendly
def train(
    preset: str = PRESET_OPTION,
    model: Optional[str] = MODEL_OPTION,
    dataset: Optional[str] = DATASET_OPTION,
    set_: list[str] = SET_OPTION,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: $CHERRY_HOME/<run-id>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
) -> None:
    """Train in this process with a live progress line. Outputs land in runs/<run-id>/."""
    from engine.spec import load_spec_file, resolve_paths, resolve_spec

    if resume is not None:
        if not (resume / "spec.yaml").exists():
            raise CherryError(f"--resume {resume}: no spec.yaml there; give the directory of an earlier run")
        spec = resolve_paths(load_spec_file(resume / "spec.yaml"))
        out = resume
    else:
        spec = resolve_spec(preset, set_, model=model, dataset=dataset)
    _configure_logging()
    run_dir, summary = _foreground(spec, out, resume=resume is not None)
    typer.echo("")
    _print_summary(run_dir, summary)


def _foreground(spec, out: Optional[Path] = None, *, resume: bool = False, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run `spec` here with a progress line. Ctrl+C ends the command with code 130 after saying how
    the run was left and how to continue it (jobs.local records it as interrupted)."""
    from jobs.home import cherry_home
    from jobs.local import local_run_id, run_in_process

    try:
        run_dir, summary = run_in_process(spec, out, _progress() if progress else None, resume=resume)
    except KeyboardInterrupt:
        typer.echo("\nquit at once (second Ctrl+C): the run is recorded as interrupted; `cherry resume RUN` continues "
                   "from its last saved checkpoint", err=True)
        raise typer.Exit(130) from None
    if summary["status"] == "interrupted":
        _print_summary(run_dir, summary)
        run_id = local_run_id(run_dir, cherry_home())
        typer.echo(f"interrupted at step {summary['step']}: checkpoint saved. Continue with `cherry resume {run_id}` "
                   f"(needs `cherry worker`) or `cherry train --resume {run_dir}`", err=True)
        raise typer.Exit(130)
    return run_dir, summary


def _configure_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def _print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    typer.echo(f"{summary['status']}: {summary['step']}/{summary['total_steps']} steps in {summary['wall_seconds']:.0f}s "
               f"({summary['tokens_per_s']:.0f} tokens/s, peak memory {summary['peak_memory_gb']:.2f} GB)")
    for name in sorted(summary["before"]):
        if name in summary["final"]:
            typer.echo(f"  {name}: {summary['before'][name]:.4f} -> {summary['final'][name]:.4f}")
    typer.echo(f"run directory: {run_dir}")
    if summary.get("final_dir"):
        typer.echo(f"final weights: {summary['final_dir']}")


@app.command()
@friendly
def score(
    reward_model: str = typer.Option(..., "--reward-model", "-r", help="An earlier `rm` run directory, or a reward model dir / hub id."),
    safety_model: Optional[str] = typer.Option(None, "--safety-model", help="A safety RM: combine with --reward-model as helpfulness (Llama 2 gating; rows may carry a boolean `safety` tag)."),
    safety_threshold: float = typer.Option(0.15, help="Use the safety score when its sigmoid falls below this."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Preference pairs (gives pairwise accuracy) or prompt/completion rows."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write every row with its score(s) as JSONL."),
    batch_size: int = typer.Option(16, help="Rows per forward pass."),
    max_length: int = typer.Option(1024, help="Truncate prompt + completion to this many tokens."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
) -> None:
    """Score text with a reward model: pairwise accuracy on pairs, score statistics on completions."""
    from engine.data import KIND_OF_FORMAT, detect_format, load_rows, prepare
    from engine.rewards.reward_model import load_reward_source, reward_scorer, score_dataset
    from engine.spec import resolve_path

    model, tokenizer = load_reward_source(reward_model, device)
    safety = None
    if safety_model is not None:
        safety, safety_tokenizer = load_reward_source(safety_model, device)
        if safety_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise CherryError("--safety-model must share the --reward-model's tokenizer (Llama 2's two RMs do)")
    rows = load_rows(resolve_path(dataset, "dataset", kind="data"))
    kind = "preference" if KIND_OF_FORMAT[detect_format(rows)[0]] == "preference" else "sft"
    data = prepare(rows, tokenizer, kind=kind, max_length=max_length, max_prompt_length=max_length // 2, eval_split=0.0)
    scored, summary = score_dataset(data, reward_scorer(model, tokenizer, batch_size, safety, safety_threshold))
    if out is not None:
        out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored))
    typer.echo(json.dumps(summary, indent=2))


@app.command()
@friendly
def export(
    run_dir: Path = typer.Argument(..., help="A completed run directory (runs/<run-id>)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the exported model."),
    merge: bool = typer.Option(False, "--merge", help="Merge a LoRA adapter into its base: full weights."),
) -> None:
    """Write a run's final weights as a model loadable with AutoModelForCausalLM.from_pretrained."""
    from engine.export import export_run

    typer.echo(f"exported to {export_run(run_dir, out, merge=merge)}")


# ----------------------------------------------------------------------------- presets


@app.command()
@friendly
def presets(name: Optional[str] = typer.Argument(None, help="Show this preset's YAML.")) -> None:
    """List the algorithm presets, or show one with its commented defaults."""
    from engine.spec import list_presets, preset_chain

    if name:
        chain = preset_chain(name)
        for i, path in enumerate(chain):
            if i:
                typer.echo(f"\n# ---- inherited from {path.stem} (values above take precedence) ----")
            typer.echo(path.read_text().rstrip())
        return
    for preset_name, description in list_presets():
        typer.echo(f"{preset_name:12s} {description}")


# ----------------------------------------------------------------------------- demo


@demo_app.callback(invoke_without_command=True)
@friendly
def demo(
    ctx: typer.Context,
    headless: bool = typer.Option(False, "--headless", help="Run in this terminal and print the results (for scripts and CI)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory with --headless (default: $CHERRY_HOME/<run-id>)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a demo setting: key=value."),
    method: str = typer.Option("dpo", "--method", help="Which demo run (presets/demo/NAME.yaml): dpo, ipo, rpo, simpo, orpo, kto, sft, rm, coh; online: grpo, rloo, ppo, online_dpo, best_of_k, rest."),
) -> None:
    """DPO (or --method) on the embedded demo. Opens the app with the run queued and a worker started
    in the background if none is running; --headless trains here and prints before/after accuracy and samples."""
    if ctx.invoked_subcommand is not None:
        return
    if not headless and not _interactive():
        typer.echo("demo: no terminal to show the app in; running headless (pass --headless to say so)", err=True)
        headless = True
    if not headless:
        _demo_in_app(method, set_, out)
        return
    from tuiapp.launch import demo_spec

    spec = demo_spec(method, set_)
    _configure_logging()
    typer.echo(f"demo: {spec.algorithm} on {Path(spec.dataset).name} from the demo model (headless)")
    run_dir, summary = _foreground(spec, out)
    name, before, after = _headline(summary)
    typer.echo("")
    typer.echo(f"{name}: {before:.1%} before -> {after:.1%} after ({(after - before) * 100:+.1f} points) "
               f"in {summary['wall_seconds']:.0f}s")
    samples_file = run_dir / "samples.jsonl"
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()] if samples_file.exists() else []
    if samples:
        final_step = max(s["step"] for s in samples)
        at_final = [s for s in samples if s["step"] == final_step]
        final = [s for s in at_final if not s.get("kind")]  # reference vs policy (not the preference pairs)
        # Where the policy now differs from the reference is what DPO changed: show those first.
        final.sort(key=lambda s: (s["policy"] == s["reference"], -(s.get("policy_score") or 0)))
        if final:
            typer.echo(f"\nside by side at step {final_step} (reference = demo model before training, policy = after; changed first):")
            _print_samples(final, limit=6)
        pairs = _pairs_line(at_final)
        if pairs:
            typer.echo(pairs)
    typer.echo(f"run directory: {run_dir}")


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _demo_in_app(method: str, overrides: list[str], out: Optional[Path]) -> None:
    """Queue the demo run, start a worker if none is live, open the app on that run."""
    from jobs.home import cherry_home
    from tuiapp.launch import WORKER_LOG, launch_demo

    if out is not None:
        raise CherryError("--out goes with --headless; runs queued from the app live in $CHERRY_HOME/<run-id>")
    home = cherry_home()
    run, worker_pid = launch_demo(home, method, overrides)
    if worker_pid is not None:
        typer.echo(f"demo: queued {run.id}; started a worker in the background (pid {worker_pid}, log {home / WORKER_LOG})", err=True)
    else:
        typer.echo(f"demo: queued {run.id} for the running worker", err=True)
    from tuiapp.app import run_app

    run_app(home, focus=run.id)
    typer.echo(f"the app closed; {run.id} keeps going in the worker (`cherry ls`, `cherry` to look again)", err=True)


def _headline(summary: dict[str, Any]) -> tuple[str, float, float]:
    """The metric a demo run is judged by: exact match for generators, pairwise accuracy for an RM.

    Chain of Hindsight is judged against the demo model on plain prompts: before training the model
    has never seen the feedback phrase, so its score after the phrase (about 0) is no baseline.
    """
    key = "eval/exact_match" if "eval/exact_match" in summary["before"] else "eval/rewards/accuracy"
    label = "held-out exact match" if key == "eval/exact_match" else "held-out pairwise accuracy"
    before = summary["before"][key]
    if summary.get("algorithm") == "coh":
        from engine.spec import demo_dir

        before = json.loads((demo_dir() / "info.json").read_text())["held_out_accuracy"]
        label += " (before = the demo model on plain prompts)"
    return label, before, summary["final"][key]


@demo_app.command("table")
@friendly
def demo_table(
    methods: list[str] = typer.Argument(None, help="Demo runs to include (default: all of presets/demo/*.yaml)."),
    threads: int = typer.Option(0, help="CPU threads per run (0 = each demo run's own setting)."),
) -> None:
    """Run every demo method and print a Markdown table: held-out exact match before/after, wall time."""
    from engine.spec import demo_dir, resolve_spec

    _configure_logging()
    methods = methods or sorted(p.stem for p in demo_dir().glob("*.yaml"))
    rows = []
    for method in methods:
        overrides = ["num_samples=0"] + ([f"num_threads={threads}"] if threads else [])
        spec = resolve_spec(str(demo_dir() / f"{method}.yaml"), overrides)
        typer.echo(f"running {method} ...", err=True)
        _, summary = _foreground(spec, progress=False)
        name, before, after = _headline(summary)
        rows.append(f"| {method} | {spec.algorithm} | {Path(spec.dataset).name} | {name.replace('held-out ', '')} | "
                    f"{before:.1%} | {after:.1%} | {(after - before) * 100:+.1f} | {summary['wall_seconds']:.0f} s |")
    typer.echo("| demo run | algorithm | data | held-out metric | before | after | gain (points) | wall time |")
    typer.echo("|---|---|---|---|---|---|---|---|")
    typer.echo("\n".join(rows))


@demo_app.command("build")
@friendly
def demo_build(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the demo (default: presets/demo)."),
    seed: int = typer.Option(0, help="Seed: the same seed rebuilds the same demo."),
) -> None:
    """Rebuild the demo model and datasets from scratch (seeded, a few CPU minutes)."""
    from engine.demo.build import build_demo
    from engine.spec import demo_dir

    info = build_demo(out or demo_dir(), seed=seed, log=typer.echo)
    typer.echo(json.dumps(info, indent=2))


# ----------------------------------------------------------------------------- bench


@bench_app.command("dpo")
@friendly
def bench_dpo(
    seq_len: int = typer.Option(256, help="Tokens per sequence (prompt + completion)."),
    prompt_len: int = typer.Option(192, help="Prompt tokens per sequence."),
    pairs: int = typer.Option(8, help="Preference pairs per step."),
    vocab: int = typer.Option(32000, help="Vocabulary size of the tiny model."),
    hidden: int = typer.Option(256, help="Hidden size of the tiny model."),
    layers: int = typer.Option(2, help="Transformer layers."),
    steps: int = typer.Option(5, help="Timed steps per path (median reported)."),
    threads: int = typer.Option(0, help="CPU threads (0 = torch default)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
) -> None:
    """Time DPO steps: Cherry's completion-only log-probs vs the naive full-logits path."""
    from engine.bench.dpo import BenchConfig, compare

    if not 0 < prompt_len < seq_len:
        raise CherryError(f"--prompt-len must be between 1 and --seq-len - 1 (got {prompt_len} with seq-len {seq_len})")
    cfg = BenchConfig(seq_len=seq_len, prompt_len=prompt_len, pairs=pairs, vocab=vocab, hidden=hidden, layers=layers,
                      steps=steps, threads=threads, device=device)
    result = compare(cfg)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    c, n = result["cherry"], result["naive"]
    typer.echo(f"DPO step, {pairs} pairs x {seq_len} tokens (prompt {prompt_len}), vocab {vocab}, "
               f"hidden {hidden} x {layers} layers, {c['device']}; median of {steps} steps")
    typer.echo(f"{'path':8s} {'tokens/s':>10s} {'step s':>8s} {'peak GB':>8s}")
    for row in (c, n):
        typer.echo(f"{row['path']:8s} {row['tokens_per_s']:10.0f} {row['step_seconds']:8.3f} {row['peak_mem_gb']:8.3f}")
    typer.echo(f"speed-up {result['speedup']:.2f}x, memory {result['memory_ratio']:.2f}x less ({c['memory']}); "
               f"|loss difference| {result['loss_abs_diff']:.2e}")


@bench_app.command("grpo")
@friendly
def bench_grpo(
    prompts: int = typer.Option(8, help="Prompts per step."),
    k: int = typer.Option(8, "--k", help="Samples per prompt."),
    prompt_len: int = typer.Option(64, help="Longest prompt (prompts are drawn from half of it to it)."),
    max_new_tokens: int = typer.Option(32, help="Tokens sampled per completion."),
    vocab: int = typer.Option(32000, help="Vocabulary size of the tiny model."),
    hidden: int = typer.Option(256, help="Hidden size of the tiny model."),
    layers: int = typer.Option(2, help="Transformer layers."),
    repeats: int = typer.Option(3, help="Timed repeats of each path (median reported)."),
    threads: int = typer.Option(0, help="CPU threads (0 = torch default)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
) -> None:
    """Time a GRPO step's rollout and update: Cherry's batched sampling and completion-only log-probs
    against a per-prompt generate loop and full-logits log-probs, in the same run."""
    from engine.bench.grpo import GRPOBenchConfig, run

    for name, value in (("--prompts", prompts), ("--k", k), ("--prompt-len", prompt_len), ("--max-new-tokens", max_new_tokens),
                        ("--repeats", repeats)):
        if value < 1:
            raise CherryError(f"{name} must be >= 1 (got {value})")
    cfg = GRPOBenchConfig(prompts=prompts, k=k, prompt_len=prompt_len, max_new_tokens=max_new_tokens, vocab=vocab,
                          hidden=hidden, layers=layers, repeats=repeats, threads=threads, device=device)
    result = run(cfg)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"GRPO step, {prompts} prompts x {k} samples x {max_new_tokens} new tokens (prompts <= {prompt_len}), "
               f"vocab {vocab}, hidden {hidden} x {layers} layers, {result['device']}; median of {repeats}")
    typer.echo(f"{'phase':8s} {'path':8s} {'samples/s':>10s} {'tokens/s':>10s} {'seconds':>8s}")
    for phase, what in (("rollout", "batched + KV cache vs one sample at a time"), ("update", "completion-only vs full logits")):
        for path in ("cherry", "naive"):
            row = result[f"{phase}_{path}"]
            typer.echo(f"{phase:8s} {path:8s} {row['samples_per_s']:10.1f} {row['tokens_per_s']:10.0f} {row['seconds']:8.3f}")
    typer.echo(f"rollout {result['rollout_speedup']:.1f}x faster, update {result['update_speedup']:.2f}x faster, "
               f"whole step {result['step_speedup']:.1f}x")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
