"""Batched generation for evaluation and sample comparisons.

Prompts are left-padded and passed with their attention mask, so every row's last prompt token
sits in the final column and the model's generate loop (KV cache on) derives positions from the
mask. Completions are returned as token ids cut before the first EOS.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from engine.batching import left_pad


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if value is None:
            continue
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i not in ids:
                ids.append(int(i))
    return ids


def _cut(row: list[int], eos: set[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos:
            return row[:i]
    return row


def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: list[str] | None = None,
    batch_size: int = 64,
) -> list[list[int]]:
    """Completion token ids for each prompt (greedy when temperature is 0), cut before the first EOS; a
    completion also ends at a stop string (`stop`, kept in its text).

    Sampling draws from the whole distribution (`top_k` 0) unless `top_k` > 0 keeps only the k most likely tokens.

    Sampling draws from the global torch RNG: seed it (`torch.manual_seed`) for reproducible samples.
    """
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate: every prompt needs at least one token")
    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("generate: neither the tokenizer nor the model's generation config names an EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=top_k if sample else None,  # 0, not None: None means transformers' default top-k 50
        pad_token_id=pad_id,
        eos_token_id=eos,
        stop_strings=list(stop) if stop else None,
        use_cache=True,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos_set = set(eos)
    out: list[list[int]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompt_ids), batch_size):
                chunk = prompt_ids[start : start + batch_size]
                input_ids, attention_mask = left_pad(chunk, pad_id)
                sequences = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    tokenizer=tokenizer if stop else None,  # generate matches stop strings through it
                    synced_gpus=False,  # a sharded model generates inside full_weights: no collective per token
                )
                new = sequences[:, input_ids.shape[1] :].tolist()
                out.extend(_cut(row, eos_set) for row in new)
    finally:
        model.train(was_training)
    return out


def decode_completions(tokenizer, ids_list: list[list[int]]) -> list[str]:
    """Completion texts, special tokens skipped."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in ids_list]
