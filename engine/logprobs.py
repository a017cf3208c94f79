"""Per-sequence log-probabilities of completions.

`completion_logps` is the engine's hot path. It runs the model's body (its decoder) once, keeps the
hidden states of the positions that predict completion tokens, and applies the LM head to them in
row chunks inside one autograd function (`_ChunkedHeadLogps`) that saves the hidden states and the
target ids, keeps the graphs of the first chunks up to `HEAD_KEEP_ELEMENTS` logits, and recomputes
every other chunk's logits in backward. What is kept between forward and backward is bounded, and
the largest temporary is a chunk (`HEAD_CHUNK_ELEMENTS`), so the LM-head memory does not grow with
vocabulary x completion length; a head small enough to keep whole simply runs under autograd, at
the unchunked path's cost. Logits for prompt and padding positions are never computed at all.

The head is the model's own output-embedding module (called as it is, so tied embeddings, hooks
and LoRA-wrapped heads work; its parameters are the function's inputs) followed by the family's own logit post-processing, read
from the config (`LOGIT_POST_PROCESSING`: Gemma-2 soft-capping, Granite `logits_scaling`, Cohere
`logit_scale`). Whether that reproduces the model's own forward is checked once per model on a
short probe; a model whose forward does something else (an unknown family, remote code, a wrapper
without a decoder) takes `model_forward_logps` instead: the model's own forward with a boolean
`logits_to_keep`, which is exact for any model but holds `[tokens, vocab]` logits and their
log-softmax for backward. `full_logits_logps` (logits at every position) is kept for the
benchmark and for tests that check the paths agree. A sharded model (engine.sharding) runs its body
and the chunked head inside its own forward call (`_Head.run`), where FSDP gathers its root unit's
weights (embeddings, final norm, head) and gathers them again for the backward.

With `stats=True` every path also returns, per completion token and detached, the entropy of the
policy's next-token distribution and the mean logit over the vocabulary (the `policy/entropy`
and `logits/chosen` / `logits/rejected` metrics), from the same logits the log-probs use (in the
chunked path: the same chunks, in the forward, under no_grad).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
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


def reduce_tokens(
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


# Rows x vocabulary elements of one LM-head chunk (64 MiB of fp32 logits; the backward holds a few
# such temporaries). Bounds the head's memory whatever the vocabulary and the completion length.
HEAD_CHUNK_ELEMENTS = 2**24
# Chunks whose graphs the forward keeps for backward, up to this many logits in all (128 MiB fp32):
# those are not recomputed, so small shapes cost what the unchunked head costs; only the rest of
# a long completion x large vocabulary is recomputed, and the kept part stays bounded.
HEAD_KEEP_ELEMENTS = 2**25


def _softcap(cap: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda logits: torch.tanh(logits / cap) * cap


# Each family's logit post-processing after the LM head, keyed by the config attribute that sets it,
# in the order transformers applies it (Granite divides, Cohere multiplies, Gemma 2/3 soft-cap).
LOGIT_POST_PROCESSING: dict[str, Callable[[float], Callable[[torch.Tensor], torch.Tensor]]] = {
    "logits_scaling": lambda s: lambda logits: logits / s,
    "logit_scale": lambda s: lambda logits: logits * s,
    "final_logit_softcapping": _softcap,
}


def _post_processing(config: object) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    steps = []
    for attr, make in LOGIT_POST_PROCESSING.items():
        value = getattr(config, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(make(float(value)))
    return steps


def _call_here(fn: Callable[[], object]) -> object:
    return fn()


@dataclass
class _Head:
    """The model's body and head, split so the head can run in chunks."""

    decoder: torch.nn.Module
    module: torch.nn.Module
    post: list[Callable[[torch.Tensor], torch.Tensor]]
    vocab: int = 0  # logits per row, from the probe; sets the chunk's rows
    # Runs a function that calls the body and the head apart, where their weights are there: here, or for
    # a sharded model inside its own forward call (engine.sharding.in_own_forward).
    run: Callable[[Callable[[], object]], object] = _call_here

    @property
    def callable_apart(self) -> bool:
        """Whether the body can be called on its own (not a sharded model's: its root unit's weights are
        gathered only inside its own forward). Shared prompts and packing call the body apart."""
        return self.run is _call_here

    @property
    def chunk_rows(self) -> int:
        return max(1, HEAD_CHUNK_ELEMENTS // max(1, self.vocab))

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.module.parameters())

    @property
    def plain_linear(self) -> bool:
        """A bare nn.Linear head (no hooks): its backward can accumulate the weight gradient in place."""
        m = self.module
        return type(m) is torch.nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)

    def logits(self, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
        """fp32 logits / temperature of `hidden` rows: the model's own head module, then its post-processing."""
        return self.post_process(self.module(hidden), temperature)

    def post_process(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        for step in self.post:
            logits = step(logits)
        logits = logits.float()
        return logits / temperature if temperature != 1.0 else logits

    def token_logps(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float):
        """(log pi(target) [n], fp32 logits [n, V], log-softmax [n, V]) of a chunk of rows."""
        return self.logps_of(self.logits(hidden, temperature), targets)

    @staticmethod
    def logps_of(logits: torch.Tensor, targets: torch.Tensor):
        # log_softmax + gather is bitwise what cross_entropy computes, and leaves the log-probs for the entropy.
        # (A new tensor, not a squeezed view: a sharded model's forward output must not be a view, FSDP's
        # backward hook on it would be lost by an in-place op.)
        all_logps = logits.log_softmax(-1)
        return all_logps.gather(-1, targets[:, None]).sum(-1), logits, all_logps


# model -> its _Head, or None when the chunked head does not reproduce the model's own logits.
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _split_head(model: torch.nn.Module) -> _Head | None:
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None  # e.g. a DistributedDataParallel wrapper: its forward must run (gradient sync)
    try:
        decoder, module = get_decoder(), get_head()
    except Exception:  # noqa: BLE001 - a model without the standard split takes the model's own forward
        return None
    if decoder is None or decoder is model or not isinstance(module, torch.nn.Module):
        return None
    return _Head(decoder, module, _post_processing(getattr(model, "config", None)))


@torch.no_grad()
def _reproduces_own_logits(model: torch.nn.Module, head: _Head) -> bool:
    """Whether body + head + post-processing give the model's own logits, on a short probe."""
    device = next(model.parameters()).device
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    probe = torch.arange(1, 9, device=device)[None] % max(2, vocab)
    was_training = model.training
    model.eval()  # dropout off for the comparison
    try:
        own = model(input_ids=probe, use_cache=False).logits
        ours = head.run(lambda: _body_then_head_logits(head, probe))
        if ours is None or not torch.is_tensor(own):
            return False
    except Exception:  # noqa: BLE001 - anything unusual: use the model's own forward
        return False
    finally:
        model.train(was_training)
    own = own.float()
    if own.shape != ours.shape:
        return False
    head.vocab = own.shape[-1]
    scale = float(own.abs().max().clamp(min=1.0))
    return bool(torch.allclose(ours, own, rtol=1e-3, atol=1e-4 * scale))


def _body_then_head_logits(head: _Head, input_ids: torch.Tensor) -> torch.Tensor | None:
    hidden = getattr(head.decoder(input_ids=input_ids, use_cache=False), "last_hidden_state", None)
    return None if hidden is None else head.logits(hidden, 1.0)


def use_head_inside(model: torch.nn.Module, run: Callable[[Callable[[], object]], object]) -> None:
    """From now on `completion_logps(model, ...)` calls the body and the chunked head inside `run(fn)`
    (a sharded model: inside its own forward, where its root unit gathers the head's weights). The
    probe runs now, on every rank at once: left to the first call, it would run where one rank scores
    alone, and its gathers would then be missing from that rank's later passes."""
    _HEADS[model] = _checked_head(model, run)


def _checked_head(model: torch.nn.Module, run: Callable[[Callable[[], object]], object]) -> _Head | None:
    head = _split_head(model)
    if head is None:
        return None
    head.run = run
    return head if _reproduces_own_logits(model, head) else None


def chunked_head(model: torch.nn.Module) -> _Head | None:
    """The model's body/head split when the chunked head reproduces its logits, else None (cached per model)."""
    if model not in _HEADS:
        _HEADS[model] = _checked_head(model, _call_here)
    return _HEADS[model]


def _chunk_stats(logits: torch.Tensor, all_logps: torch.Tensor, targets: torch.Tensor, stats: bool):
    """Detached ([n] argmax == target, [n] entropy or None, [n] mean logit or None) of a chunk's logits."""
    correct = logits.detach().argmax(-1) == targets
    if not stats:
        return correct, None, None
    return correct, token_entropy(all_logps), logits.detach().mean(-1)


class _ChunkedHeadLogps(torch.autograd.Function):
    """[N, H] hidden states -> [N] log pi(target) (and detached stats), the LM head in row chunks.

    Saves the hidden states, the targets and the head's parameters (no copies), and the graphs of
    the first chunks up to `keep_elements` logits. Backward runs each kept graph, and for every other
    chunk recomputes its logits and backpropagates through them, so each chunk's gradient comes
    from the very ops of the forward, one chunk at a time.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, temperature, stats, keep_elements, *params):
        n = hidden.shape[0]
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.head, ctx.temperature, ctx.step = head, temperature, head.chunk_rows
        ctx.kept = {}  # chunk start -> (hidden leaf, its log-probs with their graph)
        token_logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        entropy = torch.empty(n if stats else 0, dtype=torch.float32, device=hidden.device)
        logit_mean = torch.empty_like(entropy)
        for start in range(0, n, ctx.step):
            end = min(n, start + ctx.step)
            keep = (end - start) * head.vocab <= keep_elements
            with torch.enable_grad() if keep else torch.no_grad():
                h = hidden[start:end].detach().requires_grad_(keep and ctx.needs_input_grad[0])
                chunk_logps, logits, all_logps = head.token_logps(h, targets[start:end], temperature)
            if keep:
                keep_elements -= (end - start) * head.vocab
                ctx.kept[start] = (h, chunk_logps)
            token_logps[start:end] = chunk_logps.detach()
            correct[start:end], chunk_entropy, chunk_mean = _chunk_stats(logits, all_logps, targets[start:end], stats)
            if stats:
                entropy[start:end], logit_mean[start:end] = chunk_entropy, chunk_mean
            del logits, all_logps
        ctx.save_for_backward(hidden, targets, *params)
        ctx.mark_non_differentiable(correct, entropy, logit_mean)
        return token_logps, correct, entropy, logit_mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, *_unused):
        hidden, targets, *params = ctx.saved_tensors
        need_hidden, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[6:]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        device_type, enabled, dtype = ctx.autocast
        # One autocast context for every chunk (the forward's, re-entered: backward runs where autocast is
        # off): the head's weight is cast to the compute dtype once and cached, not once per chunk.
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], ctx.step):
                end = start + ctx.step
                if start in ctx.kept:
                    h, chunk_logps = ctx.kept.pop(start)
                elif ctx.head.plain_linear:
                    _linear_chunk_backward(
                        ctx,
                        hidden[start:end],
                        targets[start:end],
                        grad_logps[start:end],
                        grad_hidden[start:end] if need_hidden else None,
                        params,
                        need_params,
                        grad_params,
                    )
                    continue
                else:
                    with torch.enable_grad():
                        h = hidden[start:end].detach().requires_grad_(need_hidden)
                        chunk_logps = ctx.head.token_logps(h, targets[start:end], ctx.temperature)[0]
                wrt = ([h] if need_hidden else []) + [p for p, need in zip(params, need_params) if need]
                grads = list(torch.autograd.grad(chunk_logps, wrt, grad_logps[start:end]))
                del chunk_logps
                if need_hidden:
                    grad_hidden[start:end] = grads.pop(0)
                for i, need in enumerate(need_params):
                    if need:
                        g = grads.pop(0)
                        grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        return (grad_hidden, None, None, None, None, None, *grad_params)


def _linear_chunk_backward(ctx, h, targets, grad_logps, grad_hidden, params, need_params, grad_params) -> None:
    """A plain linear head's backward for one chunk: autograd to the head's output only, then the linear's
    backward by hand, so the weight gradient goes straight into one fp32 accumulator (no fp32 [V, H]
    gradient per chunk). Under autocast (the caller's context) the product is computed in the compute
    dtype from the cached cast weight and added in fp32: the same numbers autograd gives."""
    weight, bias = ctx.head.module.weight, ctx.head.module.bias
    raw = torch.nn.functional.linear(h, weight, bias).requires_grad_()
    with torch.enable_grad():
        logits = ctx.head.post_process(raw, ctx.temperature)
        chunk_logps = ctx.head.logps_of(logits, targets)[0]
    (grad_raw,) = torch.autograd.grad(chunk_logps, raw, grad_logps)
    del logits, chunk_logps, raw
    if grad_hidden is not None:
        grad_hidden.copy_(grad_raw @ weight)
    for i, (p, need) in enumerate(zip(params, need_params)):
        if not need:
            continue
        if grad_params[i] is None:
            grad_params[i] = torch.zeros_like(p)
        if i > 0:  # the bias (nn.Linear registers its weight first)
            grad_params[i].add_(grad_raw.sum(0))
        elif grad_raw.dtype == grad_params[i].dtype:
            grad_params[i].addmm_(grad_raw.t(), h)
        else:
            grad_params[i].add_(grad_raw.t() @ h)


def chunked_head_logps(
    head: _Head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """[N, H] hidden states of completion-predicting positions -> ([N] log-probs, [N] argmax == target,
    [N] entropy or None, [N] mean logit or None), the head applied in bounded chunks."""
    params = head.params
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    if needs_grad and hidden.shape[0] * head.vocab <= HEAD_KEEP_ELEMENTS:
        # Small enough to keep whole: plain autograd through the head, the graph the function would keep.
        token_logps, logits, all_logps = head.token_logps(hidden, targets, float(temperature))
        return token_logps, *_chunk_stats(logits, all_logps, targets, stats)
    keep = HEAD_KEEP_ELEMENTS if needs_grad else 0  # nothing to keep when there is no backward
    token_logps, correct, entropy, logit_mean = _ChunkedHeadLogps.apply(
        hidden, targets, head, float(temperature), stats, keep, *params
    )
    return token_logps, correct, (entropy if stats else None), (logit_mean if stats else None)


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    stats: bool = False,
) -> CompletionLogps:
    """Log-probs of the completion tokens only (fp32), the LM head in bounded chunks.

    stats=True adds per-token entropy and mean logit (of logits / temperature), detached. A model
    whose body/head split does not reproduce its own logits takes `model_forward_logps`.
    """
    head = chunked_head(model)
    if head is None:
        return model_forward_logps(model, input_ids, attention_mask, completion_mask, temperature, stats)
    return head.run(
        lambda: _chunked_completion_logps(head, input_ids, attention_mask, completion_mask, temperature, stats)
    )


def _chunked_completion_logps(
    head: _Head,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float,
    stats: bool,
) -> CompletionLogps:
    target_mask, targets, rows = _gather_completion(input_ids, completion_mask)
    hidden = head.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    token_logps, correct, entropy, logit_mean = chunked_head_logps(
        head, hidden[:, :-1][target_mask], targets, temperature, stats
    )
    out = reduce_tokens(token_logps, rows, input_ids.shape[0], correct)
    out.token_entropy, out.token_logit_mean = entropy, logit_mean
    return out


def model_forward_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    stats: bool = False,
) -> CompletionLogps:
    """Log-probs of the completion tokens (fp32) from the model's own forward, any model.

    The head runs on completion positions only, but their `[N, V]` logits and log-softmax are kept
    for backward. stats=True adds per-token entropy and mean logit (of logits / temperature), detached.
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
        return reduce_tokens(token_logps, rows, input_ids.shape[0], correct)
    return reduce_tokens(token_logps, rows, input_ids.shape[0], correct, all_logps, logits)


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
        return reduce_tokens(token_logps[target_mask], rows, input_ids.shape[0], correct)
    return reduce_tokens(
        token_logps[target_mask],
        rows,
        input_ids.shape[0],
        correct,
        all_logps[target_mask],
        logits[target_mask] / temperature,
    )
