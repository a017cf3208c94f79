"""An online run's stored rollouts as the app shows them: one step's groups with their statistics, the
steps where the mean reward moved most, and why a run has none. Pure functions and one small reader;
the files are read in the app's workers (never on the UI thread), through engine.rollout_store."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.home import runs_root
from jobs.trust import derived_run_dir
from tuiapp.text import safe_data

ZERO_STD = 1e-6  # rewards closer than this are equal: the group's advantages are all zero
SORTS = ("sample", "reward", "advantage")  # the order of completions within a group (o cycles)


def run_dir(home: Path, run_id: str) -> Path:
    """Where this host keeps the run's files: derived from its id, never read from a store row."""
    from jobs.shared import redis_url

    return derived_run_dir(runs_root(Path(home), redis_url() is not None), run_id)


@dataclass
class Group:
    """One prompt's completions at one step."""

    step: int
    index: int
    prompt: str
    samples: list[dict[str, Any]]

    @property
    def rewards(self) -> list[float]:
        return [s["reward"] for s in self.samples if s.get("reward") is not None]

    @property
    def mean(self) -> float | None:
        rewards = self.rewards
        return sum(rewards) / len(rewards) if rewards else None

    @property
    def std(self) -> float | None:
        rewards, mean = self.rewards, self.mean
        if mean is None:
            return None
        return (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5

    @property
    def zero_variance(self) -> bool:
        """Every sample scored the same: group-relative advantages are all zero, the group teaches nothing."""
        std = self.std
        return std is not None and len(self.rewards) > 1 and std < ZERO_STD


@dataclass
class StepRollouts:
    """What the Rollouts tab shows of one run: the stored steps and one step's groups."""

    run_id: str
    steps: list[int]
    step: int | None
    groups: list[Group] = field(default_factory=list)

    @property
    def mean_reward(self) -> float | None:
        rewards = [r for g in self.groups for r in g.rewards]
        return sum(rewards) / len(rewards) if rewards else None

    @property
    def zero_variance(self) -> int:
        return sum(1 for g in self.groups if g.zero_variance)


def step_groups(records: list[dict[str, Any]]) -> list[Group]:
    """Records of a step as groups, in group order (the prompt taken from the group's first sample)."""
    from engine.rollout_store import groups  # the app imports no engine module at start-up

    out = []
    for (step, index), samples in sorted(groups(records).items()):
        out.append(Group(step, index, str(samples[0].get("prompt") or ""), samples))
    return out


def sorted_samples(samples: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    """A group's samples in the chosen order: as drawn, or best first by reward or by advantage
    (samples without the value last)."""
    if sort == "sample":
        return list(samples)
    return sorted(samples, key=lambda s: (s.get(sort) is None, -(s.get(sort) or 0.0), s.get("sample", 0)))


def sorted_groups(step_groups: list[Group], sort: str) -> list[Group]:
    """Groups in the chosen order: as drawn, by mean reward (best first), or by their largest advantage."""
    if sort == "reward":
        return sorted(step_groups, key=lambda g: (g.mean is None, -(g.mean or 0.0), g.index))
    if sort == "advantage":

        def top(g: Group) -> float | None:
            values = [s["advantage"] for s in g.samples if s.get("advantage") is not None]
            return max(values) if values else None

        return sorted(step_groups, key=lambda g: (top(g) is None, -(top(g) or 0.0), g.index))
    return list(step_groups)


def moved_most(means: dict[int, float], limit: int = 5) -> list[tuple[int, float]]:
    """(step, change of the mean reward from the stored step before it), largest change first."""
    steps = sorted(means)
    moves = [(b, means[b] - means[a]) for a, b in zip(steps, steps[1:])]
    moves.sort(key=lambda m: (-abs(m[1]), m[0]))
    return moves[:limit]


def no_rollouts_reason(algorithm: str, spec: dict[str, Any], status: str, location: str) -> str:
    """Why a run shows no rollouts, and where to look instead."""
    from engine.registry import is_online

    if not is_online(algorithm):
        return (
            f"{algorithm} trains on a fixed dataset (an offline method): it draws no rollouts. "
            "Its eval samples are under Samples (2)."
        )
    if spec.get("log_rollouts") in ("off", False, 0):
        return "this run was started with log_rollouts: off, so its rollouts were not kept"
    if location:
        return f"this run's files are on another machine ({location}): open the app there to read its rollouts"
    if status in ("queued", "running"):
        return "no rollouts stored yet: each training step writes its shard when the step is done"
    return "this run stored no rollouts (it ran before Cherry kept them, or they were deleted)"


class RolloutReader:
    """Reads one run's rollouts at a time for the Rollouts tab; use it from one worker thread at a time.
    A shard is never rewritten once in place (engine.rollout_store), so each step's mean reward is
    read once and kept."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self._means: dict[tuple[str, int], float | None] = {}

    def read(self, run_id: str, wanted: int | None) -> StepRollouts:
        from engine.rollout_store import read_rollouts, stored_steps  # read in a worker, not at start-up

        folder = run_dir(self.home, run_id)
        steps = stored_steps(folder)
        step = wanted if wanted in steps else (steps[-1] if steps else None)
        if step is None:
            return StepRollouts(run_id, steps, None)
        records = safe_data(read_rollouts(folder, [step]))
        return StepRollouts(run_id, steps, step, step_groups(records))

    def step_means(self, run_id: str) -> dict[int, float]:
        """The mean reward of every stored step that has rewards (each shard read once)."""
        from engine.rollout_store import read_rollouts, stored_steps

        folder = run_dir(self.home, run_id)
        out = {}
        for step in stored_steps(folder):
            key = (run_id, step)
            if key not in self._means:
                rewards = [r["reward"] for r in read_rollouts(folder, [step]) if r.get("reward") is not None]
                self._means[key] = sum(rewards) / len(rewards) if rewards else None
            if self._means[key] is not None:
                out[step] = self._means[key]
        return out
