"""CLI commands for queued runs: submit, ls, show, metrics, samples, logs, cancel, resume, rm, worker.

Every listing takes `--json` for scripts. Runs are named by id or by any part of the id or name
that matches one run. Nothing here imports torch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from tuiapp.cli.manifest import show_manifest
from tuiapp.cli.options import (
    CONFIG_OPTION,
    DATASET_OPTION,
    MODEL_OPTION,
    PRESET_OPTION,
    SET_OPTION,
    echo,
    friendly,
    secho,
)
from tuiapp.text import KEY_METRICS, sample_lines

if TYPE_CHECKING:
    from jobs.store import RunRow

FOLLOW_COLUMNS = (
    "train/loss",
    "reward/mean",
    "rewards/margin",
    "rewards/accuracy",
    "kl/mean",
    "eval/exact_match",
    "eval/rewards/accuracy",
)


def _jobs():
    from jobs.runs import Jobs

    return Jobs()


def _emit_json(value: Any) -> None:
    echo(json.dumps(value, indent=2, default=str))


def _age(seconds: float | None) -> str:
    if not seconds:
        return "-"
    seconds = max(0.0, time.time() - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _key_metric(latest: dict[str, float]) -> str:
    for name in KEY_METRICS:
        if name in latest:
            return f"{name.split('/')[-1]} {latest[name]:.3f}"
    return "-"


def _run_json(run: RunRow, latest: dict[str, float] | None = None) -> dict[str, Any]:
    """Every column of the run as stored, the JSON ones decoded, and where its files are."""
    row = {k: v for k, v in run.row.items() if k not in ("spec", "log_tail")}
    row["spec"] = run.spec
    row["tags"] = run.tags
    row["swept"] = run.swept
    row["prune"] = run.prune
    row["machines"] = run.machines  # a run over several machines: each one's host, worker and GPUs
    row["location"] = run.location  # host:path when only that worker's disk holds the run's files
    if latest is not None:
        row["latest_metrics"] = latest
    return row


def _matches(run: RunRow, experiment: str | None, tags: list[str]) -> bool:
    return (experiment is None or run.experiment == experiment) and set(tags) <= set(run.tags)


def _labels(run: RunRow) -> str:
    """The run's GPUs, experiment, swept values and tags, for one table cell."""
    if run.machines:  # a run over several machines: every host and its GPUs
        parts = [f"on {run.hosts}"]
    else:
        parts = [f"GPU {run.gpus}"] if run.gpus else []  # the GPUs it holds (held, once ended)
    parts += [f"[{run.experiment}]"] if run.experiment else []
    parts += [f"{k}={v}" for k, v in run.swept.items()]
    parts += [f"#{t}" for t in run.tags]
    return " ".join(parts)


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` in the middle, so a run id keeps its time and its `-2` suffix."""
    if len(text) <= width:
        return text
    keep = width - 1
    return text[: keep - keep // 2] + "…" + text[-(keep // 2) :]


@friendly
def submit(
    preset: str = PRESET_OPTION,
    model: Optional[str] = MODEL_OPTION,
    dataset: Optional[str] = DATASET_OPTION,
    set_: list[str] = SET_OPTION,
    config: Optional[Path] = CONFIG_OPTION,
    after: Optional[str] = typer.Option(
        None, "--after", help="Start when this run completes, with its output as the model (e.g. SFT -> DPO)."
    ),
    priority: int = typer.Option(0, "--priority", help="Higher runs first; equal priorities run in submission order."),
    retries: int = typer.Option(
        0, "--retries", help="Re-run from the last checkpoint after a crash that is not a user error."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the stored run as JSON."),
) -> None:
    """Queue a run for `cherry worker` (same flags as `train`); prints the run id."""
    from engine.spec import resolve_spec

    spec = resolve_spec(preset, set_, model=model, dataset=dataset, config=config, check_paths=False)
    for note in [*(spec.aliases_used or []), *(spec.defaults_followed or [])]:
        echo(f"note: {note}", err=True)
    jobs = _jobs()
    run = jobs.submit(spec, priority=priority, after=after, retries=retries)
    if as_json:
        _emit_json(_run_json(run))
        return
    echo(run.id)
    waiting = f" after {run.parent}" if run.waiting_for_parent else ""
    echo(f"queued{waiting} in {jobs.home}; start a worker with `cherry worker` if none is running", err=True)


@friendly
def list_runs(
    status: list[str] = typer.Option(
        [],
        "--status",
        help="Only runs with this status (repeatable): queued, running, completed, failed, cancelled, interrupted, pruned.",
    ),
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Only the runs of this experiment."),
    tag: list[str] = typer.Option([], "--tag", "-t", help="Only runs with this tag (repeatable: all of them)."),
    text: Optional[str] = typer.Argument(None, help="Only runs whose id or name contains this."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array of runs."),
) -> None:
    """List runs, oldest first: status, algorithm, progress, key metric, age."""
    wanted = _statuses(status)
    jobs = _jobs()
    runs = jobs.store.find_runs(text) if text else jobs.store.list_runs(experiment=experiment)
    runs = [r for r in runs if (not wanted or r.status in wanted) and _matches(r, experiment, tag)]
    latest = jobs.store.latest_metrics_many([r.id for r in runs])
    if as_json:
        _emit_json([_run_json(r, latest[r.id]) for r in runs])
        return
    if not runs:
        echo(
            f"no runs in {jobs.home}"
            + (" with that filter" if wanted or text or experiment or tag else "; queue one with `cherry submit`")
        )
        return
    _echo_run_table(jobs, runs, latest)


def _statuses(status: list[str]) -> list[str]:
    """The statuses `--status` names (repeatable, or comma-separated), each checked."""
    from jobs.store import STATUSES

    wanted = [s for item in status for s in item.split(",") if s]
    unknown = [s for s in wanted if s not in STATUSES]
    if unknown:
        raise typer.BadParameter(
            f"unknown status {unknown[0]!r}; choose from {', '.join(STATUSES)}", param_hint="--status"
        )
    return wanted


def _echo_run_table(jobs, runs: list[RunRow], latest: dict[str, dict[str, float]]) -> None:
    """The workers line, then one line per run (`cherry ls`)."""
    workers = jobs.live_workers()
    if workers:
        busy, slots = sum(w["busy"] for w in workers), sum(w["slots"] for w in workers)
        echo(f"home {jobs.home}  ·  {len(workers)} worker(s), {busy}/{slots} slots busy")
    else:
        waiting = any(r.status == "queued" and r.task_id for r in runs)
        echo(f"home {jobs.home}  ·  no worker running" + ("; start one with `cherry worker`" if waiting else ""))
    echo(f"{'run':44s} {'status':11s} {'algo':6s} {'step':>11s}  {'key metric':20s} {'age':>5s}  labels")
    for r in runs:
        progress = f"{r.step or 0}/{r.total_steps or '?'}"
        status_text = r.status + ("*" if r.waiting_for_parent else "")
        echo(
            f"{_fit(r.id, 44):44s} {status_text:11s} {(r.algorithm or '-'):6s} {progress:>11s}  "
            f"{_key_metric(latest[r.id]):20s} {_age(r.created_at):>5s}  {_labels(r)}".rstrip()
        )
        if r.status == "queued" and r.waiting:  # a run over several machines that has not gathered them
            echo(f"  └ {r.waiting}")
    if any(r.waiting_for_parent for r in runs):
        echo("* waiting for the run it was chained after (--after)")


@friendly
def show(
    run: str = typer.Argument(..., help="Run id (or a unique part of it)."),
    as_json: bool = typer.Option(False, "--json", help="The run, its latest metrics and its summary as JSON."),
) -> None:
    """A run's status, timing, spec, latest metrics, summary and error."""
    jobs = _jobs()
    r = jobs.resolve(run)
    latest = jobs.store.latest_metrics(r.id)
    summary_file = Path(r.out_dir or "") / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if as_json:
        _emit_json({**_run_json(r, latest), "summary": summary, "log_tail": r.log_tail})
        return
    _echo_run(r)
    _echo_results(latest, summary)
    show_manifest(jobs.store, r)  # tuiapp/cli/manifest.py: versions, commit, data fingerprint, device
    changed = {k: v for k, v in r.spec.items() if k not in ("model", "dataset", "algorithm")}
    echo("spec: " + ", ".join(f"{k}={v}" for k, v in sorted(changed.items()) if v not in (None, "", [], {})))


def _echo_run(r: RunRow) -> None:
    """What a run is, where it stands and where its files are (`cherry show`)."""
    echo(f"run       {r.id}")
    echo(f"status    {r.status}" + (" (cancel requested)" if r.cancel_requested and r.status == "running" else ""))
    echo(f"algorithm {r.algorithm}    model {r.model}")
    echo(f"dataset   {r.dataset}")
    if r.parent:
        echo(f"after     {r.parent}")
    if r.experiment:
        echo(f"experiment {r.experiment}    {_labels(r).partition(' ')[2] or '-'}")
    elif _labels(r):
        echo(f"tags      {_labels(r)}")
    if r.note:
        echo(f"note      {r.note}")
    echo(f"progress  step {r.step or 0}/{r.total_steps or '?'}    attempts {r.attempts or 0}")
    started = r.started_at and time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at))
    echo(
        f"created   {_age(r.created_at)} ago    started {started or '-'}    "
        f"worker {r.worker_host or '-'} pid {r.pid or '-'}" + (f" GPU {r.gpus}" if r.gpus else "")
    )
    if r.machines:
        echo(f"machines  {r.hosts}")
    if r.status == "queued" and r.waiting:
        echo(f"waiting   {r.waiting}")
    echo(f"directory {r.location}")
    if r.error:
        secho(f"error     {r.error}", fg="red")


def _echo_results(latest: dict[str, float], summary: dict | None) -> None:
    """The latest value of each metric, and the eval metrics before -> after training."""
    if latest:
        echo("latest metrics:")
        for name in sorted(latest):
            echo(f"  {name:32s} {latest[name]:.6g}")
    if summary and summary.get("before"):
        echo("before -> final:")
        for name in sorted(summary["before"]):
            if name in summary.get("final", {}):
                echo(f"  {name:32s} {summary['before'][name]:.4f} -> {summary['final'][name]:.4f}")


@friendly
def metrics(
    run: str = typer.Argument(..., help="Run id (or a unique part of it)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new metrics until the run ends."),
    names: Optional[str] = typer.Option(
        None, "--names", help="Comma-separated metric names (default: the main ones logged)."
    ),
    as_json: bool = typer.Option(False, "--json", help="JSON lines: one object per logged step."),
    interval: float = typer.Option(1.0, help="Seconds between reads with --follow."),
) -> None:
    """A run's metrics per step (from the store), optionally following a live run."""
    from jobs.store import ENDED

    jobs = _jobs()
    r = jobs.resolve(run)
    wanted = [n.strip() for n in names.split(",")] if names else None
    logged: set[str] = set()
    columns: list[str] = []
    last_id = 0
    while True:
        # The status first: a run logs its last metrics before it ends, so rows read after seeing
        # it ended are all there is.
        status = jobs.store.get_run(r.id).status
        rows = jobs.store.metrics(r.id, after_id=last_id, names=wanted)
        if rows:
            last_id = rows[-1]["id"]
            columns = _echo_metric_rows(rows, wanted, logged, columns, as_json)
            sys.stdout.flush()
        if not follow:
            break
        if status in ENDED and not rows:
            echo(f"run {status}", err=True)
            break
        time.sleep(interval)
    if not last_id and not follow:
        echo(f"no metrics logged yet for {r.id} ({r.status})", err=True)


def _echo_metric_rows(
    rows: list[dict], wanted: list[str] | None, logged: set[str], columns: list[str], as_json: bool
) -> list[str]:
    """One line per step of the metric `rows` (adding their names to `logged`); returns the columns shown."""
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        by_step.setdefault(row["step"], {})[row["name"]] = row["value"]
        logged.add(row["name"])
    for step, values in by_step.items():
        if as_json:
            echo(json.dumps({"step": step, **values}))
            continue
        # The main metrics logged so far; the header is printed again when one appears.
        now = wanted or [c for c in FOLLOW_COLUMNS if c in logged] or sorted(logged)[:6]
        if now != columns:
            columns = now
            echo(f"{'step':>6s}  " + "  ".join(f"{c:>{max(12, len(c))}s}" for c in columns))
        cells = [f"{values[c]:{max(12, len(c))}.6g}" if c in values else " " * max(12, len(c)) for c in columns]
        echo(f"{step:6d}  " + "  ".join(cells))
    return columns


@friendly
def samples(
    run: str = typer.Argument(..., help="Run id (or a unique part of it)."),
    step: Optional[int] = typer.Option(None, "--step", help="Which logged step (default: the latest)."),
    limit: int = typer.Option(8, help="How many prompts to show."),
    as_json: bool = typer.Option(False, "--json", help="The samples as a JSON array."),
) -> None:
    """Reference vs policy completions on the fixed eval prompts at one logged step; for preference
    methods also chosen vs rejected on eval pairs with the method's reward of each and the margin."""
    jobs = _jobs()
    r = jobs.resolve(run)
    steps = jobs.store.sample_steps(r.id)
    if not steps:
        raise typer.BadParameter(f"{r.id} has logged no samples yet", param_hint="RUN")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise typer.BadParameter(
            f"no samples at step {chosen}; logged steps: {', '.join(map(str, steps))}", param_hint="--step"
        )
    rows = jobs.store.samples(r.id, chosen)
    if as_json:
        _emit_json(rows)
        return
    echo(f"{r.id} samples at step {chosen} (logged steps: {', '.join(map(str, steps))})\n")
    for line in sample_lines(rows, limit):
        echo(line)


@friendly
def logs(
    run: str = typer.Argument(..., help="Run id (or a unique part of it)."),
    lines: int = typer.Option(60, "--lines", "-n", help="How many of the last lines."),
    events: bool = typer.Option(False, "--events", help="Show the run's events (start, eval, cancel, errors) instead."),
) -> None:
    """The run's log (its process output) or its events; failures show the error first."""
    from jobs.home import runs_root
    from jobs.trust import RUN_ID_PATTERN
    from jobs.worker import log_tail

    jobs = _jobs()
    r = jobs.resolve(run)
    if r.error:
        secho(f"{r.status}: {r.error}", fg="red")
    if events:
        for event in jobs.store.events(r.id):
            stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            echo(f"{stamp} [{event['kind']}] {event['message']}")
        return
    streamed = "\n".join(jobs.store.log_text(r.id).splitlines()[-lines:])  # a run on another host
    local = runs_root(jobs.home, jobs.store.shared) / r.id / "log.txt"  # derived from the id, not the row
    text = (RUN_ID_PATTERN.fullmatch(r.id) and log_tail(local, lines)) or streamed or r.log_tail
    echo(text or f"(no log yet: {r.id} is {r.status})")


@friendly
def cancel(run: str = typer.Argument(..., help="Run id (or a unique part of it).")) -> None:
    """Cancel a queued run, or stop a running one at its next step (it keeps metrics and checkpoint)."""
    echo(_jobs().cancel(run))


@friendly
def resume(run: str = typer.Argument(..., help="Run id (or a unique part of it).")) -> None:
    """Queue a failed, cancelled, interrupted or pruned run again; it continues from its last checkpoint."""
    r = _jobs().resume(run)
    echo(f"{r.id}: queued to resume from its last checkpoint")


@friendly
def requeue() -> None:
    """Queue again the runs the store knows are queued but no queue holds (after a Redis restart
    without persistence; workers also do this by themselves every sweep)."""
    lost = _jobs().requeue_lost()
    echo("\n".join(f"{run_id}: queued again" for run_id in lost) or "nothing lost: every queued run is on the queue")


@friendly
def remove(
    run: str = typer.Argument(..., help="Run id (or a unique part of it)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask (scripts)."),
) -> None:
    """Delete a run: its store rows and its run directory (checkpoints, weights, logs)."""
    jobs = _jobs()
    r = jobs.resolve(run)
    if not yes and not typer.confirm(f"delete {r.id} ({r.status}) and {r.out_dir or 'its store rows'}?", default=False):
        raise typer.Exit(1)
    jobs.remove(r.id)
    echo(f"removed {r.id}")


@friendly
def worker(
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPUs to use, e.g. 0,1: one run per GPU at a time."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Runs at once (default: one per GPU, or 1)."),
    grace: float = typer.Option(30.0, help="Seconds a stopping run gets to checkpoint before it is killed."),
    name: Optional[str] = typer.Option(
        None, "--name", help="This worker's host name in the store (default: $CHERRY_HOST, else the hostname)."
    ),
) -> None:
    """Execute queued runs (Ctrl+C / SIGTERM stops them at their next step, then exits)."""
    import logging

    from jobs.home import cherry_home
    from jobs.queue import queue_backend
    from jobs.worker import Worker

    gpu_list = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None
    if gpu_list and concurrency and concurrency != len(gpu_list):
        raise typer.BadParameter(
            "must equal the number of --gpus (a GPU runs one job at a time)", param_hint="--concurrency"
        )
    if concurrency is not None and concurrency < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--concurrency")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("huey").setLevel(logging.WARNING)
    home = cherry_home()
    w = Worker(home, gpus=gpu_list, concurrency=concurrency, grace=grace, name=name)
    echo(
        f"cherry worker: home {home}, name {w.host}, queue {queue_backend()}, {w.concurrency} slot(s)"
        + (f" on GPUs {','.join(gpu_list)}" if gpu_list else ""),
        err=True,
    )
    w.run()


def register(app: typer.Typer) -> None:
    """Add the run-management commands to the `cherry` app."""
    app.command()(submit)
    app.command("ls")(list_runs)
    app.command()(show)
    app.command()(metrics)
    app.command()(samples)
    app.command()(logs)
    app.command()(cancel)
    app.command()(resume)
    app.command()(requeue)
    app.command("rm")(remove)
    app.command()(worker)
