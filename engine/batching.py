"""Turn tokenised examples into padded tensors.

Every batch carries `completion_mask`: 1 on the positions of tokens that are scored (the
completion, including its final EOS), 0 on prompt and padding. Log-prob code shifts by one:
the token at position t is predicted from the hidden state at t-1.
"""

from __future__ import annotations

import torch


def pad_right(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `prompt + completion` rows with attention and completion masks."""
    sequences = [p + c for p, c in zip(prompts, completions)]
    input_ids = pad_right(sequences, pad_id)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        attention_mask[row, : len(p) + len(c)] = 1
        completion_mask[row, len(p) : len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def mask_completions(
    batch: dict[str, torch.Tensor], prompts: list[list[int]], loss_masks: list[list[int] | None]
) -> dict[str, torch.Tensor]:
    """`completion_mask` set to each row's loss mask over its completion tokens (None: all scored), in place:
    an episode's environment tokens, or a conversation's non-assistant turns, stay context but are not scored."""
    for row, (prompt, mask) in enumerate(zip(prompts, loss_masks)):
        if mask is not None:
            start = len(prompt)
            batch["completion_mask"][row, start : start + len(mask)] = torch.as_tensor(mask, dtype=torch.long)
    return batch


def collate_shared_prompts(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    loss_masks: list[list[int] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """`collate_completions` plus each distinct prompt once, for scoring the rows of a group (samples of
    one prompt) with one pass over their prompt (`engine.shared_prompts.batch_logps`):

    - `prompt_ids`, `prompt_mask` [G, Lp]: the distinct prompts, left-padded, in order of first use;
    - `prompt_index` [B]: each row's prompt;
    - `completion_ids`, `completion_ids_mask` [B, Lc]: each row's completion, right-padded.

    Without a prompt that two rows share, only `collate_completions`' keys. With `loss_masks`, the tokens
    they mark 0 leave `completion_mask` (`mask_completions`) and, with shared prompts, `completion_loss_mask`
    [B, Lc] marks those scored (`completion_ids_mask` stays the completions' attention).
    """
    batch = collate_completions(prompts, completions, pad_id)
    if loss_masks is not None:
        mask_completions(batch, prompts, loss_masks)
    distinct: dict[tuple[int, ...], int] = {}
    index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    if len(distinct) == len(prompts) or any(len(p) == 0 for p in prompts) or any(len(c) == 0 for c in completions):
        return batch
    batch["prompt_ids"], batch["prompt_mask"] = left_pad([list(p) for p in distinct], pad_id)
    batch["prompt_index"] = torch.tensor(index, dtype=torch.long)
    batch["completion_ids"] = pad_right(completions, pad_id)
    batch["completion_ids_mask"] = pad_right([[1] * len(c) for c in completions], 0)
    if loss_masks is not None:
        scored = [m if m is not None else [1] * len(c) for m, c in zip(loss_masks, completions)]
        batch["completion_loss_mask"] = pad_right(scored, 0)
    return batch


def collate_preference(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, padded together so one forward pass scores both; each pair's
    prompt once as well (`collate_shared_prompts`), so the body runs over it once for both rows."""
    prompts = [ex["prompt_ids"] for ex in examples]
    batch = collate_shared_prompts(
        prompts + prompts,
        [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples],
        pad_id,
    )
    batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
    return batch


def example_length(example: dict) -> int:
    """The width an example takes in a right-padded batch: its prompt and its longest completion."""
    completions = [example[key] for key in ("chosen_ids", "rejected_ids", "completion_ids") if key in example]
    return len(example["prompt_ids"]) + max((len(ids) for ids in completions), default=0)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts for generation, with their attention mask."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask
