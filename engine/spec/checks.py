"""Impossible values refused before anything heavy loads, each message naming the setting and the fix.

The core's checks run for every run; a method setting's checks run for the methods that read it (the
registry row's `settings`), so a run is never refused over a value it would not use.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from engine.errors import SpecError
from engine.limits import check_limits
from engine.nonfinite import check_nonfinite_settings
from engine.registry import ALGORITHM_NAMES, ALGORITHMS, is_online
from engine.rewards.sources import JUDGE_PLACEHOLDERS, parse_reward_source
from engine.rollout_store import rollout_limit
from engine.spec.schema import (
    DTYPES,
    EVAL_STRATEGIES,
    OVERLONG,
    PARALLELISM,
    REPORT_TARGETS,
    SCALE_REWARDS,
    SCHEDULERS,
    RunSpec,
    method_settings,
    report_targets,
)


def need(ok: bool, message: str, field: str | None = None) -> None:
    if not ok:
        raise SpecError(message, field)


def check_values(spec: RunSpec) -> None:
    """Refuse impossible values, naming the field."""
    need(
        spec.algorithm in ALGORITHMS,
        f"algorithm '{spec.algorithm}' is not available; choose one of: {', '.join(ALGORITHM_NAMES)}",
        "algorithm",
    )
    _check_optimisation(spec)
    _check_data_and_logging(spec)
    _check_hardware(spec)
    read = method_settings(spec.algorithm)
    for setting, check in SETTING_CHECKS.items():
        if setting in read:
            message = check(spec)
            need(message is None, message or "", setting)
    for check in ALGORITHMS[spec.algorithm].checks:  # each method's own rules (engine/registry.py)
        message = check(spec)
        need(message is None, message or "")
    if is_online(spec.algorithm):
        _check_rollout_split(spec)


def _check_optimisation(spec: RunSpec) -> None:
    need(
        spec.lr > 0,
        f"lr must be > 0 (got {spec.lr}); typical DPO values are 1e-6 to 1e-5 (1e-5 to 1e-4 with LoRA)",
        "lr",
    )
    for name in ("batch_size", "grad_accum"):
        need(getattr(spec, name) >= 1, f"{name} must be >= 1 (got {getattr(spec, name)})", name)
    need(spec.epochs > 0, f"epochs must be > 0 (got {spec.epochs})", "epochs")
    need(spec.max_steps >= 0, f"max_steps must be >= 0 (got {spec.max_steps}); 0 means 'run epochs'", "max_steps")
    need(0 <= spec.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {spec.warmup_ratio})", "warmup_ratio")
    need(spec.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {spec.warmup_steps}); 0 uses warmup_ratio")
    need(spec.weight_decay >= 0, f"weight_decay must be >= 0 (got {spec.weight_decay})", "weight_decay")
    need(0 <= spec.adam_beta1 < 1 and 0 <= spec.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)")
    need(spec.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {spec.max_grad_norm}); 0 disables clipping")
    need(
        spec.lr_scheduler in SCHEDULERS,
        f"lr_scheduler must be one of {', '.join(SCHEDULERS)} (got '{spec.lr_scheduler}')",
        "lr_scheduler",
    )
    need(spec.lora.r >= 0, f"lora.r must be >= 0 (got {spec.lora.r}); 0 = full fine-tuning", "lora.r")
    need(spec.lora.alpha > 0, f"lora.alpha must be > 0 (got {spec.lora.alpha})", "lora.alpha")
    need(0 <= spec.lora.dropout < 1, f"lora.dropout must be in [0, 1) (got {spec.lora.dropout})", "lora.dropout")


def _check_data_and_logging(spec: RunSpec) -> None:
    need(0 <= spec.eval_split < 1, f"eval_split must be in [0, 1) (got {spec.eval_split})", "eval_split")
    # engine.data imports engine.spec (looks_local): its checks are looked up when called
    importlib.import_module("engine.data.sources").check_data_settings(spec)
    need(spec.max_length >= 2, f"max_length must be >= 2 (got {spec.max_length})", "max_length")
    need(
        0 < spec.max_prompt_length < spec.max_length,
        f"max_prompt_length must be > 0 and < max_length ({spec.max_prompt_length} vs {spec.max_length}): "
        "lower max_prompt_length or raise max_length",
        "max_prompt_length",
    )
    need(spec.overlong in OVERLONG, f"overlong must be one of {', '.join(OVERLONG)} (got '{spec.overlong}')")
    need(spec.max_rows is None or spec.max_rows >= 1, f"max_rows must be >= 1 (got {spec.max_rows})", "max_rows")
    need(
        spec.eval_strategy in EVAL_STRATEGIES,
        f"eval_strategy must be one of {', '.join(EVAL_STRATEGIES)} (got '{spec.eval_strategy}'); "
        "'epoch' has no equivalent: use eval_steps",
        "eval_strategy",
    )
    need(
        spec.eval_batch_size is None or spec.eval_batch_size >= 1,
        f"eval_batch_size must be >= 1 (got {spec.eval_batch_size}); null = batch_size",
        "eval_batch_size",
    )
    for name in ("logging_steps", "save_total_limit", "max_new_tokens"):
        need(getattr(spec, name) >= 1, f"{name} must be >= 1 (got {getattr(spec, name)})", name)
    for name in (
        "eval_steps",
        "sample_steps",
        "save_steps",
        "num_samples",
        "kl_samples",
        "num_threads",
        "eval_max_examples",
    ):
        need(getattr(spec, name) >= 0, f"{name} must be >= 0 (got {getattr(spec, name)})", name)
    need(
        spec.stop is None or all(isinstance(s, str) and s for s in spec.stop),
        f"stop must be a list of non-empty strings (got {spec.stop!r})",
        "stop",
    )
    check_nonfinite_settings(spec)
    check_limits(spec)
    unknown = [r for r in report_targets(spec) if r not in REPORT_TARGETS]
    need(
        not unknown,
        f"report_to: {unknown[0] if unknown else ''!r} is not known; choose from "
        f"{', '.join(REPORT_TARGETS)} (e.g. --set report_to=tensorboard)",
        "report_to",
    )


def _check_hardware(spec: RunSpec) -> None:
    need(spec.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)} (got '{spec.dtype}')", "dtype")
    need(
        not (spec.dtype == "fp16" and spec.device in ("cpu", "mps")),
        f"dtype fp16 needs a CUDA GPU (its loss scaling is GPU-only) and device is {spec.device}; "
        "use --set dtype=bf16 (mixed precision, works on the CPU) or --set dtype=fp32",
        "dtype",
    )
    need(
        spec.save_dtype in ("auto", *DTYPES[1:]),
        f"save_dtype must be auto or one of {', '.join(DTYPES[1:])} (got '{spec.save_dtype}')",
        "save_dtype",
    )
    need(
        re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", spec.device) is not None,
        f"device must be auto, cpu, mps, cuda or cuda:N (got '{spec.device}')",
        "device",
    )
    need(
        spec.num_processes >= 1,
        f"num_processes must be >= 1 (got {spec.num_processes}); 1 = one process, N = one process per GPU",
        "num_processes",
    )
    need(
        spec.num_machines >= 1,
        f"num_machines must be >= 1 (got {spec.num_machines}); 1 = this machine, M = one run over M queue workers "
        "(num_processes on each)",
        "num_machines",
    )
    need(
        spec.num_processes == 1 or spec.device in ("auto", "cpu", "cuda"),
        f"num_processes={spec.num_processes} needs device auto, cpu or cuda (got '{spec.device}'): rank r uses "
        "GPU r of those the run sees (CUDA_VISIBLE_DEVICES picks them); mps runs one process",
        "num_processes",
    )
    need(
        spec.parallelism in PARALLELISM,
        f"parallelism must be one of {', '.join(PARALLELISM)} (got '{spec.parallelism}')",
        "parallelism",
    )
    if spec.parallelism == "fsdp":
        need(
            spec.num_processes >= 2,
            f"parallelism fsdp shards the model over num_processes ranks, and num_processes is {spec.num_processes}; "
            "set --set num_processes=N (N >= 2 GPUs) or --set parallelism=ddp",
            "parallelism",
        )
        need(
            spec.lora.r == 0,
            f"parallelism fsdp shards a full fine-tune; LoRA (lora.r={spec.lora.r}) trains an adapter small enough "
            "to keep whole on every rank: use --set parallelism=ddp, or --set lora.r=0 to shard a full fine-tune",
            "parallelism",
        )
        need(
            spec.dtype != "fp16",
            "parallelism fsdp runs in bf16 or fp32 mixed precision (fp16's loss scaler does not unscale shards); "
            "use --set dtype=bf16 (or fp32)",
            "parallelism",
        )


def _check_rollout_split(spec: RunSpec) -> None:
    rollout = spec.batch_size * spec.num_generations
    need(
        rollout % spec.num_mini_batches == 0,
        f"num_mini_batches={spec.num_mini_batches} must divide the rollout of batch_size x num_generations = {rollout} samples",
        "num_mini_batches",
    )
    need(
        (rollout // spec.num_mini_batches) % spec.grad_accum == 0,
        f"grad_accum={spec.grad_accum} must divide each mini-batch of {rollout // spec.num_mini_batches} samples",
        "grad_accum",
    )


# ----------------------------------------------------------------------------- method settings

Check = Callable[[RunSpec], "str | None"]


def _at_least(name: str, low: float, strict: bool = False, hint: str = "") -> Check:
    def check(spec: RunSpec) -> str | None:
        value = getattr(spec, name)
        ok = value is None or (value > low if strict else value >= low)
        return None if ok else f"{name} must be {'>' if strict else '>='} {low:g} (got {value}){hint}"

    return check


def _within(name: str, low: float, high: float, hint: str = "") -> Check:
    def check(spec: RunSpec) -> str | None:
        value = getattr(spec, name)
        return None if low <= value < high else f"{name} must be in [{low:g}, {high:g}) (got {value}){hint}"

    return check


def _beta(spec: RunSpec) -> str | None:
    if ALGORITHMS[spec.algorithm].beta_may_be_zero:  # a real choice here: no KL term, no reference model loaded
        return (
            None if spec.beta >= 0 else f"beta must be >= 0 (got {spec.beta}); 0 = no KL penalty and no reference model"
        )
    return None if spec.beta > 0 else f"beta must be > 0 (got {spec.beta}); 0.1 is the DPO paper's default"


def _loss_type(spec: RunSpec) -> str | None:
    loss_types = ALGORITHMS[spec.algorithm].loss_types
    if spec.loss_type not in loss_types:
        return f"loss_type must be one of {', '.join(loss_types)} for {spec.algorithm} (got '{spec.loss_type}')"
    return None


def _label_smoothing(spec: RunSpec) -> str | None:
    if not 0 <= spec.label_smoothing < 0.5:
        return f"label_smoothing must be in [0, 0.5) (got {spec.label_smoothing})"
    if spec.label_smoothing and spec.algorithm == "dpo" and spec.loss_type not in ("sigmoid", "robust"):
        return (
            f"label_smoothing applies to loss_type sigmoid (cDPO) and robust only; got {spec.label_smoothing} with "
            f"loss_type={spec.loss_type} (set label_smoothing=0)"
        )
    return None


def _rpo_alpha(spec: RunSpec) -> str | None:
    if spec.rpo_alpha < 0:
        return f"rpo_alpha must be >= 0 (got {spec.rpo_alpha}); 1.0 is the RPO paper's value"
    if spec.rpo_alpha > 0 and spec.loss_type == "ipo":
        return "rpo_alpha > 0 combines the NLL with summed DPO log-ratios; it does not apply to loss_type=ipo (set rpo_alpha=0)"
    return None


def _coh_phrases(spec: RunSpec) -> str | None:
    ok = spec.coh_positive.strip() and spec.coh_negative.strip() and spec.coh_positive != spec.coh_negative
    return None if ok else "coh_positive and coh_negative must be two different, non-empty phrases"


def _kto_weights(spec: RunSpec) -> str | None:
    ok = spec.desirable_weight > 0 and spec.undesirable_weight > 0
    return None if ok else "desirable_weight and undesirable_weight must be > 0"


def _rewards(spec: RunSpec) -> str | None:
    sources = [spec.rewards] if isinstance(spec.rewards, str) else list(spec.rewards)
    if not sources:
        return "rewards is empty: name at least one reward source, e.g. --set rewards=exact_match"
    for source in sources:
        parse_reward_source(source)
    if spec.reward_weights is not None and len(spec.reward_weights) != len(sources):
        return (
            f"reward_weights has {len(spec.reward_weights)} values for {len(sources)} reward source(s) "
            f"({', '.join(sources)}): give one weight per source"
        )
    if "environment" in [s.strip() for s in sources] and not (spec.environment or spec.tools):
        return "rewards entry 'environment' is an environment's own reward: set environment (or tools), or remove it"
    if spec.safety_reward_model and not any(s.startswith("rm:") for s in sources):
        return "safety_reward_model combines with a helpfulness reward model: add an rm:PATH entry to rewards"
    return None


def _judge_template(spec: RunSpec) -> str | None:
    if spec.judge_template is None:
        return None
    missing = [p for p in JUDGE_PLACEHOLDERS if p not in spec.judge_template]
    if missing:
        return (
            f"judge_template lacks {' and '.join(missing)}: the judge prompt must contain {', '.join(JUDGE_PLACEHOLDERS)} "
            "(where the request and the two answers go)"
        )
    if spec.judge == "reward":
        return (
            "judge_template is the prompt of an LLM judge, but judge is 'reward' (the rewards decide the pairs): "
            "set judge to a causal LM directory or hub id, or leave judge_template unset"
        )
    return None


def _epsilon(spec: RunSpec) -> str | None:
    if spec.loss_type == "cispo":  # CISPO clips a weight: a lower bound of 0 is allowed
        if not 0 < spec.epsilon <= 1:
            return f"epsilon must be in (0, 1] for loss_type=cispo (got {spec.epsilon}); 1 = no lower bound on the weight (MiniMax-M1)"
        return None
    return (
        None if 0 < spec.epsilon < 1 else f"epsilon must be in (0, 1) (got {spec.epsilon}); 0.2 is the usual clip range"
    )


def _scale_rewards(spec: RunSpec) -> str | None:
    if spec.scale_rewards not in SCALE_REWARDS:
        return f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (got '{spec.scale_rewards}')"
    return None


def _log_rollouts(spec: RunSpec) -> str | None:
    try:
        rollout_limit(spec.log_rollouts)
    except ValueError as err:
        return f"{err}; e.g. --set log_rollouts=16 keeps the first 16 samples of each step"
    return None


_CODE_ENTRY = re.compile(r"^(?:.+\.py|[A-Za-z_][\w.]*):[A-Za-z_][\w.]*$")


def _environment(spec: RunSpec) -> str | None:
    if spec.environment is None:
        return None
    if not isinstance(spec.environment, str) or not _CODE_ENTRY.match(spec.environment.strip()):
        return f"environment must be path/to/env.py:ClassName or module:ClassName (got {spec.environment!r})"
    if spec.tools:
        return "set environment or tools, not both: an environment can call your tools itself"
    return None


def _tools(spec: RunSpec) -> str | None:
    if spec.tools is None:
        return None
    entries = [spec.tools] if isinstance(spec.tools, str) else spec.tools
    bad = [e for e in entries if not isinstance(e, str) or not _CODE_ENTRY.match(e.strip())]
    if bad or not entries:
        return f"tools is a list of path/to/tools.py:function or module:function entries (got {spec.tools!r})"
    return None


def _gae(spec: RunSpec) -> str | None:
    ok = 0 < spec.gamma <= 1 and 0 <= spec.lam <= 1
    return None if ok else f"gamma must be in (0, 1] and lam in [0, 1] (got {spec.gamma}, {spec.lam})"


def _rest_fractions(spec: RunSpec) -> str | None:
    fractions = spec.rest_keep_fractions
    if fractions is None or (fractions and all(0 < f <= 1 for f in fractions)):
        return None
    return f"rest_keep_fractions must be fractions in (0, 1], e.g. 0.5,0.3,0.1 (got {fractions})"


def _sampling(spec: RunSpec) -> str | None:
    if spec.temperature <= 0:
        return f"temperature must be > 0 (got {spec.temperature}); online methods must sample (1.0 is usual)"
    if not 0 < spec.top_p <= 1:
        return f"top_p must be in (0, 1] (got {spec.top_p})"
    return None


SETTING_CHECKS: dict[str, Check] = {
    "beta": _beta,
    "loss_type": _loss_type,
    "label_smoothing": _label_smoothing,
    "rpo_alpha": _rpo_alpha,
    "cpo_alpha": _at_least("cpo_alpha", 0, hint="; 1.0 is the CPO paper's value"),
    "gamma_beta_ratio": _at_least("gamma_beta_ratio", 0),
    "desirable_weight": _kto_weights,
    "center_rewards_coef": _at_least("center_rewards_coef", 0),
    "coh_positive": _coh_phrases,
    "coh_mask_ratio": _within("coh_mask_ratio", 0, 1, "; the paper masks 0-5%"),
    "coh_pretrain_coef": _at_least("coh_pretrain_coef", 0),
    "num_generations": _at_least("num_generations", 1),
    "temperature": _sampling,
    "top_k": _at_least("top_k", 0, hint="; 0 = off"),
    "min_p": _within("min_p", 0, 1, "; 0 = off"),
    "repetition_penalty": _at_least("repetition_penalty", 0, strict=True, hint="; 1 = off"),
    "rewards": _rewards,
    "judge_tie_margin": _within("judge_tie_margin", 0, 0.5),
    "judge_template": _judge_template,
    "missing_eos_penalty": _at_least("missing_eos_penalty", 0, hint="; it is subtracted"),
    "epsilon": _epsilon,
    "epsilon_high": _at_least("epsilon_high", 0, strict=True, hint="; DAPO uses 0.28"),
    "num_iterations": _at_least("num_iterations", 1),
    "num_mini_batches": _at_least("num_mini_batches", 1),
    "scale_rewards": _scale_rewards,
    "kl_target": _at_least("kl_target", 0, strict=True, hint="; InstructGPT-era runs used 6"),
    "kl_horizon": _at_least("kl_horizon", 1),
    "gamma": _gae,
    "vf_coef": _at_least("vf_coef", 0),
    "cliprange_value": _at_least("cliprange_value", 0, strict=True),
    "rest_keep_fractions": _rest_fractions,
    "rest_improve_epochs": _at_least("rest_improve_epochs", 0, strict=True),
    "log_rollouts": _log_rollouts,
    "environment": _environment,
    "tools": _tools,
    "max_turns": _at_least("max_turns", 1),
    "max_tool_calls": _at_least("max_tool_calls", 1),
    "tool_timeout": _at_least("tool_timeout", 0, hint="; 0 = no limit"),
}
