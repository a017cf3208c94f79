"""Rows that share a prompt, scored with one pass of the model's body over that prompt.

A group of GRPO samples, a preference pair (chosen and rejected) and a KTO example with its
mismatched KL row all repeat one prompt. A causal model's prompt positions do not depend on what
follows them, so each distinct prompt goes through the body once (`run_prompts`), its keys and
values are gathered to the rows that use it, and the completions run on top through the KV cache
(`run_completions`). Log-probs and gradients are those of the full rows up to float rounding (each
row's gradient flows back through the gather into the one prompt computation, where the copies'
gradients were summed before); the body's work on prompts drops by the rows per prompt.

Whether this reproduces the full rows is checked once per model on a short probe
(`shares_prompts_exactly`); a model that fails it, or that cannot take the path at all (no chunked
head, activation checkpointing, a sharded model, a body that ignores the cache), is scored on full
rows, packed where the model allows it (engine/packing.py): `batch_logps` is the one entry point that
picks. Batches come from `engine.batching.collate_shared_prompts`, which also keeps the full rows for
that fallback.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.logprobs import CompletionLogps, chunked_head, chunked_head_logps, completion_logps, reduce_tokens
from engine.packing import full_rows_logps, full_rows_positions

SHARED_PROMPT_KEYS = ("prompt_ids", "prompt_mask", "prompt_index", "completion_ids", "completion_ids_mask")

# model -> whether its shared-prompt path reproduces its full rows (checked once per model).
_SHARES_PROMPTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class PromptStates:
    """The distinct prompts after one pass of the body: what their rows' completions attend to."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [G, kv heads, Lp, head dim] each
    last_hidden: torch.Tensor  # [G, H] each prompt's last hidden state (it predicts the first completion token)
    mask: torch.Tensor  # [G, Lp] the prompts' (left-padded) attention mask
    next_position: torch.Tensor  # [G, 1] the position id of each prompt's first completion token
    config: object  # the body's config, for caches of the same layer types


def _cache(config: object):
    from transformers import DynamicCache

    return DynamicCache(config=config) if config is not None else DynamicCache()


def run_prompts(body: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptStates | None:
    """The distinct (left-padded) prompts through the body once, keeping their keys and values. None when
    the body did not fill a plain cache (a model that ignores it, sliding-window or shared-KV layers)."""
    from transformers.cache_utils import DynamicLayer

    config = getattr(body, "config", None)
    cache = _cache(config)
    positions = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
    hidden = body(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state
    if cache.get_seq_length() != prompt_ids.shape[1] or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    return PromptStates(
        keys_values=[(layer.keys, layer.values) for layer in cache.layers],
        last_hidden=hidden[:, -1],
        mask=prompt_mask,
        next_position=positions[:, -1:] + 1,
        config=config,
    )


def run_completions(
    body: torch.nn.Module,
    prompts: PromptStates,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, Lc, H] the completions' hidden states, [B, H] their prompts' last hidden states): each row's
    prompt keys and values gathered to it (differentiably: its gradient flows back into the one prompt
    computation), then the right-padded completions through the body on top of them. Under no_grad
    (a KL row) nothing is kept for backward."""
    cache = _cache(prompts.config)
    for layer, (keys, values) in zip(cache.layers, prompts.keys_values):
        keys, values = keys.index_select(0, prompt_index), values.index_select(0, prompt_index)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    mask = torch.cat([prompts.mask.index_select(0, prompt_index), completion_mask.to(prompts.mask.dtype)], dim=1)
    steps = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    positions = prompts.next_position.index_select(0, prompt_index) + steps[None]
    hidden = body(
        input_ids=completion_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state
    return hidden, prompts.last_hidden.index_select(0, prompt_index)


def _predicting_hidden(body, prompts: PromptStates, index, ids, mask) -> torch.Tensor:
    """[B, Lc, H] the hidden states that predict each completion token: the prompt's last position
    predicts the first, completion position t the token t + 1."""
    hidden, prompt_last = run_completions(body, prompts, index, ids, mask)
    return torch.cat([prompt_last[:, None], hidden[:, :-1]], dim=1)


# ----------------------------------------------------------------------------- the probe


def _probe_batch(vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    from engine.batching import collate_shared_prompts

    prompts = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6], [5, 6]]  # two groups; the second is left-padded
    completions = [[7, 8, 9], [9, 8], [3], [4, 5, 6, 7]]
    vocab = max(2, vocab)
    batch = collate_shared_prompts(
        [[t % vocab for t in p] for p in prompts], [[t % vocab for t in c] for c in completions], 0
    )
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def shares_prompts_exactly(
    model: torch.nn.Module,
    vocab: int,
    shared: Callable[[dict[str, torch.Tensor]], torch.Tensor | None],
    full: Callable[[dict[str, torch.Tensor]], torch.Tensor],
) -> bool:
    """Whether `shared(batch)` (the shared-prompt path) gives `full(batch)` (the full rows) on a short probe,
    in eval mode and full precision; checked once per model, the answer cached."""
    if model in _SHARES_PROMPTS:
        return _SHARES_PROMPTS[model]
    parameter = next(model.parameters())
    batch = _probe_batch(vocab, parameter.device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(parameter.device.type, enabled=False):  # the comparison in full precision
            ours, theirs = shared(batch), full(batch)
    except Exception:  # noqa: BLE001 - a body that does not take a cache this way scores full rows
        ours, theirs = None, None
    finally:
        model.train(was_training)
    # A structurally wrong path is off by whole nats; low-precision weights round by up to ~1e-2.
    atol = 1e-4 if parameter.dtype == torch.float32 else 5e-2
    exact = ours is not None and ours.shape == theirs.shape and bool(torch.allclose(ours, theirs, rtol=1e-3, atol=atol))
    _SHARES_PROMPTS[model] = exact
    return exact


def _shared_prompt_head(model: torch.nn.Module):
    """The chunked head when the shared-prompt path reproduces `completion_logps` on `model`, else None."""
    head = chunked_head(model)
    if head is None or not head.callable_apart or getattr(head.decoder, "gradient_checkpointing", False):
        return None  # a sharded model scores full rows (its body runs inside its own forward)

    def shared(batch):
        prompts = run_prompts(head.decoder, batch["prompt_ids"], batch["prompt_mask"])
        if prompts is None:
            return None
        mask = batch["completion_ids_mask"].bool()
        hidden = _predicting_hidden(head.decoder, prompts, *(batch[k] for k in SHARED_PROMPT_KEYS[2:]))
        return chunked_head_logps(head, hidden[mask], batch["completion_ids"][mask])[0]

    def full(batch):
        return completion_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        ).token_logps

    return head if shares_prompts_exactly(model, head.vocab, shared, full) else None


# ----------------------------------------------------------------------------- log-probs


def shared_prompt_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    stats: bool = False,
    no_grad_from: int | None = None,
) -> CompletionLogps | None:
    """`completion_logps` of a `collate_shared_prompts` batch, each distinct prompt through the body once.

    Rows from `no_grad_from` on (KTO's KL rows, whose log-probs the loss detaches) run under no_grad on
    the prompts' detached keys and values: nothing of theirs is kept for backward. None when the batch has
    no shared prompt or the model does not take this path: the caller then scores the full rows.
    """
    if any(key not in batch for key in SHARED_PROMPT_KEYS):
        return None
    head = _shared_prompt_head(model)
    if head is None:
        return None
    prompt_ids, prompt_mask, prompt_index, completion_ids, completion_mask = (batch[k] for k in SHARED_PROMPT_KEYS)
    prompts = run_prompts(head.decoder, prompt_ids, prompt_mask)
    if prompts is None:
        return None
    scored = completion_mask.bool()
    if "completion_loss_mask" in batch:  # an episode's environment tokens: attended to as context, not scored
        scored = scored & batch["completion_loss_mask"].bool()
    rows = completion_ids.shape[0]
    split = rows if no_grad_from is None else max(0, min(no_grad_from, rows))
    parts = []  # (log-probs, argmax == target, entropy, mean logit) of the rows with gradient, then without
    for start, end, with_grad in ((0, split, True), (split, rows, False)):
        if start == end:
            continue
        index, ids, mask = prompt_index[start:end], completion_ids[start:end], completion_mask[start:end].bool()
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            states = prompts if with_grad else _detached(prompts)
            hidden = _predicting_hidden(head.decoder, states, index, ids, mask)
            keep = scored[start:end]
            parts.append(chunked_head_logps(head, hidden[keep], ids[keep], temperature, stats))
    token_logps, correct, entropy, logit_mean = (_cat([part[i] for part in parts]) for i in range(4))
    row_of = torch.arange(rows, device=completion_ids.device)[:, None].expand_as(scored)[scored]
    out = reduce_tokens(token_logps, row_of, rows, correct)
    out.token_entropy, out.token_logit_mean = entropy, logit_mean
    return out


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.cat(tensors)


def _detached(prompts: PromptStates) -> PromptStates:
    return PromptStates(
        keys_values=[(k.detach(), v.detach()) for k, v in prompts.keys_values],
        last_hidden=prompts.last_hidden.detach(),
        mask=prompts.mask,
        next_position=prompts.next_position,
        config=prompts.config,
    )


def batch_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    stats: bool = False,
    no_grad_from: int | None = None,
) -> CompletionLogps:
    """Completion log-probs of a batch's rows: each shared prompt once where the model allows it
    (`shared_prompt_logps`), else the full rows, packed where the model allows it (`full_rows_logps`). Rows from `no_grad_from` on are
    scored without gradient either way (they keep nothing for backward)."""
    out = shared_prompt_logps(model, batch, temperature, stats, no_grad_from)
    if out is not None:
        return out
    rows = batch["input_ids"].shape[0]
    if no_grad_from is None or no_grad_from >= rows:
        return full_rows_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], temperature, stats
        )
    with_grad = full_rows_logps(model, *_full_rows(batch, 0, no_grad_from), temperature, stats)
    with torch.no_grad():
        without = full_rows_logps(model, *_full_rows(batch, no_grad_from, rows), temperature, stats)
    return concat_rows(with_grad, without)


def shares_prompts(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether `batch_logps` scores this batch through its shared prompts."""
    return all(key in batch for key in SHARED_PROMPT_KEYS) and _shared_prompt_head(model) is not None


def batch_positions(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """The positions of its rows the body runs over when `batch_logps` scores `batch` (the denominator of
    `batch/pad_fraction`): the full rows' tokens alone where they are packed, every padded position
    otherwise (the shared-prompt path is counted on the full rows it stands for)."""
    if shares_prompts(model, batch):
        return batch["attention_mask"].numel()
    return full_rows_positions(model, batch["attention_mask"])


def _full_rows(batch: dict[str, torch.Tensor], start: int, end: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, completion_mask) of rows [start, end), cut to their own longest row."""
    width = int(batch["attention_mask"][start:end].sum(-1).max())
    return tuple(batch[k][start:end, :width] for k in ("input_ids", "attention_mask", "completion_mask"))


def concat_rows(first: CompletionLogps, second: CompletionLogps) -> CompletionLogps:
    """The rows of `first`, then those of `second`, as one result."""

    return CompletionLogps(
        sums=torch.cat([first.sums, second.sums]),
        counts=torch.cat([first.counts, second.counts]),
        token_logps=torch.cat([first.token_logps, second.token_logps]),
        token_rows=torch.cat([first.token_rows, second.token_rows + first.sums.shape[0]]),
        token_correct=torch.cat([first.token_correct, second.token_correct]),
        token_entropy=_cat([first.token_entropy, second.token_entropy]),
        token_logit_mean=_cat([first.token_logit_mean, second.token_logit_mean]),
    )
