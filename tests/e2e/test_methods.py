"""Every offline method trains the demo model end to end and raises held-out exact match."""

from __future__ import annotations

import pytest

from engine.errors import DataError, SpecError
from engine.registry import ALGORITHMS, is_online
from engine.reporting import MemoryReporter
from engine.spec import demo_dir, load_preset, resolve_spec
from engine.train import train


def offline_demo_runs() -> list[str]:
    """The demo runs of the offline methods that have their own tests elsewhere excluded (dpo: the demo's,
    rm and coh: theirs), read from presets/demo and the registry: a new method's demo preset is picked up."""
    runs = []
    for path in sorted(demo_dir().glob("*.yaml")):
        algorithm = load_preset(str(path)).get("algorithm")
        if not is_online(algorithm) and path.stem not in ("dpo", "rm", "coh"):
            runs.append(path.stem)
    return runs


def demo_spec(method: str, *overrides: str):
    return resolve_spec(
        str(demo_dir() / f"{method}.yaml"), ["num_threads=1", "num_samples=2", "kl_samples=8", *overrides]
    )


@pytest.mark.parametrize("method", offline_demo_runs())
def test_demo_method_raises_held_out_exact_match(method, tmp_path, monkeypatch):
    import engine.loop.core as engine_train

    loaded = []
    original = engine_train.load_causal_lm
    monkeypatch.setattr(engine_train, "load_causal_lm", lambda *a, **k: loaded.append(a[0]) or original(*a, **k))
    reporter = MemoryReporter()
    spec = demo_spec(method)
    summary = train(spec, tmp_path / method, reporter)
    before, after = summary["before"]["eval/exact_match"], summary["final"]["eval/exact_match"]
    assert after >= before + 0.05, (method, before, after)
    row = ALGORITHMS[spec.algorithm]
    for name in row.logs + (("nll_loss",) if method == "rpo" else ()):  # RPO: DPO with an NLL term
        assert reporter.series(name), f"{method} logged no {name}"
    reference_free = "ref_model" not in row.settings
    assert len(loaded) == (1 if reference_free else 2)  # reference-free methods load no reference
    assert ("kl/mean" in summary["final"]) == (not reference_free)


def test_sft_lowers_held_out_perplexity(tmp_path):
    reporter = MemoryReporter()
    train(demo_spec("sft", "max_steps=20", "eval_steps=10"), tmp_path / "sft", reporter)
    perplexity = reporter.series("eval/perplexity")
    assert perplexity[-1] < perplexity[0]


def test_kto_refuses_a_batch_of_one():
    with pytest.raises(SpecError, match="kto needs batch_size >= 2"):
        demo_spec("kto", "batch_size=1")


def test_kto_data_given_to_dpo_names_the_kto_preset(tmp_path):
    spec = demo_spec("dpo", f"dataset={demo_dir() / 'unpaired.jsonl'}")
    with pytest.raises(DataError, match="kto"):
        train(spec, tmp_path / "wrong", MemoryReporter())


def test_kto_accepts_paired_data_by_splitting_it(tmp_path):
    reporter = MemoryReporter()
    train(
        demo_spec("kto", f"dataset={demo_dir() / 'pairs.jsonl'}", "max_steps=2", "eval_steps=0", "max_rows=40"),
        tmp_path / "kto-pairs",
        reporter,
    )
    data_event = next(e for e in reporter.events if e["kind"] == "data")
    assert data_event["rows"] == 80  # 40 pairs -> 40 desirable + 40 undesirable rows
    assert reporter.series("kto/desirable_fraction")


def test_rpo_with_ipo_is_refused():
    with pytest.raises(SpecError, match="does not apply to loss_type=ipo"):
        demo_spec("ipo", "rpo_alpha=1")


@pytest.mark.slow
def test_sft_from_random_init_learns_the_demo_tasks(tmp_path):
    """SFT raises exact match from a random-init model of the demo's shape (~1.5 CPU-minutes). Measured on one
    thread: 8 epochs reach 11.5%, 10 reach 32.5% (16 reached more, for 40% more time)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    init = tmp_path / "random-init"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir() / "model")).save_pretrained(init)
    AutoTokenizer.from_pretrained(demo_dir() / "model").save_pretrained(init)
    spec = demo_spec(
        "sft", f"model={init}", "lr=2e-3", "batch_size=64", "epochs=10", "eval_steps=0", "warmup_ratio=0.05"
    )
    summary = train(spec, tmp_path / "sft", MemoryReporter())
    assert summary["before"]["eval/exact_match"] == 0.0
    assert summary["final"]["eval/exact_match"] >= 0.10
    assert summary["final"]["eval/perplexity"] < summary["before"]["eval/perplexity"] / 10


def test_multi_turn_sft_teaches_assistant_turns_only(tiny_model_dir, tmp_path):
    from engine.algorithms.sft import SFT
    from engine.data import prepare
    from engine.models import load_tokenizer
    from engine.spec import build_spec
    from tests.conftest import write_jsonl

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "no"},
            ]
        }
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = prepare(str(data), tokenizer, kind="sft", eval_split=0).train
    spec = build_spec({"algorithm": "sft", "model": str(tiny_model_dir), "dataset": str(data)})
    batch = SFT(spec).collate(examples[:2], tokenizer.pad_token_id)
    assert SFT(spec).units(batch) == 2 * len("yes<|end|>no<|end|>".replace("<|end|>", "#"))  # bytes + 2 end tokens each
    summary = train(
        build_spec(
            {
                "algorithm": "sft",
                "model": str(tiny_model_dir),
                "dataset": str(data),
                "lr": 1e-2,
                "max_steps": 10,
                "batch_size": 4,
                "eval_split": 0.25,
                "eval_steps": 0,
                "warmup_ratio": 0,
                "max_length": 64,
                "max_prompt_length": 32,
                "num_threads": 1,
                "num_samples": 1,
                "max_new_tokens": 4,
            }
        ),
        tmp_path / "run",
        MemoryReporter(),
    )
    assert summary["final"]["eval/loss"] < summary["before"]["eval/loss"]


def test_sft_token_metrics_by_hand():
    import torch

    from engine.algorithms.sft import token_metrics
    from engine.logprobs import CompletionLogps

    out = CompletionLogps(
        sums=torch.tensor([-1.0, -2.0]),
        counts=torch.tensor([2, 3]),
        token_logps=torch.zeros(5),
        token_rows=torch.tensor([0, 0, 1, 1, 1]),
        token_correct=torch.tensor([True, False, True, True, False]),
        token_entropy=torch.tensor([1.0, 2.0, 0.5, 0.5, 1.0]),
        token_logit_mean=torch.zeros(5),
    )
    metrics = token_metrics(out)
    assert metrics["token_accuracy"] == 3  # summed; the loop divides by the 5 scored tokens
    assert metrics["policy/entropy"] == (5.0, 5.0)  # (1 + 2 + 0.5 + 0.5 + 1) nats over 5 tokens
    assert metrics["lengths/completion"] == (5.0, 2.0)  # 2.5 tokens per row
