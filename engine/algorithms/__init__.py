"""Algorithms the offline loop can run, by name (the `algorithm` field of a spec)."""

from __future__ import annotations

from engine.spec import RunSpec


def build_algorithm(spec: RunSpec):
    from engine.algorithms.dpo import DPO

    registry = {"dpo": DPO}
    return registry[spec.algorithm](spec)
