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


def pytest_configure(config):
    """The suite runs on the CPU wherever it runs: its exact comparisons were recorded in fp32 on the CPU,
    and its 2-process runs need no GPU each. GPUs stay visible only when the marker expression selects the
    CUDA tests (`-m gpu`); set before anything initialises CUDA, and inherited by the ranks tests start."""
    selected = config.getoption("markexpr", "") or ""
    if "gpu" not in selected.replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch thread per process: under pytest-xdist (`-n auto`) each worker is one process per core."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The longest tests first (slow ones, then end-to-end ones; each group in its usual order), so that
    with several workers the short unit tests fill the gaps at the end instead of one long test running
    alone after everything else is done."""

    def expected_length(item) -> int:
        if item.get_closest_marker("slow"):
            return 0
        return 1 if "e2e" in item.path.parts else 2

    items.sort(key=expected_length)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init ~100k-parameter Llama with the demo's byte-level tokenizer, saved locally."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
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
        rows.append(
            {"prompt": f"say {letter}{i % 3}:", "chosen": f" {letter * 3}", "rejected": f" {'zyxwvuts'[i % 8] * 3}"}
        )
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh Cherry home (store, queue, run dirs) for one test."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("CHERRY_HOME", str(path))
    monkeypatch.delenv("CHERRY_REDIS_URL", raising=False)  # the SQLite queue unless a test asks for Redis
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_redis_server() -> None:
    """Skip the calling test where redis-server is missing, except in CI (CI=true): there it fails."""
    import shutil

    if not shutil.which("redis-server"):
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")


@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server on a free port for one test (AOF on, as the README advises); its URL.

    Skipped where redis-server is missing, except in CI (CI=true), where that is a failure: the
    several-machines tests must run there."""
    import subprocess
    import time

    require_redis_server()
    import redis

    port = _free_port()
    data = tmp_path / "redis"
    data.mkdir()
    args = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--save",
        "",
        "--appendonly",
        "yes",
    ]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.05)
    url = f"redis://127.0.0.1:{port}/0"
    url_server[url] = (server, args)
    try:
        yield url
    finally:
        server, _ = url_server.pop(url)
        server.terminate()
        server.wait(10)


# The redis-server behind each URL the fixture handed out, so a test can restart it.
url_server: dict[str, tuple] = {}


def restart_redis(url: str) -> None:
    """Stop the test's redis-server (SIGTERM: it flushes its AOF) and start it again on the same port."""
    import subprocess
    import time

    import redis

    server, args = url_server[url]
    server.terminate()
    server.wait(10)
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url_server[url] = (server, args)
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
