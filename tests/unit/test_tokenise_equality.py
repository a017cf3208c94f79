"""Tokenising with `datasets` (batched map, one or several processes, then the cache) gives exactly the
examples the row-by-row path it replaced gave: the same token ids, texts, fields, order, eval split and
counts, on the embedded demo's data and on conversational files with multi-turn, truncated and
dropped rows. The expected digests were recorded with that earlier path (tests/unit/golden/)."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import pytest

from engine.data import prepare
from engine.demo.tokenizer import build_tokenizer
from tests.conftest import write_jsonl

prepare_module = importlib.import_module("engine.data.prepare")
DEMO = Path(__file__).resolve().parents[2] / "presets" / "demo"
GOLDEN = Path(__file__).parent / "golden" / "tokenised_examples.json"


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def conversational_preferences(n: int = 240) -> list[dict]:
    """UltraFeedback-shaped rows of varied lengths, some identical pairs, empty answers and long prompts."""
    rows = []
    for i in range(n):
        prompt = " ".join(f"word{(i * 7 + j) % 13}" for j in range(3 + i % 40))
        chosen = "yes " * (1 + i % 17)
        rejected = chosen if i % 31 == 0 else ("" if i % 37 == 0 else "no " * (1 + i % 23))
        row = {"prompt": [_user(prompt)], "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)]}
        if i % 5 == 0:
            row["prompt"].insert(0, {"role": "system", "content": "be brief"})
        rows.append(row)
    return rows


def multi_turn_sft(n: int = 120) -> list[dict]:
    rows = []
    for i in range(n):
        turns = [_user(f"q{i}"), _assistant("a" * (1 + i % 9)), _user("again " * (i % 4)), _assistant(f"b{i}")]
        rows.append({"messages": turns[: 2 + 2 * (i % 2)]})
    return rows


def cases() -> dict[str, tuple]:
    """name -> (source, kind, settings): every case prepared with the demo tokenizer."""
    return {
        "demo-pairs": (str(DEMO / "pairs.jsonl"), "preference", {}),
        "demo-sft": (str(DEMO / "sft.jsonl"), "sft", {}),
        "demo-unpaired": (str(DEMO / "unpaired.jsonl"), "unpaired", {}),
        "demo-prompts": (str(DEMO / "prompts.jsonl"), "prompt", {"eval_source": str(DEMO / "eval.jsonl")}),
        "demo-pairs-as-unpaired": (str(DEMO / "pairs.jsonl"), "unpaired", {"eval_split": 0.1, "seed": 3}),
        "conversational-truncate": (conversational_preferences(), "preference", {"max_length": 160}),
        "conversational-drop": (
            conversational_preferences(),
            "preference",
            {"max_length": 160, "max_prompt_length": 90, "overlong": "drop", "eval_split": 0.2},
        ),
        "multi-turn-sft": (multi_turn_sft(), "sft", {"max_length": 40}),
    }


def digest(data) -> str:
    """sha256 of the examples (train, then eval) and the counts, in a canonical JSON form."""
    document = {"train": list(data.train), "eval": list(data.eval), "stats": data.stats}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def run_case(name: str, in_dir: Path | None = None, **extra):
    """Prepare case `name`; with `in_dir`, rows given as a list are written there as a file first (the
    cache keeps local files only)."""
    source, kind, settings = cases()[name]
    if in_dir is not None and isinstance(source, list):
        source = str(write_jsonl(in_dir / f"{name}.jsonl", source))
    return prepare(source, build_tokenizer(), kind=kind, **{**settings, **extra})


def expected() -> dict[str, str]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(cases()))
def test_the_same_examples_as_the_row_by_row_path(name):
    assert digest(run_case(name)) == expected()[name]


@pytest.mark.parametrize("name", ["demo-pairs", "conversational-drop", "multi-turn-sft"])
def test_several_processes_and_the_cache_give_the_same_examples(name, tmp_path, monkeypatch):
    # these small files then use two processes (the real threshold is thousands of rows)
    monkeypatch.setattr(prepare_module, "tokenise_processes", lambda rows: 2 if rows >= 50 else 1)
    cold = run_case(name, tmp_path, cache_dir=tmp_path)
    warm = run_case(name, tmp_path, cache_dir=tmp_path)
    assert cold.cache_file is None and warm.cache_file is not None
    assert digest(cold) == digest(warm) == expected()[name]


def test_cases_cover_conversational_rows_that_are_dropped_and_truncated():
    stats = {name: run_case(name).stats for name in ("conversational-truncate", "conversational-drop")}
    assert stats["conversational-truncate"]["truncated"] > 0
    drop = stats["conversational-drop"]
    assert min(drop["dropped_overlong"], drop["dropped_identical"], drop["dropped_empty"], drop["eval"]) > 0


if __name__ == "__main__":  # records the golden digests: python -m tests.unit.test_tokenise_equality
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({name: digest(run_case(name)) for name in cases()}, indent=1) + "\n")
