"""`cherry rollouts RUN`: an online run's training rollouts (engine/rollout_store.py), filtered, listed or
exported as training data for `cherry train`.

The records come from the run directory's rollouts/ when this machine has it, else from the store
(Redis mode: the run's process streamed them, jobs/shared.py). Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from jobs import CherryError
from tuiapp.cli.options import echo, friendly


def load_records(run: str) -> tuple[str, list[dict]]:
    """(what the records belong to, the run's stored records): RUN is a run directory, or a run id (or a
    unique part of it) whose directory is read when it is on this machine, else its streamed records."""
    from engine.rollout_store import ROLLOUTS_DIR, read_rollouts

    if (Path(run) / ROLLOUTS_DIR).is_dir():
        return run, read_rollouts(run)
    from jobs.runs import Jobs

    jobs = Jobs()
    r = jobs.resolve(run)
    run_dir = Path(r.out_dir) if r.out_dir else None
    if run_dir is not None and (run_dir / ROLLOUTS_DIR).is_dir():
        return r.id, read_rollouts(run_dir)
    return r.id, jobs.store.rollouts(r.id)


def _cell(value, width: int = 7) -> str:
    return f"{value:{width}.3f}" if isinstance(value, (int, float)) else f"{'-':>{width}s}"


def group_lines(samples: list[dict], width: int = 100) -> list[str]:
    """One group's lines: its header (step, group, reward spread), its prompt, then one line per sample."""
    first = samples[0]
    rewards = [s["reward"] for s in samples if s.get("reward") is not None]
    spread = f"reward {min(rewards):.3f}..{max(rewards):.3f}" if rewards else "no reward"
    flat = " (zero variance: teaches nothing)" if len(rewards) > 1 and min(rewards) == max(rewards) else ""
    lines = [f"step {first['step']} group {first['group']}: {len(samples)} samples, {spread}{flat}"]
    lines.append(f"  prompt  {json.dumps(first['prompt'], ensure_ascii=False)[: width - 10]}")
    lines.append(f"  {'#':>3s} {'reward':>7s} {'adv':>7s} {'kl':>7s} {'len':>4s} {'end':6s} completion")
    for s in samples:
        text = json.dumps(s["completion"], ensure_ascii=False)
        lines.append(
            f"  {s['sample']:3d} {_cell(s.get('reward'))} {_cell(s.get('advantage'))} {_cell(s.get('kl'))} "
            f"{s['length']:4d} {s['finish']:6s} {text[: max(20, width - 44)]}"
        )
        lines += turn_lines(s, width)
    return lines


def turn_lines(sample: dict, width: int = 100) -> list[str]:
    """A multi-turn episode's turns, one line each under its sample's line (none for a single completion)."""
    from engine.rollout_store import turn_label

    lines = []
    for turn in sample.get("turns") or []:
        label = turn_label(turn)
        text = json.dumps(turn.get("content", ""), ensure_ascii=False)
        lines.append(f"        {label:>18s}: {text[: max(20, width - 30)]}")
    if sample.get("error"):
        lines.append(f"        {'ended on':>18s}: {sample['error'][: max(20, width - 30)]}")
    return lines


def register(app: typer.Typer) -> None:
    @app.command()
    @friendly
    def rollouts(
        run: str = typer.Argument(..., help="Run id (or a unique part of it), or a run directory."),
        step: list[int] = typer.Option([], "--step", help="Only this step (repeatable)."),
        group: list[int] = typer.Option(
            [], "--group", help="Only this group, a prompt's index in its step (repeatable)."
        ),
        min_reward: Optional[float] = typer.Option(None, "--min-reward", help="Only samples with reward >= this."),
        max_reward: Optional[float] = typer.Option(None, "--max-reward", help="Only samples with reward <= this."),
        grep: Optional[str] = typer.Option(
            None, "--grep", help="Only samples whose prompt or completion holds this text."
        ),
        as_json: bool = typer.Option(False, "--json", help="The selected records as one JSON array."),
        export: Optional[str] = typer.Option(
            None,
            "--export",
            help="Write training data instead: pairs (the best vs the worst completion of each group, TRL's "
            "preference format; ties skipped) or sft (the best completion of each group).",
        ),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="The JSONL file --export writes."),
        limit: int = typer.Option(10, "--limit", help="Groups shown (0 = all); --json and --export take all."),
    ) -> None:
        """An online run's training rollouts: each prompt's group of samples with rewards, advantage, KL and
        length; filter them, print them as JSON, or export them as preference pairs or SFT rows."""
        from engine.rollout_store import EXPORTS, export_rows, groups, select

        if export is not None and export not in EXPORTS:
            raise typer.BadParameter(f"choose one of: {', '.join(EXPORTS)}", param_hint="--export")
        if export is not None and out is None:
            raise typer.BadParameter("--export needs --out FILE (JSONL)", param_hint="--out")
        name, records = load_records(run)
        if not records:
            raise typer.BadParameter(
                f"{name} has no stored rollouts: only online methods (grpo, rloo, ppo, online_dpo, best_of_k, rest) "
                "keep them, from their first step on, unless log_rollouts is off",
                param_hint="RUN",
            )
        chosen = select(
            records, steps=step, groups_wanted=group, min_reward=min_reward, max_reward=max_reward, text=grep
        )
        if export is not None:
            count = export_rows(chosen, export, out)
            if not count:
                raise CherryError(
                    f"no {export} rows in the {len(chosen)} rollouts selected: "
                    + (
                        "no group has a best and a worst completion apart (groups whose rewards tie are skipped)"
                        if export == "pairs"
                        else "no sample has a reward"
                    )
                    + f"; nothing was written to {out}"
                )
            what = "preference pairs" if export == "pairs" else "prompt/completion rows"
            echo(f"wrote {count} {what} from {len(chosen)} of {len(records)} rollouts to {out}")
            echo(f"train on them: cherry train --preset {'dpo' if export == 'pairs' else 'sft'} --dataset {out} ...")
            return
        if as_json:
            echo(json.dumps(chosen, indent=2, ensure_ascii=False))
            return
        by_group = list(groups(chosen).values())
        steps = sorted({r["step"] for r in records})
        echo(
            f"{name}: {len(records)} rollouts at steps {steps[0]}..{steps[-1]}; {len(chosen)} selected "
            f"in {len(by_group)} groups" + (f", the first {limit} shown" if 0 < limit < len(by_group) else "")
        )
        for samples in by_group[: limit or None]:
            echo("")
            for line in group_lines(samples):
                echo(line)
