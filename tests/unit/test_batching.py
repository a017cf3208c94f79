"""Length-grouped batching: every example once per epoch, similar lengths together, seeded and
resumable; and the padding fraction the offline loop logs."""

from __future__ import annotations

import random

import torch

from engine.batching import example_length
from engine.loop.schedule import Schedule


def _schedule(n: int, lengths: list[int] | None, **overrides) -> Schedule:
    settings = {"batch_size": 8, "chunks_per_step": 2, "seed": 3, "epochs": 2, "max_steps": 0, **overrides}
    return Schedule(n, lengths=lengths, **settings)


def _lengths(n: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randint(20, 200) for _ in range(n)]  # 10x between the shortest and the longest


def _epoch(schedule: Schedule, epoch: int) -> list[list[int]]:
    first = epoch * schedule.steps_per_epoch
    return [chunk for step in range(first, first + schedule.steps_per_epoch) for chunk in schedule.micro_batches(step)]


def _padding(chunks: list[list[int]], lengths: list[int]) -> float:
    positions = sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)
    return 1 - sum(lengths[i] for chunk in chunks for i in chunk) / positions


def test_without_lengths_the_order_is_the_seeded_permutation_as_before():
    schedule = _schedule(100, None)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1)).tolist()
    expected = [order[start : start + 8] for start in range(0, 100, 8)]
    assert _epoch(schedule, 1) == expected


def test_grouped_epochs_hold_every_example_once_in_similar_length_chunks():
    n = 1003  # a short last chunk (1003 = 125 * 8 + 3)
    lengths = _lengths(n)
    grouped, plain = _schedule(n, lengths), _schedule(n, None)
    for epoch in (0, 1):
        chunks = _epoch(grouped, epoch)
        assert sorted(i for chunk in chunks for i in chunk) == list(range(n))
        assert [len(c) for c in chunks] == [8] * 125 + [3]  # same chunk sizes as without grouping
        assert _padding(chunks, lengths) < 0.2 * _padding(_epoch(plain, epoch), lengths)
    assert _epoch(grouped, 0) != _epoch(grouped, 1)
    # the step order is shuffled, not longest first
    first_lengths = [max(lengths[i] for i in chunk) for chunk in _epoch(grouped, 0)[:-1]]
    assert first_lengths != sorted(first_lengths, reverse=True)


def test_grouped_order_is_a_function_of_seed_and_step_so_resume_is_exact():
    lengths = _lengths(500)
    first = _schedule(500, lengths)
    steps = [first.micro_batches(step) for step in range(first.total_steps)]
    resumed = _schedule(500, lengths)  # a fresh schedule, as a resumed run builds, asked from step 40 on
    assert [resumed.micro_batches(step) for step in range(40, resumed.total_steps)] == steps[40:]
    assert _schedule(500, lengths, seed=4).micro_batches(0) != steps[0]


def test_example_length():
    examples = [
        {"index": 0, "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
        {"index": 1, "prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9]},
    ]
    assert [example_length(ex) for ex in examples] == [5, 2]
    sft = {"index": 0, "prompt_ids": [1], "completion_ids": [2, 3]}
    assert example_length(sft) == 3
