"""Every pair method (DPO and its loss types, RPO, SimPO, CPO, ORPO), the reward model and KTO score each
prompt once (engine/shared_prompts.py): their losses, metrics and gradients equal scoring the full rows, on a
tiny random-init Llama and Qwen2, with and without LoRA."""

from __future__ import annotations

import pytest
import torch

from engine.algorithms import build_algorithm
from engine.algorithms.base import Models
from engine.reference import Reference
from engine.shared_prompts import SHARED_PROMPT_KEYS, shared_prompt_logps
from engine.spec import build_spec

FAMILIES = ["Llama", "Qwen2"]
PAIR_METHODS = {
    "dpo": {},
    "cdpo": {"algorithm": "dpo", "label_smoothing": 0.1},
    "robust_dpo": {"algorithm": "dpo", "loss_type": "robust", "label_smoothing": 0.1},
    "hinge": {"algorithm": "dpo", "loss_type": "hinge"},
    "ipo": {"algorithm": "dpo", "loss_type": "ipo"},
    "rpo": {"algorithm": "dpo", "rpo_alpha": 1.0},
    "simpo": {},
    "cpo": {},
    "orpo": {},
    "rm": {},
}


def _tiny(family: str, head: str = "ForCausalLM", lora: bool = False, seed: int = 0) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}{head}")(config)
    if lora:
        import peft

        # init_lora_weights=False: random adapters, so they change what the model computes
        adapters = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        if head != "ForCausalLM":
            adapters.task_type = "SEQ_CLS"
        model = peft.get_peft_model(model, adapters)
    return model.train()


def _pairs() -> list[dict]:
    """Prompts of different lengths (left padding in the prompt pass), two pairs with the same prompt."""
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [5, 6, 7, 8, 9, 10], [13, 14, 15]]
    return [
        {
            "index": i,
            "prompt_ids": p,
            "chosen_ids": [20 + i, 30, 31][: 1 + i % 3],
            "rejected_ids": [40 + i, 41, 42, 43][: 4 - i],
        }
        for i, p in enumerate(prompts)
    ]


def _full_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch without its shared prompts: every row scored whole."""
    return {k: v for k, v in batch.items() if k not in SHARED_PROMPT_KEYS}


def _loss_and_grads(algo, model, batch, rows):
    model.zero_grad()
    loss, metrics = algo.loss(Models(policy=model, tokenizer=None, device=torch.device("cpu")), batch, rows)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def _assert_same(shared, full):
    (loss_s, metrics_s, grads_s), (loss_f, metrics_f, grads_f) = shared, full
    assert torch.allclose(loss_s, loss_f, atol=1e-5, rtol=1e-5)
    assert metrics_s.keys() == metrics_f.keys()
    for name, value in metrics_s.items():
        assert value == pytest.approx(metrics_f[name], abs=1e-4, rel=1e-4), name
    assert grads_s.keys() == grads_f.keys() and grads_s
    for name, grad in grads_s.items():
        assert torch.allclose(grad, grads_f[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(PAIR_METHODS))
def test_pair_losses_and_gradients_equal_the_full_rows(method, family, lora):
    settings = {"algorithm": method, **PAIR_METHODS[method]}
    algo = build_algorithm(build_spec(settings))
    rows = _pairs()
    batch = algo.collate(rows, 0)
    # chosen and rejected of each pair share its prompt; the first and third pairs' prompts are one
    assert batch["prompt_index"].tolist() == [0, 1, 0, 2, 0, 1, 0, 2]
    model = _tiny(family, "ForCausalLM" if method != "rm" else "ForSequenceClassification", lora)
    if algo.needs_reference:
        reference = Reference(model=_tiny(family, seed=1).eval())
        batch["ref_logps"] = reference.logps(batch)
        assert torch.allclose(batch["ref_logps"], reference.logps(_full_rows(batch)), atol=1e-5)
    if method == "rm":
        from engine.models import _shared_prompt_rewards

        assert _shared_prompt_rewards(model, batch) is not None  # the shared path is the one measured
    else:
        assert shared_prompt_logps(model, batch) is not None
    _assert_same(_loss_and_grads(algo, model, batch, rows), _loss_and_grads(algo, model, _full_rows(batch), rows))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kto_with_its_kl_rows_on_their_prompt_equals_the_full_rows(family, lora):
    algo = build_algorithm(build_spec({"algorithm": "kto"}))
    rows = [
        {"index": i, "prompt_ids": p, "completion_ids": c, "label": i % 2 == 0}
        for i, (p, c) in enumerate([([5, 6, 7, 8], [20, 21]), ([9, 10], [22]), ([11, 12, 13], [23, 24, 25])])
    ]
    algo.prepare_examples(rows, tokenizer=None)
    batch = algo.collate(rows, 0)
    assert batch["prompt_index"].tolist() == [0, 1, 2, 0, 1, 2]  # each KL row on its example's prompt
    batch["ref_logps"] = Reference(model=_tiny(family, seed=1).eval()).logps(batch)
    model = _tiny(family, lora=lora)
    assert shared_prompt_logps(model, batch, no_grad_from=3) is not None
    _assert_same(_loss_and_grads(algo, model, batch, rows), _loss_and_grads(algo, model, _full_rows(batch), rows))


def test_kl_rows_keep_no_graph_and_give_the_same_logps():
    """Rows from `no_grad_from` on are scored without gradient, on either path, with the log-probs of the rest."""
    from engine.batching import collate_shared_prompts
    from engine.shared_prompts import batch_logps

    model = _tiny("Llama")
    batch = collate_shared_prompts([[5, 6, 7], [8, 9]] * 2, [[20, 21], [22], [23], [24, 25, 26]], 0)
    whole = batch_logps(model, batch)
    for scored in (batch, _full_rows(batch)):
        out = batch_logps(model, scored, no_grad_from=2)
        assert torch.allclose(out.sums, whole.sums, atol=1e-5)
        assert out.sums.requires_grad
        # the KL rows add nothing to the gradient: it is the gradient of the first rows alone
        model.zero_grad()
        out.sums.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        batch_logps(model, scored).sums[:2].sum().backward()
        for got, expected in zip(grads, (p.grad for p in model.parameters())):
            assert torch.allclose(got, expected, atol=1e-6)
