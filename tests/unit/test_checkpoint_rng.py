"""Checkpoints keep every random generator a run draws from, and they load back with weights_only=True."""

from __future__ import annotations

import random

import pytest
import torch

from engine.loop.checkpoint import rng_states, set_rng_states


def _round_trip(tmp_path, states: dict) -> dict:
    torch.save({"rng": states}, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)["rng"]


def _draws(device: str) -> tuple:
    return (torch.rand(4, device=device).tolist(), random.random())


def test_cpu_and_python_states_come_back(tmp_path):
    saved = _round_trip(tmp_path, rng_states())
    before = _draws("cpu")
    set_rng_states(saved)
    assert _draws("cpu") == before
    assert ("cuda" in saved) == torch.cuda.is_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_states_come_back(tmp_path):
    saved = _round_trip(tmp_path, rng_states())
    assert len(saved["cuda"]) == torch.cuda.device_count()
    before = _draws("cuda")
    set_rng_states(saved)
    assert _draws("cuda") == before
