"""What the main screen shows of a run as text, free of any widget: its title, system figures, spec and
events, the line of latest values under its charts; and the runs filter."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from rich.text import Text

from tuiapp.data import GLYPHS, RunDetail, RunInfo, duration, sys_metrics
from tuiapp.widgets.plot import fmt_num, sparkline

SUMMARY_METRICS = ("rewards/margin", "rewards/accuracy", "kl/mean", "eval/exact_match", "train/tokens_per_s")


def matches(run: RunInfo, text: str, status: str | None) -> bool:
    if status == "live" and run.status not in ("queued", "running"):
        return False
    if status not in (None, "live") and run.status != status:
        return False
    if not text:
        return True
    # `#good` finds runs tagged good, `lr=1e-6` a swept value, an experiment's name its runs.
    words = [run.id, run.name, run.algorithm, run.model, run.dataset, run.status, run.experiment or ""]
    words += [f"#{t}" for t in run.tags] + [f"{k}={v}" for k, v in run.swept.items()]
    hay = " ".join(words).lower()
    return all(word in hay for word in text.lower().split())


def progress_bar(fraction: float, width: int = 20) -> str:
    filled = int(round(fraction * width))
    return "━" * filled + "─" * (width - filled)


def short_path(value: str) -> str:
    """The last part of a path; with its parent when the last part alone says little (model, final)."""
    if not value:
        return "-"
    parts = value.rstrip("/").split("/")
    if len(parts) > 1 and parts[-1] in ("model", "final", "checkpoint", "data"):
        return "/".join(parts[-2:])
    return parts[-1]


def short_home(path, limit: int = 40) -> str:
    text = str(path)
    home = str(Path.home())
    if text.startswith(home + "/"):
        text = "~" + text[len(home) :]
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def run_title(run: RunInfo, now: float | None = None, width: int = 80) -> Text:
    """Two lines: who the run is, then where it stands (status, progress, ETA); a third for an error."""
    glyph, colour = GLYPHS.get(run.status, ("?", "white"))
    text = Text()
    text.append(f"{glyph} {run.name}", style=f"bold {colour}")
    text.append(f"  {run.algorithm} · {short_path(run.model)} · {short_path(run.dataset)}", style="dim")
    text.append(f"\n{run.status}", style=colour)
    if run.cancel_requested and run.status == "running":
        text.append(" (stopping)", style="magenta")
    if run.waiting:
        text.append(f" (waiting for {run.parent})", style="yellow")
    if run.total_steps:
        frac = run.progress or 0.0
        text.append(f"  {progress_bar(frac, 16 if width >= 60 else 8)} ", style=colour)
        text.append(f"{run.step}/{run.total_steps}")
    eta = run.eta_seconds(now)
    if eta is not None:
        text.append(f"  ETA {duration(eta)}")
    elif run.ended and run.started_at and run.finished_at:
        text.append(f"  took {duration(run.finished_at - run.started_at)}", style="dim")
    if run.error:
        text.append(f"\n{run.error}", style="red")
    return text


SYS_KNOWN = ("sys/gpu_util", "sys/gpu_mem_gb", "sys/rss_gb", "sys/cpu_percent")


def sys_text(detail: RunDetail) -> Text:
    """System figures of a run: GPU utilisation and memory when it logged them (it ran on a GPU),
    then its process's RSS and CPU (live from /proc when it runs here, else as last logged)."""
    text = Text()
    logged = sys_metrics(detail.series)
    proc = detail.proc
    if proc is None and not logged:
        return text
    text.append("system ", style="bold")
    parts: list[tuple[str, str]] = []  # (label, value)
    if "sys/gpu_util" in logged:
        spark = sparkline(detail.series["sys/gpu_util"].values, 8)
        parts.append(("gpu", f"{logged['sys/gpu_util']:.0f}%" + (f" {spark}" if len(spark) > 1 else "")))
    if "sys/gpu_mem_gb" in logged:
        parts.append(("gpu mem", f"{fmt_num(logged['sys/gpu_mem_gb'])} GB"))
    if proc is not None and proc.rss_gb is not None:
        parts.append(("rss", f"{proc.rss_gb:.2f} GB"))
    elif "sys/rss_gb" in logged:
        parts.append(("rss", f"{fmt_num(logged['sys/rss_gb'])} GB"))
    if proc is not None:
        parts.append(("cpu", "…" if proc.cpu_pct is None else f"{proc.cpu_pct:.0f}%"))
        if proc.threads:
            parts.append(("threads", str(proc.threads)))
    elif "sys/cpu_percent" in logged:
        parts.append(("cpu", f"{logged['sys/cpu_percent']:.0f}%"))
    for name, value in logged.items():  # anything else a run logs under sys/
        if name in SYS_KNOWN:
            continue
        label = name.removeprefix("sys/").replace("_gb", "").replace("_", " ")
        unit = " GB" if name.endswith("_gb") else "%" if name.endswith(("_util", "_pct", "_percent")) else ""
        parts.append((label, f"{fmt_num(value)}{unit}"))
    for i, (label, value) in enumerate(parts):
        if i:
            text.append(" · ", style="dim")
        text.append(f"{label} ", style="dim")
        text.append(value)
    gpu = "sys/gpu_util" in logged or "sys/gpu_mem_gb" in logged
    source = (f"pid {proc.pid}" + (", gpu as last logged" if gpu else "")) if proc is not None else "last logged"
    text.append(f"  ({source})", style="dim")
    return text


def spec_text(run: RunInfo, events: list[dict]) -> Text:
    text = Text()
    text.append(f"id        {run.id}\ndirectory {run.location or run.out_dir}\n", style="dim")
    if run.hosts or run.worker_host or run.gpus:
        where = run.hosts or (run.worker_host or "") + (f"  GPU {run.gpus}" if run.gpus else "")
        text.append(f"ran on    {where.strip()}\n", style="dim")
    if run.waiting_reason:
        text.append(f"waiting   {run.waiting_reason}\n", style="yellow")
    if run.parent:
        text.append(f"after     {run.parent}\n", style="dim")
    if run.experiment:
        swept = "  ".join(f"{k}={v}" for k, v in run.swept.items())
        text.append(f"experiment {run.experiment}  {swept}\n")
    if run.tags:
        text.append("tags      " + " ".join(f"#{t}" for t in run.tags) + "\n", style="cyan")
    if run.note:
        text.append(f"note      {run.note}\n", style="yellow")
    text.append("\nspec\n", style="bold")
    text.append(yaml.safe_dump(run.spec, sort_keys=False, default_flow_style=False, width=100))
    text.append("\nevents\n", style="bold")
    for event in events[-60:]:
        stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
        style = "red" if event["kind"] in ("failed", "error") else ""
        text.append(f"{stamp} ", style="dim")
        text.append(f"[{event['kind']}] ", style="cyan")
        text.append(f"{event['message']}\n", style=style)
    return text


def latest_text(detail: RunDetail, charted: list[str], hidden: list[str]) -> Text:
    """The line under the charts: how many charts did not fit, then the latest value and a sparkline of
    each summary metric not charted; or that the run has logged nothing yet."""
    if not detail.series:
        return Text(
            "no metrics logged yet" + (" (the run waits for a worker)" if detail.run.status == "queued" else ""),
            style="dim",
        )
    latest = Text()
    if hidden:
        latest.append(f"+{len(hidden)} more charts (m picks, or enlarge the terminal)  ", style="dim")
    for name in SUMMARY_METRICS:
        if name in detail.series and detail.series[name].values and name not in charted:
            values = detail.series[name].values
            latest.append(f"{name.replace('rewards/', '').replace('train/', '').replace('sys/', '')} ", style="dim")
            latest.append(f"{fmt_num(values[-1])} ")
            latest.append(sparkline(values, 8) + "  ", style="cyan")
    return latest
