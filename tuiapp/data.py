"""What the app shows, read from the run store off the UI thread.

`StoreReader` owns one `Store` (sqlite connections stay in the thread that opened them) and keeps
each run's metric series in memory, reading only rows newer than the last id it saw, so a run
that logs thousands of rows costs one small query per refresh. `read()` returns a `Snapshot` of
plain data the UI renders without touching SQLite.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.home import runs_root
from jobs.queue import queue_backend
from jobs.shared import open_store
from jobs.store import ENDED, RunRow, sample_kind, this_host
from jobs.trust import RUN_ID_PATTERN
from tuiapp.text import KEY_METRICS, safe_data, safe_text

LIVE = ("queued", "running")
GLYPHS = {
    "queued": ("○", "yellow"),
    "running": ("●", "green"),
    "completed": ("✓", "cyan"),
    "failed": ("✗", "red"),
    "cancelled": ("⊘", "magenta"),
    "interrupted": ("◌", "orange1"),
    "pruned": ("✂", "grey62"),  # stopped early by its sweep's rule; resumable
}
FRONTIER_Y = ("eval/exact_match", "eval/reward", "eval/rewards/accuracy")
FRONTIER_X = "kl/mean"


@dataclass
class SeriesData:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def copy(self) -> "SeriesData":
        return SeriesData(list(self.steps), list(self.values), list(self.times))


@dataclass
class RunInfo:
    """A run row as the UI needs it."""

    id: str
    name: str
    status: str
    algorithm: str
    model: str
    dataset: str
    step: int
    total_steps: int
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    parent: str | None
    waiting: bool  # chained after another run that has not completed yet
    cancel_requested: bool
    error: str | None
    out_dir: str
    spec: dict[str, Any]
    key_metric: tuple[str, float] | None = None
    pid: int | None = None  # the run's own process (while it runs)
    worker_host: str | None = None
    gpus: str | None = None  # the GPUs the worker gave the run ("0,1"), while it runs and after
    hosts: str = ""  # a run over several machines (num_machines > 1): every machine's host and GPUs
    waiting_reason: str | None = None  # why a queued run over several machines has not started
    location: str = ""  # host:path when only that worker's disk holds the run's files
    experiment: str | None = None  # the sweep (or group) the run belongs to
    swept: dict[str, Any] = field(default_factory=dict)  # the values its sweep point set
    tags: list[str] = field(default_factory=list)
    note: str | None = None
    prune: dict[str, Any] | None = None  # its sweep's early-stopping rule {rule, metric, mode, ...}

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def progress(self) -> float | None:
        return min(1.0, self.step / self.total_steps) if self.total_steps else None

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Remaining time at the average pace since the run started (None until it can tell)."""
        if self.status != "running" or not self.started_at or not self.total_steps or self.step <= 0:
            return None
        elapsed = (now or time.time()) - self.started_at
        return max(0.0, elapsed / self.step * (self.total_steps - self.step))

    @classmethod
    def from_run(cls, run: RunRow) -> "RunInfo":
        return cls(
            id=run.id,
            name=run.name or run.id,
            status=run.status,
            algorithm=run.algorithm or "-",
            model=run.model or "-",
            dataset=run.dataset or "-",
            step=run.step or 0,
            total_steps=run.total_steps or 0,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            parent=run.parent,
            waiting=run.waiting_for_parent,
            cancel_requested=bool(run.cancel_requested),
            error=run.error,
            out_dir=run.out_dir or "",
            spec=run.spec,
            pid=run.pid,
            worker_host=run.worker_host,
            gpus=run.gpus,
            hosts=run.hosts if run.machines else "",
            waiting_reason=run.waiting if run.status == "queued" else None,
            location=run.location,
            experiment=run.experiment,
            swept=run.swept,
            tags=run.tags,
            note=run.note,
            prune=run.prune,
        )


@dataclass
class RunDetail:
    run: RunInfo
    series: dict[str, SeriesData]
    sample_steps: list[int]
    sample_step: int | None
    samples: list[dict[str, Any]]
    events: list[dict[str, Any]]
    log: str
    proc: ProcFigures | None = None  # the run's process when it runs on this machine


@dataclass
class Want:
    """What the UI wants read next (set from the UI thread, read by the reader thread)."""

    focus: str | None = None
    sample_step: int | None = None  # None = the newest logged step
    compare: tuple[str, ...] = ()
    # The compare screen's side-by-side samples: (run id, step or None = its newest) of runs A and B.
    compare_samples: tuple[tuple[str, int | None], ...] = ()


@dataclass
class SampleSet:
    """The sample rows one run logged at one step, and the steps it logged any at."""

    run_id: str
    steps: list[int]
    step: int | None
    rows: list[dict[str, Any]]


def move_step(steps: list[int], current: int | None, delta: int) -> int:
    """The logged step `delta` places from `current` (from the newest when `current` is not one), clamped."""
    start = steps.index(current) if current in steps else len(steps) - 1
    return steps[max(0, min(len(steps) - 1, start + delta))]


def comparison_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if sample_kind(r) == "comparison"]


def preference_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if sample_kind(r) == "preference"]


@dataclass
class Matched:
    """Two runs' sample rows matched by prompt text (preference pairs by prompt, chosen and rejected)."""

    shared: list[tuple[str, dict[str, Any], dict[str, Any]]]  # (prompt, A's row, B's row), in A's order
    only_a: int
    only_b: int
    pairs: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    @property
    def differing(self) -> int:
        return sum(1 for _, a, b in self.shared if (a.get("policy") or "") != (b.get("policy") or ""))


def match_samples(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> Matched:
    """Match A's and B's rows of one logged step each on the same prompt text (the first row of a
    prompt when a run logged it twice). Completions are the comparison rows' policy texts; the
    preference rows of both (same pair: prompt, chosen, rejected) are matched alongside."""

    def by(rows, key):
        out: dict[Any, dict[str, Any]] = {}
        for row in rows:
            out.setdefault(key(row), row)
        return out

    prompt = lambda r: r.get("prompt") or ""  # noqa: E731
    a, b = by(comparison_rows(rows_a), prompt), by(comparison_rows(rows_b), prompt)
    shared = [(p, row, b[p]) for p, row in a.items() if p in b]
    pair_key = lambda r: (r.get("prompt") or "", r.get("chosen") or "", r.get("rejected") or "")  # noqa: E731
    pa, pb = by(preference_rows(rows_a), pair_key), by(preference_rows(rows_b), pair_key)
    pairs = [(k[0], row, pb[k]) for k, row in pa.items() if k in pb]
    return Matched(shared, len(a) - len(shared), len(b) - len(shared), pairs)


@dataclass
class Snapshot:
    home: Path
    backend: str
    runs: list[RunInfo]
    pending: int  # runs queued and waiting for a worker
    running: int
    workers: list[dict[str, Any]]  # live workers of this home (Store.live_workers)
    detail: RunDetail | None
    compare: dict[str, dict[str, SeriesData]]
    read_at: float
    compare_samples: dict[str, SampleSet] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return any(r.status in LIVE for r in self.runs)

    @property
    def live_workers(self) -> int:
        return len(self.workers)

    @property
    def busy_slots(self) -> tuple[int, int]:
        """(busy, total) run slots over the live workers."""
        return sum(w.get("busy") or 0 for w in self.workers), sum(w.get("slots") or 0 for w in self.workers)


def algorithm_row(algorithm: str):
    """The engine's registry row of `algorithm` (torch-free), or None for a name it does not know."""
    from engine.registry import ALGORITHMS

    return ALGORITHMS.get(algorithm)


def default_metrics(algorithm: str, available: list[str]) -> list[str]:
    """The charts a user of `algorithm` watches first (its registry row), among the metrics the run has."""
    row = algorithm_row(algorithm)
    wanted = [m for m in row.charts if m in available] if row is not None else []
    return wanted or available[:4]


def key_metric(latest: dict[str, float], prefer: str | None = None) -> tuple[str, float] | None:
    """The metric a run is summarised by: `prefer` (its sweep's pruning metric) when logged, else the first
    of KEY_METRICS it has."""
    for name in ((prefer,) if prefer else ()) + KEY_METRICS:
        if name in latest:
            return name, latest[name]
    return None


def log_tail(path: Path, max_bytes: int = 16_000, lines: int = 200) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ProcFigures:
    """A local run process's resources, read from /proc (None where the OS does not tell)."""

    pid: int
    rss_gb: float | None
    cpu_pct: float | None  # since the previous read; 100 = one core busy
    threads: int | None


def read_proc(pid: int) -> tuple[float, float, int] | None:
    """(rss bytes, cpu seconds used, threads) of a live process, from /proc/<pid>/stat; None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        fields = stat[stat.rindex(")") + 2 :].split()  # fields from the 3rd on (the name may hold spaces)
        if fields[0] in ("Z", "X"):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        threads = int(fields[17])
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, IndexError, OSError):
        return None
    return rss, cpu, threads


def sys_metrics(series: dict[str, "SeriesData"]) -> dict[str, float]:
    """The newest value of each sys/* metric a run logged (GPU memory and utilisation, RSS, CPU)."""
    return {name: s.values[-1] for name, s in sorted(series.items()) if name.startswith("sys/") and s.values}


class StoreReader:
    """Reads snapshots of one Cherry home; use it from one thread only."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.store = open_store(self.home)
        self._series: dict[str, dict[str, SeriesData]] = {}
        self._last_id: dict[str, int] = {}
        self._latest: dict[str, tuple[tuple[Any, ...], tuple[str, float] | None]] = {}
        self._cpu: dict[int, tuple[float, float]] = {}  # pid -> (monotonic time, cpu seconds) at the last read

    def close(self) -> None:
        self.store.close()

    def series(self, run_id: str, step: int) -> dict[str, SeriesData]:
        """All metric series of a run, updated incrementally (a rewound run is read again)."""
        cached = self._series.get(run_id)
        if cached and any(s.steps and s.steps[-1] > step for s in cached.values()):
            cached = None  # resumed from an earlier checkpoint: the store forgot later steps
        if cached is None:
            cached, self._last_id[run_id] = {}, 0
            self._series[run_id] = cached
        rows = self.store.metrics(run_id, after_id=self._last_id.get(run_id, 0))
        for row in rows:
            s = cached.setdefault(row["name"], SeriesData())
            s.steps.append(row["step"])
            s.values.append(row["value"])
            s.times.append(row["time"])
        if rows:
            self._last_id[run_id] = rows[-1]["id"]
        return cached

    def _key_metric(self, run: RunInfo) -> tuple[str, float] | None:
        stamp = (run.step, run.status)
        hit = self._latest.get(run.id)
        if hit is None or hit[0] != stamp:
            hit = (stamp, key_metric(self.store.latest_metrics(run.id), (run.prune or {}).get("metric")))
            self._latest[run.id] = hit
        return hit[1]

    def proc_figures(self, run: RunInfo) -> ProcFigures | None:
        """RSS, CPU and threads of a running run's process, when it runs on this machine."""
        if run.status != "running" or not run.pid or run.worker_host != this_host():
            return None
        figures = read_proc(run.pid)
        if figures is None:
            return None
        rss, cpu, threads = figures
        now = time.monotonic()
        before = self._cpu.get(run.pid)
        self._cpu[run.pid] = (now, cpu)
        pct = None
        if before is not None and now - before[0] > 0.05:
            pct = max(0.0, (cpu - before[1]) / (now - before[0]) * 100)
        return ProcFigures(run.pid, rss / 2**30, pct, threads)

    def _log(self, run_id: str) -> str:
        """The run's log: this host's file (in the directory derived from the id), else the shared copy."""
        local = log_tail(runs_root(self.home, self.store.shared) / run_id / "log.txt")
        return local or self.store.log_text(run_id)[-64_000:]

    def read(self, want: Want) -> Snapshot:
        # Everything shown is escaped here, once (tuiapp.text.safe_data); a row whose id is not a run id
        # (a tampered shared store) is left out: its id would be looked up and shown everywhere.
        runs = [safe_run(RunInfo.from_run(r)) for r in self.store.list_runs() if RUN_ID_PATTERN.fullmatch(r.id)]
        for run in runs:
            run.key_metric = safe_data(self._key_metric(run))
        workers = self.store.live_workers()
        by_id = {r.id: r for r in runs}
        detail = None
        if want.focus in by_id:
            run = by_id[want.focus]
            series = {safe_text(k): v.copy() for k, v in self.series(run.id, run.step).items()}
            steps = self.store.sample_steps(run.id)
            step = want.sample_step if want.sample_step in steps else (steps[-1] if steps else None)
            detail = RunDetail(
                run=run,
                series=series,
                sample_steps=steps,
                sample_step=step,
                samples=safe_data(self.store.samples(run.id, step)) if step is not None else [],
                events=safe_data(self.store.events(run.id)[-200:]),
                log=safe_text(self._log(run.id)),
                proc=self.proc_figures(run),
            )
        compare = {
            rid: {safe_text(k): v.copy() for k, v in self.series(rid, by_id[rid].step).items()}
            for rid in want.compare
            if rid in by_id
        }
        compare_samples: dict[str, SampleSet] = {}
        for rid, wanted_step in want.compare_samples:
            if rid in by_id and rid not in compare_samples:
                steps = self.store.sample_steps(rid)
                step = wanted_step if wanted_step in steps else (steps[-1] if steps else None)
                rows = safe_data(self.store.samples(rid, step)) if step is not None else []
                compare_samples[rid] = SampleSet(rid, steps, step, rows)
        return Snapshot(
            home=self.home,
            backend=queue_backend(),
            runs=runs,
            pending=sum(1 for r in runs if r.status == "queued" and not r.waiting),
            running=sum(1 for r in runs if r.status == "running"),
            workers=safe_data(workers),
            detail=detail,
            compare=compare,
            read_at=time.time(),
            compare_samples=compare_samples,
        )


def safe_run(run: RunInfo) -> RunInfo:
    """`run` with every string it shows escaped (its id is a checked run id already)."""
    for f in dataclasses.fields(run):
        if f.name != "id":
            setattr(run, f.name, safe_data(getattr(run, f.name)))
    return run


def age(seconds: float | None, now: float | None = None) -> str:
    if not seconds:
        return "-"
    seconds = max(0.0, (now or time.time()) - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def frontier_points(series: dict[str, SeriesData]) -> tuple[str, list[float], list[float]] | None:
    """(y metric, kl values, y values) at each eval step where both were logged."""
    kl = series.get(FRONTIER_X)
    if kl is None:
        return None
    kl_at = dict(zip(kl.steps, kl.values))
    for name in FRONTIER_Y:
        ys = series.get(name)
        if ys is None:
            continue
        pts = [(kl_at[s], v) for s, v in zip(ys.steps, ys.values) if s in kl_at]
        if pts:
            return name, [p[0] for p in pts], [p[1] for p in pts]
    return None
