"""Rollouts for the online methods: sample k completions per prompt, then score them.

Sampling is batched: the prompts of a step, each repeated k times so a prompt's samples sit in
consecutive rows (a "group"), are left-padded together and decoded in one `generate` call with
the KV cache on; position ids follow the attention mask, so padding never shifts a prompt.
A completion keeps its EOS when it stopped (the EOS is an action the policy took and is scored
like any other token); one that ran into `max_new_tokens` has none and is marked truncated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig

from engine.batching import left_pad
from engine.generation import _eos_ids


@dataclass
class Rollout:
    """k samples for each of a step's prompts, flattened: rows g*k .. g*k+k-1 share prompt g."""

    examples: list[dict]  # the prompt example of each row (repeated k times)
    completion_ids: list[list[int]]  # sampled tokens, ending with EOS unless truncated
    texts: list[str]  # completions decoded without special tokens
    truncated: list[bool]  # hit max_new_tokens without EOS
    group_size: int
    seconds: float = 0.0
    rewards: torch.Tensor | None = None  # [N] total reward after penalties (set by `score_rollout`)
    components: dict[str, list[float]] = field(default_factory=dict)  # each reward source's raw scores

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [ex["prompt_ids"] for ex in self.examples]

    @property
    def prompts(self) -> list[str]:
        return [ex["prompt"] for ex in self.examples]

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    def columns(self) -> dict[str, list]:
        return reward_columns(self.examples)


def merge_rollouts(parts: list[Rollout]) -> Rollout:
    """The ranks' rollouts of one data-parallel step joined in rank order (each rank sampled and scored
    its shard of the step's prompts), so every batch statistic is computed over the whole step."""
    if len(parts) == 1:
        return parts[0]
    filled = [part for part in parts if part.examples]
    rewards = [part.rewards for part in filled]
    names = filled[0].components if filled else {}
    return Rollout(
        examples=[ex for part in filled for ex in part.examples],
        completion_ids=[ids for part in filled for ids in part.completion_ids],
        texts=[text for part in filled for text in part.texts],
        truncated=[t for part in filled for t in part.truncated],
        group_size=parts[0].group_size,
        seconds=max(part.seconds for part in parts),
        rewards=torch.cat(rewards) if rewards and all(r is not None for r in rewards) else None,
        components={name: [v for part in filled for v in part.components[name]] for name in names},
    )


def reward_columns(examples: list[dict]) -> dict[str, list]:
    """Dataset columns reward functions may use (`answer`, `safety`, the prompt's `messages`), one value per row."""
    return {
        name: [ex.get(name) for ex in examples]
        for name in ("answer", "safety", "messages")
        if any(ex.get(name) is not None for ex in examples)
    }


def _sampling_config(
    tokenizer, eos: list[int], max_new_tokens: int, temperature: float, top_p: float
) -> GenerationConfig:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # top_k=0, not None: None lets transformers fall back to top-k 50, and the update would then score
    # tokens under a distribution they were not sampled from.
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        pad_token_id=pad_id,
        eos_token_id=eos,
        use_cache=True,
    )


def _split_at_eos(row: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """(tokens up to and including the first EOS, truncated?)"""
    for i, tok in enumerate(row):
        if tok in eos:
            return row[: i + 1], False
    return row, True


def _repeat_rows(states: torch.Tensor, k: int) -> torch.Tensor:
    """[batch, heads, seq, dim] cached keys or values -> each row k times, in the memory layout they came in.

    Attention projections leave keys as a transposed view ([batch, seq, heads, dim] in memory); each
    decoding step concatenates the new token's keys onto the cache, and a cache made contiguous by a plain
    `repeat_interleave` no longer matches that layout, which made the concatenation 2-3x slower (profiled:
    most of a 64-token rollout's extra time).
    """
    if states.transpose(1, 2).is_contiguous():
        return states.transpose(1, 2).repeat_interleave(k, dim=0).transpose(1, 2)
    return states.repeat_interleave(k, dim=0)


@torch.no_grad()
def generate_groups(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, config: GenerationConfig
) -> torch.Tensor:
    """k samples of each left-padded prompt row, in rows g*k .. g*k+k-1: `generate`'s output sequences.

    A group's k samples share their prompt, so the prompt is run through the model once per group,
    not k times: all but its last token fill a KV cache that is then repeated k times, and `generate`
    continues from it (it feeds the last prompt token, then samples). Prefill is most of a rollout's
    work when prompts are long and completions short; this divides it by k. Position ids follow the
    attention mask as `generate`'s own do, so the cache holds what `generate` would have computed.
    """
    ids, mask = input_ids.repeat_interleave(k, dim=0), attention_mask.repeat_interleave(k, dim=0)
    if k == 1 or input_ids.shape[1] < 2:
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=False)
    prefix_mask = attention_mask[:, :-1]
    positions = (prefix_mask.long().cumsum(-1) - 1).masked_fill(prefix_mask == 0, 1)
    cache = DynamicCache(config=model.config)
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=prefix_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,  # the prefix's logits are never used
    )
    for layer in cache.layers:
        layer.keys, layer.values = _repeat_rows(layer.keys, k), _repeat_rows(layer.values, k)
    # synced_gpus=False: a sharded model generates inside full_weights, with no collective per token
    return model.generate(input_ids=ids, attention_mask=mask, cache=cache, generation_config=config, synced_gpus=False)


@torch.no_grad()
def sample_rollout(
    model,
    tokenizer,
    examples: list[dict],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    batch_size: int = 256,
) -> Rollout:
    """k samples per example (`prompt_ids`), drawn from the global torch RNG in chunks of about `batch_size` rows."""
    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("sampling needs an EOS token: neither the tokenizer nor the generation config names one")
    config = _sampling_config(tokenizer, eos, max_new_tokens, temperature, top_p)
    eos_set = set(eos)
    rows = [ex for ex in examples for _ in range(k)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    started = time.time()
    completions: list[list[int]] = []
    truncated: list[bool] = []
    per_chunk = max(1, batch_size // k)  # whole groups per generate call
    try:
        for start in range(0, len(examples), per_chunk):
            prompts = [ex["prompt_ids"] for ex in examples[start : start + per_chunk]]
            input_ids, attention_mask = left_pad(prompts, config.pad_token_id)
            sequences = generate_groups(model, input_ids.to(device), attention_mask.to(device), k, config)
            for new in sequences[:, input_ids.shape[1] :].tolist():
                ids, cut = _split_at_eos(new, eos_set)
                completions.append(ids)
                truncated.append(cut)
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    return Rollout(rows, completions, texts, truncated, k, seconds=time.time() - started)


def score_rollout(rollout: Rollout, reward, missing_eos_penalty: float = 0.0) -> None:
    """Fill `rollout.rewards` (total, minus `missing_eos_penalty` on truncated samples) and its components."""
    result = reward.reward(
        rollout.prompts, rollout.texts, rollout.prompt_ids, rollout.completion_ids, rollout.columns()
    )
    total = torch.tensor(result.total, dtype=torch.float32)
    if missing_eos_penalty:
        total = total - missing_eos_penalty * torch.tensor(rollout.truncated, dtype=torch.float32)
    rollout.rewards = total
    rollout.components = result.components
