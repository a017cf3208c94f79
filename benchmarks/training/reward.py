"""The reward of the online benchmarks (`cherry bench grpo|rloo --against trl`), read by both sides: Cherry
as `benchmarks.training.reward:bench_reward`, TRL's trainer as a reward function. Its own module so that the TRL
side and the harness (benchmarks/training/against.py) do not import each other."""


def bench_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Cheap, deterministic and different from sample to sample, so advantages are not all zero and every
    sample is trained on."""
    return [(sum(ids) % 7) / 7.0 for ids in completion_ids]
