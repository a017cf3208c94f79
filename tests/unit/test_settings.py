"""Settings in the field's language: each method owns its settings; TRL's and transformers' names land on Cherry's."""

from __future__ import annotations

import pytest
import yaml

from engine.errors import SpecError
from engine.registry import ALGORITHMS
from engine.spec import (
    ALIASES,
    NO_EQUIVALENT,
    load_preset,
    method_settings,
    preset_chain,
    refuse_unread,
    resolve_spec,
    setting_help,
    spec_fields,
)
from engine.spec.aliases import COMPOUND
from engine.spec.schema import METHOD_SETTINGS, WRITTEN_BY_CHERRY, RunSpec, short_name


def _a_value_for(setting: str):
    """A valid value of `setting` that differs from the demo DPO preset's (so landing on it shows)."""
    return {
        "lr": 2e-5,
        "batch_size": 4,
        "eval_batch_size": 3,
        "grad_accum": 2,
        "epochs": 2.0,
        "max_steps": 7,
        "lr_scheduler": "cosine",
        "report_to": "tensorboard",
        "eval_strategy": "no",
        "model": "demo",
        "name": "my-run",
        "dtype": "bf16",
        "dataset": "demo/pairs.jsonl",
        "max_length": 96,
        "precompute_ref_logps": True,
        "center_rewards_coef": 0.01,
        "mask_truncated": True,
        "rewards": ["exact_match", "length:8"],
        "scale_rewards": "batch",
        "beta": 0.3,
        "epsilon": 0.1,
        "num_iterations": 2,
        "num_generations": 4,
        "max_new_tokens": 12,
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.1,
        "lora.target_modules": ["q_proj", "v_proj"],
    }[setting]


# A method that reads each alias's target, for the table-driven test below.
def _method_for(target: str) -> str:
    name = target.split(".")[0]
    if name not in METHOD_SETTINGS:
        return "dpo"
    return next(m for m in ("dpo", "rm", "grpo", "ppo") if name in ALGORITHMS[m].settings)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_each_alias_lands_on_its_setting(alias):
    target = ALIASES[alias].target
    value = _a_value_for(target)
    method = _method_for(target)
    text = ",".join(value) if isinstance(value, list) else value
    extra = ["rewards=exact_match,length:8"] if alias == "reward_weights" else []
    spec = resolve_spec(f"demo/{method}", [f"{alias}={text}", *extra], check_paths=False)
    got = getattr(spec.lora, target.split(".")[1]) if target.startswith("lora.") else getattr(spec, target)
    assert got == value, (alias, target, got)
    if alias != target:
        assert f"{alias} -> {target}" in (spec.aliases_used or []) and f"{alias} -> {target}" in spec.followed_note


def test_compound_names():
    spec = resolve_spec("demo/dpo", ["bf16=true", "use_peft=true"])
    assert spec.dtype == "bf16" and spec.lora.r == 16
    assert resolve_spec("demo/dpo", ["bf16=false", "fp16=false"]).dtype == "fp32"
    assert resolve_spec("demo/dpo", ["use_peft=false", "lora_r=8"]).lora.r == 0
    assert resolve_spec("demo/grpo", ["max_completion_length=24"]).max_new_tokens == 24
    offline = resolve_spec("demo/dpo", ["max_prompt_length=40", "max_completion_length=24"])
    assert (offline.max_prompt_length, offline.max_length) == (40, 64)
    assert resolve_spec("demo/dpo", ["max_steps=-1"]).max_steps == 0
    assert resolve_spec("demo/dpo", ["report_to=none"]).report_to == []
    assert resolve_spec("demo/dpo", ["eval_strategy=no"]).eval_strategy == "no"  # YAML's false, as typed
    assert resolve_spec("demo/dpo", ["lr_scheduler_type=constant_with_warmup"]).lr_scheduler == "constant"
    with pytest.raises(SpecError, match="bf16 and fp16 are both true"):
        resolve_spec("demo/dpo", ["bf16=true", "fp16=true"])


@pytest.mark.parametrize(
    "override, message",
    [
        (["lr=1e-5", "learning_rate=2e-5"], "lr=1e-5 and learning_rate=2e-5 both set lr: give only one"),
        (["push_to_hub=true"], "push_to_hub has no equivalent in Cherry"),
        (["deepspeed=ds.json"], "deepspeed has no equivalent in Cherry: use parallelism: fsdp"),
        (["lr_scheduler_type=polynomial"], "lr_scheduler_type: 'polynomial' has no equivalent"),
        (["eval_strategy=epoch"], "eval_strategy must be one of steps, no"),
        (["gradient_accumulation_step=2"], "did you mean 'gradient_accumulation_steps'"),
        (["learning_rat=2"], "did you mean 'learning_rate'"),
        (["max_completion_lenght=2"], "did you mean 'max_completion_length'"),
    ],
)
def test_bad_names_get_one_message(override, message):
    with pytest.raises(SpecError) as err:
        resolve_spec("demo/dpo", override)
    assert message in str(err.value)


def test_harmless_trl_defaults_are_accepted_and_noted():
    spec = resolve_spec("demo/dpo", ["push_to_hub=false", "logging_strategy=steps"])
    assert "push_to_hub ignored" in spec.aliases_used
    # knobs that only tune speed take any value (TRL's examples set these)
    knobs = resolve_spec("demo/dpo", ["gradient_checkpointing_kwargs={use_reentrant: false}", "dataset_num_proc=4"])
    assert knobs.aliases_used == ["gradient_checkpointing_kwargs ignored", "dataset_num_proc ignored"]


@pytest.mark.parametrize("method", ["kto", "cpo", "orpo", "sft", "rm"])
def test_a_setting_the_method_does_not_read_is_refused(method):
    with pytest.raises(SpecError) as err:
        resolve_spec(f"demo/{method}", ["label_smoothing=0.1"])
    assert f"label_smoothing is not read by {method}" in str(err.value)
    assert "dpo, simpo" in str(err.value) and err.value.field == "label_smoothing"
    resolve_spec("demo/dpo", ["label_smoothing=0.1"])  # DPO reads it (cDPO)


def test_every_preset_sets_only_what_its_method_reads():
    from engine.spec import presets_dir

    for path in sorted(presets_dir().glob("*.yaml")) + sorted((presets_dir() / "demo").glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        keys: set[str] = set()
        for file in preset_chain(str(path)):
            if file.name != "_base.yaml":
                keys |= set(yaml.safe_load(file.read_text()) or {}) - {"base", "description"}
        refuse_unread(load_preset(str(path)).get("algorithm", "dpo"), dict.fromkeys(keys))


def test_a_run_carries_only_the_settings_it_reads():
    kto = resolve_spec("demo/kto").to_dict()
    assert "label_smoothing" not in kto and "num_generations" not in kto and "desirable_weight" in kto
    grpo = resolve_spec("demo/grpo").to_dict()
    assert {"num_generations", "scale_rewards", "top_k"} <= set(grpo) and "cpo_alpha" not in grpo
    assert set(kto) == method_settings("kto") - {"lora"} | {"lora"}


def test_each_setting_has_help_written_once():
    help_text = setting_help()
    for name in spec_fields(RunSpec):
        if name in ("lora", "name", *WRITTEN_BY_CHERRY):
            continue
        assert help_text.get(name), f"{name} has no help comment in presets/_base.yaml"
    assert "adapter rank" in help_text["lora.r"] or "LoRA" in help_text["lora.r"]


def test_every_alias_target_is_a_setting_and_the_tables_do_not_overlap():
    fields = set(spec_fields(RunSpec))
    for alias in ALIASES.values():
        assert alias.target.split(".")[0] in fields
    assert not (set(ALIASES) & set(NO_EQUIVALENT)) and not (set(COMPOUND) & set(ALIASES))


def test_run_names_from_hub_ids_keep_their_dots():
    assert short_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct"
    assert short_name("/data/pairs.jsonl") == "pairs"
    assert RunSpec(algorithm="dpo", model="Qwen/Qwen2.5-0.5B-Instruct", dataset="x/y.v2").display_name == (
        "dpo-Qwen2.5-0.5B-Instruct-y.v2"
    )


def test_config_file_in_trl_shape(tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text(
        "model_name_or_path: demo\ndataset_name: demo/pairs.jsonl\nlearning_rate: 2.0e-5\n"
        "per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\nbeta: 0.2\nmax_steps: 3\n"
        "bf16: false\noutput_dir: out/dpo\npush_to_hub: false\nlogging_steps: 1\n"
    )
    launch: dict = {}
    spec = resolve_spec("demo/dpo", ["beta=0.3"], config=config, launch=launch)
    assert (spec.lr, spec.batch_size, spec.grad_accum, spec.max_steps, spec.dtype) == (2e-5, 4, 2, 3, "fp32")
    assert spec.beta == 0.3  # --set wins over the config file
    assert launch == {"output_dir": "out/dpo"}
    with pytest.raises(SpecError, match="no such file"):
        resolve_spec("demo/dpo", config=tmp_path / "missing.yaml")


def test_runs_of_one_name_are_told_apart():
    from tuiapp.cli.runs import _fit
    from tuiapp.widgets.runs_table import id_hint

    assert id_hint("20261207-194501-dpo-Qwen2.5-0.5B-Instruct-pairs-2") == "19:45:01 #2"
    assert id_hint("20261207-194501-dpo-demo") == "19:45:01"
    long_a = "20261207-194501-dpo-Qwen2.5-0.5B-Instruct-ultrafeedback_binarized"
    assert _fit(long_a, 44) != _fit(long_a + "-2", 44) and _fit(long_a + "-2", 44).endswith("-2")
    assert len(_fit(long_a, 44)) == 44 and _fit("short", 44) == "short"
