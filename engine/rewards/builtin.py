"""The built-in rewards: a verifier (`exact_match`), a format reward (`regex:`) and a length
reward (`length:`), written with the same signature as a user's reward function."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from engine.errors import CherryError


def exact_match(completion: str, answer: str) -> float:
    """Verifier reward: 1.0 when the completion equals the gold answer after stripping
    surrounding whitespace on both, else 0.0."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


def exact_match_reward(
    prompts: list[str], completions: list[str], answer: list[str | None] | None = None, **kwargs: Any
) -> list[float]:
    """1.0 where the completion equals the `answer` column (whitespace-stripped), else 0.0."""
    if answer is None or any(a is None for a in answer):
        missing = len(completions) if answer is None else sum(a is None for a in answer)
        raise CherryError(
            f"reward 'exact_match' needs an 'answer' column: {missing} of {len(completions)} prompts have none; "
            "add an `answer` field to every row of the dataset, or use another reward source"
        )
    return [exact_match(c, str(a)) for c, a in zip(completions, answer)]


def regex_reward(pattern: str) -> Callable[..., list[float]]:
    """A format reward: 1.0 where re.fullmatch(pattern, completion.strip(), re.DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def regex(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0 if compiled.fullmatch(c.strip()) else 0.0 for c in completions]

    return regex


def length_reward(target: int) -> Callable[..., list[float]]:
    """-|n - target| / target with n the number of completion tokens."""

    def length(
        prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kwargs: Any
    ) -> list[float]:
        return [-abs(len(ids) - target) / target for ids in completion_ids]

    return length
