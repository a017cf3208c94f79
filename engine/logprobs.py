"""Per-sequence log-probabilities of completions.

`completion_logps` is the engine's hot path. It runs the model's own forward once with
`logits_to_keep` set to the positions that predict completion tokens, so the model's LM head and
its own logit post-processing run on those rows only. A full `[batch, seq, vocab]` logits tensor is never built for
prompt and padding positions, which on long prompts and large vocabularies is most of the
work and most of the memory of a naive implementation (`full_logits_logps`, kept for the
benchmark and for tests that check both paths agree).

With `stats=True` both paths also return, per completion token and detached, the entropy of the
policy's next-token distribution and the mean logit over the vocabulary (the `policy/entropy`
and `logits/chosen` / `logits/rejected` metrics). Both come from the completion-position logits
the log-probs already need; the entropy is computed in row chunks under no_grad, so it adds
at most a bounded temporary (`ENTROPY_CHUNK_ELEMENTS`) and nothing to the backward graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompletionLogps:
    sums: torch.Tensor  # [B] sum of log pi(y_t | x, y_<t) over completion tokens
    counts: torch.Tensor  # [B] number of completion tokens (incl. EOS)
    token_logps: torch.Tensor  # [N] flat per-token log-probs of all completion tokens
    token_rows: torch.Tensor  # [N] row index of each flat token
    token_correct: torch.Tensor  # [N] bool: the model's argmax is the token (SFT token accuracy)
    token_entropy: torch.Tensor | None = None  # [N] entropy of pi(. | x, y_<t), detached (stats=True only)
    token_logit_mean: torch.Tensor | None = None  # [N] mean logit over the vocabulary, detached (stats=True only)

    @property
    def means(self) -> torch.Tensor:
        """Per-token mean log-prob (IPO, SimPO, ORPO use this instead of the sum)."""
        return self.sums / self.counts.clamp(min=1)

    def row_sums(self, token_values: torch.Tensor) -> torch.Tensor:
        """[N] per-token values -> [B] sums over each row's completion tokens."""
        out = torch.zeros(self.sums.shape[0], dtype=token_values.dtype, device=token_values.device)
        return out.index_add(0, self.token_rows, token_values)


# Rows x vocabulary elements the entropy works on at once (64 MiB fp32 temporaries).
ENTROPY_CHUNK_ELEMENTS = 2**24


@torch.no_grad()
def token_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """[N, V] normalised log-probs -> [N] entropies -sum_v p_v log p_v (nats), in row chunks of bounded size."""
    log_probs = log_probs.detach()
    out = torch.empty(log_probs.shape[0], dtype=torch.float32, device=log_probs.device)
    step = max(1, ENTROPY_CHUNK_ELEMENTS // max(1, log_probs.shape[-1]))
    for start in range(0, log_probs.shape[0], step):
        chunk = log_probs[start : start + step].float()
        # p log p -> 0 where p = 0 (a -inf log-prob, e.g. a masked vocabulary entry), not 0 * -inf = NaN.
        out[start : start + step] = -(chunk.exp() * chunk.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    return out


def _completion_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """[N, V] fp32 logits of the positions that predict completion tokens, from the model's own forward.

    The model's forward applies its head *and* its logit post-processing (Gemma-2 soft-capping,
    Granite `logits_scaling`, Cohere `logit_scale`, ...), so Cherry never re-implements them. A
    boolean `[batch, seq]` `logits_to_keep` makes the model slice its hidden states to the True
    positions before the head (flattened, row-major), so each row's own completion positions are
    kept even though right padding puts them at different columns in different rows.
    """
    predicting = torch.zeros_like(input_ids, dtype=torch.bool)
    predicting[:, :-1] = target_mask
    n_positions = int(predicting.sum())
    try:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=predicting
        ).logits
    except TypeError as err:  # a model whose forward has no logits_to_keep (older remote code)
        if "logits_to_keep" not in str(err):
            raise
        logits = None
    if logits is None or logits.shape[0] != n_positions or logits.dim() != 2:
        # Still the model's own logits, computed at every position first (the memory the mask saves).
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[predicting]
    return logits.float()


def _gather_completion(
    input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The token at position t is predicted by the hidden state at t-1.
    target_mask = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:][target_mask]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    return target_mask, targets, rows


def _reduce(
    token_logps: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int,
    correct: torch.Tensor,
    all_logps: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> CompletionLogps:
    """Per-row sums and counts; given the [N, V] log-softmax and logits of the completion positions, the token stats too."""
    sums = torch.zeros(batch_size, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.zeros(batch_size, dtype=torch.long, device=rows.device).index_add(0, rows, torch.ones_like(rows))
    out = CompletionLogps(sums=sums, counts=counts, token_logps=token_logps, token_rows=rows, token_correct=correct)
    if all_logps is not None and logits is not None:
        out.token_entropy = token_entropy(all_logps)
        out.token_logit_mean = logits.detach().float().mean(-1)
    return out


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    stats: bool = False,
) -> CompletionLogps:
    """Log-probs of the completion tokens only (fp32), without full-vocabulary logits elsewhere.

    stats=True adds per-token entropy and mean logit (of logits / temperature), detached.
    """
    target_mask, targets, rows = _gather_completion(input_ids, completion_mask)
    logits = _completion_logits(model, input_ids, attention_mask, target_mask)
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax + gather is bitwise what cross_entropy computes, and leaves the log-probs for the entropy.
    all_logps = logits.log_softmax(-1)
    token_logps = all_logps.gather(-1, targets[:, None]).squeeze(-1)
    correct = logits.detach().argmax(-1) == targets
    if not stats:
        return _reduce(token_logps, rows, input_ids.shape[0], correct)
    return _reduce(token_logps, rows, input_ids.shape[0], correct, all_logps, logits)


def full_logits_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    stats: bool = False,
) -> CompletionLogps:
    """The naive path: logits and log-softmax over every position, then mask. Benchmark baseline."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    all_logps = (logits / temperature).log_softmax(-1)
    token_logps = all_logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    target_mask, targets, rows = _gather_completion(input_ids, completion_mask)
    correct = logits.detach().argmax(-1)[target_mask] == targets
    if not stats:
        return _reduce(token_logps[target_mask], rows, input_ids.shape[0], correct)
    return _reduce(
        token_logps[target_mask],
        rows,
        input_ids.shape[0],
        correct,
        all_logps[target_mask],
        logits[target_mask] / temperature,
    )
