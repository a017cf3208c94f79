"""Spec validation and the CLI's user-facing errors: one clear line, the field named, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from engine.errors import SpecError
from engine.spec import build_spec, load_preset, resolve_spec, spec_fields
from tuiapp.cli import app

runner = CliRunner()
# Fields a preset does not list: a run's own label, and the notes Cherry writes on defaults it moved.
WRITTEN_BY_CHERRY = {"name", "defaults_followed", "aliases_used"}


def test_dpo_preset_holds_every_field_and_is_valid():
    values = load_preset("dpo")
    assert set(spec_fields()) - WRITTEN_BY_CHERRY <= set(values)
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
        ("max_prompt_length=0", "max_prompt_length must be > 0 and < max_length"),
        ("beta", "--set expects key=value"),
        ("loss_type=hinge label_smoothing=0.1", "label_smoothing applies to loss_type sigmoid (cDPO) and robust only"),
    ],
)
def test_bad_values_are_refused_naming_the_field(override, message):
    with pytest.raises(SpecError) as err:
        resolve_spec("dpo", override.split(), check_paths=False)
    assert message in str(err.value)


def test_overrides_are_typed():
    spec = resolve_spec(
        "dpo",
        ["lr=1e-5", "beta=0.25", "lora.r=16", "lora.target_modules=q_proj,v_proj", "max_rows=10"],
        check_paths=False,
    )
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
    result = runner.invoke(
        app, ["train", "--model", str(tiny_model_dir), "--dataset", str(bad), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "question" in result.output and "prompt" in result.output
    empty_dir = tmp_path / "not-a-model"
    empty_dir.mkdir()
    result = runner.invoke(
        app, ["train", "--model", str(empty_dir), "--dataset", str(bad), "--out", str(tmp_path / "r2")]
    )
    assert result.exit_code == 2 and "could not load a tokenizer" in result.output


def test_presets_lists_every_method_and_shows_inherited_values():
    result = runner.invoke(app, ["presets"])
    names = [line.split()[0] for line in result.output.splitlines()]
    assert result.exit_code == 0
    from engine.registry import ALGORITHMS
    from engine.spec import presets_dir

    assert names == sorted(p.stem for p in presets_dir().glob("*.yaml") if not p.name.startswith("_"))
    assert set(ALGORITHMS) <= set(names)  # every method has its preset
    shown = runner.invoke(app, ["presets", "ipo", "--yaml"])
    assert (
        "loss_type: ipo" in shown.output
        and "inherited from dpo" in shown.output
        and "inherited from _base" in shown.output
    )
    settings = runner.invoke(app, ["presets", "ipo"]).output  # every setting dpo reads, with its help
    assert 'loss_type: "ipo"' in settings and "# --- dpo's own" in settings and "(TRL: learning_rate)" in settings
    assert "num_generations" not in settings and "desirable_weight" not in settings
    kto = runner.invoke(app, ["presets", "kto"]).output
    assert "desirable_weight" in kto and "label_smoothing" not in kto
    ipo = load_preset("ipo")
    assert (
        ipo["loss_type"] == "ipo" and ipo["algorithm"] == "dpo" and ipo["lora"]["r"] == 0
    )  # merged through dpo and _base
    for name in names:
        assert set(spec_fields()) - WRITTEN_BY_CHERRY <= set(load_preset(name)), name
        build_spec(load_preset(name))  # every preset is valid as shipped


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, tuiapp.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuiapp.cli", "--help"], check=True, capture_output=True)
    assert time.perf_counter() - started < 3.0  # generous: ~0.2 s when the machine is quiet


def test_cli_trains_a_local_model_on_a_local_jsonl(tmp_path, tiny_model_dir, tiny_pairs):
    out = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "dpo",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_pairs),
        "--out",
        str(out),
        "--set",
        "max_steps=4",
        "--set",
        "lr=1e-3",
        "--set",
        "batch_size=4",
        "--set",
        "grad_accum=1",
        "--set",
        "max_new_tokens=4",
        "--set",
        "num_threads=1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "completed: 4/4 steps" in result.output and f"run directory: {out}" in result.output
    assert (out / "final" / "config.json").exists()
    resumed = runner.invoke(app, ["train", "--resume", str(out)])
    assert resumed.exit_code == 0 and "completed: 4/4 steps" in resumed.output, resumed.output
    missing = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no spec.yaml there" in missing.output


# ----------------------------------------------------------------------------- defaults that follow yours


def test_max_length_alone_brings_the_prompt_budget_along():
    """The issue's case: `--set max_length=128` on a preset made for 1024 tokens."""
    spec = resolve_spec("dpo", ["max_length=128"], check_paths=False)
    assert (spec.max_length, spec.max_prompt_length) == (128, 64)  # the preset's 512 of 1024: half
    assert spec.defaults_followed == [
        "max_prompt_length=64: 50% of max_length=128, the preset's proportion (set max_prompt_length yourself to choose)"
    ]
    demo = resolve_spec("demo/dpo", ["max_length=32"], check_paths=False)
    assert demo.max_prompt_length == 24  # the demo preset's 48 of 64
    longer = resolve_spec("dpo", ["max_prompt_length=2000"], check_paths=False)
    assert (longer.max_length, longer.max_prompt_length) == (4000, 2000)
    assert resolve_spec("dpo", ["max_length=128", "max_prompt_length=100"], check_paths=False).defaults_followed is None


def test_two_explicit_settings_that_contradict_each_other_are_the_only_error():
    for overrides, message in [
        (["max_length=128", "max_prompt_length=512"], "max_prompt_length must be > 0 and < max_length (512 vs 128)"),
        (["epochs=2", "max_steps=100"], "max_steps=100 and epochs=2.0 are both set"),
        (["warmup_ratio=0.2", "warmup_steps=10"], "warmup_steps=10 and warmup_ratio=0.2 are both set"),
    ]:
        with pytest.raises(SpecError) as err:
            resolve_spec("dpo", overrides, check_paths=False)
        assert message in str(err.value)


def test_a_setting_the_preset_would_override_wins_over_the_preset(tmp_path):
    """epochs over a preset's max_steps, warmup_ratio over its warmup_steps, rewards over its weights:
    the preset's value steps aside (max_steps, warmup_steps 0; equal weights) and the start line says so."""
    spec = resolve_spec("demo/grpo", ["epochs=2"], check_paths=False)
    assert (spec.max_steps, spec.epochs) == (0, 2.0)
    assert spec.defaults_followed[0].startswith("max_steps=0: you set epochs=2.0, which the preset's max_steps")
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: grpo\nwarmup_steps: 150\nrewards: [exact_match, length:8]\nreward_weights: [1.0, 0.1]\n")
    spec = resolve_spec(str(mine), ["warmup_ratio=0.05", "rewards=exact_match"], check_paths=False)
    assert (spec.warmup_steps, spec.warmup_ratio, spec.reward_weights) == (0, 0.05, None)
    assert resolve_spec(str(mine), [], check_paths=False).warmup_steps == 150  # untouched without a reason


def test_the_methods_own_settings_follow_an_algorithm_or_loss_set_on_top():
    assert resolve_spec("dpo", ["algorithm=grpo"], check_paths=False).loss_type == "dapo"
    rpo_ipo = resolve_spec("rpo", ["loss_type=ipo"], check_paths=False)
    assert rpo_ipo.rpo_alpha == 0.0 and "rpo_alpha=0.0" in rpo_ipo.defaults_followed[0]
    with pytest.raises(SpecError, match="does not apply to loss_type=ipo"):
        resolve_spec("rpo", ["loss_type=ipo", "rpo_alpha=1.0"], check_paths=False)


def test_rollout_splits_follow_batch_size_and_num_generations():
    spec = resolve_spec("demo/ppo", ["batch_size=3"], check_paths=False)  # the preset cuts 64 samples in 2
    assert spec.num_mini_batches == 1 and "num_mini_batches=1" in spec.defaults_followed[0]
    spec = resolve_spec("demo/ppo", ["batch_size=6", "grad_accum=2"], check_paths=False)
    assert (spec.num_mini_batches, spec.grad_accum) == (
        1,
        2,
    )  # your grad_accum stays; the preset's 2 mini-batches of 3 cannot
    with pytest.raises(SpecError, match="num_mini_batches=2 must divide"):
        resolve_spec("demo/ppo", ["batch_size=3", "num_mini_batches=2"], check_paths=False)


def test_a_full_spec_is_taken_as_written():
    """A stored spec (a queued run, spec.yaml on resume) has nothing left to follow: build_spec checks only."""
    with pytest.raises(SpecError, match="max_prompt_length must be > 0 and < max_length"):
        build_spec({**load_preset("dpo"), "max_length": 128})
    with pytest.raises(SpecError, match="defaults_followed is written by Cherry"):
        resolve_spec("dpo", ["defaults_followed=x"], check_paths=False)


def test_the_start_line_says_which_settings_followed(tmp_path):
    """A real run from the demo preset file with only max_length set: it trains, and both the start
    line and events.jsonl name the prompt budget Cherry chose."""
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuiapp.cli",
            "train",
            "--preset",
            "demo/dpo",
            "--out",
            str(out),
            "--set",
            "max_length=32",
            "--set",
            "max_steps=1",
            "--set",
            "num_threads=1",
            "--set",
            "eval_steps=0",
            "--set",
            "num_samples=0",
            "--set",
            "kl_samples=0",
            "--set",
            "max_rows=40",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    note = "max_prompt_length=24: 75% of max_length=32, the preset's proportion"
    assert note in result.stderr
    start = next(json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if '"start"' in line)
    assert note in start["message"]
    assert "max_prompt_length: 24" in (out / "spec.yaml").read_text()


def test_every_default_is_written_once_in_the_base_preset():
    """RunSpec's field defaults are read from presets/_base.yaml: the commented file users read is the
    one source, so code and preset can never disagree."""
    import dataclasses

    import yaml

    from engine.spec import REPO_ROOT, RunSpec

    base = yaml.safe_load((REPO_ROOT / "presets" / "_base.yaml").read_text())
    spec = RunSpec()
    for f in dataclasses.fields(RunSpec):
        if f.name in ("defaults_followed", "aliases_used"):  # records Cherry writes: not settings
            continue
        value = dataclasses.asdict(spec.lora) if f.name == "lora" else getattr(spec, f.name)
        assert value == base[f.name], f.name


def test_a_resume_may_change_only_the_batch_split_and_the_parallelism():
    from engine.spec import with_resume_settings

    spec = build_spec({"algorithm": "dpo", "model": "m", "dataset": "d", "batch_size": 8})
    sharded = with_resume_settings(spec, ["parallelism=fsdp", "num_processes=2", "batch_size=4"])
    assert (sharded.parallelism, sharded.num_processes, sharded.batch_size) == ("fsdp", 2, 4)
    with pytest.raises(SpecError, match="--set lr: a resumed run keeps its settings"):
        with_resume_settings(spec, ["lr=1e-3"])
    with pytest.raises(SpecError, match="parallelism fsdp shards the model over num_processes"):
        with_resume_settings(spec, ["parallelism=fsdp"])
