"""The run settings: one dataclass, its defaults and help read from presets/_base.yaml.

presets/_base.yaml is the one place a setting's default and its help are written (`key: value  # help`);
RunSpec takes its defaults from it and `setting_help` reads the comments, so `cherry presets`, the CLI's
help and the app's form say the same thing. Which settings a run reads: the common core, plus those its
method's registry row declares (`method_settings`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from engine.registry import ALGORITHMS

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
BASE_PRESET = REPO_ROOT / "presets" / "_base.yaml"


def presets_dir() -> Path:
    """Where presets and the embedded demo live (`$CHERRY_PRESETS` overrides the checkout's)."""
    return Path(os.environ.get("CHERRY_PRESETS", REPO_ROOT / "presets"))


DTYPES = ("auto", "fp32", "bf16", "fp16")
PARALLELISM = ("ddp", "fsdp")
SCHEDULERS = ("linear", "cosine", "constant", "inverse_sqrt")  # engine.loop.schedule.lr_factor
OVERLONG = ("truncate", "drop")
SCALE_REWARDS = ("group", "batch", "none")
EVAL_STRATEGIES = ("steps", "no")
REPORT_TARGETS = ("tensorboard", "wandb")
DEFAULT_EPSILON = 0.2  # the clip range a null `epsilon` takes, unless the method's loss type has its own
# Free text taken from `--set key=value` as typed: YAML would read "{prompt} ..." as a mapping.
VERBATIM_FIELDS = ("judge_template", "chat_template")

_BASE: dict[str, Any] = yaml.safe_load(BASE_PRESET.read_text()) or {}


def default(key: str) -> Any:
    """The base preset's value of `key` ("lora.r" for a LoRA setting) as a dataclass default."""
    section, _, name = key.rpartition(".")
    value = (_BASE.get(section) or {}).get(name) if section else _BASE[key]
    return field(default_factory=lambda: list(value)) if isinstance(value, list) else value


@dataclass
class LoraSpec:
    r: int = default("lora.r")
    alpha: int = default("lora.alpha")
    dropout: float = default("lora.dropout")
    target_modules: str | list[str] = default("lora.target_modules")


@dataclass
class RunSpec:
    """Every setting of a run; the help of each is its comment in presets/_base.yaml."""

    algorithm: str = default("algorithm")
    name: str | None = default("name")
    # --- models
    model: str | None = default("model")
    ref_model: str | None = default("ref_model")
    trust_remote_code: bool = default("trust_remote_code")
    dtype: str = default("dtype")
    save_dtype: str = default("save_dtype")
    device: str = default("device")
    gradient_checkpointing: bool = default("gradient_checkpointing")
    chat_template: str | None = default("chat_template")
    lora: LoraSpec = field(default_factory=LoraSpec)
    # --- data
    dataset: str | None = default("dataset")
    eval_dataset: str | None = default("eval_dataset")
    eval_split: float = default("eval_split")
    eval_prompts: str | None = default("eval_prompts")
    max_length: int = default("max_length")
    max_prompt_length: int = default("max_prompt_length")
    overlong: str = default("overlong")
    max_rows: int | None = default("max_rows")
    group_by_length: bool = default("group_by_length")
    # --- data sources: the Hub's configs and splits, mixtures, column maps (engine/data/sources.py)
    dataset_config: str | None = default("dataset_config")
    dataset_train_split: str = default("dataset_train_split")
    dataset_test_split: str | None = default("dataset_test_split")
    dataset_mixture: dict | None = default("dataset_mixture")
    column_map: dict | None = default("column_map")
    # --- optimisation
    lr: float = default("lr")
    batch_size: int = default("batch_size")
    grad_accum: int = default("grad_accum")
    epochs: float = default("epochs")
    max_steps: int = default("max_steps")
    warmup_ratio: float = default("warmup_ratio")
    warmup_steps: int = default("warmup_steps")
    lr_scheduler: str = default("lr_scheduler")
    weight_decay: float = default("weight_decay")
    adam_beta1: float = default("adam_beta1")
    adam_beta2: float = default("adam_beta2")
    max_grad_norm: float = default("max_grad_norm")
    seed: int = default("seed")
    num_threads: int = default("num_threads")
    num_processes: int = default("num_processes")
    num_machines: int = default("num_machines")
    parallelism: str = default("parallelism")
    # --- logging, eval, samples, checkpoints
    logging_steps: int = default("logging_steps")
    eval_strategy: str = default("eval_strategy")
    eval_steps: int = default("eval_steps")
    eval_batch_size: int | None = default("eval_batch_size")
    eval_max_examples: int = default("eval_max_examples")
    sample_steps: int = default("sample_steps")
    num_samples: int = default("num_samples")
    kl_samples: int = default("kl_samples")
    max_new_tokens: int = default("max_new_tokens")
    save_steps: int = default("save_steps")
    save_total_limit: int = default("save_total_limit")
    report_to: str | list[str] = default("report_to")
    skip_nonfinite_steps: int = default("skip_nonfinite_steps")
    reward_timeout: float = default("reward_timeout")
    # --- method-specific: the registry row of each method names those it reads
    beta: float = default("beta")
    loss_type: str = default("loss_type")
    label_smoothing: float = default("label_smoothing")
    rpo_alpha: float = default("rpo_alpha")
    cpo_alpha: float = default("cpo_alpha")
    gamma_beta_ratio: float = default("gamma_beta_ratio")
    desirable_weight: float = default("desirable_weight")
    undesirable_weight: float = default("undesirable_weight")
    center_rewards_coef: float = default("center_rewards_coef")
    coh_positive: str = default("coh_positive")
    coh_negative: str = default("coh_negative")
    coh_mask_ratio: float = default("coh_mask_ratio")
    coh_pretrain_dataset: str | None = default("coh_pretrain_dataset")
    coh_pretrain_coef: float = default("coh_pretrain_coef")
    precompute_ref_logps: bool = default("precompute_ref_logps")
    # --- sampling (online rollouts, and the eval samples of every method that generates)
    temperature: float = default("temperature")
    top_p: float = default("top_p")
    top_k: int = default("top_k")
    min_p: float = default("min_p")
    repetition_penalty: float = default("repetition_penalty")
    stop: list[str] | None = default("stop")
    # --- online methods
    num_generations: int = default("num_generations")
    rewards: str | list[str] = default("rewards")
    reward_weights: list[float] | None = default("reward_weights")
    safety_reward_model: str | None = default("safety_reward_model")
    safety_threshold: float = default("safety_threshold")
    judge: str = default("judge")
    judge_tie_margin: float = default("judge_tie_margin")
    judge_template: str | None = default("judge_template")
    missing_eos_penalty: float = default("missing_eos_penalty")
    mask_truncated: bool = default("mask_truncated")
    epsilon: float | None = default("epsilon")
    epsilon_high: float | None = default("epsilon_high")
    num_iterations: int = default("num_iterations")
    num_mini_batches: int = default("num_mini_batches")
    scale_rewards: str = default("scale_rewards")
    kl_target: float | None = default("kl_target")
    kl_horizon: int = default("kl_horizon")
    gamma: float = default("gamma")
    lam: float = default("lam")
    vf_coef: float = default("vf_coef")
    cliprange_value: float = default("cliprange_value")
    value_model: str | None = default("value_model")
    whiten_rewards: bool = default("whiten_rewards")
    rest_keep_fractions: list[float] | None = default("rest_keep_fractions")
    rest_improve_epochs: float = default("rest_improve_epochs")
    log_rollouts: str | int = default("log_rollouts")
    environment: str | None = default("environment")
    tools: list[str] | None = default("tools")
    max_turns: int = default("max_turns")
    max_tool_calls: int = default("max_tool_calls")
    tool_timeout: float = default("tool_timeout")
    # --- written by Cherry, not set by users: settings it chose to follow one you set (follow_explicit), and the
    # field's names it translated (`learning_rate -> lr`); kept so the run's start line can say so.
    defaults_followed: list[str] | None = None
    aliases_used: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The settings this run reads (the core and its method's), in field order: what spec.yaml holds."""
        read = method_settings(self.algorithm) if self.algorithm in ALGORITHMS else None
        values = dataclasses.asdict(self)
        return {k: v for k, v in values.items() if read is None or k in read or k not in METHOD_SETTINGS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def followed_note(self) -> str:
        """ "; "-joined notes on translated names and on the settings that followed the user's ("" if none)."""
        notes = [f"read {', '.join(self.aliases_used)}"] if self.aliases_used else []
        return "".join(f"; {note}" for note in notes + list(self.defaults_followed or []))

    @property
    def eval_rows(self) -> int:
        """Rows per eval forward pass: eval_batch_size, else batch_size."""
        return self.eval_batch_size or self.batch_size

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        parts = [self.algorithm, short_name(self.model), short_name(self.dataset)]
        return "-".join(p for p in parts if p)


_DATA_SUFFIXES = re.compile(r"\.(jsonl|json|parquet|csv|tsv|txt|arrow|gz|yaml|yml)$", re.IGNORECASE)


def short_name(path: str | None) -> str:
    """The last part of a path or hub id, a data file's suffix dropped ("Qwen2.5-0.5B-Instruct" keeps its dots)."""
    if not path:
        return ""
    return _DATA_SUFFIXES.sub("", path.rstrip("/").replace(os.sep, "/").rsplit("/", 1)[-1])


def spec_fields(cls: type = RunSpec) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# Settings some method reads and others don't: each registry row lists its own; the rest of RunSpec is the core.
METHOD_SETTINGS: frozenset[str] = frozenset(s for info in ALGORITHMS.values() for s in info.settings)
WRITTEN_BY_CHERRY = ("defaults_followed", "aliases_used")


def method_settings(algorithm: str) -> frozenset[str]:
    """Every setting a run of `algorithm` reads: the core plus the method's own."""
    return frozenset(spec_fields(RunSpec)) - METHOD_SETTINGS | frozenset(ALGORITHMS[algorithm].settings)


def methods_reading(setting: str) -> list[str]:
    return [name for name, info in ALGORITHMS.items() if setting in info.settings]


@lru_cache(maxsize=1)
def setting_help() -> dict[str, str]:
    """Each setting's help: its trailing comment in presets/_base.yaml ("lora.r" for a LoRA setting)."""
    out: dict[str, str] = {}
    section = ""
    for line in BASE_PRESET.read_text().splitlines():
        match = re.match(r"^(\s*)([a-z_0-9]+):(.*?)(?:\s+#\s*(.*))?$", line)
        if not match:
            continue
        indent, key, _, comment = match.groups()
        if not indent:
            section = key
        name = f"{section}.{key}" if indent else key
        if comment:
            out[name] = comment.strip()
    return out


def report_targets(spec: RunSpec) -> list[str]:
    """`report_to` as a list (a `--set report_to=tensorboard` gives one name)."""
    value = spec.report_to or []
    return [value] if isinstance(value, str) else list(value)
