"""`cherry demo`: the embedded demo, in the app or headless, and the demo table in docs/demo.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from jobs import CherryError
from tuiapp.cli.options import friendly
from tuiapp.cli.train import _configure_logging, _foreground, _pairs_line, _print_samples

demo_app = typer.Typer(help="The embedded demo: a tiny model learning verifiable tasks, offline.")


@demo_app.callback(invoke_without_command=True)
@friendly
def demo(
    ctx: typer.Context,
    headless: bool = typer.Option(
        False, "--headless", help="Run in this terminal and print the results (for scripts and CI)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Run directory with --headless (default: $CHERRY_HOME/<run-id>)."
    ),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a demo setting: key=value."),
    method: str = typer.Option(
        "dpo",
        "--method",
        help="Which demo run: NAME of presets/demo/NAME.yaml (one per method, and variants such as ipo, "
        "gspo); a name that has none lists those that do.",
    ),
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
    headline = _headline(summary)
    typer.echo("")
    if headline is None:
        typer.echo(f"no before/after figure: the run was not evaluated (eval_strategy: {spec.eval_strategy})")
    else:
        name, before, after = headline
        typer.echo(
            f"{name}: {before:.1%} before -> {after:.1%} after ({(after - before) * 100:+.1f} points) "
            f"in {summary['wall_seconds']:.0f}s"
        )
    samples_file = run_dir / "samples.jsonl"
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()] if samples_file.exists() else []
    if samples:
        final_step = max(s["step"] for s in samples)
        at_final = [s for s in samples if s["step"] == final_step]
        final = [s for s in at_final if not s.get("kind")]  # reference vs policy (not the preference pairs)
        # Where the policy now differs from the reference is what DPO changed: show those first.
        final.sort(key=lambda s: (s["policy"] == s["reference"], -(s.get("policy_score") or 0)))
        if final:
            typer.echo(
                f"\nside by side at step {final_step} (reference = demo model before training, policy = after; changed first):"
            )
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
        typer.echo(
            f"demo: queued {run.id}; started a worker in the background (pid {worker_pid}, log {home / WORKER_LOG})",
            err=True,
        )
    else:
        typer.echo(f"demo: queued {run.id} for the running worker", err=True)
    from tuiapp.app import run_app

    run_app(home, focus=run.id)
    typer.echo(f"the app closed; {run.id} keeps going in the worker (`cherry ls`, `cherry` to look again)", err=True)


def _headline(summary: dict[str, Any]) -> tuple[str, float, float] | None:
    """The metric a demo run is judged by: exact match for generators, pairwise accuracy for an RM; None
    when the run was not evaluated before and after (`eval_strategy: no`).

    Chain of Hindsight is judged against the demo model on plain prompts: before training the model
    has never seen the feedback phrase, so its score after the phrase (about 0) is no baseline.
    """
    before_metrics, final_metrics = summary.get("before") or {}, summary.get("final") or {}
    key = "eval/exact_match" if "eval/exact_match" in before_metrics else "eval/rewards/accuracy"
    if key not in before_metrics or key not in final_metrics:
        return None
    label = "held-out exact match" if key == "eval/exact_match" else "held-out pairwise accuracy"
    before = before_metrics[key]
    if summary.get("algorithm") == "coh":
        from engine.spec import demo_dir

        before = json.loads((demo_dir() / "info.json").read_text())["held_out_accuracy"]
        label += " (before = the demo model on plain prompts)"
    return label, before, final_metrics[key]


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
        headline = _headline(summary)
        if headline is None:
            rows.append(
                f"| {method} | {spec.algorithm} | {Path(spec.dataset).name} | not evaluated | | | | "
                f"{summary['wall_seconds']:.0f} s |"
            )
            continue
        name, before, after = headline
        rows.append(
            f"| {method} | {spec.algorithm} | {Path(spec.dataset).name} | {name.replace('held-out ', '')} | "
            f"{before:.1%} | {after:.1%} | {(after - before) * 100:+.1f} | {summary['wall_seconds']:.0f} s |"
        )
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
