"""The field's names for Cherry's settings: TRL's configs and transformers' TrainingArguments.

A user coming from TRL writes `learning_rate`, `per_device_train_batch_size` or a whole TRL YAML; each name
that has a Cherry equivalent lands on it (the run's start line says `learning_rate -> lr`). A TRL name with no
equivalent is refused with what to do instead, never guessed at, unless its value is the one that changes
nothing (`push_to_hub: false`), which is accepted and noted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from engine.errors import SpecError
from engine.registry import is_online


@dataclass(frozen=True)
class Alias:
    target: str  # Cherry's setting ("lora.r" for a LoRA one)
    convert: Callable[[Any], Any] | None = None  # the field's value -> Cherry's (None: the same value)


def _no_limit(value: Any) -> Any:  # transformers' max_steps -1 = "run the epochs", Cherry's 0
    return 0 if value in (-1, "-1") else value


def _report_to(value: Any) -> Any:
    if value in ("none", None, ["none"]):
        return []
    if value in ("all", ["all"]):
        raise SpecError("report_to: 'all' has no equivalent; name them: --set report_to=tensorboard,wandb")
    return value


_SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "constant_with_warmup": "constant",
    "inverse_sqrt": "inverse_sqrt",
}


def _scheduler(value: Any) -> Any:
    if value == "constant":  # transformers' constant has no warmup; Cherry's warms up for warmup_steps/ratio
        return "constant"
    if value not in _SCHEDULERS:
        raise SpecError(
            f"lr_scheduler_type: {value!r} has no equivalent in Cherry; choose one of "
            f"{', '.join(['constant', *_SCHEDULERS])} (Cherry's lr_scheduler)"
        )
    return _SCHEDULERS[value]


def _eval_strategy(value: Any) -> Any:  # YAML reads a bare `no` as false
    return {False: "no", True: "steps"}.get(value, value) if isinstance(value, bool) else value


def _scale_rewards(value: Any) -> Any:  # TRL took true/false before "group" | "batch" | "none"
    return {True: "group", False: "none", "true": "group", "false": "none"}.get(value, value)


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "auto"}


def _torch_dtype(value: Any) -> Any:
    return _DTYPE_NAMES.get(str(value), value)


ALIASES: dict[str, Alias] = {
    # model and run
    "model_name_or_path": Alias("model"),
    "sft_model_path": Alias("model"),
    "run_name": Alias("name"),
    "torch_dtype": Alias("dtype", _torch_dtype),
    # data
    "dataset_name": Alias("dataset"),
    "max_seq_length": Alias("max_length"),
    # optimisation (TrainingArguments)
    "learning_rate": Alias("lr"),
    "per_device_train_batch_size": Alias("batch_size"),
    "per_device_eval_batch_size": Alias("eval_batch_size"),
    "gradient_accumulation_steps": Alias("grad_accum"),
    "num_train_epochs": Alias("epochs"),
    "max_steps": Alias("max_steps", _no_limit),
    "lr_scheduler_type": Alias("lr_scheduler", _scheduler),
    "report_to": Alias("report_to", _report_to),
    "eval_strategy": Alias("eval_strategy", _eval_strategy),
    # TRL's method settings under their own names
    "precompute_ref_log_probs": Alias("precompute_ref_logps"),
    "center_rewards_coefficient": Alias("center_rewards_coef"),
    "mask_truncated_completions": Alias("mask_truncated"),
    "reward_funcs": Alias("rewards"),
    "scale_rewards": Alias("scale_rewards", _scale_rewards),
    "kl_coef": Alias("beta"),  # TRL's PPO
    "cliprange": Alias("epsilon"),  # TRL's PPO
    "num_ppo_epochs": Alias("num_iterations"),
    "rloo_k": Alias("num_generations"),
    "response_length": Alias("max_new_tokens"),
    # PEFT (TRL's ModelConfig)
    "lora_r": Alias("lora.r"),
    "lora_alpha": Alias("lora.alpha"),
    "lora_dropout": Alias("lora.dropout"),
    "lora_target_modules": Alias("lora.target_modules"),
}

# Names that need more than a rename; `translate` handles them (listed here so the tables know them).
COMPOUND = ("bf16", "fp16", "use_peft", "max_completion_length", "output_dir")

# Any value of a knob that only tunes how fast or how quietly the same run goes: ignored, with a note.
ANY = ("any value",)
# TRL / TrainingArguments names with no Cherry equivalent: (values that change nothing, what to do instead).
NO_EQUIVALENT: dict[str, tuple[tuple[Any, ...], str]] = {
    "push_to_hub": ((False, None), "Cherry does not upload; `cherry export RUN --out DIR` then `hf upload`"),
    "hub_model_id": ((None,), "Cherry does not upload; `cherry export RUN --out DIR` then `hf upload`"),
    "logging_dir": ((None,), "metrics go to the run store; report_to=tensorboard writes event files in the run dir"),
    "logging_strategy": (("steps",), "Cherry logs every logging_steps"),
    "logging_first_step": (ANY, "Cherry always logs the first step"),
    "save_strategy": (("steps",), "Cherry saves every save_steps"),
    "eval_on_start": (ANY, "Cherry evaluates at the start whenever eval_strategy is steps"),
    "do_train": (ANY, "a run always trains"),
    "do_eval": ((True, False, None), "set eval_strategy: no to switch evaluation off"),
    "overwrite_output_dir": (ANY, "each run gets its own directory"),
    "remove_unused_columns": (ANY, "Cherry keeps the columns reward functions read"),
    "dataloader_num_workers": (ANY, "Cherry tokenises once (cached) and batches in the training process"),
    "dataloader_drop_last": ((False, None), "Cherry keeps every row"),
    "gradient_checkpointing_kwargs": (ANY, "gradient_checkpointing: true uses the model's default"),
    "model_init_kwargs": ((None, {}), "use dtype, trust_remote_code and device"),
    "ref_model_init_kwargs": ((None, {}), "use ref_model"),
    "model_revision": (("main", None), "download the revision and give its directory as model"),
    "attn_implementation": ((None,), "Cherry uses the model's default attention"),
    "use_liger_kernel": ((False, None), "Cherry's own chunked LM head already avoids full-vocabulary logits"),
    "use_vllm": ((False, None), "Cherry samples with its own decoding loop"),
    "vllm_mode": ((None, "server", "colocate"), "Cherry samples with its own decoding loop"),
    "packing": ((False, None), "Cherry batches rows of similar length (group_by_length) instead"),
    "padding_free": ((False, None), "not available yet"),
    "completion_only_loss": ((True, None), "Cherry always trains on completion tokens only"),
    "assistant_only_loss": ((False, None), "Cherry trains on the final assistant turn of each conversation"),
    "dataset_text_field": (("text",), "a `text` column is read as is; rename other columns in your data"),
    "dataset_num_proc": (ANY, "Cherry tokenises in processes of its own choosing"),
    "disable_dropout": ((True, False, None), "Cherry's presets set dropout on the adapter only (lora.dropout)"),
    "deepspeed": ((None,), "use parallelism: fsdp (PyTorch's FSDP2) with num_processes"),
    "fsdp": ((None, "", []), "use parallelism: fsdp with num_processes"),
    "fsdp_config": ((None, {}), "use parallelism: fsdp with num_processes"),
    "ddp_find_unused_parameters": (ANY, "Cherry's data-parallel sync needs no setting"),
    "optim": (("adamw_torch", "adamw_torch_fused"), "Cherry trains with AdamW (fused on GPUs)"),
    "torch_compile": ((False, None), "not available"),
    "tf32": ((None,), "not available"),
    "load_in_8bit": ((False, None), "quantised training is not available"),
    "load_in_4bit": ((False, None), "quantised training is not available"),
    "lora_task_type": (("CAUSAL_LM", None), "Cherry picks the task from the method"),
    "use_rslora": ((False, None), "not available"),
    "use_dora": ((False, None), "not available"),
    "ds3_gather_for_generation": ((True, None), "not needed: parallelism fsdp gathers for generation"),
    "sync_ref_model": ((False, None), "the reference stays frozen in Cherry"),
    "log_completions": (ANY, "Cherry logs samples every sample_steps (num_samples of them)"),
    "num_completions_to_print": (ANY, "Cherry logs num_samples samples"),
    "generation_batch_size": ((None,), "a rollout is batch_size prompts x num_generations"),
    "steps_per_generation": ((None,), "use num_mini_batches (optimizer steps per rollout pass)"),
    "shuffle_dataset": ((True, None), "Cherry shuffles with the seed"),
    "dataset_streaming": ((False, None), "Cherry reads Arrow-backed data, memory-mapped"),
    "importance_sampling_level": (("token",), "sequence-level ratios are loss_type: gspo"),
    "total_episodes": ((None,), "use max_steps or epochs"),
}


def translate(
    values: dict[str, Any], launch: dict[str, Any] | None = None, algorithm: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """`values` with the field's names turned into Cherry's, and one note per name translated or ignored.

    The same setting given twice with different values (`lr` and `learning_rate`) is refused, naming both.
    `output_dir` is where a run's directory goes, not a setting: it lands in `launch` when the caller can
    place the run (`cherry train`), and is ignored with a note otherwise (queued runs live in the worker's home).
    `algorithm` is the run's method when `values` does not name it (one layer of several: preset, config, --set).
    """
    out: dict[str, Any] = {}
    came_from: dict[str, str] = {}
    notes: list[str] = []

    def put(target: str, value: Any, name: str) -> None:
        if target in out and out[target] != value:
            raise SpecError(f"{came_from[target]}={out[target]} and {name}={value} both set {target}: give only one")
        out[target] = value
        came_from[target] = name
        if name != target:
            notes.append(f"{name} -> {target}")

    peft_off = "use_peft" in values and not _flag("use_peft", values["use_peft"])
    for name, value in values.items():
        if peft_off and name == "lora_r":  # TRL reads lora_r only with use_peft
            notes.append("lora_r ignored (use_peft=false)")
        elif name in ALIASES:
            alias = ALIASES[name]
            put(alias.target, alias.convert(value) if alias.convert else value, name)
        elif name in NO_EQUIVALENT:
            harmless, instead = NO_EQUIVALENT[name]
            if harmless is not ANY and value not in harmless:
                raise SpecError(f"{name} has no equivalent in Cherry: {instead}; remove {name}")
            notes.append(f"{name} ignored")
        elif name not in COMPOUND:
            put(name, value, name)
    _compound({"algorithm": algorithm, **values}, put, notes)
    if values.get("output_dir") not in (None, ""):
        if launch is not None:
            launch["output_dir"] = str(values["output_dir"])
        else:
            notes.append("output_dir ignored (a queued run's directory is under the worker's home)")
    return out, notes


def _compound(values: dict[str, Any], put: Callable[[str, Any, str], None], notes: list[str]) -> None:
    """The names that need more than a rename: precision flags, use_peft, max_completion_length."""
    flags = {name: _flag(name, values[name]) for name in ("bf16", "fp16") if name in values}
    if all(flags.get(name) for name in ("bf16", "fp16")):
        raise SpecError("bf16 and fp16 are both true: choose one (Cherry's dtype: bf16 | fp16 | fp32)")
    chosen = [name for name, on in flags.items() if on]
    if chosen:
        put("dtype", chosen[0], chosen[0])
    elif flags:  # both false: full precision, as transformers reads it
        put("dtype", "fp32", "/".join(flags) + "=false")
    if "use_peft" in values:
        if not _flag("use_peft", values["use_peft"]):
            put("lora.r", 0, "use_peft=false")
        elif not values.get("lora_r") and not values.get("lora.r"):
            put("lora.r", 16, "use_peft")  # TRL's lora_r default
    if "max_completion_length" in values:
        length = values["max_completion_length"]
        if is_online(values.get("algorithm") or ""):
            put("max_new_tokens", length, "max_completion_length")
        elif values.get("max_prompt_length") is not None and values.get("max_length") is None:
            # offline TRL cuts the completion at this length; Cherry cuts prompt + completion at max_length
            put("max_length", int(values["max_prompt_length"]) + int(length), "max_prompt_length+max_completion_length")
        else:
            put("max_new_tokens", length, "max_completion_length")


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise SpecError(f"{name} must be true or false, got {value!r}")


def known_names() -> list[str]:
    """Every name the field uses that Cherry understands (for 'did you mean' suggestions)."""
    return [*ALIASES, *COMPOUND, *NO_EQUIVALENT]
