"""A run's data path: the second run on the same data loads the tokenised cache, and length-grouped
batching trains on the same examples with less padding."""

from __future__ import annotations

import json

from engine.reporting import MemoryReporter
from tests.e2e.test_train import dpo_spec


def _short(**overrides):
    return {
        "max_steps": 2,
        "eval_steps": 0,
        "sample_steps": 0,
        "num_samples": 0,
        "kl_samples": 0,
        "save_steps": 100,
        **overrides,
    }


def _twice_with_one_cache(spec, tmp_path) -> list[list[dict]]:
    """Run `spec` twice with the same cache directory (the same losses); each run's "loaded from the cache" events."""
    from engine.train import train

    reporters = []
    for name in ("first", "second"):
        reporter = MemoryReporter()
        train(spec, tmp_path / name, reporter, cache_dir=tmp_path / "cache")
        reporters.append(reporter)
    assert len(list((tmp_path / "cache" / "tokenised").glob("*.npz"))) == 1
    # the same numbers from cached examples
    first, second = ((tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in ("first", "second"))
    loss = lambda lines: [json.loads(line).get("train/loss") for line in lines]  # noqa: E731
    assert loss(first) == loss(second)
    return [[e for e in r.events if "loaded from the cache" in e["message"]] for r in reporters]


def test_second_run_on_the_same_data_starts_from_the_tokenised_cache(tiny_model_dir, tiny_pairs, tmp_path):
    cached = _twice_with_one_cache(dpo_spec(tiny_model_dir, tiny_pairs, **_short()), tmp_path)
    assert cached[0] == [] and len(cached[1]) == 1


def test_second_online_run_loads_its_prompts_from_the_tokenised_cache(tiny_model_dir, tmp_path):
    from tests.conftest import write_jsonl
    from tests.e2e.test_online import online_spec

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {c}:", "answer": c} for c in "abcdefgh"])
    cached = _twice_with_one_cache(online_spec(tiny_model_dir, prompts, "grpo", max_steps=1), tmp_path)
    assert cached[0] == [] and len(cached[1]) == 1


def test_group_by_length_logs_less_padding(tiny_model_dir, tmp_path):
    from engine.train import train
    from tests.conftest import write_jsonl

    rows = [
        {"prompt": f"say {'abc'[i % 3] * (1 + i % 10)}:", "chosen": " " + "x" * (2 + 3 * (i % 10)), "rejected": " y"}
        for i in range(96)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pad = {}
    for grouped in (False, True):
        spec = dpo_spec(tiny_model_dir, data, **_short(max_steps=10, group_by_length=grouped, eval_split=0.0))
        train(spec, tmp_path / str(grouped))
        lines = [json.loads(line) for line in (tmp_path / str(grouped) / "metrics.jsonl").read_text().splitlines()]
        values = [line["batch/pad_fraction"] for line in lines if "batch/pad_fraction" in line]
        assert len(values) == 10 and all(0 <= v < 1 for v in values)
        pad[grouped] = sum(values) / len(values)
    assert pad[True] < 0.6 * pad[False]  # the short rejected answers keep some padding in every pair
