"""Preference samples (chosen vs rejected with each method's own reward) and the system figures
the loop logs: hand-computed against the formulas, and through `train` into samples.jsonl."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from engine.algorithms import build_algorithm
from engine.algorithms.base import Models
from engine.batching import collate_completions
from engine.data import prepare
from engine.logprobs import completion_logps
from engine.models import load_causal_lm, load_reward_model, load_tokenizer, sequence_rewards
from engine.reference import Reference
from engine.spec import build_spec

CPU = torch.device("cpu")


def _spec(model_dir, data, **overrides):
    values = dict(
        algorithm="dpo",
        model=str(model_dir),
        dataset=str(data),
        beta=0.5,
        batch_size=4,
        max_length=64,
        max_prompt_length=32,
        num_threads=1,
        eval_split=0.25,
    )
    values.update(overrides)
    return build_spec(values)


def _setup(spec, tiny_model_dir, tiny_pairs, kind="preference"):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = prepare(str(tiny_pairs), tokenizer, kind=kind, max_length=64, max_prompt_length=32, eval_split=0.25, seed=0)
    algo = build_algorithm(spec)
    examples = data.eval[:3]
    algo.prepare_examples(examples, tokenizer)
    return tokenizer, algo, examples, partial(algo.collate, pad_id=tokenizer.pad_token_id)


def _models(policy, tokenizer) -> Models:
    return Models(policy=policy, tokenizer=tokenizer, device=CPU)


def _perturbed(model):
    """A reference that differs from the policy, so the implicit rewards are not all zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _logps(model, tokenizer, ex, completion: str) -> tuple[float, int]:
    """(sum, token count) of log pi(completion | prompt), computed directly, one row."""
    batch = collate_completions([ex["prompt_ids"]], [ex[completion]], tokenizer.pad_token_id)
    out = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return out.sums.item(), int(out.counts.item())


def test_dpo_rows_are_beta_times_the_summed_log_ratio(tiny_model_dir, tiny_pairs):
    spec = _spec(tiny_model_dir, tiny_pairs, beta=0.5)
    tokenizer, algo, examples, collate = _setup(spec, tiny_model_dir, tiny_pairs)
    policy = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=CPU).eval()
    ref = _perturbed(load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=CPU))
    rows = algo.preference_samples(_models(policy, tokenizer), examples, collate, Reference(model=ref).logps)

    assert len(rows) == 3
    for row, ex in zip(rows, examples):
        assert row["kind"] == "preference"
        assert (row["prompt"], row["chosen"], row["rejected"]) == (ex["prompt"], ex["chosen"], ex["rejected"])
        chosen = 0.5 * (_logps(policy, tokenizer, ex, "chosen_ids")[0] - _logps(ref, tokenizer, ex, "chosen_ids")[0])
        rejected = 0.5 * (
            _logps(policy, tokenizer, ex, "rejected_ids")[0] - _logps(ref, tokenizer, ex, "rejected_ids")[0]
        )
        assert row["chosen_reward"] == pytest.approx(chosen, abs=1e-4)
        assert row["rejected_reward"] == pytest.approx(rejected, abs=1e-4)
        assert row["margin"] == pytest.approx(chosen - rejected, abs=1e-4)
    assert any(abs(r["margin"]) > 1e-3 for r in rows)
    json.dumps(rows)  # plain numbers and strings: the store and samples.jsonl take them as they are


@pytest.mark.parametrize("algorithm, scale", [("simpo", 2.0), ("orpo", 0.25)])
def test_reference_free_methods_use_their_own_reward(algorithm, scale, tiny_model_dir, tiny_pairs):
    """SimPO: beta x per-token mean log-prob; ORPO: lambda (its beta) x per-token mean log-prob."""
    spec = _spec(tiny_model_dir, tiny_pairs, algorithm=algorithm, beta=scale)
    tokenizer, algo, examples, collate = _setup(spec, tiny_model_dir, tiny_pairs)
    policy = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=CPU).eval()

    def fail(batch):
        raise AssertionError("a reference-free method asked for reference log-probs")

    rows = algo.preference_samples(_models(policy, tokenizer), examples, collate, fail)
    for row, ex in zip(rows, examples):
        total, count = _logps(policy, tokenizer, ex, "chosen_ids")
        assert row["chosen_reward"] == pytest.approx(scale * total / count, abs=1e-4)
        total, count = _logps(policy, tokenizer, ex, "rejected_ids")
        assert row["rejected_reward"] == pytest.approx(scale * total / count, abs=1e-4)
        assert row["margin"] == pytest.approx(row["chosen_reward"] - row["rejected_reward"], abs=1e-6)


def test_reward_model_rows_are_its_scalar_scores(tiny_model_dir, tiny_pairs):
    spec = _spec(tiny_model_dir, tiny_pairs, algorithm="rm")
    tokenizer, algo, examples, collate = _setup(spec, tiny_model_dir, tiny_pairs)
    model = load_reward_model(str(tiny_model_dir), dtype=torch.float32, device=CPU).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = algo.preference_samples(_models(model, tokenizer), examples, collate, None)
    for row, ex in zip(rows, examples):
        batch = collate_completions(
            [ex["prompt_ids"]] * 2, [ex["chosen_ids"], ex["rejected_ids"]], tokenizer.pad_token_id
        )
        with torch.no_grad():
            scores = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        assert row["chosen_reward"] == pytest.approx(scores[0].item(), abs=1e-4)
        assert row["rejected_reward"] == pytest.approx(scores[1].item(), abs=1e-4)


def test_kto_rows_are_completions_with_label_and_implicit_reward(tiny_model_dir, tiny_pairs):
    spec = _spec(tiny_model_dir, tiny_pairs, algorithm="kto", beta=0.5)
    tokenizer, algo, examples, collate = _setup(spec, tiny_model_dir, tiny_pairs, kind="unpaired")
    policy = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=CPU).eval()
    ref = _perturbed(load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=CPU))
    rows = algo.preference_samples(_models(policy, tokenizer), examples, collate, Reference(model=ref).logps)
    assert len(rows) == 3
    for row, ex in zip(rows, examples):
        assert row["kind"] == "unpaired" and row["label"] == bool(ex["label"]) and row["completion"] == ex["completion"]
        expected = 0.5 * (
            _logps(policy, tokenizer, ex, "completion_ids")[0] - _logps(ref, tokenizer, ex, "completion_ids")[0]
        )
        assert row["reward"] == pytest.approx(expected, abs=1e-4)


def test_sft_logs_no_preference_rows(tiny_model_dir, tiny_pairs):
    spec = _spec(tiny_model_dir, tiny_pairs, algorithm="sft")
    algo = build_algorithm(spec)
    assert algo.preference_samples(None, [{"prompt": "p"}], None, None) == []


def test_train_logs_pairs_beside_the_samples_and_rm_logs_its_scores(tiny_model_dir, tiny_pairs, tmp_path):
    """Every sample step carries num_samples preference rows; a reward model (no generation) too."""
    from engine.reporting import MemoryReporter
    from engine.train import train

    common = dict(
        lr=5e-3,
        max_steps=4,
        eval_steps=0,
        sample_steps=2,
        save_steps=100,
        num_samples=2,
        kl_samples=0,
        max_new_tokens=4,
        warmup_ratio=0.0,
    )
    reporter = MemoryReporter()
    train(_spec(tiny_model_dir, tiny_pairs, **common), tmp_path / "dpo", reporter)
    pairs = [s for s in reporter.samples if s.get("kind") == "preference"]
    assert sorted({s["step"] for s in pairs}) == [0, 2, 4]
    assert all(len([s for s in pairs if s["step"] == step]) == 2 for step in (0, 2, 4))
    assert all(s["margin"] == 0.0 for s in pairs if s["step"] == 0)  # policy == reference before training
    assert sum(s["margin"] for s in pairs if s["step"] == 4) > 0  # the rule is learnable: chosen pulls ahead
    assert {s["step"] for s in reporter.samples if not s.get("kind")} == {0, 2, 4}  # reference vs policy still logged
    on_disk = [json.loads(line) for line in (tmp_path / "dpo" / "samples.jsonl").read_text().splitlines()]
    assert sum(1 for s in on_disk if s.get("kind") == "preference") == 6

    reporter = MemoryReporter()
    train(_spec(tiny_model_dir, tiny_pairs, algorithm="rm", **common), tmp_path / "rm", reporter)
    assert reporter.samples and all(s["kind"] == "preference" for s in reporter.samples)
    assert {s["step"] for s in reporter.samples} == {0, 2, 4}


# ----------------------------------------------------------------------------- system figures


def test_cpu_percent_of_two_readings():
    from engine.loop.metrics import cpu_percent

    assert cpu_percent(None, (10.0, 5.0)) is None
    assert cpu_percent((10.0, 5.0), (10.0, 6.0)) is None  # no wall time
    assert cpu_percent((10.0, 5.0), (12.0, 6.0)) == pytest.approx(50.0)
    assert cpu_percent((10.0, 5.0), (11.0, 7.0)) == pytest.approx(200.0)  # two cores busy
    assert cpu_percent((10.0, 5.0), (11.0, 4.0)) == 0.0  # never negative


def test_cpu_meter_reads_the_use_since_its_last_reading():
    from engine.loop.metrics import CpuMeter

    clock = iter([0.0, 2.0, 4.0, 4.0])
    cpu = iter([1.0, 2.0, 4.0, 4.0])
    meter = CpuMeter(clock=lambda: next(clock), cpu_time=lambda: next(cpu))
    assert meter.read() == pytest.approx(50.0)  # (2 - 1) / (2 - 0)
    assert meter.read() == pytest.approx(100.0)  # (4 - 2) / (4 - 2)
    assert meter.read() is None  # no time passed


def test_sys_metrics_on_cpu_and_gpu_utilisation_without_nvml(monkeypatch):
    import engine.loop.metrics as train_module

    meter = train_module.CpuMeter()
    sum(i * i for i in range(200_000))
    figures = train_module.sys_metrics(CPU, meter)
    assert figures["sys/rss_gb"] > 0.01 and figures["sys/cpu_percent"] >= 0
    assert "sys/gpu_util" not in figures and "sys/gpu_mem_gb" not in figures

    def no_nvml(device=None):
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    assert train_module.gpu_util(torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: 87)
    assert train_module.gpu_util(torch.device("cuda", 0)) == 87.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sys_metrics_on_a_gpu():
    import engine.loop.metrics as train_module

    device = torch.device("cuda", 0)
    x = torch.ones(1024, 1024, device=device)
    figures = train_module.sys_metrics(device, train_module.CpuMeter())
    assert figures["sys/gpu_mem_gb"] > 0 and "sys/cpu_percent" in figures
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert "sys/gpu_util" not in figures
    else:
        assert 0 <= figures["sys/gpu_util"] <= 100
    del x
