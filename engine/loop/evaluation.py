"""Evaluation pieces both loops use: greedy answers checked by the verifier, reward on eval prompts,
a KL estimate to the reference, and reference-vs-policy sample comparisons."""

from __future__ import annotations

import contextlib

import torch

from engine.batching import collate_completions
from engine.generation import decode_completions, generate
from engine.logprobs import completion_logps
from engine.reference import Reference
from engine.rewards import exact_match
from engine.rollout import reward_columns


def exact_match_accuracy(
    model, tokenizer, examples: list[dict], *, max_new_tokens: int = 16, batch_size: int = 64, stop=None
) -> dict:
    """Greedy completions of `examples` (each with `prompt_ids` and `answer`) scored by exact match.

    Returns `{"accuracy": float, "completions": [str], "correct": [bool]}`.
    """
    ids = generate(
        model,
        tokenizer,
        [ex["prompt_ids"] for ex in examples],
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        stop=stop,
        batch_size=batch_size,
    )
    completions = decode_completions(tokenizer, ids)
    correct = [exact_match(c, ex["answer"]) == 1.0 for c, ex in zip(completions, examples)]
    accuracy = sum(correct) / len(correct) if correct else 0.0
    return {"accuracy": accuracy, "completions": completions, "correct": correct}


@torch.no_grad()
def estimate_kl(policy, reference: Reference, tokenizer, prompts: list[dict], spec, device) -> dict[str, float]:
    """KL(policy || reference) on policy samples: mean over sequences of sum_t k1, and of sum_t k3."""
    prompt_ids = [p["prompt_ids"] for p in prompts]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        completions = generate(
            policy, tokenizer, prompt_ids, max_new_tokens=spec.max_new_tokens, temperature=1.0, stop=spec.stop
        )
    eos = tokenizer.eos_token_id
    # A completion shorter than the limit stopped at EOS, which is part of what was sampled.
    completions = [c + [eos] if len(c) < spec.max_new_tokens else c for c in completions]
    keep = [i for i, c in enumerate(completions) if c]
    if not keep:
        return {}
    batch = collate_completions([prompt_ids[i] for i in keep], [completions[i] for i in keep], tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = policy.training
    policy.eval()
    pol = completion_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    policy.train(was_training)
    with reference.model() as ref:
        ref_out = completion_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    log_ratio = pol.token_logps - ref_out.token_logps
    k1 = torch.zeros_like(pol.sums).index_add(0, pol.token_rows, log_ratio)
    k3 = torch.zeros_like(pol.sums).index_add(0, pol.token_rows, torch.expm1(-log_ratio) + log_ratio)
    return {"kl/mean": k1.mean().item(), "kl/k3_mean": k3.mean().item()}


def reference_completions(
    policy, reference: Reference | None, tokenizer, prompts: list[dict], max_new_tokens: int
) -> list[str]:
    """Greedy completions of the reference (the policy itself when there is none) for sample comparisons."""
    if not prompts:
        return []
    ref_ctx = reference.model() if reference is not None else contextlib.nullcontext(policy)
    with ref_ctx as ref_model:
        return decode_completions(
            tokenizer, generate(ref_model, tokenizer, [p["prompt_ids"] for p in prompts], max_new_tokens=max_new_tokens)
        )


def sample_comparisons(policy, tokenizer, prompts: list[dict], reference_texts: list[str], spec) -> list[dict]:
    """Greedy policy completions beside the reference's, with verifier scores when answers exist."""
    ids = generate(
        policy, tokenizer, [p["prompt_ids"] for p in prompts], max_new_tokens=spec.max_new_tokens, stop=spec.stop
    )
    policy_texts = decode_completions(tokenizer, ids)
    rows = []
    for prompt, ref_text, pol_text in zip(prompts, reference_texts, policy_texts):
        row = {"prompt": prompt["prompt"], "reference": ref_text, "policy": pol_text, "answer": prompt.get("answer")}
        if prompt.get("answer") is not None:
            row["reference_score"] = exact_match(ref_text, prompt["answer"])
            row["policy_score"] = exact_match(pol_text, prompt["answer"])
        rows.append(row)
    return rows


@torch.no_grad()
def evaluate_prompts(policy, tokenizer, prompts: list[dict], with_reward: bool, reward, spec) -> dict[str, float]:
    """Greedy completions of the eval prompts: eval/exact_match where answers exist, eval/reward where the
    reward sources have what they need (`with_reward`), eval/length_mean."""
    if not prompts:
        return {}
    ids = generate(
        policy, tokenizer, [p["prompt_ids"] for p in prompts], max_new_tokens=spec.max_new_tokens, stop=spec.stop
    )
    texts = decode_completions(tokenizer, ids)
    # Scored as sampled completions are: a completion that stopped keeps its EOS (a reward model reads it).
    ids = [i + [tokenizer.eos_token_id] if len(i) < spec.max_new_tokens else i for i in ids]
    metrics = {"eval/length_mean": sum(len(i) for i in ids) / len(ids)}
    answered = [(t, p["answer"]) for t, p in zip(texts, prompts) if p.get("answer") is not None]
    if answered:
        metrics["eval/exact_match"] = sum(exact_match(t, a) for t, a in answered) / len(answered)
    if with_reward:
        result = reward.reward(
            [p["prompt"] for p in prompts], texts, [p["prompt_ids"] for p in prompts], ids, reward_columns(prompts)
        )
        metrics["eval/reward"] = sum(result.total) / len(result.total)
    return metrics
