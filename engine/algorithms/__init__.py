"""Algorithms by name (the `algorithm` field of a spec): offline ones run in engine/train.py,
online ones (sampling while training) in engine/online.py."""

from __future__ import annotations

from engine.spec import RunSpec


def build_algorithm(spec: RunSpec):
    from engine.algorithms.coh import ChainOfHindsight
    from engine.algorithms.dpo import DPO
    from engine.algorithms.grpo import GRPO
    from engine.algorithms.kto import KTO
    from engine.algorithms.online_dpo import OnlineDPO
    from engine.algorithms.orpo import ORPO
    from engine.algorithms.ppo import PPO
    from engine.algorithms.rejection import BestOfK, ReST
    from engine.algorithms.reward_model import RewardModel
    from engine.algorithms.rloo import RLOO
    from engine.algorithms.sft import SFT
    from engine.algorithms.simpo import SimPO

    registry = {
        "dpo": DPO, "simpo": SimPO, "orpo": ORPO, "kto": KTO, "sft": SFT, "rm": RewardModel, "coh": ChainOfHindsight,
        "grpo": GRPO, "rloo": RLOO, "ppo": PPO, "online_dpo": OnlineDPO, "best_of_k": BestOfK, "rest": ReST,
    }
    return registry[spec.algorithm](spec)
