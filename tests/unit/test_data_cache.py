"""The tokenised-data cache: a second `prepare` on the same data loads it without tokenising; any
change to the data, the tokenizer or a setting that changes tokenisation misses it."""

from __future__ import annotations

import importlib

import pytest

from engine.data import prepare
from engine.demo.tokenizer import build_tokenizer
from tests.conftest import write_jsonl

prepare_module = importlib.import_module("engine.data.prepare")  # the module, not the function engine.data exports


@pytest.fixture
def tokenizer():
    return build_tokenizer()


def _conversations(n: int = 30) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{i}+{i}="}],
                "chosen": [{"role": "assistant", "content": str(2 * i)}],
                "rejected": [{"role": "assistant", "content": str(2 * i + 1)}],
            }
        )
    return rows


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of the tokenising step (`_process`: render, tokenise, build examples)."""
    calls = []
    real = prepare_module._process

    def process(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_process", process)
    return calls


def _prep(path, tokenizer, cache_dir, **settings):
    return prepare(str(path), tokenizer, kind="preference", cache_dir=cache_dir, **{"max_length": 32, **settings})


def test_second_prepare_loads_the_cache_without_tokenising(tmp_path, tokenizer, counted):
    data = write_jsonl(tmp_path / "pairs.jsonl", _conversations())
    cold = _prep(data, tokenizer, tmp_path / "cache", eval_split=0.2)
    assert counted == [1] and cold.cache_file is None
    files = list((tmp_path / "cache" / "tokenised").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind
    warm = _prep(data, tokenizer, tmp_path / "cache", eval_split=0.2)
    assert counted == [1] and warm.cache_file == str(files[0])
    assert (warm.train, warm.eval, warm.stats) == (cold.train, cold.eval, cold.stats)
    assert (warm.format, warm.conversational, warm.kind, warm.summary()) == (
        cold.format,
        cold.conversational,
        cold.kind,
        cold.summary(),
    )


@pytest.mark.parametrize(
    "change",
    ["max_length", "max_prompt_length", "overlong", "eval_split", "seed", "max_rows", "chat_template", "vocab", "data"],
)
def test_any_change_that_alters_tokenisation_misses_the_cache(tmp_path, tokenizer, counted, change):
    data = write_jsonl(tmp_path / "pairs.jsonl", _conversations())
    _prep(data, tokenizer, tmp_path / "cache")
    settings = {
        "max_length": {"max_length": 24},
        "max_prompt_length": {"max_prompt_length": 8},
        "overlong": {"overlong": "drop"},
        "eval_split": {"eval_split": 0.3},
        "seed": {"seed": 1},
        "max_rows": {"max_rows": 10},
    }.get(change, {})
    if change == "chat_template":
        tokenizer.chat_template += "{# another template, the same rendering #}"
    elif change == "vocab":
        tokenizer.add_tokens(["<extra>"])
    elif change == "data":
        write_jsonl(data, _conversations(31))
    again = _prep(data, tokenizer, tmp_path / "cache", **settings)
    assert counted == [1, 1] and again.cache_file is None
    assert len(list((tmp_path / "cache" / "tokenised").iterdir())) == 2


def test_multi_turn_sft_and_plain_text_round_trip(tmp_path, tokenizer):
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
    ]
    sft = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}] * 4)
    kwargs = {"kind": "sft", "max_length": 64, "cache_dir": tmp_path / "cache", "eval_split": 0.0}
    cold, warm = (prepare(str(sft), tokenizer, **kwargs) for _ in range(2))
    assert warm.cache_file and warm.train == cold.train and "loss_mask" in warm.train[0]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 3)
    kwargs = {"kind": "preference", "max_length": 16, "cache_dir": tmp_path / "cache"}
    cold, warm = (prepare(str(plain), tokenizer, **kwargs) for _ in range(2))
    assert warm.cache_file and (warm.train, warm.eval) == (cold.train, cold.eval)


def test_a_damaged_cache_file_is_rebuilt_and_row_lists_are_not_cached(tmp_path, tokenizer, counted):
    data = write_jsonl(tmp_path / "pairs.jsonl", _conversations())
    cold = _prep(data, tokenizer, tmp_path / "cache")
    [file] = (tmp_path / "cache" / "tokenised").iterdir()
    file.write_bytes(b"not an npz")
    again = _prep(data, tokenizer, tmp_path / "cache")
    assert counted == [1, 1] and again.train == cold.train and _prep(data, tokenizer, tmp_path / "cache").cache_file
    rows = _conversations()
    prepare(rows, tokenizer, kind="preference", max_length=32, cache_dir=tmp_path / "cache2")
    assert not (tmp_path / "cache2").exists()


def test_the_same_tokenizer_loaded_offline_or_from_another_path_keeps_its_key(tmp_path, tokenizer):
    import shutil

    from transformers import AutoTokenizer

    from engine.data.cache import tokenizer_fingerprint

    tokenizer.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    online = AutoTokenizer.from_pretrained(tmp_path / "a")
    moved = AutoTokenizer.from_pretrained(tmp_path / "b")
    offline = AutoTokenizer.from_pretrained(tmp_path / "a")
    # transformers records how a tokenizer was loaded: local_files_only is True under HF_HUB_OFFLINE=1
    offline.init_kwargs["local_files_only"] = not online.init_kwargs["local_files_only"]
    assert moved.init_kwargs["name_or_path"] != online.init_kwargs["name_or_path"]
    assert tokenizer_fingerprint(online) == tokenizer_fingerprint(offline) == tokenizer_fingerprint(moved)
    online.chat_template = online.chat_template + " "
    assert tokenizer_fingerprint(online) != tokenizer_fingerprint(offline)
