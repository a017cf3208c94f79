"""Benchmarks behind `cherry bench`: `dpo` (the completion-only log-prob path against the naive
full-logits path in a DPO step) and `grpo` (a GRPO step's rollout and update, Cherry's paths
against naive ones), `start` (time to the first step, cold and warm). They build their own tiny
models; nothing here is used by a training run."""

from __future__ import annotations


def bench_device(name: str):
    """`auto` is the GPU when there is one, else the CPU; any other name is taken as it is (a torch.device).

    torch is imported here, not at the top: `python -m benchmarks.training.start` times its child from process
    start, and the package's import must not add torch's to the interpreter's start."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
