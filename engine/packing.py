"""Padding-free batches: right-padded rows scored with their sequences packed end to end, no padding in the body.

A right-padded batch runs the body over every padded position; with rows whose lengths vary tenfold that is
about half the positions. `packed_logps` instead lays the rows' sequences end to end in packed rows, each
sequence's position ids restarting at 0, and runs the body once per packed row with no attention mask at
all: transformers (5.x) reads restarting position ids as packed sequences and keeps attention within each
one (a block-diagonal causal mask for sdpa and eager, variable-length kernels for flash attention). That
is the portable choice: a custom 4-D mask would need a dtype and convention per attention implementation
and does not reach flash attention at all. Log-probs and gradients are those of the padded rows up to
float rounding.

Packed rows hold at most as many tokens as the batch's longest sequence (first-fit decreasing), so a
packed row's attention never costs more than a padded row's: a dense block-diagonal mask over the whole
batch in one row would make the attention quadratic in the batch's tokens. Rows of different lengths
cannot share a tensor without padding, so each packed row is its own pass of the body.

Whether the body keeps packed sequences apart is checked once per model on a short probe
(`packs_exactly`). A model that fails it (a body that builds its own mask from position 0 only, older
transformers), one without the chunked head (a sharded model, a wrapper), or a batch without padding or
not right-padded is scored padded (`completion_logps`): `full_rows_logps` is the one entry point that picks.
"""

from __future__ import annotations

import weakref

import torch

from engine.logprobs import (
    CompletionLogps,
    _gather_completion,
    chunked_head,
    chunked_head_logps,
    completion_logps,
    reduce_tokens,
)

# model -> whether packed sequences give its padded rows' log-probs (checked once per model).
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into packed rows of at most `capacity` tokens, first-fit decreasing (longest
    first, each into the first packed row it fits); rows of no tokens are left out."""
    packed: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if lengths[row] == 0:
            continue
        slot = next((i for i, free in enumerate(room) if free >= lengths[row]), None)
        if slot is None:
            packed.append([])
            room.append(capacity)
            slot = len(packed) - 1
        packed[slot].append(row)
        room[slot] -= lengths[row]
    return packed


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Each row's length when every row is its tokens then padding (what `collate_completions` builds), else
    None: a left-padded row's positions would not start at 0 in the padded path, so it is not packed."""
    lengths = attention_mask.sum(-1)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), columns[None] < lengths[:, None]):
        return None
    return lengths.tolist()


def _packed_hidden(
    decoder: torch.nn.Module, input_ids: torch.Tensor, lengths: list[int]
) -> tuple[torch.Tensor, list[int]]:
    """([sum of lengths, H] the body's hidden states of every row's tokens, packed row after packed row;
    [B] where each row's first token is in it)."""
    width = input_ids.shape[1]
    starts, hidden, offset = [0] * len(lengths), [], 0
    for rows in pack_rows(lengths, max(lengths)):
        flat, positions = [], []
        for row in rows:
            starts[row] = offset + len(flat)
            flat += range(row * width, row * width + lengths[row])
            positions += range(lengths[row])
        ids = input_ids.reshape(-1)[torch.tensor(flat, device=input_ids.device)]
        position_ids = torch.tensor(positions, device=input_ids.device)
        # No attention mask: the restarting position ids are what keeps each sequence to itself.
        out = decoder(input_ids=ids[None], position_ids=position_ids[None], use_cache=False)
        hidden.append(out.last_hidden_state[0])
        offset += len(flat)
    return torch.cat(hidden), starts


def _logps(head, input_ids, completion_mask, lengths: list[int], temperature: float, stats: bool) -> CompletionLogps:
    target_mask, targets, rows = _gather_completion(input_ids, completion_mask)
    hidden, starts = _packed_hidden(head.decoder, input_ids, lengths)
    # The hidden state at column t of a row predicts its token t + 1: the same tokens, in the same
    # (row-major) order, as the padded path's hidden[:, :-1][target_mask].
    target_rows, target_columns = target_mask.nonzero(as_tuple=True)
    source = torch.tensor(starts, device=hidden.device)[target_rows] + target_columns
    token_logps, correct, entropy, logit_mean = chunked_head_logps(
        head, hidden.index_select(0, source), targets, temperature, stats
    )
    out = reduce_tokens(token_logps, rows, input_ids.shape[0], correct)
    out.token_entropy, out.token_logit_mean = entropy, logit_mean
    return out


@torch.no_grad()
def packs_exactly(model: torch.nn.Module) -> bool:
    """Whether packed sequences give `model` its padded rows' log-probs, on a short probe (in eval mode and
    full precision; checked once per model, the answer cached)."""
    if model in _PACKS:
        return _PACKS[model]
    from engine.batching import collate_completions

    head = chunked_head(model)
    if head is None or head.vocab < 2 or not head.callable_apart:  # a sharded model is scored padded
        _PACKS[model] = False
        return False
    parameter = next(model.parameters())
    # Lengths 6, 2 and 3: the third and second rows share a packed row, where a leak between them would show.
    prompts, completions = [[1, 2, 3], [4], [5, 6]], [[7, 8, 9], [3], [2]]
    probe = collate_completions(
        [[t % head.vocab for t in p] for p in prompts], [[t % head.vocab for t in c] for c in completions], 0
    )
    probe = {k: v.to(parameter.device) for k, v in probe.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(parameter.device.type, enabled=False):  # the comparison in full precision
            lengths = probe["attention_mask"].sum(-1).tolist()
            ours = _logps(head, probe["input_ids"], probe["completion_mask"], lengths, 1.0, False).token_logps
            theirs = completion_logps(model, **probe).token_logps
    except Exception:  # noqa: BLE001 - a body that does not take position ids this way is scored padded
        ours, theirs = None, None
    finally:
        model.train(was_training)
    # A leak between sequences is off by whole nats; low-precision weights round by up to ~1e-2.
    atol = 1e-4 if parameter.dtype == torch.float32 else 5e-2
    exact = ours is not None and ours.shape == theirs.shape and bool(torch.allclose(ours, theirs, rtol=1e-3, atol=atol))
    _PACKS[model] = exact
    return exact


def _packable_lengths(model: torch.nn.Module, attention_mask: torch.Tensor) -> list[int] | None:
    """The rows' lengths when `full_rows_logps` packs them: the batch has padding to remove, is right-padded,
    and the model keeps packed sequences apart. None when the rows are scored padded."""
    if attention_mask.shape[0] < 2 or bool(attention_mask.all()):
        return None  # nothing to remove: one padded pass is the cheaper one
    lengths = right_padded_lengths(attention_mask)
    if lengths is None or not packs_exactly(model):
        return None
    return lengths


def packed_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    stats: bool = False,
) -> CompletionLogps | None:
    """`completion_logps` of right-padded rows with their sequences packed (no padding in the body); None
    when the rows are not packed (see `_packable_lengths`): the caller then scores them padded."""
    lengths = _packable_lengths(model, attention_mask)
    if lengths is None:
        return None
    return _logps(chunked_head(model), input_ids, completion_mask, lengths, temperature, stats)


def full_rows_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    stats: bool = False,
) -> CompletionLogps:
    """Completion log-probs of right-padded rows: packed where the model and the batch allow it
    (`packed_logps`), else padded (`completion_logps`)."""
    out = packed_logps(model, input_ids, attention_mask, completion_mask, temperature, stats)
    if out is not None:
        return out
    return completion_logps(model, input_ids, attention_mask, completion_mask, temperature, stats)


def full_rows_positions(model: torch.nn.Module, attention_mask: torch.Tensor) -> int:
    """Positions the body runs over when `full_rows_logps` scores these rows (the denominator of
    `batch/pad_fraction`): their tokens alone when packed, every padded position otherwise."""
    if _packable_lengths(model, attention_mask) is not None:
        return int(attention_mask.sum())
    return attention_mask.numel()
