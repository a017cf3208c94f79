"""`cherry train`, `score`, `export`, `presets`: runs in this terminal and the tools around them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from jobs import INTERRUPTED_EXIT, CherryError
from tuiapp.cli.options import (
    CONFIG_OPTION,
    DATASET_OPTION,
    MODEL_OPTION,
    PRESET_OPTION,
    SET_OPTION,
    echo,
    friendly,
)
from tuiapp.text import margin_stats


def _progress():
    from engine.reporting import ProgressReporter

    return ProgressReporter(sys.stderr)


def _print_samples(samples: list[dict[str, Any]], limit: int) -> None:
    def mark(score):
        return "" if score is None else (" ✓" if score >= 1 else " ✗")

    for row in samples[:limit]:
        prompt = row["prompt"].replace("\n", " ")
        echo(f"  prompt    {prompt}")
        echo(f"  reference {row['reference']!r}{mark(row.get('reference_score'))}")
        echo(f"  policy    {row['policy']!r}{mark(row.get('policy_score'))}   (answer {row.get('answer')!r})")
        echo("")


def _pairs_line(samples: list[dict[str, Any]]) -> str | None:
    """One line on the preference pairs logged beside the samples: how often the chosen side wins."""
    stats = margin_stats(samples)
    if stats is None:
        return None
    n, ahead, mean = stats
    return f"implicit reward on {n} held-out pairs: chosen ahead on {ahead}/{n}, mean margin {mean:+.3g} (cherry samples RUN shows them)"


@friendly
def train(
    preset: str = PRESET_OPTION,
    model: Optional[str] = MODEL_OPTION,
    dataset: Optional[str] = DATASET_OPTION,
    set_: list[str] = SET_OPTION,
    config: Optional[Path] = CONFIG_OPTION,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Run directory (default: a config's output_dir, else $CHERRY_HOME/<run-id>)."
    ),
    resume: Optional[Path] = typer.Option(
        None,
        "--resume",
        help="Continue the run in this directory from its last checkpoint (--set may change num_processes, "
        "batch_size and grad_accum when their product stays the same).",
    ),
) -> None:
    """Train in this process with a live progress line. Outputs land in runs/<run-id>/. Started by torchrun,
    `accelerate launch` or srun, each process is one rank of one run (docs/multi-machine.md)."""
    from engine.launch import check_one_machine, fit_spec, launched
    from engine.spec import load_spec_file, resolve_paths, resolve_spec, with_resume_settings
    from jobs.local import run_launched_rank

    if resume is not None:
        if not (resume / "spec.yaml").exists():
            raise CherryError(f"--resume {resume}: no spec.yaml there; give the directory of an earlier run")
        spec = with_resume_settings(resolve_paths(load_spec_file(resume / "spec.yaml")), set_)
        out = resume
    else:
        launch: dict[str, Any] = {}
        spec = resolve_spec(preset, set_, model=model, dataset=dataset, config=config, launch=launch)
        if out is None and launch.get("output_dir"):
            out = Path(launch["output_dir"])
    _configure_logging()
    place = launched()
    if place is not None:  # torchrun, accelerate launch or srun started this command: one rank of their run
        spec = fit_spec(spec, place)  # before anything is recorded: num_processes is the launcher's
        if place.rank > 0:
            run_launched_rank(spec, resume=resume is not None)  # rank 0 records the run and prints
            return
    else:
        check_one_machine(spec)  # before anything is recorded
    run_dir, summary = _foreground(spec, out, resume=resume is not None)
    echo("")
    _print_summary(run_dir, summary)


def _foreground(
    spec, out: Optional[Path] = None, *, resume: bool = False, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Run `spec` here with a progress line. Ctrl+C ends the command with code 130 after saying how
    the run was left and how to continue it (jobs.local records it as interrupted)."""
    from jobs.home import cherry_home
    from jobs.local import local_run_id, run_in_process

    try:
        run_dir, summary = run_in_process(spec, out, _progress() if progress else None, resume=resume)
    except KeyboardInterrupt:
        echo(
            "\nquit at once (second Ctrl+C): the run is recorded as interrupted; `cherry resume RUN` continues "
            "from its last saved checkpoint",
            err=True,
        )
        raise typer.Exit(INTERRUPTED_EXIT) from None
    if summary["status"] == "interrupted":
        _print_summary(run_dir, summary)
        run_id = local_run_id(run_dir, cherry_home())
        echo(
            f"interrupted at step {summary['step']}: checkpoint saved. Continue with `cherry resume {run_id}` "
            f"(needs `cherry worker`) or `cherry train --resume {run_dir}`",
            err=True,
        )
        raise typer.Exit(INTERRUPTED_EXIT)
    return run_dir, summary


def _configure_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def _print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    echo(
        f"{summary['status']}: {summary['step']}/{summary['total_steps']} steps in {summary['wall_seconds']:.0f}s "
        f"({summary['tokens_per_s']:.0f} tokens/s, peak memory {summary['peak_memory_gb']:.2f} GB)"
    )
    for name in sorted(summary["before"]):
        if name in summary["final"]:
            echo(f"  {name}: {summary['before'][name]:.4f} -> {summary['final'][name]:.4f}")
    echo(f"run directory: {run_dir}")
    if summary.get("final_dir"):
        echo(f"final weights: {summary['final_dir']}")


@friendly
def score(
    reward_model: str = typer.Option(
        ..., "--reward-model", "-r", help="An earlier `rm` run directory, or a reward model dir / hub id."
    ),
    safety_model: Optional[str] = typer.Option(
        None,
        "--safety-model",
        help="A safety RM: combine with --reward-model as helpfulness (Llama 2 gating; rows may carry a boolean `safety` tag).",
    ),
    safety_threshold: float = typer.Option(0.15, help="Use the safety score when its sigmoid falls below this."),
    dataset: str = typer.Option(
        ..., "--dataset", "-d", help="Preference pairs (gives pairwise accuracy) or prompt/completion rows."
    ),
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
    echo(json.dumps(summary, indent=2))


@friendly
def export(
    run_dir: Path = typer.Argument(..., help="A completed run directory (runs/<run-id>)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the exported model."),
    merge: bool = typer.Option(False, "--merge", help="Merge a LoRA adapter into its base: full weights."),
) -> None:
    """Write a run's final weights as a model loadable with AutoModelForCausalLM.from_pretrained."""
    from engine.export import export_run

    echo(f"exported to {export_run(run_dir, out, merge=merge)}")


# ----------------------------------------------------------------------------- presets


@friendly
def presets(
    name: Optional[str] = typer.Argument(None, help="A preset (or method): show its settings."),
    yaml_files: bool = typer.Option(False, "--yaml", help="Print the preset's YAML files as written instead."),
) -> None:
    """List the algorithm presets, or show one: every setting its method reads, with its value and help."""
    from engine.spec import list_presets, preset_chain

    if name and yaml_files:
        for i, path in enumerate(preset_chain(name)):
            if i:
                echo(f"\n# ---- inherited from {path.stem} (values above take precedence) ----")
            echo(path.read_text().rstrip())
    elif name:
        _print_settings(name)
    else:
        for preset_name, description in list_presets():
            echo(f"{preset_name:12s} {description}")


def _print_settings(preset: str) -> None:
    """`key: value  # help` for each setting a run of the preset reads: the core, then its method's own."""
    from engine.registry import ALGORITHMS
    from engine.spec import ALIASES, resolve_spec, setting_help

    spec = resolve_spec(preset, check_paths=False)
    values = spec.to_dict()
    helps = setting_help()
    field_names: dict[str, str] = {}
    for name, alias in ALIASES.items():  # the first (most used) of the field's names for each setting
        field_names.setdefault(alias.target, name)
    own = ALGORITHMS[spec.algorithm].settings
    echo(f"# {preset}: {ALGORITHMS[spec.algorithm].title}")
    for title, keys in (("common settings", [k for k in values if k not in own]), (f"{spec.algorithm}'s own", own)):
        echo(f"# --- {title}")
        for key in keys:
            if key in ("defaults_followed", "aliases_used"):
                continue
            items = values[key].items() if key == "lora" else [(None, values[key])]
            for sub, value in items:
                full = f"{key}.{sub}" if sub else key
                also = f" (TRL: {field_names[full]})" if full in field_names else ""
                echo(f"{full}: {json.dumps(value)}".ljust(40) + f"# {helps.get(full, '')}{also}")


# ----------------------------------------------------------------------------- demo


def register(app: typer.Typer) -> None:
    for command in (train, score, export, presets):
        app.command()(command)
