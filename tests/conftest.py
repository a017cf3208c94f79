"""Shared fixtures: tiny models and data built locally (tests never touch the network)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Tests share 2 cores with other work: one thread keeps torch steps from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Runs, the store and the queue of a test session live in a throwaway home, never in ./runs.
os.environ["CHERRY_HOME"] = tempfile.mkdtemp(prefix="cherry-home-")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init ~100k-parameter Llama with the demo's byte-level tokenizer, saved locally."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    """Preference pairs with a learnable rule: the chosen answer repeats the prompt's letter."""
    rows = []
    for i in range(48):
        letter = "abcdefgh"[i % 8]
        rows.append({"prompt": f"say {letter}{i % 3}:", "chosen": f" {letter * 3}", "rejected": f" {'zyxwvuts'[i % 8] * 3}"})
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh Cherry home (store, queue, run dirs) for one test."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("CHERRY_HOME", str(path))
    monkeypatch.delenv("CHERRY_REDIS_URL", raising=False)  # the SQLite queue unless a test asks for Redis
    return path
