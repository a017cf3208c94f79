"""Padding-free batches (engine/packing.py): SFT and the pair methods' full rows packed end to end give the
padded rows' losses, metrics and gradients, on a tiny random-init Llama and Qwen2, with and without LoRA;
the body sees no padding; a model that lets packed sequences see each other is scored padded."""

from __future__ import annotations

import pytest
import torch

from engine import packing
from engine.algorithms import build_algorithm
from engine.algorithms.base import Models
from engine.batching import collate_completions
from engine.logprobs import completion_logps
from engine.packing import full_rows_logps, pack_rows, packed_logps, right_padded_lengths
from engine.spec import build_spec
from tests.unit.test_pair_shared_prompts import _full_rows, _loss_and_grads, _pairs, _tiny

FAMILIES = ["Llama", "Qwen2"]


def _assert_same(packed, padded):
    """Equal losses, metrics and gradients up to float32 rounding. A packed row runs other matmul shapes
    than the padded batch, so the rounding scales with each gradient (IPO's reach ~10); a leak between
    packed sequences is off by the gradient's own size."""
    (loss_p, metrics_p, grads_p), (loss_f, metrics_f, grads_f) = packed, padded
    assert torch.allclose(loss_p, loss_f, atol=1e-5, rtol=1e-5)
    assert metrics_p.keys() == metrics_f.keys()
    for name, value in metrics_p.items():
        assert value == pytest.approx(metrics_f[name], abs=1e-4, rel=1e-4), name
    assert grads_p.keys() == grads_f.keys() and grads_p
    for name, grad in grads_p.items():
        scale = max(1.0, float(grads_f[name].abs().max()))
        assert torch.allclose(grad, grads_f[name], atol=1e-5 * scale, rtol=1e-4), name


def test_rows_are_packed_first_fit_decreasing_within_the_longest_row():
    lengths = [10, 1, 4, 6, 3, 0, 5]
    packed = pack_rows(lengths, max(lengths))
    assert packed == [[0], [3, 2], [6, 4, 1]]  # 10 | 6 + 4 | 5 + 3 + 1; the empty row nowhere
    assert all(sum(lengths[r] for r in rows) <= 10 for rows in packed)


def test_only_right_padded_rows_have_packable_lengths():
    right = collate_completions([[5, 6], [7]], [[8], [9, 10, 11]], 0)["attention_mask"]
    assert right_padded_lengths(right) == [3, 4]
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert right_padded_lengths(left) is None


def _sft_rows() -> list[dict]:
    """Lengths 12, 3, 6 and 6: two rows share the longest row's width once packed; one is a conversation."""
    rows = [
        {"prompt_ids": [5, 6], "completion_ids": [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]},
        {"prompt_ids": [7], "completion_ids": [30, 31]},
        {"prompt_ids": [8, 9, 10, 11], "completion_ids": [32, 33]},
        {"prompt_ids": [12, 13], "completion_ids": [34, 35, 36, 37], "loss_mask": [1, 0, 1, 1]},
    ]
    return [{"index": i, **row} for i, row in enumerate(rows)]


def _decoder_inputs(model) -> list[tuple[int, ...]]:
    """The shapes of the input ids the model's body is called with, recorded from now on."""
    from engine.logprobs import chunked_head

    seen: list[tuple[int, ...]] = []
    chunked_head(model).decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return seen


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_packed_equals_padded(family, lora, monkeypatch):
    algo = build_algorithm(build_spec({"algorithm": "sft"}))
    rows = _sft_rows()
    batch = algo.collate(rows, 0)
    model = _tiny(family, lora=lora)
    assert packed_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]) is not None
    seen = _decoder_inputs(model)
    packed = _loss_and_grads(algo, model, batch, rows)
    tokens = int(batch["attention_mask"].sum())
    # packed rows of 12 | 6 + 6 | 3 tokens: every position the body runs is a token
    assert seen == [(1, 12), (1, 12), (1, 3)] and sum(shape[1] for shape in seen) == tokens
    models = Models(policy=model, tokenizer=None, device=torch.device("cpu"))
    assert algo.body_positions(models, batch) == tokens < batch["attention_mask"].numel()

    monkeypatch.setattr(packing, "packed_logps", lambda *args, **kwargs: None)  # the padded path
    padded = _loss_and_grads(algo, model, batch, rows)
    _assert_same(packed, padded)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo", "kto"])
def test_pair_methods_full_rows_packed_equal_padded(method, family, lora, monkeypatch):
    """Where shared prompts do not apply (here: the batch without them), the full rows are packed."""
    settings = {"algorithm": "dpo", "loss_type": "ipo"} if method == "ipo" else {"algorithm": method}
    algo = build_algorithm(build_spec(settings))
    if method == "kto":
        rows = [
            {"index": i, "prompt_ids": p, "completion_ids": c, "label": i % 2 == 0}
            for i, (p, c) in enumerate([([5, 6, 7, 8], [20, 21]), ([9, 10], [22]), ([11, 12, 13], [23, 24, 25])])
        ]
        algo.prepare_examples(rows, tokenizer=None)
    else:
        rows = _pairs()
    batch = _full_rows(algo.collate(rows, 0))
    model = _tiny(family, lora=lora)
    if algo.needs_reference:
        from engine.reference import Reference

        batch["ref_logps"] = Reference(model=_tiny(family, seed=1).eval()).logps(batch)
    assert packed_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]) is not None
    seen = _decoder_inputs(model)
    packed = _loss_and_grads(algo, model, batch, rows)
    tokens = int(batch["attention_mask"].sum())
    assert sum(rows * width for rows, width in seen) == tokens  # KTO's KL rows, of one length, run as they are
    models = Models(policy=model, tokenizer=None, device=torch.device("cpu"))
    assert algo.body_positions(models, batch) == tokens

    monkeypatch.setattr(packing, "packed_logps", lambda *args, **kwargs: None)
    _assert_same(packed, _loss_and_grads(algo, model, batch, rows))


def test_a_body_that_lets_packed_sequences_see_each_other_is_scored_padded():
    model = _tiny("Llama")
    decoder = model.get_decoder()
    forward = decoder.forward
    # Without its position ids the body numbers the packed row 0..T-1 and attends across sequences.
    decoder.forward = lambda *args, position_ids=None, **kwargs: forward(*args, **kwargs)
    batch = collate_completions([[5, 6, 7], [8]], [[9, 10], [11]], 0)
    assert packed_logps(model, **batch) is None
    assert torch.equal(full_rows_logps(model, **batch).sums, completion_logps(model, **batch).sums)


def test_rows_without_padding_or_alone_are_not_packed():
    model = _tiny("Llama")
    even = collate_completions([[5, 6], [7, 8]], [[9], [10]], 0)
    single = collate_completions([[5, 6]], [[9]], 0)
    assert packed_logps(model, **even) is None and packed_logps(model, **single) is None


def test_a_pair_method_with_activation_checkpointing_packs_its_full_rows(monkeypatch):
    """Activation checkpointing turns shared prompts off; the full rows it falls back to are packed."""
    from engine.shared_prompts import shares_prompts

    algo = build_algorithm(build_spec({"algorithm": "simpo"}))
    rows = _pairs()
    batch = algo.collate(rows, 0)
    model = _tiny("Qwen2")
    model.gradient_checkpointing_enable()
    assert not shares_prompts(model, batch)
    assert packed_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]) is not None
    seen = _decoder_inputs(model)
    packed = _loss_and_grads(algo, model, batch, rows)
    assert all(shape[0] == 1 for shape in seen) and sum(shape[1] for shape in seen) == batch["attention_mask"].sum()
    monkeypatch.setattr(packing, "packed_logps", lambda *args, **kwargs: None)
    _assert_same(packed, _loss_and_grads(algo, model, batch, rows))
