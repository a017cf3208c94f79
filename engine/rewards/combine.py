"""The reward of a completion: the weighted sum of its sources, each also kept on its own; with a
safety model, the `rm:` source's score becomes Llama 2's helpfulness + safety reward."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import CherryError
from engine.limits import TimeLimitExceeded, time_limit
from engine.rewards.builtin import exact_match_reward, length_reward, regex_reward
from engine.rewards.functions import (
    call_async_reward_function,
    call_reward_function,
    function_needs,
    is_async,
    load_reward_function,
)
from engine.rewards.reward_model import RewardModelScorer, helpful_safety_scores
from engine.rewards.sources import GRAMMAR, base_name, parse_reward_source


@dataclass
class RewardResult:
    total: list[float]  # weighted sum of the components, one per completion
    components: dict[str, list[float | None]]  # each source's (unweighted) score (None: none for that one)
    extras: dict[str, list[float]] = field(default_factory=dict)  # raw helpful/safety scores when combined


log = logging.getLogger("cherry.rewards")

ScoreFn = Callable[[list[str], list[str], list[list[int]], list[list[int]], dict[str, list]], list[float]]


@dataclass
class RewardSource:
    entry: str  # as written in the spec
    kind: str  # one of KINDS
    name: str  # component / metric name
    weight: float
    score: ScoreFn  # (prompts, completions, prompt_ids, completion_ids, columns) -> scores
    needs: set[str] = field(default_factory=set)


def _conversational(columns: dict[str, list], n: int) -> bool:
    messages = columns.get("messages")
    return bool(n) and messages is not None and all(isinstance(m, list) for m in messages)


def _function_source(
    entry: str, fn: Callable[..., Any], *, as_trl: bool = False, timeout: float | None = None
) -> ScoreFn:
    """A reward function as a source. `as_trl` (a function of yours): for conversational data the prompts
    are message lists and the completions [{"role": "assistant", "content": ...}], as TRL passes them;
    an `async def` one returns an awaitable, which `Reward.reward` awaits with the others. A call that runs
    past `timeout` seconds gives its completions no reward from this function (logged): a hung reward must
    not hold the run, and its worker slot, forever."""
    asynchronous = is_async(fn)

    def timed_out(n: int, err: Exception | str) -> list[None]:
        log.warning("%s (reward_timeout); its %d completion(s) get no reward from it", err, n)
        return [None] * n

    async def bounded(awaitable: Awaitable, n: int):
        try:
            return await asyncio.wait_for(awaitable, timeout) if timeout else await awaitable
        except asyncio.TimeoutError:
            return timed_out(n, f"reward '{entry}' took longer than {timeout:g}s and was stopped")

    def score(prompts, completions, prompt_ids, completion_ids, columns):
        if as_trl and _conversational(columns, len(completions)):
            prompts = list(columns["messages"])
            completions = [[{"role": "assistant", "content": text}] for text in completions]
        available = {**columns, "prompts": list(prompts), "completions": list(completions)}
        available["completion_ids"] = completion_ids
        if asynchronous:
            return bounded(call_async_reward_function(entry, fn, available), len(completions))
        try:
            with time_limit(timeout, f"reward '{entry}'"):
                return call_reward_function(entry, fn, available)
        except TimeLimitExceeded as err:
            return timed_out(len(completions), err)

    return score


def _environment_reward(prompts, completions, prompt_ids, completion_ids, columns) -> list[float]:
    """The `environment` source: each episode's summed per-turn rewards (engine/episodes.py)."""
    if "environment_reward" not in columns:
        raise CherryError(
            "rewards entry 'environment' is the reward of an environment, but these samples come from none; "
            "set environment (or tools), or remove 'environment' from rewards"
        )
    return list(columns["environment_reward"])


async def _gather(pending: dict[str, Awaitable]) -> dict[str, Any]:
    results = await asyncio.gather(*pending.values())
    return dict(zip(pending, results))


def _weighted_total(sources: list[RewardSource], components: dict[str, list], i: int) -> float:
    """The weighted sum of the sources that scored completion i (a None score: no reward from that source)."""
    return sum(s.weight * components[s.name][i] for s in sources if components[s.name][i] is not None)


class Reward:
    """A weighted sum of reward sources; build it with `build_reward`."""

    def __init__(
        self, sources: list[RewardSource], *, safety: RewardModelScorer | None = None, safety_threshold: float = 0.15
    ):
        if not sources:
            raise CherryError(f"rewards is empty: name at least one reward source; {GRAMMAR}")
        self.sources = sources
        self.step: int | None = None  # the loop sets these before scoring; reward functions get them as step=, epoch=
        self.epoch: float | None = None
        self.safety = safety
        self.safety_threshold = safety_threshold

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    @property
    def needs_columns(self) -> set[str]:
        return set().union(*(s.needs for s in self.sources))

    def reward(
        self,
        prompts: list[str],
        completions: list[str],
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        columns: dict[str, list] | None = None,
    ) -> RewardResult:
        columns = dict(columns or {})
        n = len(completions)
        for what, values in (
            ("prompts", prompts),
            ("prompt_ids", prompt_ids),
            ("completion_ids", completion_ids),
            *columns.items(),
        ):
            if len(values) != n:
                raise ValueError(f"reward: {what} has {len(values)} rows for {n} completions")
        components: dict[str, list] = {}
        extras: dict[str, list[float]] = {}
        progress = {"step": self.step, "epoch": self.epoch}
        pending = {}
        for source in self.sources:
            given = columns if source.kind == "rm" else {**columns, **progress}
            scores = source.score(list(prompts), list(completions), prompt_ids, completion_ids, given) if n else []
            if inspect.isawaitable(scores):
                pending[source.name] = scores  # async functions run together, below
                continue
            if source.kind == "rm" and self.safety is not None and n:
                safety = self.safety(list(prompts), list(completions), prompt_ids, completion_ids, columns)
                tags = [bool(v) for v in columns.get("safety", [False] * n)]
                extras["rm/helpful"], extras["rm/safety"] = scores, safety
                scores = helpful_safety_scores(scores, safety, tags, self.safety_threshold)
            components[source.name] = [None if s is None else float(s) for s in scores]
        if pending:
            components.update(asyncio.run(_gather(pending)))
        components = {s.name: components[s.name] for s in self.sources}
        total = [_weighted_total(self.sources, components, i) for i in range(n)]
        return RewardResult(total=total, components=components, extras=extras)

    __call__ = reward


def build_reward(
    sources: list[str],
    weights: list[float] | None = None,
    *,
    tokenizer: Any,
    device: str = "cpu",
    safety_model: str | None = None,
    safety_threshold: float = 0.15,
    batch_size: int = 16,
    timeout: float | None = None,
) -> Reward:
    """Parse, load and check every source. `tokenizer` is the policy's (it decides whether a reward
    model can read the policy's token ids directly); reward models go to `device`. Each call of a reward
    function (and `regex:`) may take `timeout` seconds; past that its completions get no reward from it (logged)."""
    if isinstance(sources, str):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise CherryError(f"rewards is empty: name at least one reward source; {GRAMMAR}")
    if weights is None:
        weights = [1.0] * len(sources)
    weights = list(weights)
    if len(weights) != len(sources):
        raise CherryError(
            f"reward_weights has {len(weights)} value(s) for {len(sources)} reward source(s) ({', '.join(sources)}): "
            "give one weight per source"
        )
    for source, weight in zip(sources, weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
            raise CherryError(f"reward_weights: the weight of '{source}' must be a finite number (got {weight!r})")
    parsed = [parse_reward_source(s) for s in sources]
    rm_sources = [s for s, (kind, _) in zip(sources, parsed) if kind == "rm"]
    if safety_model and len(rm_sources) != 1:
        raise CherryError(
            "safety_reward_model combines with exactly one helpfulness reward model, "
            + (
                "but rewards has no rm: entry; add rm:PATH"
                if not rm_sources
                else f"but rewards has {len(rm_sources)} ({', '.join(rm_sources)}); keep one"
            )
        )
    if not 0.0 <= safety_threshold <= 1.0:
        raise CherryError(f"safety_threshold is a probability in [0, 1] (got {safety_threshold})")

    built: list[RewardSource] = []
    seen: dict[str, int] = {}
    for entry, (kind, arg), weight in zip(sources, parsed, weights):
        base = base_name(kind, arg)
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        while name in {s.name for s in built}:
            seen[base] += 1
            name = f"{base}_{seen[base]}"
        needs: set[str] = set()
        if kind == "environment":
            score: ScoreFn = _environment_reward
            needs = {"environment_reward"}
        elif kind == "rm":
            score = RewardModelScorer(f"rewards entry '{entry}'", arg, tokenizer, device=device, batch_size=batch_size)
        else:
            if kind == "exact_match":
                fn = exact_match_reward
                needs = {"answer"}
            elif kind == "regex":
                fn = regex_reward(arg)
            elif kind == "length":
                fn = length_reward(int(arg))
            else:
                fn = load_reward_function(arg)
                needs = function_needs(fn)
            score = _function_source(entry, fn, as_trl=kind == "python", timeout=timeout)
        built.append(RewardSource(entry=entry, kind=kind, name=name, weight=float(weight), score=score, needs=needs))
    safety = None
    if safety_model:
        safety = RewardModelScorer(
            f"safety_reward_model '{safety_model}'", safety_model, tokenizer, device=device, batch_size=batch_size
        )
    return Reward(built, safety=safety, safety_threshold=safety_threshold)
