"""Per-sequence log-probabilities of completions.

`completion_logps` is the engine's hot path. It runs the transformer body once, keeps the hidden
states of the positions that predict completion tokens, and applies the LM head and the
log-softmax to those rows only. A full `[batch, seq, vocab]` logits tensor is never built for
prompt and padding positions, which on long prompts and large vocabularies is most of the
work and most of the memory of a naive implementation (`full_logits_logps`, kept for the
benchmark and for tests that check both paths agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CompletionLogps:
    sums: torch.Tensor  # [B] sum of log pi(y_t | x, y_<t) over completion tokens
    counts: torch.Tensor  # [B] number of completion tokens (incl. EOS)
    token_logps: torch.Tensor  # [N] flat per-token log-probs of all completion tokens
    token_rows: torch.Tensor  # [N] row index of each flat token
    token_correct: torch.Tensor  # [N] bool: the model's argmax is the token (SFT token accuracy)

    @property
    def means(self) -> torch.Tensor:
        """Per-token mean log-prob (IPO, SimPO, ORPO use this instead of the sum)."""
        return self.sums / self.counts.clamp(min=1)


def _head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    # Gemma-2-style models cap logits after the head; the decoder-only path must do it too.
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _gather_completion(
    input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The token at position t is predicted by the hidden state at t-1.
    target_mask = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:][target_mask]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    return target_mask, targets, rows


def _reduce(token_logps: torch.Tensor, rows: torch.Tensor, batch_size: int, correct: torch.Tensor) -> CompletionLogps:
    sums = torch.zeros(batch_size, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.zeros(batch_size, dtype=torch.long, device=rows.device).index_add(0, rows, torch.ones_like(rows))
    return CompletionLogps(sums=sums, counts=counts, token_logps=token_logps, token_rows=rows, token_correct=correct)


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> CompletionLogps:
    """Log-probs of the completion tokens only (fp32), without full-vocabulary logits elsewhere."""
    body = model.get_decoder()
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target_mask, targets, rows = _gather_completion(input_ids, completion_mask)
    logits = _head_logits(model, hidden[:, :-1][target_mask])
    if temperature != 1.0:
        logits = logits / temperature
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    return _reduce(token_logps, rows, input_ids.shape[0], logits.detach().argmax(-1) == targets)


def full_logits_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> CompletionLogps:
    """The naive path: logits and log-softmax over every position, then mask. Benchmark baseline."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    all_logps = (logits / temperature).log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    target_mask, targets, rows = _gather_completion(input_ids, completion_mask)
    correct = logits.detach().argmax(-1)[target_mask] == targets
    return _reduce(all_logps[target_mask], rows, input_ids.shape[0], correct)
