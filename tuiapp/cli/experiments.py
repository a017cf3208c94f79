"""CLI commands for experiments: `sweep` (one run per point of a grid or of random draws, grouped as
one experiment, optionally with early stopping), `tag`, `untag` and `note`. Nothing here imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tuiapp.cli.options import CONFIG_OPTION, DATASET_OPTION, MODEL_OPTION, SET_OPTION, echo, friendly


def _jobs():
    from jobs.runs import Jobs

    return Jobs()


def register(app: typer.Typer) -> None:
    """Add the experiment commands to the `cherry` app."""

    @app.command()
    @friendly
    def sweep(
        file: Optional[Path] = typer.Argument(
            None, help="A YAML sweep file (preset, model, dataset, set, grid, random, prune)."
        ),
        preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name or YAML file (default dpo)."),
        model: Optional[str] = MODEL_OPTION,
        dataset: Optional[str] = DATASET_OPTION,
        set_: list[str] = SET_OPTION,
        config: Optional[Path] = CONFIG_OPTION,
        grid: list[str] = typer.Option(
            [],
            "--grid",
            "-g",
            help="key=v1,v2 (every combination of the grids is a point), or a range for --random: "
            "key=log(1e-7,1e-5), uniform(0.05,0.5), int(1,4), choice(a,b).",
        ),
        draws: int = typer.Option(0, "--random", help="Draw this many points from the ranges (per grid point)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random draws (the same seed gives the same points)."),
        name: Optional[str] = typer.Option(None, "--name", help="The experiment's name (default: preset-date)."),
        prune: Optional[str] = typer.Option(
            None,
            "--prune",
            help="Stop weak runs early: median (worse than the median of the others at an eval point) or halving "
            "(successive halving: only the best 1/eta of the runs at each rung go on).",
        ),
        prune_metric: Optional[str] = typer.Option(None, "--prune-metric", help="The eval metric the rule compares."),
        prune_after: int = typer.Option(
            1, "--prune-after", help="Eval points (after the start) before a run can be pruned."
        ),
        prune_mode: Optional[str] = typer.Option(
            None, "--prune-mode", help="max (higher is better) or min; default min for losses and KL, else max."
        ),
        prune_eta: int = typer.Option(3, "--prune-eta", help="halving: the reduction factor (3 keeps the best third)."),
        prune_rung: Optional[int] = typer.Option(
            None, "--prune-rung", help="halving: the first rung's step (default: a run's first eval point); then x eta."
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check and print the points; queue nothing."),
        worker: bool = typer.Option(
            False, "--worker", help="Start `cherry worker` in the background when none is running (log: worker.log)."
        ),
    ) -> None:
        """Queue one run per point of a sweep, all in one experiment; every point is checked first."""
        from jobs.sweep import Sweep, load_sweep_file, parse_grid, parse_ranges, prune_rule, split_grid, submit_sweep

        values, ranges = split_grid(grid)
        plan = load_sweep_file(file) if file else Sweep()
        plan.preset = preset or plan.preset
        plan.model = model or plan.model
        plan.dataset = dataset or plan.dataset
        plan.config = str(config) if config else plan.config
        plan.sets = [*plan.sets, *set_]
        plan.grid.update(parse_grid(values))
        plan.random.update(parse_ranges(ranges))
        plan.count = draws or plan.count
        plan.seed = seed if seed else plan.seed
        plan.name = name or plan.name
        if prune:
            plan.prune = prune_rule(prune, prune_metric, prune_after, prune_mode, eta=prune_eta, rung=prune_rung)
        jobs = _jobs()
        if dry_run:
            from jobs.sweep import plan as check_points

            checked = check_points(plan, jobs)
            echo(f"experiment {plan.experiment}: {len(checked)} point(s), all valid; nothing queued (--dry-run)")
            for index, (point, _spec) in enumerate(checked, 1):
                echo(f"{index:3d}  " + "  ".join(f"{k}={v}" for k, v in point.items()))
            return
        runs = submit_sweep(plan, jobs)
        echo(f"experiment {runs[0].experiment}: queued {len(runs)} run(s)", err=True)
        for run in runs:
            echo(run.id)
        if worker:
            from tuiapp.launch import WORKER_LOG, ensure_worker

            pid = ensure_worker(jobs.home)
            echo(
                f"started a worker in the background (pid {pid}, log {jobs.home / WORKER_LOG})"
                if pid
                else "a worker is already running: it takes them",
                err=True,
            )
        echo(f"follow them with `cherry ls --experiment {runs[0].experiment}`, or `cherry` (the app)", err=True)

    @app.command()
    @friendly
    def tag(
        run: str = typer.Argument(..., help="Run id (or a unique part of it)."),
        tags: list[str] = typer.Argument(..., help="Tags to add, e.g. good baseline."),
    ) -> None:
        """Add tags to a run (`cherry ls --tag NAME` filters by them)."""
        _retag(run, tags, add=True)

    @app.command()
    @friendly
    def untag(
        run: str = typer.Argument(..., help="Run id (or a unique part of it)."),
        tags: list[str] = typer.Argument(..., help="Tags to remove."),
    ) -> None:
        """Remove tags from a run."""
        _retag(run, tags, add=False)

    @app.command()
    @friendly
    def note(
        run: str = typer.Argument(..., help="Run id (or a unique part of it)."),
        text: str = typer.Argument(..., help='The note (replaces the previous one; "" clears it).'),
    ) -> None:
        """Attach a note to a run (`cherry show` prints it)."""
        jobs = _jobs()
        r = jobs.resolve(run)
        jobs.store.update_run(r.id, note=text or None)
        echo(f"{r.id}: note " + ("saved" if text else "cleared"))


def _retag(run: str, tags: list[str], *, add: bool) -> None:
    from jobs.runs import JobError

    cleaned = [t.strip() for t in tags if t.strip()]
    bad = [t for t in cleaned if any(c.isspace() or c == "," for c in t)]
    if bad or not cleaned:
        raise JobError(f"tag {bad[0] if bad else ''!r}: a tag is one word (no spaces or commas), e.g. good baseline")
    jobs = _jobs()
    r = jobs.resolve(run)
    now = set(r.tags)
    now = now | set(cleaned) if add else now - set(cleaned)
    jobs.store.set_tags(r.id, now)
    echo(f"{r.id}: tags " + (", ".join(sorted(now)) or "(none)"))
