"""Completion-only log-probs equal the naive full-logits path, and the LM head sees completion rows only."""

from __future__ import annotations

import pytest
import torch

from engine.batching import collate_completions, collate_preference, left_pad
from engine.logprobs import chunked_head, chunked_head_logps, completion_logps, full_logits_logps, model_forward_logps


def _tiny(family: str, **post_processing):
    """A tiny random-init causal LM of `family`, with the family's logit post-processing settings."""
    import transformers

    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}ForCausalLM")
    config = config_class(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        **post_processing,
    )
    torch.manual_seed(0)
    return model_class(config).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny("Llama")


def batch():
    return collate_completions([[5, 6, 7, 8], [9], [10, 11]], [[12, 13], [14, 15, 16, 17, 18], [19]], pad_id=0)


def test_matches_full_logits_path_with_padding(model):
    b = batch()
    fast = completion_logps(model, **b)
    naive = full_logits_logps(model, **b)
    assert fast.counts.tolist() == [2, 5, 1]
    assert torch.allclose(fast.sums, naive.sums, atol=1e-5)
    assert torch.allclose(fast.means, naive.sums / torch.tensor([2.0, 5.0, 1.0]), atol=1e-5)
    # and against a hand-written per-row loop over the unpadded sequences
    for row, (prompt, completion) in enumerate(
        [([5, 6, 7, 8], [12, 13]), ([9], [14, 15, 16, 17, 18]), ([10, 11], [19])]
    ):
        ids = torch.tensor([prompt + completion])
        logps = model(ids).logits[0, :-1].log_softmax(-1)
        expected = sum(logps[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion))
        assert fast.sums[row].item() == pytest.approx(expected, abs=1e-4)


def test_temperature_divides_logits(model):
    b = batch()
    assert torch.allclose(
        completion_logps(model, **b, temperature=0.7).sums,
        full_logits_logps(model, **b, temperature=0.7).sums,
        atol=1e-5,
    )


def test_lm_head_only_sees_completion_positions(model):
    completion_logps(model, **batch())  # the first call also checks the head on a short probe
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    try:
        completion_logps(model, **batch())
    finally:
        handle.remove()
    assert seen == [(8, 32)]  # 2 + 5 + 1 completion tokens, never [batch, seq, vocab]


def test_gradients_match_the_naive_path(model):
    b = batch()
    grads = []
    for fn in (completion_logps, full_logits_logps):
        model.zero_grad()
        fn(model, **b).sums.sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_preference_collation_puts_chosen_then_rejected():
    examples = [
        {"index": 0, "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
        {"index": 1, "prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9]},
    ]
    b = collate_preference(examples, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [6, 7, 8, 0], [1, 2, 4, 5], [6, 9, 0, 0]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    ids, mask = left_pad([[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]


def test_token_entropy_matches_hand_values_in_any_chunking(monkeypatch):
    import math

    import engine.logprobs as logprobs

    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]])
    expected = [math.log(4), math.log(2), 0.0, -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))]
    log_probs = probs.log()  # zeros become -inf: p log p must count as 0, not NaN
    assert logprobs.token_entropy(log_probs).tolist() == pytest.approx(expected, abs=1e-6)
    monkeypatch.setattr(logprobs, "ENTROPY_CHUNK_ELEMENTS", 5)  # one row at a time
    assert logprobs.token_entropy(log_probs).tolist() == pytest.approx(expected, abs=1e-6)


def test_stats_match_the_full_logits_path_and_change_nothing_else(model):
    b = batch()
    fast = completion_logps(model, **b, stats=True)
    naive = full_logits_logps(model, **b, stats=True)
    plain = completion_logps(model, **b)
    assert plain.token_entropy is None and plain.token_logit_mean is None
    assert torch.equal(fast.sums, plain.sums) and torch.equal(fast.token_correct, plain.token_correct)
    assert torch.allclose(fast.token_entropy, naive.token_entropy, atol=1e-5)
    assert torch.allclose(fast.token_logit_mean, naive.token_logit_mean, atol=1e-5)
    assert not fast.token_entropy.requires_grad and not fast.token_logit_mean.requires_grad
    # by hand for the first completion token of row 0 (prompt [5, 6, 7, 8] -> predicted at position 3)
    logits = model(torch.tensor([[5, 6, 7, 8, 12, 13]])).logits[0, 3].float()
    assert fast.token_logit_mean[0].item() == pytest.approx(logits.mean().item(), abs=1e-5)
    p = logits.softmax(-1)
    assert fast.token_entropy[0].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
    # stats follow the temperature
    hot = completion_logps(model, **b, temperature=0.5, stats=True)
    assert torch.allclose(hot.token_logit_mean, fast.token_logit_mean / 0.5, atol=1e-5)
    assert torch.allclose(
        hot.token_entropy, full_logits_logps(model, **b, temperature=0.5, stats=True).token_entropy, atol=1e-5
    )
    assert fast.row_sums(torch.ones_like(fast.token_logps)).tolist() == [2.0, 5.0, 1.0]


# Every family with its own logit post-processing in transformers, each at a setting that changes the logits.
ARCHITECTURES = {
    "llama": ("Llama", {}),
    "qwen2": ("Qwen2", {}),
    "gemma2-softcap": ("Gemma2", {"final_logit_softcapping": 0.5}),
    "granite-scale-1": ("Granite", {"logits_scaling": 1.0}),
    "granite-scale-8": ("Granite", {"logits_scaling": 8.0}),
    "cohere-scale-1": ("Cohere", {"logit_scale": 1.0}),
    "cohere-scale-0.125": ("Cohere", {"logit_scale": 0.125}),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logps_equal_the_models_own_log_softmax(name):
    family, post_processing = ARCHITECTURES[name]
    model = _tiny(family, **post_processing)
    b = batch()
    for temperature in (1.0, 0.7):
        got = completion_logps(model, **b, temperature=temperature, stats=True)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        own = (logits / temperature).log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
        target_mask = b["completion_mask"][:, 1:].bool()
        assert torch.allclose(got.token_logps, own[target_mask], atol=1e-5), name
        assert torch.equal(got.token_correct, logits.argmax(-1)[target_mask] == b["input_ids"][:, 1:][target_mask])
        assert torch.allclose(got.token_logit_mean, (logits / temperature)[target_mask].mean(-1), atol=1e-5)


@pytest.mark.parametrize(
    ("family", "setting", "values"),
    [("Granite", "logits_scaling", (1.0, 8.0)), ("Cohere", "logit_scale", (1.0, 0.125))],
)
def test_logit_scaling_changes_cherrys_logps(family, setting, values):
    # Same weights, only the scale differs: the models' log-probs differ, so Cherry's must too.
    plain, scaled = (completion_logps(_tiny(family, **{setting: v}), **batch()).sums for v in values)
    assert not torch.allclose(plain, scaled, atol=1e-3)


class _NoLogitsToKeep(torch.nn.Module):
    """A model whose forward predates logits_to_keep (as some remote-code models do)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_a_forward_without_logits_to_keep_still_gets_its_own_logits(model):
    b = batch()
    assert torch.allclose(
        completion_logps(_NoLogitsToKeep(model), **b).sums, full_logits_logps(model, **b).sums, atol=1e-5
    )


# The chunked head against the model's own forward: every family above, tied embeddings too.
CHUNKED = {**ARCHITECTURES, "llama-tied": ("Llama", {"tie_word_embeddings": True})}


def _grads(model, fn, b, temperature):
    """(token log-probs, stats, gradients w.r.t. every parameter and w.r.t. the input embeddings)."""
    model.zero_grad()
    embeddings = model.get_input_embeddings()
    captured = []

    def keep(module, inputs, out):
        out.retain_grad()
        captured.append(out)

    handle = embeddings.register_forward_hook(keep)
    try:
        out = fn(model, **b, temperature=temperature, stats=True)
        # a loss that weights tokens differently, so row and token mix-ups show
        (out.token_logps * torch.linspace(0.5, 2.0, out.token_logps.shape[0])).sum().backward()
    finally:
        handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads, captured[-1].grad.clone()


@pytest.mark.parametrize("name", list(CHUNKED))
@pytest.mark.parametrize(
    ("chunk_rows", "kept_rows"),
    [(1, 0), (3, 0), (3, 4), (1000, 1000)],  # all recomputed in backward, some chunks' graphs kept, all kept
)
def test_chunked_head_equals_the_models_own_forward_values_and_gradients(name, chunk_rows, kept_rows, monkeypatch):
    import engine.logprobs as logprobs

    family, post_processing = CHUNKED[name]
    model = _tiny(family, **post_processing)
    assert chunked_head(model) is not None, f"{name}: the chunked head does not reproduce the model's logits"
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 97 * chunk_rows)
    monkeypatch.setattr(logprobs, "HEAD_KEEP_ELEMENTS", 97 * kept_rows)
    b = batch()
    for temperature in (1.0, 0.7):
        new, new_grads, new_input_grad = _grads(model, completion_logps, b, temperature)
        old, old_grads, old_input_grad = _grads(model, model_forward_logps, b, temperature)
        assert torch.allclose(new.token_logps, old.token_logps, atol=1e-6), name
        assert torch.equal(new.token_correct, old.token_correct)
        assert torch.allclose(new.token_entropy, old.token_entropy, atol=1e-6)
        assert torch.allclose(new.token_logit_mean, old.token_logit_mean, atol=1e-6)
        assert new_grads.keys() == old_grads.keys() and len(new_grads) == len(list(model.parameters()))
        for param, grad in old_grads.items():
            # 1e-5: a tied embedding's gradient sums the head's and the lookup's parts in another order
            difference = (new_grads[param] - grad).abs().max()
            assert torch.allclose(new_grads[param], grad, atol=1e-5, rtol=1e-5), (name, param, difference)
        assert torch.allclose(new_input_grad, old_input_grad, atol=1e-6, rtol=1e-5), name


def test_a_model_with_unknown_logit_post_processing_takes_its_own_forward():
    import transformers

    class DoubledLogits(
        transformers.LlamaForCausalLM
    ):  # a family whose forward scales logits in a way Cherry does not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    base = _tiny("Llama")
    model = DoubledLogits(base.config).eval()
    model.load_state_dict(base.state_dict())
    assert chunked_head(model) is None
    b = batch()
    with torch.no_grad():
        own = (model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]).log_softmax(-1)
    own = own.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)[b["completion_mask"][:, 1:].bool()]
    assert torch.allclose(completion_logps(model, **b).token_logps, own, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_head_under_bf16_autocast_matches_the_models_own_forward(model, recompute, monkeypatch):
    import engine.logprobs as logprobs

    if recompute:  # 2-row chunks, none kept: backward recomputes every chunk under the forward's autocast
        monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 97 * 2)
        monkeypatch.setattr(logprobs, "HEAD_KEEP_ELEMENTS", 0)
    b = batch()
    results = []
    for fn in (completion_logps, model_forward_logps):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(model, **b)
        out.sums.sum().backward()
        results.append((out.token_logps.detach(), model.lm_head.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    # Recomputed chunks sum per-chunk bf16 weight gradients in fp32: equal to bf16's own precision.
    tolerance = {"atol": 2e-3, "rtol": 2e-2} if recompute else {"atol": 1e-6, "rtol": 1e-5}
    assert torch.allclose(results[0][1], results[1][1], **tolerance)


def _peak_measures(forward) -> tuple[int, int]:
    """The most elements of any one tensor an op creates in forward() and the backward of what it
    returns, and the elements the forward saves for backward (parameters left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    largest, saved = [0], [0]

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t):
                    largest[0] = max(largest[0], t.numel())
            return out

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[0] += t.numel()
        return t

    with Largest():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        loss.backward()
    return largest[0], saved[0]


def test_lm_head_peak_does_not_grow_with_completion_length(monkeypatch):
    import engine.logprobs as logprobs

    vocab, width = 512, 8
    head_module = torch.nn.Linear(width, vocab, bias=False)
    head = logprobs._Head(decoder=torch.nn.Identity(), module=head_module, post=[], vocab=vocab)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 16 * vocab)
    monkeypatch.setattr(logprobs, "HEAD_KEEP_ELEMENTS", 32 * vocab)  # two chunks' graphs kept

    def run(path: str, tokens: int) -> tuple[int, int]:
        hidden = torch.randn(tokens, width, requires_grad=True)
        targets = torch.randint(0, vocab, (tokens,))

        def forward():
            if path == "chunked":
                token_logps = chunked_head_logps(head, hidden, targets, stats=True)[0]
            else:  # what the model-forward path does with the head's output
                token_logps = head_module(hidden).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
            return token_logps.sum()

        largest, saved = _peak_measures(forward)
        return largest, saved - tokens * (width + 1)  # less the hidden states and targets, which are O(tokens)

    # Chunked: the largest tensor is one chunk's logits (16 rows), and what is kept for backward
    # beyond the hidden states is the same, at 64 and at 1024 tokens alike.
    assert run("chunked", 64) == run("chunked", 1024)
    assert run("chunked", 1024)[0] == 16 * vocab
    # The measures see the [tokens, vocab] logits of the unchunked head, which grow with the tokens.
    full_64, full_1024 = run("full", 64), run("full", 1024)
    assert full_1024[0] == 1024 * vocab > full_64[0] and full_1024[1] > 1024 * vocab > full_64[1]


def test_a_lora_model_takes_the_chunked_head_with_and_without_its_adapter():
    import peft

    model = peft.get_peft_model(_tiny("Llama"), peft.LoraConfig(r=4, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, so that disabling it changes the log-probs
            torch.nn.init.normal_(param, std=0.1)
    assert chunked_head(model) is not None
    b = batch()
    with_adapter = completion_logps(model, **b).sums
    assert torch.allclose(with_adapter, model_forward_logps(model, **b).sums, atol=1e-6)
    with model.disable_adapter():  # the reference under LoRA
        without = completion_logps(model, **b).sums
        assert torch.allclose(without, model_forward_logps(model, **b).sums, atol=1e-6)
    assert not torch.allclose(with_adapter, without, atol=1e-3)


def test_a_biased_linear_head_gets_the_same_gradients_from_the_in_place_backward(monkeypatch):
    import engine.logprobs as logprobs

    torch.manual_seed(0)
    module = torch.nn.Linear(8, 50, bias=True)
    head = logprobs._Head(decoder=torch.nn.Identity(), module=module, post=[lambda x: x * 0.5], vocab=50)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 3 * 50)
    monkeypatch.setattr(logprobs, "HEAD_KEEP_ELEMENTS", 0)  # every chunk recomputed in backward
    hidden, targets, weights = torch.randn(10, 8, requires_grad=True), torch.randint(0, 50, (10,)), torch.rand(10)
    results = []
    for path in ("chunked", "autograd"):
        module.zero_grad()
        hidden.grad = None
        if path == "chunked":
            token_logps = chunked_head_logps(head, hidden, targets, temperature=0.7)[0]
        else:
            logits = (module(hidden) * 0.5).float() / 0.7
            token_logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        (token_logps * weights).sum().backward()
        results.append(
            (token_logps.detach(), hidden.grad.clone(), module.weight.grad.clone(), module.bias.grad.clone())
        )
    for got, expected in zip(*results):
        assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- shared prompts (online groups)


def _group_rows():
    """Two groups of samples (one prompt each, the second shorter: left padding) and a lone prompt."""
    prompts = [[5, 6, 7, 8]] * 3 + [[9, 10]] * 2 + [[11, 12, 13]]
    completions = [[12, 13], [14, 15, 16, 17, 18], [19], [20, 21, 22], [23], [24, 25]]
    return prompts, completions


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_shared_prompts_give_the_full_rows_logps_and_gradients(family):
    from engine.batching import collate_shared_prompts
    from engine.shared_prompts import shared_prompt_logps

    model = _tiny(family).train()
    prompts, completions = _group_rows()
    b = collate_shared_prompts(prompts, completions, pad_id=0)
    assert b["prompt_ids"].shape[0] == 3 and b["prompt_index"].tolist() == [0, 0, 0, 1, 1, 2]
    weights = torch.linspace(-1.0, 2.0, 14)  # a loss that weighs every token differently

    shared = shared_prompt_logps(model, b, temperature=0.7, stats=True)
    assert shared is not None
    (shared.token_logps * weights).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = completion_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], 0.7, stats=True)
    (full.token_logps * weights).sum().backward()

    assert torch.equal(shared.token_rows, full.token_rows) and torch.equal(shared.counts, full.counts)
    assert torch.allclose(shared.token_logps, full.token_logps, atol=1e-5)
    assert torch.allclose(shared.token_entropy, full.token_entropy, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(shared_grads[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_rows_without_a_shared_prompt_take_the_full_rows_path(model):
    from engine.batching import collate_shared_prompts
    from engine.shared_prompts import shared_prompt_logps

    b = collate_shared_prompts([[5, 6], [7, 8]], [[9], [10]], pad_id=0)
    assert "prompt_index" not in b and shared_prompt_logps(model, b) is None


def test_a_body_that_ignores_the_cache_is_not_given_shared_prompts(model, monkeypatch):
    """Activation checkpointing switches the cache off in training: the full rows are scored instead."""
    from engine.batching import collate_shared_prompts
    from engine.shared_prompts import shared_prompt_logps

    b = collate_shared_prompts(*_group_rows(), pad_id=0)
    monkeypatch.setattr(model.model, "gradient_checkpointing", True, raising=False)
    assert shared_prompt_logps(model, b) is None
