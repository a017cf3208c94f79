"""Spec validation and the CLI's user-facing errors: one clear line, the field named, no traceback."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from engine.errors import SpecError
from engine.spec import build_spec, load_preset, resolve_spec, spec_fields
from tuiapp.cli import app

runner = CliRunner()


def test_dpo_preset_holds_every_field_and_is_valid():
    values = load_preset("dpo")
    assert set(spec_fields()) - {"name"} <= set(values)
    spec = build_spec(values)
    assert (spec.beta, spec.lr, spec.loss_type) == (0.1, 1e-6, "sigmoid")


@pytest.mark.parametrize(
    "override, message",
    [
        ("betta=0.2", "unknown key 'betta': did you mean 'beta'?"),
        ("lora.rank=8", "unknown lora key 'lora.rank': valid keys: alpha, dropout, r, target_modules"),
        ("beta=0", "beta must be > 0"),
        ("beta=-1", "beta must be > 0"),
        ("lr=0", "lr must be > 0"),
        ("batch_size=0", "batch_size must be >= 1"),
        ("batch_size=two", "batch_size must be an integer, got 'two'"),
        ("lr=fast", "lr must be a number"),
        ("precompute_ref_logps=maybe", "precompute_ref_logps must be true or false"),
        ("dtype=fp64", "dtype must be one of auto, fp32, bf16, fp16"),
        ("max_prompt_length=2000", "max_prompt_length must be > 0 and < max_length"),
        ("beta", "--set expects key=value"),
        ("loss_type=hinge label_smoothing=0.1", "label_smoothing applies to loss_type sigmoid (cDPO) and robust only"),
    ],
)
def test_bad_values_are_refused_naming_the_field(override, message):
    with pytest.raises(SpecError) as err:
        resolve_spec("dpo", override.split(), check_paths=False)
    assert message in str(err.value)


def test_overrides_are_typed():
    spec = resolve_spec("dpo", ["lr=1e-5", "beta=0.25", "lora.r=16", "lora.target_modules=q_proj,v_proj", "max_rows=10"],
                        check_paths=False)
    assert spec.lr == 1e-5 and spec.beta == 0.25 and spec.lora.r == 16
    assert spec.lora.target_modules == ["q_proj", "v_proj"] and spec.max_rows == 10


def test_paths_are_checked_and_made_absolute(tmp_path, tiny_model_dir, tiny_pairs):
    with pytest.raises(SpecError, match="dataset: './nope.jsonl' does not exist"):
        resolve_spec("dpo", model=str(tiny_model_dir), dataset="./nope.jsonl")
    with pytest.raises(SpecError, match="model: '/no/such/dir' does not exist"):
        resolve_spec("dpo", model="/no/such/dir", dataset=str(tiny_pairs))
    with pytest.raises(SpecError, match="model is not set"):
        resolve_spec("dpo", dataset=str(tiny_pairs))
    hub = resolve_spec("dpo", model="Qwen/Qwen2.5-0.5B-Instruct", dataset="trl-lib/ultrafeedback_binarized")
    assert hub.model == "Qwen/Qwen2.5-0.5B-Instruct"  # hub ids pass through to the hub code path
    with pytest.raises(SpecError, match="unknown preset 'dop': did you mean 'dpo'"):
        resolve_spec("dop")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "demo", "--dataset", "missing.jsonl"], "dataset: 'missing.jsonl' does not exist"),
        (["train", "--set", "lr=-1"], "lr must be > 0"),
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["presets", "dop"], "did you mean 'dpo'"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_reports_model_and_data_errors_cleanly(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "chosen": "2", "rejected": "3"}\n')
    result = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--dataset", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "question" in result.output and "prompt" in result.output
    empty_dir = tmp_path / "not-a-model"
    empty_dir.mkdir()
    result = runner.invoke(app, ["train", "--model", str(empty_dir), "--dataset", str(bad), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "could not load a tokenizer" in result.output


def test_presets_lists_every_method_and_shows_inherited_values():
    result = runner.invoke(app, ["presets"])
    names = [line.split()[0] for line in result.output.splitlines()]
    assert result.exit_code == 0
    assert names == ["best_of_k", "cdpo", "coh", "dpo", "grpo", "hinge", "ipo", "kto", "online_dpo", "orpo", "ppo", "rest",
                     "rloo", "rm", "robust_dpo", "rpo", "sft", "simpo"]
    shown = runner.invoke(app, ["presets", "ipo"])
    assert "loss_type: ipo" in shown.output and "inherited from dpo" in shown.output and "inherited from _base" in shown.output
    ipo = load_preset("ipo")
    assert ipo["loss_type"] == "ipo" and ipo["algorithm"] == "dpo" and ipo["lora"]["r"] == 0  # merged through dpo and _base
    for name in names:
        assert set(spec_fields()) - {"name"} <= set(load_preset(name)), name
        build_spec(load_preset(name))  # every preset is valid as shipped


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, tuiapp.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuiapp.cli", "--help"], check=True, capture_output=True)
    assert time.perf_counter() - started < 3.0  # generous: ~0.2 s when the machine is quiet


def test_cli_trains_a_local_model_on_a_local_jsonl(tmp_path, tiny_model_dir, tiny_pairs):
    out = tmp_path / "run"
    args = ["train", "--preset", "dpo", "--model", str(tiny_model_dir), "--dataset", str(tiny_pairs), "--out", str(out),
            "--set", "max_steps=4", "--set", "lr=1e-3", "--set", "batch_size=4", "--set", "grad_accum=1",
            "--set", "max_new_tokens=4", "--set", "num_threads=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "completed: 4/4 steps" in result.output and f"run directory: {out}" in result.output
    assert (out / "final" / "config.json").exists()
    resumed = runner.invoke(app, ["train", "--resume", str(out)])
    assert resumed.exit_code == 0 and "completed: 4/4 steps" in resumed.output
    missing = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no spec.yaml there" in missing.output
