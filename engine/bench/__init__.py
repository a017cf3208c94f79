"""Benchmarks behind `cherry bench`: `dpo` (the completion-only log-prob path against the naive
full-logits path in a DPO step) and `grpo` (a GRPO step's rollout and update, Cherry's paths
against naive ones). They build their own tiny models; nothing here is used by a training run."""

from __future__ import annotations

import torch


def bench_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; any other name is taken as it is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
