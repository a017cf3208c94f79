"""Settings a user did not set that move to agree with those they did (each move noted for the start line)."""

from __future__ import annotations

import math
from typing import Any

from engine.errors import SpecError
from engine.registry import ALGORITHMS, is_online
from engine.spec.schema import RunSpec


def follow_explicit(spec: RunSpec, explicit: set[str], preset: RunSpec) -> list[str]:
    """Move settings the user did not set so they agree with those the user did; returns one note per
    change ("max_prompt_length=64: ..."). `preset` holds the preset's own values (for proportions).

    Two explicit settings that contradict each other are left alone here: check_values, or the
    SpecError raised below, names them both.
    """
    notes: list[str] = []

    def follow(key: str, value: Any, why: str) -> None:
        setattr(spec, key, value)
        notes.append(f"{key}={value}: {why} (set {key} yourself to choose)")

    # Prompt budget: a fraction of max_length, the preset's own proportion.
    share = preset.max_prompt_length / preset.max_length if 0 < preset.max_prompt_length < preset.max_length else 0.5
    if "max_length" in explicit and "max_prompt_length" not in explicit:
        prompt = min(spec.max_length - 1, max(1, round(spec.max_length * share)))
        if prompt != spec.max_prompt_length and spec.max_length >= 2:
            follow("max_prompt_length", prompt, f"{share:.0%} of max_length={spec.max_length}, the preset's proportion")
    elif (
        "max_prompt_length" in explicit
        and "max_length" not in explicit
        and spec.max_prompt_length >= spec.max_length > 0
    ):
        follow(
            "max_length",
            max(spec.max_prompt_length + 1, math.ceil(spec.max_prompt_length / share)),
            f"room for max_prompt_length={spec.max_prompt_length} at the preset's proportion ({share:.0%} prompt)",
        )

    # max_steps > 0 replaces epochs, warmup_steps > 0 replaces warmup_ratio: the one you set counts.
    for primary, replaced, zero in (
        ("max_steps", "epochs", "0 runs epochs"),
        ("warmup_steps", "warmup_ratio", "0 uses the ratio"),
    ):
        if getattr(spec, primary) and primary in explicit and replaced in explicit:
            raise SpecError(
                f"{primary}={getattr(spec, primary)} and {replaced}={getattr(spec, replaced)} are both set, and "
                f"{primary} > 0 replaces {replaced}: set only one ({primary}={zero})"
            )
        if getattr(spec, primary) and replaced in explicit and primary not in explicit:
            follow(
                primary, 0, f"you set {replaced}={getattr(spec, replaced)}, which the preset's {primary} would replace"
            )

    # The method's own loss: a preset's loss_type may not exist for an algorithm set on top of it.
    method = ALGORITHMS.get(spec.algorithm)
    if (
        "algorithm" in explicit
        and "loss_type" not in explicit
        and method is not None
        and spec.loss_type not in method.loss_types
    ):
        follow("loss_type", method.default_loss_type, f"{spec.algorithm}'s default loss")
    if "loss_type" in explicit and "rpo_alpha" not in explicit and spec.loss_type == "ipo" and spec.rpo_alpha > 0:
        follow("rpo_alpha", 0.0, "the RPO NLL term does not combine with loss_type=ipo")

    # One weight per reward source: new sources with the preset's weights get equal weights.
    sources = [spec.rewards] if isinstance(spec.rewards, str) else list(spec.rewards)
    if (
        "rewards" in explicit
        and "reward_weights" not in explicit
        and spec.reward_weights is not None
        and len(spec.reward_weights) != len(sources)
    ):
        follow("reward_weights", None, f"one weight of 1 for each of the {len(sources)} reward source(s) you set")

    # Online rollouts: batch_size x num_generations samples, cut into mini-batches, then micro-batches.
    if is_online(spec.algorithm) and spec.batch_size >= 1 and spec.num_generations >= 1:
        rollout = spec.batch_size * spec.num_generations
        sources_set = explicit & {"batch_size", "num_generations", "algorithm", "grad_accum"}
        accum = spec.grad_accum if "grad_accum" in explicit and spec.grad_accum >= 1 else 1

        def splits(d: int) -> bool:  # d mini-batches cut the rollout evenly, each into your grad_accum
            return rollout % d == 0 and (rollout // d) % accum == 0

        if (
            sources_set
            and "num_mini_batches" not in explicit
            and spec.num_mini_batches >= 1
            and not splits(spec.num_mini_batches)
        ):
            fits = [d for d in range(spec.num_mini_batches, 0, -1) if splits(d)]
            if fits:
                follow(
                    "num_mini_batches",
                    fits[0],
                    f"the most mini-batches up to the preset's {spec.num_mini_batches} "
                    f"that split a rollout of {rollout} samples evenly",
                )
        mini_batch = rollout // max(1, spec.num_mini_batches)
        if (
            (sources_set or "num_mini_batches" in explicit)
            and "grad_accum" not in explicit
            and spec.grad_accum >= 1
            and mini_batch % spec.grad_accum
        ):
            follow(
                "grad_accum",
                _largest_divisor(mini_batch, spec.grad_accum),
                f"the most micro-batches up to the preset's {spec.grad_accum} that split a mini-batch of {mini_batch} evenly",
            )
    return notes


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)
