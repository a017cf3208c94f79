"""Chain of Hindsight: sequence layout, loss masking, random block order, positive-phrase prompting,
attention masking of earlier tokens, the pretraining regulariser and the NLL-gap metric."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine.algorithms.base import Models
from engine.algorithms.coh import ChainOfHindsight, mask_earlier_tokens
from engine.reporting import MemoryReporter
from engine.spec import build_spec
from engine.train import train

CPU = torch.device("cpu")


class _Tok:
    """Maps each character to its code point: enough to read the layout back."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_sequence_layout_masks_only_completions_and_randomises_block_order():
    spec = build_spec(
        {"algorithm": "coh", "coh_positive": "+", "coh_negative": "-", "max_length": 64, "max_prompt_length": 32}
    )
    algo = ChainOfHindsight(spec)
    examples = [{"index": i, "prompt_ids": [1, 2], "chosen_ids": [10, 0], "rejected_ids": [20, 0]} for i in range(40)]
    algo.prepare_examples(examples, _Tok())
    plus, minus = ord("+"), ord("-")
    good_first = [[1, 2, plus, 10, 0, minus, 20, 0], [0, 0, 0, 1, 1, 0, 1, 1]]
    bad_first = [[1, 2, minus, 20, 0, plus, 10, 0], [0, 0, 0, 1, 1, 0, 1, 1]]
    layouts = [[ex["coh_ids"], ex["coh_mask"]] for ex in examples]
    assert all(layout in (good_first, bad_first) for layout in layouts)
    assert 10 <= sum(layout == good_first for layout in layouts) <= 30  # both orders occur
    assert algo.generation_prompt([1, 2]) == [1, 2, plus]
    batch = algo.collate(examples[:2], pad_id=0)
    assert algo.units(batch) == 8  # 2 sequences x (2 + 2) completion tokens


def test_coh_trains_a_tiny_model(tiny_model_dir, tiny_pairs, tmp_path):
    spec = build_spec(
        {
            "algorithm": "coh",
            "model": str(tiny_model_dir),
            "dataset": str(tiny_pairs),
            "lr": 5e-3,
            "batch_size": 8,
            "max_steps": 60,
            "eval_steps": 0,
            "eval_split": 0.2,
            "warmup_ratio": 0.0,
            "max_length": 64,
            "max_prompt_length": 32,
            "num_samples": 2,
            "max_new_tokens": 4,
            "num_threads": 1,
        }
    )
    reporter = MemoryReporter()
    summary = train(spec, tmp_path / "coh", reporter)
    assert summary["final"]["eval/loss"] < summary["before"]["eval/loss"]
    losses = reporter.series("train/loss")
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    assert "kl/mean" not in summary["final"]  # no reference model
    # the model learns which answer follows which phrase: the chosen answer gets likelier after
    # the positive phrase than after the negative one, and the rejected answer the other way
    assert summary["final"]["eval/coh/nll_gap"] > summary["before"]["eval/coh/nll_gap"]
    assert summary["final"]["eval/coh/nll_gap"] > 0
    assert summary["final"]["eval/coh/rejected_nll_gap"] > 0


def test_mask_earlier_tokens_hides_a_bounded_fraction_never_the_first_token_or_padding():
    mask = torch.ones(400, 30, dtype=torch.long)
    mask[:, 25:] = 0  # padding
    assert mask_earlier_tokens(mask, 0.0) is mask
    generator = torch.Generator().manual_seed(0)
    hidden = mask_earlier_tokens(mask, 0.2, generator) != mask
    assert not hidden[:, 0].any() and not hidden[:, 25:].any()
    fraction = hidden[:, 1:25].float().mean(-1)
    assert fraction.max() <= 0.5 and 0.07 < fraction.mean() < 0.13  # per-row ratio ~ U(0, 0.2): mean 0.1
    again = mask_earlier_tokens(mask, 0.2, torch.Generator().manual_seed(0)) != mask
    assert torch.equal(hidden, again)


def _chain_batch(tiny_model_dir, **overrides):
    from engine.models import load_tokenizer
    from engine.spec import build_spec

    tokenizer = load_tokenizer(str(tiny_model_dir))
    values = {
        "algorithm": "coh",
        "model": str(tiny_model_dir),
        "max_length": 64,
        "max_prompt_length": 32,
        "batch_size": 4,
    }
    algo = ChainOfHindsight(build_spec({**values, **overrides}))
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = [
        {
            "index": i,
            "prompt_ids": enc(f"say {c}:"),
            "chosen_ids": enc(f" {c * 3}") + [tokenizer.eos_token_id],
            "rejected_ids": enc(" zzz") + [tokenizer.eos_token_id],
        }
        for i, c in enumerate("abcd")
    ]
    algo.prepare_examples(examples, tokenizer)
    return algo, examples, algo.collate(examples, tokenizer.pad_token_id)


def test_earlier_tokens_are_masked_in_training_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for ratio, differs in ((0.0, False), (0.9, True)):
        algo, _, batch = _chain_batch(tiny_model_dir, coh_mask_ratio=ratio)
        torch.manual_seed(0)
        train_loss = algo.loss(Models(model.train(), None, CPU), batch, [])[0].item()
        eval_loss = algo.loss(Models(model.eval(), None, CPU), batch, [])[0].item()
        assert (abs(train_loss - eval_loss) > 1e-4) == differs, ratio


def test_pretraining_nll_is_added_with_its_weight(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import write_jsonl

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"the quick brown fox {i}"} for i in range(20)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    losses = {}
    for coef in (1.0, 3.0):
        algo, _, batch = _chain_batch(
            tiny_model_dir, coh_mask_ratio=0.0, coh_pretrain_dataset=str(text), coh_pretrain_coef=coef
        )
        torch.manual_seed(0)  # the same pretraining rows are drawn for both weights
        losses[coef] = algo.loss(Models(model, None, CPU), batch, [])
    (one, metrics_one), (three, metrics_three) = losses[1.0], losses[3.0]
    assert metrics_one["pretrain_loss"] == pytest.approx(metrics_three["pretrain_loss"])
    assert metrics_one["pretrain_loss"] > 0
    # loss = chains' NLL sum + coef * pretraining token-mean NLL * the batch's units
    assert (three - one).item() == pytest.approx(2 * metrics_one["pretrain_loss"], rel=1e-5)
    off, _, _ = _chain_batch(tiny_model_dir, coh_pretrain_dataset=str(text), coh_pretrain_coef=0.0)
    assert off.pretrain is None  # weight 0: the dataset is not even loaded
    assert len(algo.pretrain_eval) >= 1 and "pretrain_loss" in algo.eval_metrics(
        Models(model.eval(), None, CPU), [], None
    )


class _Bigram(torch.nn.Module):
    """A model whose next-token distribution depends only on the current token: rows of `probs`."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_table = torch.nn.Parameter(probs.log())

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=None):
        # logits_to_keep: the [batch, seq] boolean mask completion_logps passes, as transformers models take it
        one_hot = torch.nn.functional.one_hot(input_ids, self.log_table.shape[0]).float()
        return SimpleNamespace(logits=one_hot[logits_to_keep] @ self.log_table)


def test_nll_gap_matches_hand_values():
    from engine.spec import build_spec

    # tokens: 1 prompt, 2 "+", 3 "-", 4 chosen, 5 rejected, 0 EOS (= pad here, masked anyway)
    probs = torch.full((6, 6), 0.02)
    probs[2] = torch.tensor([0.02, 0.02, 0.02, 0.02, 0.8, 0.12])  # after "+": chosen 0.8, rejected 0.12
    probs[3] = torch.tensor([0.02, 0.02, 0.02, 0.02, 0.2, 0.72])  # after "-": chosen 0.2, rejected 0.72
    probs[4] = probs[5] = torch.tensor([0.9, 0.02, 0.02, 0.02, 0.02, 0.02])  # then EOS
    model = _Bigram(probs)

    class Tok:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [{"+": 2, "-": 3}[text]]}

    algo = ChainOfHindsight(
        build_spec(
            {
                "algorithm": "coh",
                "coh_positive": "+",
                "coh_negative": "-",
                "max_length": 16,
                "max_prompt_length": 8,
                "batch_size": 2,
            }
        )
    )
    examples = [{"index": i, "prompt_ids": [1], "chosen_ids": [4, 0], "rejected_ids": [5, 0]} for i in range(3)]
    algo.prepare_examples(examples, Tok())
    m = algo.eval_metrics(Models(model, None, CPU), examples, None)
    eos = -math.log(0.9)
    assert m["coh/chosen_nll_positive"] == pytest.approx((-math.log(0.8) + eos) / 2, rel=1e-5)
    assert m["coh/chosen_nll_negative"] == pytest.approx((-math.log(0.2) + eos) / 2, rel=1e-5)
    assert m["coh/nll_gap"] == pytest.approx(math.log(0.8 / 0.2) / 2, rel=1e-5)
    assert m["coh/rejected_nll_gap"] == pytest.approx(math.log(0.72 / 0.12) / 2, rel=1e-5)


@pytest.mark.slow
def test_demo_coh_beats_the_demo_models_own_exact_match(tmp_path):
    """The demo CoH run (presets/demo/coh.yaml, ~1 CPU-minute) answers more held-out prompts right
    after the positive phrase than the demo model does on the plain prompts (47.5%)."""
    import json

    from engine.spec import demo_dir, resolve_spec

    spec = resolve_spec(
        str(demo_dir() / "coh.yaml"), ["num_threads=1", "num_samples=0", "eval_steps=0", "save_steps=0"]
    )
    summary = train(spec, tmp_path / "coh", MemoryReporter())
    plain = json.loads((demo_dir() / "info.json").read_text())["held_out_accuracy"]
    assert summary["before"]["eval/exact_match"] < plain  # the phrase is new to the demo model
    assert summary["final"]["eval/exact_match"] >= plain + 0.05
    assert "eval/coh/nll_gap" in summary["final"]
