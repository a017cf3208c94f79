"""Reward sources and pairwise judges for the online methods (GRPO, RLOO, PPO, online DPO,
best-of-K, ReST).

- `sources`: the grammar of a `rewards` entry (exact_match, regex:, length:, rm:, module:function).
- `builtin`: the built-in reward functions.
- `functions`: loading, checking and calling a reward function of your own.
- `reward_model`: scoring with a trained reward model; Llama 2's helpfulness + safety combination.
- `judge`: the LLM judge of online DPO and the tie rule for its verdicts.
- `combine`: `build_reward`, the weighted sum of a run's sources.

Importing this package imports no torch or transformers (front ends validate a spec with
`parse_reward_source` instantly): the torch-free names are imported here, the others on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from engine.rewards.builtin import exact_match, exact_match_reward, length_reward, regex_reward
from engine.rewards.functions import call_reward_function, check_scores, load_reward_function
from engine.rewards.sources import JUDGE_PLACEHOLDERS, KINDS, parse_reward_source, required_columns

# Names that need torch, by the submodule that defines them: loaded when first asked for.
_LAZY = {
    "combine": ("Reward", "RewardResult", "RewardSource", "build_reward"),
    "reward_model": (
        "RewardModelScorer",
        "helpful_safety_scores",
        "load_reward_source",
        "resolve_reward_model",
        "reward_scorer",
        "score_completions",
        "score_dataset",
    ),
    "judge": (
        "DEFAULT_JUDGE_TEMPLATE",
        "PLAIN_JUDGE_SUFFIX",
        "JudgeResult",
        "LLMJudge",
        "judge_pairs",
        "judge_tallies",
    ),
}
_LAZY_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _LAZY_HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "JUDGE_PLACEHOLDERS",
    "KINDS",
    "call_reward_function",
    "check_scores",
    "exact_match",
    "exact_match_reward",
    "length_reward",
    "load_reward_function",
    "parse_reward_source",
    "regex_reward",
    "required_columns",
    *_LAZY_HOME,
]
