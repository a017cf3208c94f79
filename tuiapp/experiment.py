"""Experiments as the app shows them: runs grouped by experiment (best point first), each experiment's
key metric, the reward-vs-KL frontier across its runs, and a colour per swept value.

Plain data in, plain data out (no Textual): the runs table and the experiment view render these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tuiapp.data import RunInfo, SeriesData, frontier_points
from tuiapp.text import lower_is_better

GROUP_KEY = "experiment:"  # row keys of group rows in the runs table (run ids never start with it)
# Low to high swept values run from cool to warm colours, so the order reads off the chart.
VALUE_COLOURS = ("dodger_blue1", "cyan", "green3", "gold1", "orange1", "red1", "magenta", "medium_purple1")


@dataclass
class Group:
    """One experiment's row in the runs table, and its runs, best first."""

    name: str
    runs: list[RunInfo]
    collapsed: bool = False
    metric: str | None = None  # the key metric the runs are ordered by
    lower: bool = False  # lower is better for that metric

    @property
    def key(self) -> str:
        return GROUP_KEY + self.name

    @property
    def best(self) -> RunInfo | None:
        return self.runs[0] if self.runs else None

    @property
    def best_value(self) -> float | None:
        best = self.best
        if best is None or not best.key_metric or best.key_metric[0] != self.metric:
            return None
        return best.key_metric[1]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for run in self.runs:
            out[run.status] = out.get(run.status, 0) + 1
        return out


def group_name(key: str | None) -> str | None:
    """The experiment of a group row's key, None for a run's key."""
    return key[len(GROUP_KEY) :] if key and key.startswith(GROUP_KEY) else None


def experiment_metric(runs: list[RunInfo]) -> tuple[str | None, bool]:
    """(metric, lower is better) an experiment is judged by: its pruning rule's metric and mode, else the
    key metric most of its runs show."""
    for run in runs:
        if run.prune and run.prune.get("metric"):
            return run.prune["metric"], run.prune.get("mode") == "min"
    counts: dict[str, int] = {}
    for run in runs:
        if run.key_metric:
            counts[run.key_metric[0]] = counts.get(run.key_metric[0], 0) + 1
    if not counts:
        return None, False
    name = max(counts, key=lambda n: counts[n])
    return name, lower_is_better(name)


def best_first(runs: list[RunInfo], metric: str | None, lower: bool) -> list[RunInfo]:
    """Runs by `metric` (their key metric's latest value), best first; runs without it last, in their order."""

    def rank(run: RunInfo):
        if metric is None or not run.key_metric or run.key_metric[0] != metric or not math.isfinite(run.key_metric[1]):
            return (1, 0.0)
        value = run.key_metric[1]
        return (0, value if lower else -value)

    return sorted(runs, key=rank)


def grouped(runs: list[RunInfo], collapsed: set[str]) -> list[RunInfo | Group]:
    """The table's rows: runs without an experiment as they come; each experiment once, where its first run
    comes in `runs`, as a group row followed (unless collapsed) by its runs best first."""
    members: dict[str, list[RunInfo]] = {}
    for run in runs:
        if run.experiment:
            members.setdefault(run.experiment, []).append(run)
    rows: list[RunInfo | Group] = []
    placed: set[str] = set()
    for run in runs:
        name = run.experiment
        if not name:
            rows.append(run)
            continue
        if name in placed:
            continue
        placed.add(name)
        metric, lower = experiment_metric(members[name])
        group = Group(name, best_first(members[name], metric, lower), name in collapsed, metric, lower)
        rows.append(group)
        if not group.collapsed:
            rows.extend(group.runs)
    return rows


def value_colours(values: list) -> dict[str, str]:
    """A colour per distinct value (as text), ordered low to high when all are numbers, else as given."""
    distinct = list(dict.fromkeys(str(v) for v in values))
    try:
        distinct.sort(key=float)
    except ValueError:
        pass
    n = len(distinct)
    if n <= 1:
        return {v: VALUE_COLOURS[0] for v in distinct}
    if n >= len(VALUE_COLOURS):
        return {v: VALUE_COLOURS[i % len(VALUE_COLOURS)] for i, v in enumerate(distinct)}
    # spread over the palette so two values are blue and red, not blue and cyan
    span = len(VALUE_COLOURS[:6]) - 1
    return {v: VALUE_COLOURS[round(i * span / (n - 1))] for i, v in enumerate(distinct)}


def swept_keys(runs: list[RunInfo]) -> list[str]:
    """The settings the experiment's sweep varied, in the order its points name them."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.swept))
    return list(keys)


def pareto(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the points no other point beats on both axes: x lower is better (KL), y higher (reward)."""
    front = set()
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy >= y) and (ox < x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.add(i)
    return front


@dataclass
class RunResult:
    """One run of an experiment as its table row: swept values, best and final key metric, final frontier point."""

    run: RunInfo
    best: float | None = None
    final: float | None = None
    kl: float | None = None  # at the final frontier point
    reward: float | None = None  # the frontier's y metric at that point
    on_front: bool = False
    values: dict[str, str] = field(default_factory=dict)


def results(
    runs: list[RunInfo], series: dict[str, dict[str, SeriesData]], metric: str | None, lower: bool
) -> tuple[list[RunResult], str | None]:
    """Each run's row, best first by its best value of `metric`, and the frontier's y metric.

    The frontier point of a run is its last eval point where both KL and the held-out metric were logged
    (eval/exact_match, eval/reward or eval/rewards/accuracy, as in the compare view)."""
    keys = swept_keys(runs)
    out = []
    y_name = None
    for run in runs:
        by_name = series.get(run.id, {})
        row = RunResult(run, values={k: str(run.swept.get(k, "-")) for k in keys})
        s = by_name.get(metric or "")
        finite = [v for v in (s.values if s else []) if math.isfinite(v)]
        if finite:
            row.best = min(finite) if lower else max(finite)
            row.final = finite[-1]
        point = frontier_points(by_name)
        if point is not None:
            y_name, xs, ys = point
            row.kl, row.reward = xs[-1], ys[-1]
        out.append(row)
    on = [r for r in out if r.kl is not None and r.reward is not None]
    for i in pareto([(r.kl, r.reward) for r in on]):
        on[i].on_front = True
    out.sort(key=lambda r: (r.best is None, 0.0 if r.best is None else (r.best if lower else -r.best)))
    return out, y_name
