"""Seeded generators of the demo's verifiable tasks.

Two task kinds, each a short prompt with one exact answer:
- `addition`: two two-digit numbers, `"37+48="` -> `"85"`;
- `reverse`: a 3-6 letter lowercase string, `"reverse: garden"` -> `"nedrag"`.
"""

from __future__ import annotations

import random
import string

TASKS = ("addition", "reverse")
REVERSE_PREFIX = "reverse: "
REVERSE_LENGTHS = (3, 6)


def addition(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "task": "addition"}


def reverse(rng: random.Random, lengths: tuple[int, int] = REVERSE_LENGTHS) -> dict:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*lengths)))
    return {"prompt": f"{REVERSE_PREFIX}{word}", "answer": word[::-1], "task": "reverse"}


def task_of(prompt: str) -> str:
    """The task kind of a prompt text."""
    return "reverse" if prompt.startswith(REVERSE_PREFIX) else "addition"


def make_tasks(
    n: int,
    seed: int,
    exclude: set[str] | frozenset[str] = frozenset(),
    *,
    weights: tuple[float, float] | None = None,
    reverse_lengths: tuple[int, int] = REVERSE_LENGTHS,
) -> list[dict]:
    """`n` distinct tasks (dicts with prompt, answer, task), the kind drawn per item (uniformly,
    or by `weights` over `TASKS`).

    Deterministic for a given seed. No prompt in `exclude` is returned, which is how held-out
    sets stay disjoint from training sets: build the held-out set first, then pass its prompts
    (and those of any other set) as `exclude`. `reverse_lengths` narrows the word lengths of the
    reversal task (inclusive range inside 3-6).
    """
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise ValueError(f"could not draw {n} distinct tasks outside the {len(exclude)} excluded prompts")
        kind = rng.choice(TASKS) if weights is None else rng.choices(TASKS, weights=weights)[0]
        item = addition(rng) if kind == "addition" else reverse(rng, reverse_lengths)
        if item["prompt"] in seen:
            continue
        seen.add(item["prompt"])
        out.append(item)
    return out
