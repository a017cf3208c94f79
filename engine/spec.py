"""Run specs: a preset (YAML) plus overrides, validated before anything heavy is loaded.

This module imports no torch, so front ends can validate a spec instantly. Every problem a user
can cause becomes a `SpecError` that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from engine.errors import SpecError
from engine.limits import check_limits, load_yaml, load_yaml_file
from engine.registry import ALGORITHM_NAMES, ALGORITHMS, is_online
from engine.rewards.sources import JUDGE_PLACEHOLDERS, parse_reward_source  # torch-free: the grammar only

REPO_ROOT = Path(__file__).resolve().parent.parent


def presets_dir() -> Path:
    """Where presets and the embedded demo live (`$CHERRY_PRESETS` overrides the checkout's)."""
    return Path(os.environ.get("CHERRY_PRESETS", REPO_ROOT / "presets"))


DTYPES = ("auto", "fp32", "bf16", "fp16")
PARALLELISM = ("ddp", "fsdp")
SCHEDULERS = ("linear", "cosine", "constant", "inverse_sqrt")  # engine.loop.schedule.lr_factor
OVERLONG = ("truncate", "drop")
SCALE_REWARDS = ("group", "batch", "none")
DEFAULT_EPSILON = 0.2  # the clip range a null `epsilon` takes, unless the method's loss type has its own
# Free text taken from `--set key=value` as typed: YAML would read "{prompt} ..." as a mapping.
VERBATIM_FIELDS = ("judge_template",)


def _base_preset() -> dict[str, Any]:
    """presets/_base.yaml, the one place each setting's default is written (with a comment that says why);
    every preset builds on it, and the fields below take their defaults from it."""
    return yaml.safe_load((REPO_ROOT / "presets" / "_base.yaml").read_text()) or {}


_BASE = _base_preset()


def default(key: str) -> Any:
    """The base preset's value of `key` ("lora.r" for a LoRA setting) as a dataclass default."""
    section, _, name = key.rpartition(".")
    value = (_BASE.get(section) or {}).get(name) if section else _BASE[key]
    return field(default_factory=lambda: list(value)) if isinstance(value, list) else value


@dataclass
class LoraSpec:
    r: int = default("lora.r")  # adapter rank; 0 = full fine-tuning
    alpha: int = default("lora.alpha")  # scaling numerator (effective scale alpha / r)
    dropout: float = default("lora.dropout")  # dropout on the adapter input
    target_modules: str | list[str] = default(
        "lora.target_modules"
    )  # "all-linear" or module names, e.g. [q_proj, v_proj]


@dataclass
class RunSpec:
    algorithm: str = default("algorithm")
    name: str | None = None  # a label for the run; defaults to algorithm-model-dataset
    # --- models
    model: str | None = default("model")  # local dir or hub id; "demo" = the embedded demo model
    ref_model: str | None = default("ref_model")  # frozen reference; default = the policy's starting weights
    trust_remote_code: bool = default("trust_remote_code")
    dtype: str = default("dtype")  # compute precision (autocast); trainable weights stay fp32
    save_dtype: str = default("save_dtype")  # auto = the dtype the model came in
    device: str = default("device")  # auto = cuda > mps > cpu; or "cpu", "cuda", "cuda:1", "mps"
    gradient_checkpointing: bool = default("gradient_checkpointing")
    lora: LoraSpec = field(default_factory=LoraSpec)
    # --- data
    dataset: str | None = default("dataset")  # local file (jsonl/json/parquet/csv), saved datasets dir, or hub id
    eval_dataset: str | None = default("eval_dataset")  # default: eval_split of `dataset`
    eval_split: float = default("eval_split")
    eval_prompts: str | None = default("eval_prompts")  # prompt + answer rows scored by the exact-match verifier
    max_length: int = default("max_length")
    max_prompt_length: int = default("max_prompt_length")
    overlong: str = default("overlong")  # truncate (keep the prompt's end, cut the completion) | drop
    max_rows: int | None = default("max_rows")  # use only the first N rows (quick trials)
    group_by_length: bool = default("group_by_length")  # offline methods: batch rows of similar length together
    # --- optimisation
    lr: float = default("lr")
    batch_size: int = default("batch_size")  # examples (pairs for DPO) per micro-batch
    grad_accum: int = default("grad_accum")  # micro-batches per optimizer step
    epochs: float = default("epochs")
    max_steps: int = default("max_steps")  # optimizer steps; 0 = run `epochs`
    warmup_ratio: float = default("warmup_ratio")
    warmup_steps: int = default("warmup_steps")  # > 0: this many linear warmup steps, instead of warmup_ratio
    lr_scheduler: str = default("lr_scheduler")
    weight_decay: float = default("weight_decay")
    adam_beta1: float = default("adam_beta1")
    adam_beta2: float = default("adam_beta2")
    max_grad_norm: float = default("max_grad_norm")  # 0 = no clipping
    seed: int = default("seed")
    num_threads: int = default("num_threads")  # CPU threads for torch; 0 = torch's default
    num_processes: int = default("num_processes")  # data-parallel ranks (one per GPU); batch_size is per rank
    parallelism: str = default("parallelism")  # ddp: every rank holds the model | fsdp: each holds 1/N of it
    # --- algorithm (DPO family, KTO, ORPO)
    beta: float = default("beta")  # DPO/KTO KL strength; IPO tau; SimPO reward scale; ORPO lambda
    loss_type: str = default("loss_type")  # DPO: sigmoid | robust | hinge | ipo
    label_smoothing: float = default("label_smoothing")  # cDPO / robust DPO label-flip rate
    rpo_alpha: float = default("rpo_alpha")  # RPO: weight of the NLL on chosen (0 = off)
    cpo_alpha: float = default("cpo_alpha")  # CPO: weight of the NLL on chosen (0 = the preference term alone)
    gamma_beta_ratio: float = default("gamma_beta_ratio")  # SimPO target margin gamma / beta
    desirable_weight: float = default("desirable_weight")  # KTO lambda_D
    undesirable_weight: float = default("undesirable_weight")  # KTO lambda_U
    center_rewards_coef: float = default("center_rewards_coef")  # reward model: eta in eta (r_w + r_l)^2 (TRL 0.01)
    coh_positive: str = default("coh_positive")  # Chain of Hindsight feedback phrases
    coh_negative: str = default("coh_negative")
    coh_mask_ratio: float = default(
        "coh_mask_ratio"
    )  # CoH: hide up to this fraction of earlier tokens from attention (paper 0-5%)
    coh_pretrain_dataset: str | None = default(
        "coh_pretrain_dataset"
    )  # CoH: data for a pretraining NLL regulariser (None = off)
    coh_pretrain_coef: float = default("coh_pretrain_coef")  # CoH: weight of that NLL
    precompute_ref_logps: bool = default("precompute_ref_logps")
    # --- online methods (grpo, rloo, ppo, online_dpo, best_of_k, rest): sample -> score -> update.
    # `batch_size` counts prompts per rollout; each gets `num_generations` samples.
    num_generations: int = default(
        "num_generations"
    )  # samples per prompt (GRPO G, RLOO k, best-of-K K; online_dpo uses 2)
    temperature: float = default("temperature")  # sampling temperature; the update's log-probs use the same one
    top_p: float = default("top_p")
    rewards: str | list[str] = default("rewards")  # reward sources (engine/rewards/), summed with reward_weights
    reward_weights: list[float] | None = default("reward_weights")  # one per source; None = all 1
    safety_reward_model: str | None = default(
        "safety_reward_model"
    )  # Llama 2 gating: with an rm: source as helpfulness
    safety_threshold: float = default("safety_threshold")
    judge: str = default("judge")  # online_dpo: "reward" (compare the rewards) or a causal LM dir / hub id (LLM judge)
    judge_tie_margin: float = default(
        "judge_tie_margin"
    )  # online_dpo: skip pairs whose preference is within this of 0.5
    # online_dpo: the LLM judge's prompt, with {prompt}, {answer_1}, {answer_2}; None = the built-in one
    judge_template: str | None = default("judge_template")
    missing_eos_penalty: float = default(
        "missing_eos_penalty"
    )  # subtracted from the reward of a sample that hit max_new_tokens without EOS
    mask_truncated: bool = default(
        "mask_truncated"
    )  # leave samples without EOS out of the loss (DAPO overlong filtering)
    # PPO / GRPO / RLOO clip range (low side); None = the loss type's own (the registry's clip_defaults), else 0.2
    epsilon: float | None = default("epsilon")
    # upper clip (DAPO clip-higher 0.28); None = epsilon, or the loss type's own (gspo, cispo)
    epsilon_high: float | None = default("epsilon_high")
    num_iterations: int = default("num_iterations")  # passes over each rollout (PPO epochs, GRPO mu)
    num_mini_batches: int = default("num_mini_batches")  # optimizer steps per pass over a rollout
    scale_rewards: str = default("scale_rewards")  # GRPO advantage scaling: group | batch | none (Dr. GRPO)
    kl_target: float | None = default("kl_target")  # PPO adaptive KL: target sequence KL (None = fixed beta)
    kl_horizon: int = default("kl_horizon")  # PPO adaptive KL horizon (Ziegler et al. 2019)
    gamma: float = default("gamma")  # PPO discount
    lam: float = default("lam")  # PPO GAE lambda
    vf_coef: float = default("vf_coef")  # PPO value-loss weight
    cliprange_value: float = default("cliprange_value")  # PPO value clip
    # PPO: initialise the value model from this reward model (default: the policy + a fresh head)
    value_model: str | None = default("value_model")
    whiten_rewards: bool = default("whiten_rewards")  # PPO: rescale scores (no mean shift) before GAE
    rest_keep_fractions: list[float] | None = default(
        "rest_keep_fractions"
    )  # ReST Improve steps: top fractions kept (default 0.5, 0.3, 0.1)
    rest_improve_epochs: float = default("rest_improve_epochs")  # ReST / best-of-K: SFT epochs over each kept set
    # --- logging, eval, checkpoints
    logging_steps: int = default("logging_steps")
    eval_steps: int = default("eval_steps")  # 0 = only at the start and the end
    eval_max_examples: int = default("eval_max_examples")
    sample_steps: int = default("sample_steps")
    num_samples: int = default("num_samples")
    kl_samples: int = default("kl_samples")  # policy samples used for the kl/mean estimate
    max_new_tokens: int = default("max_new_tokens")
    save_steps: int = default("save_steps")
    save_total_limit: int = default("save_total_limit")
    # Also log to: tensorboard (event files in the run directory), wandb (when installed). Front ends
    # build these reporters; the engine only ever sees the Reporter interface.
    report_to: str | list[str] = default("report_to")
    # --- bounds on user code (engine/limits.py)
    reward_timeout: float = default("reward_timeout")  # seconds per reward-function call; 0 = no limit
    # Written by Cherry, not set by users: settings it chose to follow one you set (resolve_spec), e.g.
    # "max_prompt_length=64: ...". Kept in the spec so the run's start event can say so.
    defaults_followed: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def followed_note(self) -> str:
        """ "; "-joined notes on the settings that followed the user's, for the start event ("" if none)."""
        return "".join(f"; {note}" for note in self.defaults_followed or [])

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        parts = [self.algorithm, _short(self.model), _short(self.dataset)]
        return "-".join(p for p in parts if p)


def _short(path: str | None) -> str:
    if not path:
        return ""
    return Path(path.rstrip("/")).stem if "/" in path or os.sep in path else path


# ----------------------------------------------------------------------------- building


def spec_fields(cls: type = RunSpec) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def closest(name: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return found[0] if found else None


def _unknown_key(key: str, candidates: list[str], where: str) -> SpecError:
    guess = closest(key.split(".")[-1], candidates)
    hint = f"did you mean '{guess}'?" if guess else f"valid keys: {', '.join(sorted(candidates))}"
    return SpecError(f"unknown {where}key '{key}': {hint}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML or `--set` value into the field's type, or say what was expected."""
    args = get_args(hint)
    if list[float] in args:  # "0.5,0.3" or a YAML list of numbers
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        try:
            return [float(v) for v in items]
        except (TypeError, ValueError):
            raise SpecError(f"{key} must be a list of numbers such as 0.5,0.3 (got {value!r})") from None
    if any(get_origin(a) is list for a in args):  # "str | list[str]": a name, a list, or "a,b"
        if value is None and type(None) in args:
            return None
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, str) and "," in value:
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str):
            return value
        raise SpecError(f"{key} must be a name or a list of names, got {value!r}")
    if value is None:
        if type(None) in args:
            return None
        raise SpecError(f"{key} cannot be empty: give a value of type {_type_name(hint)}")
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise SpecError(f"{key} must be true or false, got {value!r}")
    if target is int:
        if isinstance(value, bool):
            raise SpecError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise SpecError(f"{key} must be an integer, got {value!r}")
    if target is float:
        if isinstance(value, bool):
            raise SpecError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SpecError(f"{key} must be a number, got {value!r}") from None
    if target is str:
        if isinstance(value, (dict, list)):
            raise SpecError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _type_name(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args) if args else getattr(hint, "__name__", str(hint))


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise SpecError(f"--set expects key=value, got '{item}' (for example --set beta=0.2)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key in VERBATIM_FIELDS:
        return key, raw
    try:
        value = load_yaml(raw, f"--set {key}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def build_spec(values: dict[str, Any]) -> RunSpec:
    """A RunSpec from a flat-or-nested dict; unknown keys, wrong types and impossible values are refused."""
    spec = _typed_spec(values)
    check_values(spec)
    return spec


def _typed_spec(values: dict[str, Any]) -> RunSpec:
    """A RunSpec from a flat-or-nested dict with each value turned into its field's type (not yet checked)."""
    top = spec_fields(RunSpec)
    lora_fields = spec_fields(LoraSpec)
    kwargs: dict[str, Any] = {}
    lora_kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith("lora."):
            sub = key[len("lora.") :]
            if sub not in lora_fields:
                raise _unknown_key(key, list(lora_fields), "lora ")
            lora_kwargs[sub] = _coerce(key, value, lora_fields[sub])
        elif key == "lora":
            if isinstance(value, LoraSpec):
                value = dataclasses.asdict(value)
            if not isinstance(value, dict):
                raise SpecError("lora must be a mapping, e.g. lora: {r: 16, alpha: 32}")
            for sub, sub_value in value.items():
                if sub not in lora_fields:
                    raise _unknown_key(f"lora.{sub}", list(lora_fields), "lora ")
                lora_kwargs.setdefault(sub, _coerce(f"lora.{sub}", sub_value, lora_fields[sub]))
        elif key in top:
            kwargs[key] = _coerce(key, value, top[key])
        else:
            raise _unknown_key(key, list(top) + [f"lora.{k}" for k in lora_fields], "")
    algorithm = ALGORITHMS.get(kwargs.get("algorithm", RunSpec.algorithm))
    if (
        "loss_type" not in kwargs and algorithm is not None
    ):  # each method's own default loss (GRPO: token-level, as TRL)
        kwargs["loss_type"] = algorithm.default_loss_type
    low, high = clip_defaults(kwargs.get("algorithm", RunSpec.algorithm), kwargs.get("loss_type", "sigmoid"))
    if kwargs.get("epsilon") is None:
        kwargs["epsilon"] = low
    if kwargs.get("epsilon_high") is None:
        kwargs["epsilon_high"] = high
    if isinstance(kwargs.get("judge_template"), str):  # "\n" typed on a command line or in the app is a line break
        kwargs["judge_template"] = kwargs["judge_template"].replace("\\n", "\n")
    return RunSpec(**kwargs, lora=LoraSpec(**lora_kwargs))


def clip_defaults(algorithm: str, loss_type: str) -> tuple[float, float | None]:
    """(epsilon, epsilon_high) a spec that leaves them null gets: the GRPO loss_type's paper values, else 0.2 and
    None (= epsilon)."""
    row = ALGORITHMS.get(algorithm)
    if row is not None and loss_type in row.clip_defaults:
        return row.clip_defaults[loss_type]
    return DEFAULT_EPSILON, None


REPORT_TARGETS = ("tensorboard", "wandb")


def report_targets(spec: RunSpec) -> list[str]:
    """`report_to` as a list (a `--set report_to=tensorboard` gives one name)."""
    value = spec.report_to or []
    return [value] if isinstance(value, str) else list(value)


def check_values(spec: RunSpec) -> None:
    """Refuse impossible values, naming the field."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SpecError(message)

    unknown_reporters = [r for r in report_targets(spec) if r not in REPORT_TARGETS]
    need(
        not unknown_reporters,
        f"report_to: {unknown_reporters[0] if unknown_reporters else ''!r} is not known; choose from "
        f"{', '.join(REPORT_TARGETS)} (e.g. --set report_to=tensorboard)",
    )
    need(
        spec.algorithm in ALGORITHMS,
        f"algorithm '{spec.algorithm}' is not available; choose one of: {', '.join(ALGORITHM_NAMES)}",
    )
    algorithm = ALGORITHMS[spec.algorithm]
    need(spec.lr > 0, f"lr must be > 0 (got {spec.lr}); typical DPO values are 1e-6 to 1e-5 (1e-5 to 1e-4 with LoRA)")
    if algorithm.beta_may_be_zero:
        # beta = 0 is a real choice here: no KL term, and no reference model is loaded.
        need(spec.beta >= 0, f"beta must be >= 0 (got {spec.beta}); 0 = no KL penalty and no reference model")
    else:
        need(spec.beta > 0, f"beta must be > 0 (got {spec.beta}); 0.1 is the DPO paper's default")
    need(spec.batch_size >= 1, f"batch_size must be >= 1 (got {spec.batch_size})")
    need(spec.grad_accum >= 1, f"grad_accum must be >= 1 (got {spec.grad_accum})")
    need(spec.epochs > 0, f"epochs must be > 0 (got {spec.epochs})")
    need(spec.max_steps >= 0, f"max_steps must be >= 0 (got {spec.max_steps}); 0 means 'run epochs'")
    need(0 <= spec.eval_split < 1, f"eval_split must be in [0, 1) (got {spec.eval_split})")
    need(0 <= spec.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {spec.warmup_ratio})")
    need(spec.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {spec.warmup_steps}); 0 uses warmup_ratio")
    need(0 <= spec.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5) (got {spec.label_smoothing})")
    need(spec.max_length >= 2, f"max_length must be >= 2 (got {spec.max_length})")
    need(
        0 < spec.max_prompt_length < spec.max_length,
        f"max_prompt_length must be > 0 and < max_length ({spec.max_prompt_length} vs {spec.max_length}): "
        "lower max_prompt_length or raise max_length",
    )
    need(spec.weight_decay >= 0, f"weight_decay must be >= 0 (got {spec.weight_decay})")
    need(0 <= spec.adam_beta1 < 1 and 0 <= spec.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)")
    need(spec.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {spec.max_grad_norm}); 0 disables clipping")
    need(spec.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)} (got '{spec.dtype}')")
    need(
        not (spec.dtype == "fp16" and spec.device in ("cpu", "mps")),
        f"dtype fp16 needs a CUDA GPU (its loss scaling is GPU-only) and device is {spec.device}; "
        "use --set dtype=bf16 (mixed precision, works on the CPU) or --set dtype=fp32",
    )
    need(
        spec.save_dtype in ("auto", *DTYPES[1:]),
        f"save_dtype must be auto or one of {', '.join(DTYPES[1:])} (got '{spec.save_dtype}')",
    )
    need(
        re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", spec.device) is not None,
        f"device must be auto, cpu, mps, cuda or cuda:N (got '{spec.device}')",
    )
    need(
        spec.num_processes >= 1,
        f"num_processes must be >= 1 (got {spec.num_processes}); 1 = one process, N = one process per GPU",
    )
    need(
        spec.num_processes == 1 or spec.device in ("auto", "cpu", "cuda"),
        f"num_processes={spec.num_processes} needs device auto, cpu or cuda (got '{spec.device}'): rank r uses "
        "GPU r of those the run sees (CUDA_VISIBLE_DEVICES picks them); mps runs one process",
    )
    need(
        spec.parallelism in PARALLELISM,
        f"parallelism must be one of {', '.join(PARALLELISM)} (got '{spec.parallelism}')",
    )
    if spec.parallelism == "fsdp":
        need(
            spec.num_processes >= 2,
            f"parallelism fsdp shards the model over num_processes ranks, and num_processes is {spec.num_processes}; "
            "set --set num_processes=N (N >= 2 GPUs) or --set parallelism=ddp",
        )
        need(
            spec.lora.r == 0,
            f"parallelism fsdp shards a full fine-tune; LoRA (lora.r={spec.lora.r}) trains an adapter small enough "
            "to keep whole on every rank: use --set parallelism=ddp, or --set lora.r=0 to shard a full fine-tune",
        )
        need(
            spec.dtype != "fp16",
            "parallelism fsdp runs in bf16 or fp32 mixed precision (fp16's loss scaler does not unscale shards); "
            "use --set dtype=bf16 (or fp32)",
        )
    need(
        spec.lr_scheduler in SCHEDULERS,
        f"lr_scheduler must be one of {', '.join(SCHEDULERS)} (got '{spec.lr_scheduler}')",
    )
    need(spec.overlong in OVERLONG, f"overlong must be one of {', '.join(OVERLONG)} (got '{spec.overlong}')")
    loss_types = algorithm.loss_types
    need(
        spec.loss_type in loss_types,
        f"loss_type must be one of {', '.join(loss_types)} for {spec.algorithm} (got '{spec.loss_type}')",
    )
    need(
        spec.label_smoothing == 0 or spec.loss_type in ("sigmoid", "robust"),
        f"label_smoothing applies to loss_type sigmoid (cDPO) and robust only; got {spec.label_smoothing} with "
        f"loss_type={spec.loss_type} (set label_smoothing=0)",
    )
    need(spec.cpo_alpha >= 0, f"cpo_alpha must be >= 0 (got {spec.cpo_alpha}); 1.0 is the CPO paper's value")
    need(spec.rpo_alpha >= 0, f"rpo_alpha must be >= 0 (got {spec.rpo_alpha}); 1.0 is the RPO paper's value")
    need(
        not (spec.rpo_alpha > 0 and spec.loss_type == "ipo"),
        "rpo_alpha > 0 combines the NLL with summed DPO log-ratios; it does not apply to loss_type=ipo (set rpo_alpha=0)",
    )
    need(
        bool(spec.coh_positive.strip()) and bool(spec.coh_negative.strip()) and spec.coh_positive != spec.coh_negative,
        "coh_positive and coh_negative must be two different, non-empty phrases",
    )
    need(
        0 <= spec.coh_mask_ratio < 1,
        f"coh_mask_ratio must be in [0, 1) (got {spec.coh_mask_ratio}); the paper masks 0-5%",
    )
    need(spec.coh_pretrain_coef >= 0, f"coh_pretrain_coef must be >= 0 (got {spec.coh_pretrain_coef})")
    need(spec.center_rewards_coef >= 0, f"center_rewards_coef must be >= 0 (got {spec.center_rewards_coef})")
    need(spec.gamma_beta_ratio >= 0, f"gamma_beta_ratio must be >= 0 (got {spec.gamma_beta_ratio})")
    need(
        spec.desirable_weight > 0 and spec.undesirable_weight > 0,
        "desirable_weight and undesirable_weight must be > 0",
    )
    for name in ("logging_steps", "save_total_limit", "max_new_tokens"):
        need(getattr(spec, name) >= 1, f"{name} must be >= 1 (got {getattr(spec, name)})")
    for name in (
        "eval_steps",
        "sample_steps",
        "save_steps",
        "num_samples",
        "kl_samples",
        "num_threads",
        "eval_max_examples",
    ):
        need(getattr(spec, name) >= 0, f"{name} must be >= 0 (got {getattr(spec, name)})")
    check_online_values(spec, need)
    check_limits(spec)
    for check in algorithm.checks:  # each method's own rules (engine/registry.py)
        message = check(spec)
        need(message is None, message or "")
    need(spec.max_rows is None or spec.max_rows >= 1, f"max_rows must be >= 1 (got {spec.max_rows})")
    need(spec.lora.r >= 0, f"lora.r must be >= 0 (got {spec.lora.r}); 0 = full fine-tuning")
    need(spec.lora.alpha > 0, f"lora.alpha must be > 0 (got {spec.lora.alpha})")
    need(0 <= spec.lora.dropout < 1, f"lora.dropout must be in [0, 1) (got {spec.lora.dropout})")


def check_online_values(spec: RunSpec, need) -> None:
    """The online methods' settings (they are ignored, but still checked, by offline methods)."""
    online = is_online(spec.algorithm)
    need(spec.num_generations >= 1, f"num_generations must be >= 1 (got {spec.num_generations})")
    need(
        spec.temperature > 0,
        f"temperature must be > 0 (got {spec.temperature}); online methods must sample (1.0 is usual)",
    )
    need(0 < spec.top_p <= 1, f"top_p must be in (0, 1] (got {spec.top_p})")
    sources = _as_list(spec.rewards)
    need(
        bool(sources) or not online, "rewards is empty: name at least one reward source, e.g. --set rewards=exact_match"
    )
    for source in sources:
        parse_reward_source(source)
    if spec.reward_weights is not None:
        need(
            len(spec.reward_weights) == len(sources),
            f"reward_weights has {len(spec.reward_weights)} values for {len(sources)} reward source(s) "
            f"({', '.join(sources)}): give one weight per source",
        )
    need(
        not spec.safety_reward_model or any(s.startswith("rm:") for s in sources),
        "safety_reward_model combines with a helpfulness reward model: add an rm:PATH entry to rewards",
    )
    need(0 <= spec.judge_tie_margin < 0.5, f"judge_tie_margin must be in [0, 0.5) (got {spec.judge_tie_margin})")
    if spec.judge_template is not None:
        missing = [p for p in JUDGE_PLACEHOLDERS if p not in spec.judge_template]
        need(
            not missing,
            f"judge_template lacks {' and '.join(missing)}: the judge prompt must contain {', '.join(JUDGE_PLACEHOLDERS)} "
            "(where the request and the two answers go)",
        )
        need(
            spec.algorithm != "online_dpo" or spec.judge != "reward",
            "judge_template is the prompt of an LLM judge, but judge is 'reward' (the rewards decide the pairs): "
            "set judge to a causal LM directory or hub id, or leave judge_template unset",
        )
    need(
        spec.missing_eos_penalty >= 0,
        f"missing_eos_penalty must be >= 0 (got {spec.missing_eos_penalty}); it is subtracted",
    )
    if spec.algorithm == "grpo" and spec.loss_type == "cispo":  # CISPO clips a weight: a lower bound of 0 is allowed
        need(
            0 < spec.epsilon <= 1,
            f"epsilon must be in (0, 1] for loss_type=cispo (got {spec.epsilon}); 1 = no lower bound on the weight (MiniMax-M1)",
        )
    else:
        need(0 < spec.epsilon < 1, f"epsilon must be in (0, 1) (got {spec.epsilon}); 0.2 is the usual clip range")
    need(
        spec.epsilon_high is None or spec.epsilon_high > 0,
        f"epsilon_high must be > 0 (got {spec.epsilon_high}); DAPO uses 0.28",
    )
    need(spec.num_iterations >= 1, f"num_iterations must be >= 1 (got {spec.num_iterations})")
    need(spec.num_mini_batches >= 1, f"num_mini_batches must be >= 1 (got {spec.num_mini_batches})")
    if online:
        rollout = spec.batch_size * spec.num_generations
        need(
            rollout % spec.num_mini_batches == 0,
            f"num_mini_batches={spec.num_mini_batches} must divide the rollout of batch_size x num_generations = {rollout} samples",
        )
        need(
            (rollout // spec.num_mini_batches) % spec.grad_accum == 0,
            f"grad_accum={spec.grad_accum} must divide each mini-batch of {rollout // spec.num_mini_batches} samples",
        )
    need(
        spec.scale_rewards in SCALE_REWARDS,
        f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (got '{spec.scale_rewards}')",
    )
    need(
        spec.kl_target is None or spec.kl_target > 0,
        f"kl_target must be > 0 (got {spec.kl_target}); InstructGPT-era runs used 6",
    )
    need(spec.kl_horizon >= 1, f"kl_horizon must be >= 1 (got {spec.kl_horizon})")
    need(
        0 < spec.gamma <= 1 and 0 <= spec.lam <= 1,
        f"gamma must be in (0, 1] and lam in [0, 1] (got {spec.gamma}, {spec.lam})",
    )
    need(spec.vf_coef >= 0 and spec.cliprange_value > 0, "vf_coef must be >= 0 and cliprange_value > 0")
    fractions = spec.rest_keep_fractions
    need(
        fractions is None or (len(fractions) > 0 and all(0 < f <= 1 for f in fractions)),
        f"rest_keep_fractions must be fractions in (0, 1], e.g. 0.5,0.3,0.1 (got {fractions})",
    )
    need(spec.rest_improve_epochs > 0, f"rest_improve_epochs must be > 0 (got {spec.rest_improve_epochs})")


# ----------------------------------------------------------------------------- presets


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every preset YAML in the presets dir."""
    out = []
    for path in sorted(presets_dir().glob("*.yaml")):
        if path.name.startswith("_"):  # shared bases, not presets of their own
            continue
        data = load_yaml_file(path) or {}
        out.append((path.stem, str(data.get("description", ""))))
    return out


def preset_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    # `dpo`, `demo/dpo` and `demo/dpo.yaml` all name files under the presets dir, from anywhere.
    for candidate in (presets_dir() / f"{name}.yaml", presets_dir() / name):
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate
    names = [n for n, _ in list_presets()]
    guess = closest(name, names)
    hint = f"did you mean '{guess}'? " if guess else ""
    raise SpecError(f"unknown preset '{name}': {hint}available presets: {', '.join(names)} (or a path to a .yaml file)")


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's values, merged over its `base` preset's (a variant lists only what it changes)."""
    path = preset_path(name)
    try:
        data = load_yaml_file(path, f"preset {path}") or {}
    except yaml.YAMLError as err:
        raise SpecError(f"preset {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"preset {path} must be a mapping of key: value")
    data.pop("description", None)
    base = data.pop("base", None)
    if base is None:
        return data
    if base in _seen:
        raise SpecError(f"preset {path}: base presets form a loop ({' -> '.join(_seen + (base,))})")
    base_path = path.parent / f"{base}.yaml"
    merged = load_preset(str(base_path) if base_path.exists() else base, _seen + (str(name),))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def preset_chain(name: str) -> list[Path]:
    """The preset file followed by the files it builds on (for `cherry presets NAME`)."""
    chain = [preset_path(name)]
    while True:
        base = (load_yaml_file(chain[-1]) or {}).get("base")
        if not base or len(chain) > 8:
            return chain
        chain.append(preset_path(str(chain[-1].parent / f"{base}.yaml")))


def resolve_spec(
    preset: str | None,
    overrides: list[str] | None = None,
    *,
    model: str | None = None,
    dataset: str | None = None,
    check_paths: bool = True,
) -> RunSpec:
    """preset + `--set key=value` overrides (+ model/dataset flags) -> a validated RunSpec.

    What the user sets wins over the preset: a preset value that would contradict an explicit
    setting follows it instead (`follow_explicit`), and only two explicit settings that contradict
    each other are an error.
    """
    preset_values = load_preset(preset) if preset else {}
    explicit: dict[str, Any] = {}
    for item in overrides or []:
        key, value = _parse_override(item)
        explicit[key] = value
    if model is not None:
        explicit["model"] = model
    if dataset is not None:
        explicit["dataset"] = dataset
    if "defaults_followed" in explicit:
        raise SpecError("defaults_followed is written by Cherry (the settings it chose to follow yours); leave it out")
    spec = _typed_spec({**preset_values, **explicit})
    try:
        preset_spec = _typed_spec(preset_values)
    except SpecError:  # a preset value the user overrode anyway: the field defaults stand in for it
        preset_spec = RunSpec()
    spec.defaults_followed = follow_explicit(spec, {k.split(".")[0] for k in explicit}, preset_spec) or None
    check_values(spec)
    if check_paths:
        resolve_paths(spec)
    return spec


# What a resumed run may change: the split of its global batch over processes and micro-batches.
RESUME_SETTINGS = ("num_processes", "batch_size", "grad_accum", "parallelism")


def with_resume_settings(spec: RunSpec, overrides: list[str]) -> RunSpec:
    """A resumed run's spec with `--set` values for RESUME_SETTINGS (the engine then checks that the global
    batch, batch_size x num_processes x grad_accum, is the checkpoint's); any other setting is refused."""
    values = spec.to_dict()
    for item in overrides:
        key, value = _parse_override(item)
        if key not in RESUME_SETTINGS:
            raise SpecError(
                f"--set {key}: a resumed run keeps its settings; only {', '.join(RESUME_SETTINGS)} may change "
                "(with the same global batch). Start a new run to change the rest"
            )
        values[key] = value
    resumed = _typed_spec(values)
    check_values(resumed)
    return resumed


def follow_explicit(spec: RunSpec, explicit: set[str], preset: RunSpec) -> list[str]:
    """Move settings the user did not set so they agree with those the user did; returns one note per
    change ("max_prompt_length=64: ..."). `preset` holds the preset's own values (for proportions).

    Two explicit settings that contradict each other are left alone here: check_values, or the
    SpecError raised below, names them both.
    """
    notes: list[str] = []

    def follow(key: str, value: Any, why: str) -> None:
        setattr(spec, key, value)
        notes.append(f"{key}={value}: {why} (set {key} yourself to choose)")

    # Prompt budget: a fraction of max_length, the preset's own proportion.
    share = preset.max_prompt_length / preset.max_length if 0 < preset.max_prompt_length < preset.max_length else 0.5
    if "max_length" in explicit and "max_prompt_length" not in explicit:
        prompt = min(spec.max_length - 1, max(1, round(spec.max_length * share)))
        if prompt != spec.max_prompt_length and spec.max_length >= 2:
            follow("max_prompt_length", prompt, f"{share:.0%} of max_length={spec.max_length}, the preset's proportion")
    elif (
        "max_prompt_length" in explicit
        and "max_length" not in explicit
        and spec.max_prompt_length >= spec.max_length > 0
    ):
        follow(
            "max_length",
            max(spec.max_prompt_length + 1, math.ceil(spec.max_prompt_length / share)),
            f"room for max_prompt_length={spec.max_prompt_length} at the preset's proportion ({share:.0%} prompt)",
        )

    # max_steps > 0 replaces epochs, warmup_steps > 0 replaces warmup_ratio: the one you set counts.
    for primary, replaced, zero in (
        ("max_steps", "epochs", "0 runs epochs"),
        ("warmup_steps", "warmup_ratio", "0 uses the ratio"),
    ):
        if getattr(spec, primary) and primary in explicit and replaced in explicit:
            raise SpecError(
                f"{primary}={getattr(spec, primary)} and {replaced}={getattr(spec, replaced)} are both set, and "
                f"{primary} > 0 replaces {replaced}: set only one ({primary}={zero})"
            )
        if getattr(spec, primary) and replaced in explicit and primary not in explicit:
            follow(
                primary, 0, f"you set {replaced}={getattr(spec, replaced)}, which the preset's {primary} would replace"
            )

    # The method's own loss: a preset's loss_type may not exist for an algorithm set on top of it.
    method = ALGORITHMS.get(spec.algorithm)
    if (
        "algorithm" in explicit
        and "loss_type" not in explicit
        and method is not None
        and spec.loss_type not in method.loss_types
    ):
        follow("loss_type", method.default_loss_type, f"{spec.algorithm}'s default loss")
    if "loss_type" in explicit and "rpo_alpha" not in explicit and spec.loss_type == "ipo" and spec.rpo_alpha > 0:
        follow("rpo_alpha", 0.0, "the RPO NLL term does not combine with loss_type=ipo")

    # One weight per reward source: new sources with the preset's weights get equal weights.
    sources = _as_list(spec.rewards)
    if (
        "rewards" in explicit
        and "reward_weights" not in explicit
        and spec.reward_weights is not None
        and len(spec.reward_weights) != len(sources)
    ):
        follow("reward_weights", None, f"one weight of 1 for each of the {len(sources)} reward source(s) you set")

    # Online rollouts: batch_size x num_generations samples, cut into mini-batches, then micro-batches.
    if is_online(spec.algorithm) and spec.batch_size >= 1 and spec.num_generations >= 1:
        rollout = spec.batch_size * spec.num_generations
        sources_set = explicit & {"batch_size", "num_generations", "algorithm", "grad_accum"}
        accum = spec.grad_accum if "grad_accum" in explicit and spec.grad_accum >= 1 else 1

        def splits(d: int) -> bool:  # d mini-batches cut the rollout evenly, each into your grad_accum
            return rollout % d == 0 and (rollout // d) % accum == 0

        if (
            sources_set
            and "num_mini_batches" not in explicit
            and spec.num_mini_batches >= 1
            and not splits(spec.num_mini_batches)
        ):
            fits = [d for d in range(spec.num_mini_batches, 0, -1) if splits(d)]
            if fits:
                follow(
                    "num_mini_batches",
                    fits[0],
                    f"the most mini-batches up to the preset's {spec.num_mini_batches} "
                    f"that split a rollout of {rollout} samples evenly",
                )
        mini_batch = rollout // max(1, spec.num_mini_batches)
        if (
            (sources_set or "num_mini_batches" in explicit)
            and "grad_accum" not in explicit
            and spec.grad_accum >= 1
            and mini_batch % spec.grad_accum
        ):
            follow(
                "grad_accum",
                _largest_divisor(mini_batch, spec.grad_accum),
                f"the most micro-batches up to the preset's {spec.grad_accum} that split a mini-batch of {mini_batch} evenly",
            )
    return notes


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


# ----------------------------------------------------------------------------- paths

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"
_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".tsv", ".gz"}


def demo_dir() -> Path:
    return presets_dir() / "demo"


def looks_local(value: str) -> bool:
    """True when `value` can only be a local path (so a missing one is an error, not a hub id)."""
    return (
        value.startswith((".", "/", "~"))
        or "\\" in value
        or value.endswith("/")
        or Path(value).suffix.lower() in _LOCAL_SUFFIXES
        or not _HUB_ID.match(value)
    )


def resolve_path(value: str, field_name: str, *, kind: str) -> str:
    """A local path made absolute, or a hub id left as is; a missing local path is an error.

    Relative paths are tried against the current directory, then the presets dir, so
    `demo/pairs.jsonl` finds the embedded demo data from anywhere. `demo` as a model is the demo model.
    """
    if kind == "model" and value == "demo":
        return str(demo_dir() / "model")
    expanded = Path(value).expanduser()
    for candidate in (expanded, presets_dir() / expanded):
        if candidate.exists():
            return str(candidate.resolve())
    if looks_local(value):
        what = (
            "a local directory saved with save_pretrained (or a hub id)"
            if kind == "model"
            else ("a .jsonl/.json/.parquet/.csv/.tsv file, a saved datasets directory, or a hub id")
        )
        raise SpecError(f"{field_name}: '{value}' does not exist; give {what}")
    return value


def resolve_paths(spec: RunSpec, *, check_model: bool = True) -> RunSpec:
    """Check model and dataset fields up front and make local paths absolute (workers may run elsewhere).

    `check_model=False` leaves the model alone: a chained run's model is an earlier run's output,
    which does not exist yet.
    """
    if check_model and not spec.model:
        raise SpecError("model is not set: pass --model PATH_OR_HUB_ID (or --model demo)")
    if not spec.dataset:
        raise SpecError("dataset is not set: pass --dataset PATH_OR_HUB_ID (e.g. --dataset demo/pairs.jsonl)")
    if check_model:
        spec.model = resolve_path(spec.model, "model", kind="model")
    if spec.ref_model:
        spec.ref_model = resolve_path(spec.ref_model, "ref_model", kind="model")
    spec.dataset = resolve_path(spec.dataset, "dataset", kind="data")
    if spec.eval_dataset:
        spec.eval_dataset = resolve_path(spec.eval_dataset, "eval_dataset", kind="data")
    if spec.eval_prompts:
        spec.eval_prompts = resolve_path(spec.eval_prompts, "eval_prompts", kind="data")
    if is_online(spec.algorithm):
        spec.rewards = [_resolve_reward_source(source) for source in _as_list(spec.rewards)]
    if spec.value_model:
        spec.value_model = resolve_path(spec.value_model, "value_model", kind="model")
    if spec.safety_reward_model:
        spec.safety_reward_model = resolve_path(spec.safety_reward_model, "safety_reward_model", kind="model")
    if spec.algorithm == "online_dpo" and spec.judge != "reward":
        spec.judge = resolve_path(spec.judge, "judge", kind="model")
    if spec.coh_pretrain_dataset:
        spec.coh_pretrain_dataset = resolve_path(spec.coh_pretrain_dataset, "coh_pretrain_dataset", kind="data")
    return spec


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _resolve_reward_source(source: str) -> str:
    """rm:PATH and path/to/file.py:function entries with their local paths made absolute."""
    kind, arg = parse_reward_source(source)
    if kind == "rm":
        return "rm:" + resolve_path(arg, f"rewards entry '{source}'", kind="model")
    if kind == "python":
        module, _, function = arg.rpartition(":")
        if module.endswith(".py"):
            path = Path(module).expanduser()
            if not path.is_file():
                raise SpecError(
                    f"rewards entry '{source}': {module} does not exist; give path/to/file.py:function "
                    "(relative to where you run cherry) or an importable module:function"
                )
            return f"{path.resolve()}:{function}"
    return source


def load_spec_file(path: Path) -> RunSpec:
    data = load_yaml_file(path) or {}
    return build_spec(data)
