"""The offline loop end to end on a tiny random model: it learns, logs, saves and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from engine.reporting import MemoryReporter
from engine.spec import build_spec
from engine.train import train


def dpo_spec(model_dir, data, **overrides):
    values = dict(
        algorithm="dpo",
        model=str(model_dir),
        dataset=str(data),
        lr=5e-3,
        beta=0.5,
        batch_size=8,
        max_steps=12,
        eval_split=0.2,
        eval_steps=6,
        sample_steps=6,
        save_steps=4,
        num_samples=2,
        kl_samples=4,
        max_new_tokens=6,
        max_length=64,
        max_prompt_length=32,
        warmup_ratio=0.0,
        num_threads=1,
    )
    values.update(overrides)
    return build_spec(values)


def test_dpo_learns_and_writes_a_complete_run_directory(tiny_model_dir, tiny_pairs, tmp_path):
    reporter = MemoryReporter()
    summary = train(dpo_spec(tiny_model_dir, tiny_pairs), tmp_path / "run", reporter)

    assert summary["status"] == "completed" and summary["step"] == 12
    losses = reporter.series("train/loss")
    assert len(losses) == 12
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: -log sigmoid(0)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    margins = reporter.series("rewards/margin")
    assert margins[-1] > margins[0] + 0.5
    eval_acc = reporter.series("eval/rewards/accuracy")
    assert eval_acc[-1] > 0.9  # the held-out pairs follow the same rule
    assert reporter.series("kl/mean")[-1] > reporter.series("kl/mean")[0]

    run = tmp_path / "run"
    for name in ("spec.yaml", "metrics.jsonl", "samples.jsonl", "events.jsonl", "summary.json"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 6, 12} and {"prompt", "reference", "policy"} <= set(samples[0])
    assert json.loads((run / "summary.json").read_text())["tokens_per_s"] > 0
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000008", "step-0000012"]

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert sum(p.numel() for p in final.parameters()) > 0


def test_resume_continues_with_identical_losses(tiny_model_dir, tiny_pairs, tmp_path):
    spec = dpo_spec(tiny_model_dir, tiny_pairs, max_steps=8, save_steps=100, eval_steps=0, sample_steps=0)
    straight = MemoryReporter()
    train(spec, tmp_path / "straight", straight)

    calls = {"n": 0}

    def stop_after_five() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    first = MemoryReporter()
    summary = train(spec, tmp_path / "resumed", first, should_stop=stop_after_five)
    assert summary["status"] == "cancelled" and summary["step"] == 5
    second = MemoryReporter()
    summary = train(spec, tmp_path / "resumed", second, resume=True)
    assert summary["status"] == "completed" and summary["step"] == 8

    assert second.series("train/loss") == straight.series("train/loss")[5:]
    on_disk = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in on_disk if "train/loss" in r] == straight.series("train/loss")


class _RunsCode:
    """What a tampered checkpoint would carry: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["state_truncated", "state_runs_code", "weights_truncated"])
def test_a_damaged_checkpoint_is_set_aside_and_resume_continues_from_the_one_before(
    tiny_model_dir, tiny_pairs, tmp_path, damage
):
    spec = dpo_spec(tiny_model_dir, tiny_pairs, max_steps=8, save_steps=4, eval_steps=0, sample_steps=0)
    run = tmp_path / "run"
    straight = MemoryReporter()
    train(spec, run, straight)
    newest = run / "checkpoints" / "step-0000008"
    marker = tmp_path / "code-ran"
    if damage == "state_truncated":
        state = newest / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "state_runs_code":
        saved = torch.load(newest / "state.pt", weights_only=True)
        saved["extra"]["payload"] = _RunsCode(marker)
        torch.save(saved, newest / "state.pt")
    else:
        weights = newest / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])

    resumed = MemoryReporter()
    summary = train(spec, run, resumed, resume=True)
    assert not marker.exists()  # the file was refused, not unpickled
    assert summary["status"] == "completed" and summary["step"] == 8
    assert resumed.series("train/loss") == straight.series("train/loss")[4:]  # from step-0000004, exactly
    warning = next(e["message"] for e in resumed.events if e["kind"] == "warning")
    assert "step-0000008" in warning and "moved it aside to step-0000008.unreadable" in warning
    assert next(e["message"] for e in resumed.events if e["kind"] == "resume") == "resumed from step-0000004"
    aside = run / "checkpoints" / "step-0000008.unreadable"
    assert aside.is_dir()  # kept for a look, never overwritten or pruned
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000008", aside.name]


def test_checkpoint_state_loads_without_pickle(tiny_model_dir, tiny_pairs, tmp_path):
    """Everything state.pt holds (optimizer, scheduler, both RNG states) loads with weights_only=True,
    and Python's RNG state comes back as the tuple random.setstate needs."""
    import random

    from engine.loop.checkpoint import read_checkpoint_state

    train(
        dpo_spec(tiny_model_dir, tiny_pairs, max_steps=2, eval_steps=0, sample_steps=0),
        tmp_path / "run",
        MemoryReporter(),
    )
    saved = read_checkpoint_state(tmp_path / "run" / "checkpoints" / "step-0000002")
    assert saved["state"]["step"] == 2 and saved["optimizer"]["state"] and saved["scheduler"]["last_epoch"] == 2
    random.setstate(saved["rng"]["python"])  # a list anywhere inside would raise TypeError here
    assert random.getstate() == saved["rng"]["python"]


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, tiny_pairs, tmp_path):
    common = dict(max_steps=2, eval_steps=0, sample_steps=0, save_steps=100, eval_split=0.0, lr=1e-2, max_rows=11)
    big = MemoryReporter()
    train(dpo_spec(tiny_model_dir, tiny_pairs, batch_size=11, grad_accum=1, **common), tmp_path / "big", big)
    accum = MemoryReporter()
    train(dpo_spec(tiny_model_dir, tiny_pairs, batch_size=4, grad_accum=3, **common), tmp_path / "accum", accum)
    # 11 pairs as 4+4+3: per-pair normalisation makes each step identical to one batch of 11
    for name in ("train/loss", "train/grad_norm", "rewards/margin"):
        assert accum.series(name) == pytest.approx(big.series(name), rel=1e-4, abs=1e-6), name


def test_lora_uses_the_adapter_disabled_base_as_reference(tiny_model_dir, tiny_pairs, tmp_path):
    import engine.loop.core as engine_train

    loaded = []
    original = engine_train.load_causal_lm

    def counting_load(*args, **kwargs):
        loaded.append(args[0])
        return original(*args, **kwargs)

    engine_train.load_causal_lm = counting_load
    try:
        reporter = MemoryReporter()
        spec = dpo_spec(tiny_model_dir, tiny_pairs, lr=2e-2, max_steps=10, **{"lora.r": 8, "lora.alpha": 16})
        summary = train(spec, tmp_path / "lora", reporter)
    finally:
        engine_train.load_causal_lm = original
    assert len(loaded) == 1  # no second copy for the reference
    assert reporter.series("train/loss")[0] == pytest.approx(0.6931, abs=1e-3)
    assert reporter.series("rewards/margin")[-1] > reporter.series("rewards/margin")[0]
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_config.json").exists() and summary["adapter_base"] == str(tiny_model_dir)

    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(final) is not None


def test_precomputed_reference_logps_are_cached_and_give_the_same_losses(tiny_model_dir, tiny_pairs, tmp_path):
    common = dict(max_steps=3, eval_steps=0, sample_steps=0, save_steps=100)
    live = MemoryReporter()
    train(dpo_spec(tiny_model_dir, tiny_pairs, **common), tmp_path / "live", live)
    cache = tmp_path / "cache"
    first = MemoryReporter()
    train(
        dpo_spec(tiny_model_dir, tiny_pairs, precompute_ref_logps=True, **common),
        tmp_path / "pre1",
        first,
        cache_dir=cache,
    )
    files = list((cache / "ref_logps").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # tensors only: reading it runs no code
    stamp = files[0].stat().st_mtime_ns
    second = MemoryReporter()
    train(
        dpo_spec(tiny_model_dir, tiny_pairs, precompute_ref_logps=True, **common),
        tmp_path / "pre2",
        second,
        cache_dir=cache,
    )
    assert files[0].stat().st_mtime_ns == stamp  # reused, not recomputed
    assert first.series("train/loss") == pytest.approx(live.series("train/loss"), abs=1e-6)
    assert second.series("train/loss") == first.series("train/loss")
    # a cache cut short (a shared home, a full disk) is computed again and replaced, never trusted
    files[0].write_bytes(files[0].read_bytes()[:40])
    third = MemoryReporter()
    train(
        dpo_spec(tiny_model_dir, tiny_pairs, precompute_ref_logps=True, **common),
        tmp_path / "pre4",
        third,
        cache_dir=cache,
    )
    assert third.series("train/loss") == first.series("train/loss")
    assert files[0].stat().st_size > 40
    # different data -> a different key
    train(
        dpo_spec(tiny_model_dir, tiny_pairs, precompute_ref_logps=True, max_rows=30, **common),
        tmp_path / "pre3",
        MemoryReporter(),
        cache_dir=cache,
    )
    assert len(list((cache / "ref_logps").glob("*.safetensors"))) == 2


def test_kto_with_precomputed_reference_logps_gives_the_same_losses(tiny_model_dir, tiny_pairs, tmp_path):
    """KTO rows hold a completion and its mismatched partner, not chosen/rejected: the cache key and
    the table must follow what the algorithm batches."""
    common = dict(algorithm="kto", max_steps=3, eval_steps=0, sample_steps=0, save_steps=100)
    live, pre = MemoryReporter(), MemoryReporter()
    train(dpo_spec(tiny_model_dir, tiny_pairs, **common), tmp_path / "live", live)
    train(
        dpo_spec(tiny_model_dir, tiny_pairs, precompute_ref_logps=True, **common),
        tmp_path / "pre",
        pre,
        cache_dir=tmp_path / "cache",
    )
    assert pre.series("train/loss") == pytest.approx(live.series("train/loss"), abs=1e-6)
    assert pre.series("kl") == pytest.approx(live.series("kl"), abs=1e-6)


def test_export_merges_a_lora_adapter_into_full_weights(tiny_model_dir, tiny_pairs, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from tuiapp.cli import app

    spec = dpo_spec(
        tiny_model_dir,
        tiny_pairs,
        lr=2e-2,
        max_steps=4,
        eval_steps=0,
        sample_steps=0,
        **{"lora.r": 4, "lora.target_modules": "q_proj,v_proj"},
    )
    train(spec, tmp_path / "run", MemoryReporter())
    runner = CliRunner()
    refused = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "pass --merge" in refused.output
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merge"])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-5)  # the adapter really changed it


@pytest.mark.parametrize("algorithm", ["sft", "simpo", "orpo", "kto"])
def test_every_method_trains_with_lora(algorithm, tiny_model_dir, tiny_pairs, tmp_path):
    spec = dpo_spec(
        tiny_model_dir,
        tiny_pairs,
        algorithm=algorithm,
        lr=1e-2,
        max_steps=3,
        eval_steps=0,
        sample_steps=0,
        **{"lora.r": 4},
    )
    reporter = MemoryReporter()
    summary = train(spec, tmp_path / algorithm, reporter)
    assert summary["status"] == "completed" and len(reporter.series("train/loss")) == 3
    assert (tmp_path / algorithm / "final" / "adapter_config.json").exists()


PAIR_METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "policy/entropy",
    "lengths/chosen",
    "lengths/rejected",
]
SPEC_METRICS = {  # docs/algorithms.md: what the DPO family, KTO and ORPO log
    "dpo": ({}, PAIR_METRICS),
    "ipo": ({"loss_type": "ipo"}, PAIR_METRICS),
    "rpo": ({"rpo_alpha": 1.0}, PAIR_METRICS + ["nll_loss"]),
    "simpo": ({"algorithm": "simpo"}, PAIR_METRICS),
    "orpo": ({"algorithm": "orpo"}, PAIR_METRICS + ["nll_loss", "or_loss", "log_odds_ratio", "log_odds_chosen"]),
    "kto": (
        {"algorithm": "kto"},
        PAIR_METRICS[:2]
        + [
            "rewards/margin",
            "logps/chosen",
            "logps/rejected",
            "kl",
            "count/desirable",
            "count/undesirable",
            "kto/desirable_fraction",
            "logits/chosen",
            "logits/rejected",
            "policy/entropy",
            "lengths/chosen",
            "lengths/rejected",
        ],
    ),
}


@pytest.mark.parametrize("method", sorted(SPEC_METRICS))
def test_each_method_logs_the_metrics_its_paper_section_lists(method, tiny_model_dir, tiny_pairs, tmp_path):
    import math

    from engine.models import load_tokenizer

    overrides, names = SPEC_METRICS[method]
    reporter = MemoryReporter()
    train(
        dpo_spec(tiny_model_dir, tiny_pairs, max_steps=2, eval_steps=0, sample_steps=0, save_steps=100, **overrides),
        tmp_path / method,
        reporter,
    )
    for name in names:
        assert len(reporter.series(name)) == 2, f"{method}: train {name}"
        assert len(reporter.series(f"eval/{name}")) == 2, f"{method}: eval/{name} (start and end)"
    first = reporter.metrics[[row["step"] for row in reporter.metrics].index(1)]
    # every completion is " xxx" + EOS: 4 bytes and 1 end token
    assert first["lengths/chosen"] == first["lengths/rejected"] == 5.0
    vocab = len(load_tokenizer(str(tiny_model_dir)))
    assert 0.9 * math.log(vocab) < first["policy/entropy"] <= math.log(vocab) + 1e-4  # a random init is nearly uniform
    assert all(math.isfinite(first[name]) for name in names)
    if method == "kto":  # 8 rows per micro-batch, split between the classes
        assert first["count/desirable"] + first["count/undesirable"] == 8


def test_inverse_sqrt_schedule_by_hand():
    from engine.loop.schedule import lr_factor

    # warmup 4: 1/4, 2/4, 3/4, 1, then sqrt(4 / s) at the 1-based step s; total_steps does not matter
    expected = [0.25, 0.5, 0.75, 1.0, (4 / 5) ** 0.5, (4 / 6) ** 0.5, (4 / 7) ** 0.5, 0.5**0.5]
    for total in (8, 1000):
        assert [lr_factor(step, total, 4, "inverse_sqrt") for step in range(8)] == pytest.approx(expected)
    assert lr_factor(15, 20, 4, "inverse_sqrt") == pytest.approx(0.5)  # half at 4x the warmup
    assert [lr_factor(step, 10, 0, "inverse_sqrt") for step in range(4)] == pytest.approx([1, 0.5**0.5, 3**-0.5, 0.5])
    # the other kinds are unchanged
    assert [lr_factor(step, 6, 2, "linear") for step in range(6)] == pytest.approx([0.5, 1, 1, 0.75, 0.5, 0.25])
    assert lr_factor(5, 6, 2, "constant") == 1.0


def test_inverse_sqrt_is_a_valid_setting_and_drives_the_logged_lr(tiny_model_dir, tiny_pairs, tmp_path):
    from engine.errors import SpecError

    with pytest.raises(SpecError, match="lr_scheduler must be one of linear, cosine, constant, inverse_sqrt"):
        dpo_spec(tiny_model_dir, tiny_pairs, lr_scheduler="rsqrt")
    reporter = MemoryReporter()
    spec = dpo_spec(
        tiny_model_dir,
        tiny_pairs,
        algorithm="orpo",
        lr_scheduler="inverse_sqrt",
        lr=1e-3,
        warmup_ratio=0.25,
        max_steps=8,
        eval_steps=0,
        sample_steps=0,
        save_steps=100,
        eval_split=0.0,
    )
    train(spec, tmp_path / "run", reporter)
    expected = [0.5, 1.0] + [(2 / s) ** 0.5 for s in range(3, 9)]  # warmup int(0.25 * 8) = 2 steps
    assert reporter.series("train/lr") == pytest.approx([1e-3 * f for f in expected])


def test_warmup_steps_override_the_ratio(tiny_model_dir, tiny_pairs, tmp_path):
    from engine.errors import SpecError

    with pytest.raises(SpecError, match="warmup_steps must be >= 0"):
        dpo_spec(tiny_model_dir, tiny_pairs, warmup_steps=-1)
    reporter = MemoryReporter()
    spec = dpo_spec(
        tiny_model_dir,
        tiny_pairs,
        lr_scheduler="constant",
        lr=1e-3,
        warmup_ratio=0.5,
        warmup_steps=3,
        max_steps=5,
        eval_steps=0,
        sample_steps=0,
        save_steps=100,
        eval_split=0.0,
    )
    train(spec, tmp_path / "run", reporter)
    # 3 warmup steps (not the ratio's int(0.5 * 5) = 2): 1/3, 2/3, 1, then constant
    assert reporter.series("train/lr") == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])
