"""Every algorithm Cherry trains, one row each: the only list of algorithms in the project.

Spec validation, data loading, the training entry point, the CLI and the app all read these rows;
nothing else names the methods. The module imports nothing heavy (no torch), so front ends can
use it to validate and describe a run instantly.

Adding a method (docs/architecture.md, "Adding an algorithm") touches four files: its class in
engine/algorithms/, its pure loss in engine/losses/, its preset in presets/, and its row here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# Charts a user of each family watches first (the app's default metric panels).
PREFERENCE_CHARTS = ("train/loss", "rewards/margin", "rewards/accuracy", "kl/mean", "eval/exact_match")
SFT_CHARTS = ("train/loss", "token_accuracy", "eval/exact_match", "eval/perplexity")
REWARD_MODEL_CHARTS = ("train/loss", "rewards/accuracy", "eval/rewards/accuracy", "rewards/margin")
ONLINE_CHARTS = (
    "reward/mean",
    "kl/mean",
    "eval/exact_match",
    "gen/length_mean",
    "frac_reward_zero_std",
    "policy/entropy",
)

# The new-run form's extra fields for methods that sample while training: how they sample, what rewards them.
SAMPLING_FIELDS = ("num_generations", "temperature", "max_new_tokens", "rewards")

# The settings a method reads beyond the common core (model, data, optimiser, schedule, logging, eval,
# checkpoints, precision, parallelism). A setting no row lists is core; one a run's row does not list is refused
# at submit when set (engine.spec), so a value that would do nothing never passes silently.
OFFLINE = ("group_by_length",)  # batches of similar length from a fixed dataset
REFERENCE = ("ref_model",)  # a frozen reference model (the starting weights by default)
PRECOMPUTED_REFERENCE = REFERENCE + ("precompute_ref_logps",)
ROLLOUT = (  # sample -> score -> update
    "num_generations",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "rewards",
    "reward_weights",
    "reward_timeout",
    "safety_reward_model",
    "safety_threshold",
    "missing_eos_penalty",
    "num_iterations",
    "num_mini_batches",
    "log_rollouts",
    # multi-turn episodes with an environment or tools (engine/episodes.py)
    "environment",
    "tools",
    "max_turns",
    "max_tool_calls",
    "tool_timeout",
)
POLICY_GRADIENT = ROLLOUT + REFERENCE + ("beta", "epsilon", "mask_truncated")

# A check takes the spec and returns None, or the message that names the field and the fix.
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str  # the spec's `algorithm` value
    title: str  # what the method is, with its paper
    data_kind: str  # what engine.data.prepare builds: preference | unpaired | sft | prompt
    online: bool  # samples from the policy while training (the online loop) or reads a fixed dataset
    implementation: str  # "module:Class" of its engine/algorithms class, imported only when a run starts
    loss: str  # "module:function" of its pure loss in engine/losses (the maths, tested against hand-computed values)
    loss_types: tuple[str, ...] = ("sigmoid",)  # accepted `loss_type` values
    default_loss: str | None = None  # the `loss_type` a spec that names none gets; None = the first of loss_types
    model_kind: str = "causal_lm"  # or "reward": a scalar-head sequence classifier
    generates: bool = True  # a causal LM whose samples can be compared and verified
    beta_may_be_zero: bool = False  # beta = 0 means "no KL term, no reference model" instead of an error
    charts: tuple[str, ...] = PREFERENCE_CHARTS
    logs: tuple[str, ...] = ()  # metrics it logs beyond train/loss (a demo run of it is checked to log each)
    settings: tuple[str, ...] = ()  # the settings it reads beyond the common core
    form_fields: tuple[str, ...] = ()  # fields the app's new-run form shows beyond the common ones
    checks: tuple[Check, ...] = field(default=())
    # (epsilon, epsilon_high) a spec that leaves them null gets, per loss type with its own paper's clip range
    # (others: epsilon 0.2, epsilon_high = epsilon). A test ties these to the losses' own constants.
    clip_defaults: dict[str, tuple[float, float | None]] = field(default_factory=dict)

    @property
    def default_loss_type(self) -> str:
        return self.default_loss or self.loss_types[0]


# ----------------------------------------------------------------------------- method-specific checks


def _kto_batch(spec) -> str | None:
    if spec.batch_size < 2:
        return (
            "kto needs batch_size >= 2: its reference point z0 comes from the other rows of the batch "
            "(with batch_size 1 it collapses to the example's own reward); use --set batch_size=4 or more"
        )
    return None


def _compares_samples(spec) -> str | None:
    if spec.num_generations < 2:
        return (
            f"num_generations must be >= 2 for {spec.algorithm}, which compares samples of one prompt "
            f"(got {spec.num_generations}); 8 is usual"
        )
    return None


def _rloo_baseline(spec) -> str | None:
    if spec.num_generations < 2:
        return (
            f"num_generations must be >= 2 for rloo: its baseline is the other samples of the prompt "
            f"(got {spec.num_generations}); the paper finds 4 better than 2"
        )
    return None


def _two_samples(spec) -> str | None:
    if spec.num_generations != 2:
        return f"num_generations must be 2 for online_dpo, which compares two samples per prompt (got {spec.num_generations})"
    return None


# ----------------------------------------------------------------------------- the rows

ALGORITHMS: dict[str, AlgorithmInfo] = {
    info.name: info
    for info in (
        AlgorithmInfo(
            "sft",
            "SFT: completion-only token-mean NLL",
            "sft",
            False,
            "engine.algorithms.sft:SFT",
            "engine.losses.sft:sft_loss",
            charts=SFT_CHARTS,
            settings=OFFLINE,
            logs=("token_accuracy", "eval/perplexity", "eval/token_accuracy", "policy/entropy", "lengths/completion"),
        ),
        AlgorithmInfo(
            "rm",
            "Bradley-Terry reward model",
            "preference",
            False,
            "engine.algorithms.reward_model:RewardModel",
            "engine.losses.reward:reward_model_loss",
            model_kind="reward",
            generates=False,
            charts=REWARD_MODEL_CHARTS,
            settings=OFFLINE + ("center_rewards_coef",),
        ),
        AlgorithmInfo(
            "dpo",
            "DPO (Rafailov et al. 2023) and its reference-based variants",
            "preference",
            False,
            "engine.algorithms.dpo:DPO",
            "engine.losses.dpo:dpo_loss",
            loss_types=("sigmoid", "robust", "hinge", "ipo"),
            settings=OFFLINE + PRECOMPUTED_REFERENCE + ("beta", "loss_type", "label_smoothing", "rpo_alpha"),
            logs=("rewards/margin", "rewards/accuracy", "logps/chosen", "eval/rewards/accuracy", "kl/mean"),
        ),
        AlgorithmInfo(
            "simpo",
            "SimPO (Meng et al. 2024)",
            "preference",
            False,
            "engine.algorithms.simpo:SimPO",
            "engine.losses.dpo:simpo_loss",
            settings=OFFLINE + ("beta", "label_smoothing", "gamma_beta_ratio"),
            logs=("rewards/margin", "logps/chosen"),
        ),
        AlgorithmInfo(
            "cpo",
            "CPO (Xu et al. 2024)",
            "preference",
            False,
            "engine.algorithms.cpo:CPO",
            "engine.losses.dpo:cpo_loss",
            settings=OFFLINE + ("beta", "cpo_alpha"),
            logs=("nll_loss", "rewards/accuracy", "logps/chosen"),
        ),
        AlgorithmInfo(
            "orpo",
            "ORPO (Hong et al. 2024)",
            "preference",
            False,
            "engine.algorithms.orpo:ORPO",
            "engine.losses.orpo:orpo_loss",
            settings=OFFLINE + ("beta",),
            logs=("nll_loss", "log_odds_ratio", "rewards/accuracy"),
        ),
        AlgorithmInfo(
            "kto",
            "KTO (Ethayarajh et al. 2024)",
            "unpaired",
            False,
            "engine.algorithms.kto:KTO",
            "engine.losses.kto:kto_loss",
            checks=(_kto_batch,),
            settings=OFFLINE + PRECOMPUTED_REFERENCE + ("beta", "desirable_weight", "undesirable_weight"),
            logs=("kl", "rewards/chosen", "rewards/rejected", "rewards/margin", "kto/desirable_fraction"),
        ),
        AlgorithmInfo(
            "coh",
            "Chain of Hindsight (Liu et al. 2023)",
            "preference",
            False,
            "engine.algorithms.coh:ChainOfHindsight",
            "engine.losses.sft:sft_loss",
            charts=SFT_CHARTS,
            settings=OFFLINE
            + ("coh_positive", "coh_negative", "coh_mask_ratio", "coh_pretrain_dataset", "coh_pretrain_coef"),
        ),
        AlgorithmInfo(
            "grpo",
            "GRPO (Shao et al. 2024) with the DAPO and Dr. GRPO choices",
            "prompt",
            True,
            "engine.algorithms.grpo:GRPO",
            "engine.losses.online:clipped_policy_loss",
            loss_types=("grpo", "dapo", "dr_grpo", "gspo", "cispo"),
            default_loss="dapo",  # token-level aggregation, as TRL
            beta_may_be_zero=True,
            charts=ONLINE_CHARTS,
            form_fields=SAMPLING_FIELDS,
            checks=(_compares_samples,),
            clip_defaults={"gspo": (3e-4, 4e-4), "cispo": (1.0, 4.0)},
            settings=POLICY_GRADIENT + ("loss_type", "epsilon_high", "scale_rewards"),
        ),
        AlgorithmInfo(
            "rloo",
            "RLOO (Ahmadian et al. 2024)",
            "prompt",
            True,
            "engine.algorithms.rloo:RLOO",
            "engine.losses.online:sequence_policy_loss",
            beta_may_be_zero=True,
            charts=ONLINE_CHARTS,
            form_fields=SAMPLING_FIELDS,
            checks=(_rloo_baseline,),
            settings=POLICY_GRADIENT,
        ),
        AlgorithmInfo(
            "ppo",
            "PPO-RLHF (Ouyang et al. 2022)",
            "prompt",
            True,
            "engine.algorithms.ppo:PPO",
            "engine.losses.online:clipped_policy_loss",
            beta_may_be_zero=True,
            charts=ONLINE_CHARTS,
            form_fields=SAMPLING_FIELDS,
            settings=POLICY_GRADIENT
            + (
                "epsilon_high",
                "kl_target",
                "kl_horizon",
                "gamma",
                "lam",
                "vf_coef",
                "cliprange_value",
                "value_model",
                "whiten_rewards",
            ),
        ),
        AlgorithmInfo(
            "online_dpo",
            "online DPO with AI feedback (Guo et al. 2024)",
            "prompt",
            True,
            "engine.algorithms.online_dpo:OnlineDPO",
            "engine.losses.dpo:dpo_loss",
            loss_types=("sigmoid", "ipo"),
            charts=ONLINE_CHARTS + ("judge/position_consistency", "judge/shorter_preferred_frac"),
            form_fields=SAMPLING_FIELDS + ("judge", "judge_template"),
            checks=(_two_samples,),
            settings=ROLLOUT + REFERENCE + ("beta", "loss_type", "judge", "judge_tie_margin", "judge_template"),
        ),
        AlgorithmInfo(
            "best_of_k",
            "rejection sampling fine-tuning (best-of-K)",
            "prompt",
            True,
            "engine.algorithms.rejection:BestOfK",
            "engine.losses.sft:sft_loss",
            beta_may_be_zero=True,
            charts=ONLINE_CHARTS,
            form_fields=SAMPLING_FIELDS,
            checks=(_compares_samples,),
            settings=ROLLOUT + ("rest_improve_epochs",),
        ),
        AlgorithmInfo(
            "rest",
            "ReST (Gulcehre et al. 2023)",
            "prompt",
            True,
            "engine.algorithms.rejection:ReST",
            "engine.losses.sft:sft_loss",
            beta_may_be_zero=True,
            charts=ONLINE_CHARTS,
            form_fields=SAMPLING_FIELDS,
            settings=ROLLOUT + ("rest_keep_fractions", "rest_improve_epochs"),
        ),
    )
}

ALGORITHM_NAMES = tuple(ALGORITHMS)
ONLINE_ALGORITHMS = tuple(name for name, info in ALGORITHMS.items() if info.online)
DATA_KINDS = ("preference", "unpaired", "sft", "prompt")


def algorithm_info(name: str) -> AlgorithmInfo:
    """The row of `name`; a KeyError names the known algorithms (spec validation refuses unknown ones first)."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm '{name}'; known: {', '.join(ALGORITHMS)}") from None


def is_online(name: str) -> bool:
    return name in ALGORITHMS and ALGORITHMS[name].online


def algorithms_for(data_kind: str) -> list[str]:
    """The algorithms that train on `data_kind` data (named in data-format error messages)."""
    return [name for name, info in ALGORITHMS.items() if info.data_kind == data_kind]


def all_form_fields() -> tuple[str, ...]:
    """Every method-specific field of the new-run form, in a stable order."""
    out: list[str] = []
    for info in ALGORITHMS.values():
        out += [f for f in info.form_fields if f not in out]
    return tuple(out)
