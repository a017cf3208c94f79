"""Seeded generators of the demo's verifiable tasks.

Two task kinds, each a short prompt with one exact answer:
- `addition`: two two-digit numbers, `"37+48="` -> `"85"`;
- `reverse`: a 3-6 letter lowercase string, `"reverse: garden"` -> `"nedrag"`.
"""

from __future__ import annotations

import random
import string

TASKS = ("addition", "reverse")


def addition(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "task": "addition"}


def reverse(rng: random.Random) -> dict:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return {"prompt": f"reverse: {word}", "answer": word[::-1], "task": "reverse"}


GENERATORS = {"addition": addition, "reverse": reverse}


def make_tasks(
    n: int,
    seed: int,
    exclude: set[str] | frozenset[str] = frozenset(),
    kinds: tuple[str, ...] = TASKS,
) -> list[dict]:
    """`n` distinct tasks (dicts with prompt, answer, task), the kind drawn uniformly per item.

    Deterministic for a given seed. No prompt in `exclude` is returned, which is how held-out
    sets stay disjoint from training sets: build the held-out set first, then pass its prompts
    (and those of any other set) as `exclude`.
    """
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise ValueError(f"could not draw {n} distinct tasks outside the {len(exclude)} excluded prompts")
        item = GENERATORS[rng.choice(kinds)](rng)
        if item["prompt"] in seen:
            continue
        seen.add(item["prompt"])
        out.append(item)
    return out
