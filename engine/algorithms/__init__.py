"""Algorithms the offline loop can run, by name (the `algorithm` field of a spec)."""

from __future__ import annotations

from engine.spec import RunSpec


def build_algorithm(spec: RunSpec):
    from engine.algorithms.coh import ChainOfHindsight
    from engine.algorithms.dpo import DPO
    from engine.algorithms.kto import KTO
    from engine.algorithms.orpo import ORPO
    from engine.algorithms.reward_model import RewardModel
    from engine.algorithms.sft import SFT
    from engine.algorithms.simpo import SimPO

    registry = {"dpo": DPO, "simpo": SimPO, "orpo": ORPO, "kto": KTO, "sft": SFT, "rm": RewardModel, "coh": ChainOfHindsight}
    return registry[spec.algorithm](spec)
