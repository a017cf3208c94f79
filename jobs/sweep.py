"""Sweeps: many runs of one preset that differ in a few settings, grouped as one experiment.

A sweep is a preset, a model, a dataset, fixed `--set` overrides, a grid (every combination of
listed values) and/or random draws over ranges (`lr=log(1e-7,1e-5)`, `beta=uniform(0.05,0.5)`,
`loss_type=choice(sigmoid,ipo)`), drawn with a fixed seed so a sweep file always gives the same
points. Every point is resolved and passes `Jobs.check` (the checks `submit` makes) before any
run is queued: one bad point refuses the whole sweep, naming the point and the field.

Early stopping (`prune`), two rules. `median`: at each of its eval points a run of the sweep compares
its metric with the median of the other runs of its experiment at the same step; after `after` eval
points, a run worse than that median ends as `pruned`. `halving` (successive halving, judged as each
run arrives, as asynchronous successive halving does): rungs sit at steps `rung`, `rung*eta`,
`rung*eta^2`, ...; at the highest rung a run has reached, it goes on only while it ranks among the
best ceil(n/eta) of the n runs of its experiment that reached that rung. A pruned run keeps its
metrics and checkpoint and can be resumed. The run's own process asks (jobs/child.py's stop check),
so it stops cooperatively like a cancel.

Torch-free: the CLI imports this module.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import CherryError
from engine.limits import load_yaml_file
from jobs.store import RunRow, Store

PRUNE_RULES = ("median", "halving")
_RANGE = re.compile(r"^(log|uniform|int|choice)\((.*)\)$")


class SweepError(CherryError):
    """A sweep that cannot be planned: a malformed grid, range or sweep file."""


@dataclass
class Sweep:
    preset: str = "dpo"
    model: str | None = None
    dataset: str | None = None
    config: str | None = None  # a config file (TRL's shape or a preset's) under the fixed overrides
    sets: list[str] = field(default_factory=list)  # fixed `key=value` overrides shared by every point
    grid: dict[str, list[str]] = field(default_factory=dict)
    random: dict[str, str] = field(default_factory=dict)  # key -> range text, e.g. log(1e-7,1e-5)
    count: int = 0  # random draws (per grid point)
    seed: int = 0
    name: str | None = None  # the experiment; default preset-date
    prune: dict[str, Any] | None = None  # {rule, metric, after, mode} (+ eta, rung for halving)

    @property
    def experiment(self) -> str:
        return self.name or f"{Path(self.preset).stem.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M')}"


def parse_grid(items: list[str], flag: str = "--grid") -> dict[str, list[str]]:
    """`key=v1,v2,...` items -> {key: [v1, v2, ...]} (a key given twice is an error)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, values = _split(item, flag)
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not parts:
            raise SweepError(f"{flag} {item!r}: give at least one value after '=' (e.g. lr=1e-6,2e-6)")
        if key in grid:
            raise SweepError(f"{flag}: {key} is given twice; list all its values in one {flag} {key}=a,b")
        grid[key] = parts
    return grid


def parse_ranges(items: list[str]) -> dict[str, str]:
    """`key=log(a,b)` / `uniform(a,b)` / `int(a,b)` / `choice(x,y)` items -> {key: range text}, checked."""
    ranges: dict[str, str] = {}
    for item in items:
        key, text = _split(item, "--grid")
        draw_value(key, text, random.Random(0))  # refuse a malformed range now, not at the first draw
        ranges[key] = text.strip()
    return ranges


def _split(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SweepError(f"{flag} {item!r}: write key=values, e.g. lr=1e-6,2e-6")
    return key.strip(), value


def draw_value(key: str, text: str, rng: random.Random) -> str:
    """One draw from a range as the text a `--set` takes."""
    match = _RANGE.match(text.strip())
    if not match:
        raise SweepError(
            f"--grid {key}={text}: write log(low,high), uniform(low,high), int(low,high) or choice(a,b,...)"
        )
    kind, inner = match.groups()
    args = [a.strip() for a in inner.split(",") if a.strip()]
    if kind == "choice":
        if not args:
            raise SweepError(f"--grid {key}={text}: choice needs at least one value")
        return rng.choice(args)
    try:
        low, high = (float(a) for a in args)
    except ValueError:
        raise SweepError(f"--grid {key}={text}: {kind} takes two numbers, low and high") from None
    if low > high or (kind == "log" and low <= 0):
        raise SweepError(f"--grid {key}={text}: need low <= high" + (" and low > 0 for log" if kind == "log" else ""))
    if kind == "int":
        return str(rng.randint(int(low), int(high)))
    value = math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "log" else rng.uniform(low, high)
    return f"{value:.4g}"


def points(sweep: Sweep) -> list[dict[str, str]]:
    """Every point of the sweep: the grid's combinations, each with `count` random draws (seeded)."""
    if sweep.random and sweep.count < 1:
        raise SweepError("ranges need --random N (how many points to draw)")
    if sweep.count and not sweep.random:
        raise SweepError("--random N needs at least one range, e.g. --grid 'lr=log(1e-7,1e-5)'")
    keys = list(sweep.grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))]
    if not sweep.random:
        if not keys:
            raise SweepError("nothing to sweep: give --grid key=a,b (or ranges with --random N)")
        return combos
    rng = random.Random(sweep.seed)
    out = []
    for combo in combos:
        for _ in range(sweep.count):
            out.append({**combo, **{k: draw_value(k, text, rng) for k, text in sweep.random.items()}})
    return out


def split_grid(items: list[str]) -> tuple[list[str], list[str]]:
    """`--grid` items: value lists, and ranges (log(...), uniform(...), int(...), choice(...)) for --random."""
    ranges = [i for i in items if _RANGE.match(i.partition("=")[2].strip())]
    return [i for i in items if i not in ranges], ranges


def load_sweep_file(path: Path) -> Sweep:
    """A YAML sweep: preset, model, dataset, set (mapping or list), grid (key: list), random (count,
    seed, ranges: key: text), name, prune (rule, metric, after, mode; eta and rung for halving)."""
    try:
        data = load_yaml_file(path, f"sweep file {path}")
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"sweep file {path}: cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {path}: write a mapping with preset, model, dataset, grid and/or random")
    known = {"preset", "config", "model", "dataset", "set", "grid", "random", "name", "prune"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SweepError(f"sweep file {path}: unknown key {unknown[0]!r}; use {', '.join(sorted(known))}")
    sets = data.get("set") or []
    if isinstance(sets, dict):
        sets = [f"{k}={_text(v)}" for k, v in sets.items()]
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
        raise SweepError(f"sweep file {path}: grid maps each key to a list of values, e.g. lr: [1e-6, 2e-6]")
    draws = data.get("random") or {}
    if not isinstance(draws, dict):
        raise SweepError(f"sweep file {path}: random is a mapping: count, seed, ranges")
    sweep = Sweep(
        preset=str(data.get("preset") or "dpo"),
        config=str(Path(path).parent / data["config"]) if data.get("config") else None,
        model=data.get("model"),
        dataset=data.get("dataset"),
        sets=[str(s) for s in sets],
        grid={str(k): [_text(v) for v in values] for k, values in grid.items()},
        random=parse_ranges([f"{k}={v}" for k, v in (draws.get("ranges") or {}).items()]),
        count=int(draws.get("count") or 0),
        seed=int(draws.get("seed") or 0),
        name=data.get("name"),
    )
    if data.get("prune"):
        prune = data["prune"]
        sweep.prune = prune_rule(
            prune.get("rule", "median"),
            prune.get("metric"),
            int(prune.get("after", 1)),
            prune.get("mode"),
            eta=int(prune.get("eta", 3)),
            rung=int(prune["rung"]) if prune.get("rung") is not None else None,
        )
    return sweep


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def prune_rule(
    rule: str, metric: str | None, after: int, mode: str | None = None, *, eta: int = 3, rung: int | None = None
) -> dict[str, Any]:
    """The stored early-stopping rule; `mode` max (higher is better) or min, by default min for losses and KL.
    Halving keeps the best 1/`eta` at each rung; its first rung is step `rung` (default: the run's first
    eval point after the start)."""
    if rule not in PRUNE_RULES:
        raise SweepError(f"--prune {rule}: choose from {', '.join(PRUNE_RULES)}")
    if not metric:
        raise SweepError("--prune needs --prune-metric, an eval metric such as eval/exact_match or eval/loss")
    if after < 1:
        raise SweepError("--prune-after must be at least 1 (eval points before a run can be pruned)")
    mode = mode or ("min" if "loss" in metric or "kl" in metric else "max")
    if mode not in ("max", "min"):
        raise SweepError(f"--prune-mode {mode}: choose max (higher is better) or min")
    if rule == "halving":
        if eta < 2:
            raise SweepError(f"--prune-eta {eta}: the reduction factor must be at least 2 (3 keeps the best third)")
        if rung is not None and rung < 1:
            raise SweepError(f"--prune-rung {rung}: the first rung is a step >= 1 (e.g. the first eval step)")
        return {"rule": rule, "metric": metric, "after": after, "mode": mode, "eta": eta, "rung": rung}
    return {"rule": rule, "metric": metric, "after": after, "mode": mode}


def run_name(experiment: str, point: dict[str, str]) -> str:
    return experiment + "-" + "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())


def plan(sweep: Sweep, jobs) -> list[tuple[dict[str, str], Any]]:
    """(point, checked spec) for every point; the first bad point raises, naming it and the field."""
    from engine.spec import resolve_spec

    planned = []
    sweep.name = experiment = sweep.experiment  # fixed now: the default name carries the minute
    all_points = points(sweep)
    for index, point in enumerate(all_points, 1):
        overrides = [*sweep.sets, *(f"{k}={v}" for k, v in point.items())]
        if not any(o.startswith("name=") for o in sweep.sets):
            overrides.append(f"name={run_name(experiment, point)}")
        shown = ", ".join(f"{k}={v}" for k, v in point.items())
        try:
            spec = resolve_spec(
                sweep.preset,
                overrides,
                model=sweep.model,
                dataset=sweep.dataset,
                config=sweep.config,
                check_paths=False,
            )
            spec, _ = jobs.check(spec)
        except CherryError as err:
            raise SweepError(f"sweep point {index}/{len(all_points)} ({shown}): {err}; nothing was queued") from None
        planned.append((point, spec))
    return planned


def submit_sweep(sweep: Sweep, jobs) -> list[RunRow]:
    """Check every point, then queue one run per point, all in the sweep's experiment."""
    planned = plan(sweep, jobs)
    experiment = sweep.experiment
    return [jobs.submit(spec, experiment=experiment, swept=point, prune=sweep.prune) for point, spec in planned]


def prune_reason(store: Store, run: RunRow) -> str | None:
    """Why the run's rule prunes it now (one sentence), or None while it goes on.

    The run's eval points from the `after`-th on are compared, latest first, with the other runs of
    its experiment at the same step; the latest step some other run has reached decides (a run ahead
    of the rest is judged where they have caught up)."""
    rule = run.prune
    if not rule or not run.experiment:
        return None
    logged = store.metrics(run.id, names=[rule["metric"]])
    mine = {row["step"]: row["value"] for row in logged if row["step"] > 0}  # step 0: before any training
    if rule["rule"] == "halving":
        return _halving_reason(store, run, rule, mine)
    steps = sorted(mine)
    if len(steps) < rule["after"]:
        return None
    others = [r.id for r in store.list_runs(experiment=run.experiment) if r.id != run.id]
    for step in reversed(steps[rule["after"] - 1 :]):
        values = list(store.metric_at_step(others, rule["metric"], step).values())
        if not values:
            continue
        median = statistics.median(values)
        worse = mine[step] < median if rule["mode"] == "max" else mine[step] > median
        if not worse:
            return None
        side = "below" if rule["mode"] == "max" else "above"
        return (
            f"{rule['metric']} {mine[step]:.4g} at step {step} is {side} the median {median:.4g} of "
            f"{len(values)} other run(s) of experiment {run.experiment}"
        )
    return None


def _halving_reason(store: Store, run: RunRow, rule: dict[str, Any], mine: dict[int, float]) -> str | None:
    others = {}
    for other in store.list_runs(experiment=run.experiment):
        if other.id != run.id:
            rows = store.metrics(other.id, names=[rule["metric"]])
            others[other.id] = {row["step"]: row["value"] for row in rows if row["step"] > 0}
    verdict = halving_verdict(mine, list(others.values()), eta=rule["eta"], rung=rule.get("rung"), mode=rule["mode"])
    if verdict is None or verdict.kept:
        return None
    return (
        f"{rule['metric']} {verdict.value:.4g} at rung step {verdict.step} ranks {verdict.rank} of {verdict.reached} "
        f"run(s) of experiment {run.experiment} there; successive halving (eta {rule['eta']}) keeps the "
        f"best {verdict.keep}"
    )


@dataclass
class Rung:
    """Where a run stands at the highest halving rung it has reached."""

    step: int  # the rung's step
    value: float  # the run's metric there
    rank: int  # 1 = best among the runs that reached the rung
    reached: int  # runs (this one included) that reached the rung
    keep: int  # how many of them go on: ceil(reached / eta)

    @property
    def kept(self) -> bool:
        return self.rank <= self.keep


def rung_steps(first: int, eta: int, last: int) -> list[int]:
    """The rungs first, first*eta, first*eta^2, ... up to `last`."""
    steps = []
    step = first
    while step <= last:
        steps.append(step)
        step *= eta
    return steps


def value_at(history: dict[int, float], step: int) -> float | None:
    """A run's metric at rung `step`: its first eval point at or past the rung (None before it got there)."""
    past = [s for s in history if s >= step]
    return history[min(past)] if past else None


def halving_verdict(
    mine: dict[int, float], others: list[dict[int, float]], *, eta: int, rung: int | None, mode: str
) -> Rung | None:
    """Successive halving over eval histories ({step: value}, steps > 0): the run's standing at the highest
    rung it has reached (None before the first rung). Ties rank in the run's favour."""
    if not mine:
        return None
    first = rung or min(mine)
    rungs = rung_steps(first, eta, max(mine))
    if not rungs:
        return None
    step = rungs[-1]
    value = value_at(mine, step)
    if value is None:
        return None
    peers = [v for v in (value_at(h, step) for h in others) if v is not None]
    better = sum(1 for v in peers if (v > value if mode == "max" else v < value))
    reached = len(peers) + 1
    return Rung(step, value, better + 1, reached, math.ceil(reached / eta))
