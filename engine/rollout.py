"""Rollouts for the online methods: sample k completions per prompt, then score them.

Sampling is batched: the prompts of a step are left-padded together, run through the model once
each, and decoded k times each by Cherry's own KV-cache loop (`decode_groups`), so a prompt's
samples sit in consecutive rows (a "group"); position ids follow the attention mask, so padding
never shifts a prompt. Tokens are drawn by inverse-CDF sampling (`sample_next`) from
softmax(logits / temperature) within the top-p nucleus, from the global torch RNG.
A completion keeps its EOS when it stopped (the EOS is an action the policy took and is scored
like any other token); one that ran into `max_new_tokens` has none and is marked truncated.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

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
    # What the algorithm's `prepare` computed per sample, one value per row (None where it has none), for
    # the rollout store (engine/rollout_store.py): "advantage", "kl", "logp_mean", "judge"
    sample_stats: dict[str, list] = field(default_factory=dict)
    # Multi-turn episodes (an environment or tools: engine/episodes.py), else None. `completion_ids` then
    # holds the whole episode after the prompt: the policy's turns and the environment's in between.
    episodes: list[Episode] | None = None

    @property
    def policy_masks(self) -> list[list[int]] | None:
        """Per row, 1 on each completion token the policy sampled, 0 on the environment's (None: all the policy's)."""
        return None if self.episodes is None else [e.policy_mask for e in self.episodes]

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
        """What reward functions get besides prompts and completions: the data's columns and, for episodes,
        `turns` (each episode's messages after the prompt) and `environment_reward` (its summed turn rewards)."""
        columns = reward_columns(self.examples)
        if self.episodes is not None:
            columns["turns"] = [e.turns for e in self.episodes]
            columns["environment_reward"] = [e.reward for e in self.episodes]
        return columns


@dataclass
class Episode:
    """One multi-turn episode: its turns as messages, which completion tokens are the policy's, and how it went."""

    turns: list[dict]  # messages after the prompt: assistant turns and the environment's (tool results marked)
    policy_mask: list[int]  # per completion token: 1 sampled by the policy, 0 written by the environment
    reward: float = 0.0  # the environment's per-turn rewards, summed
    finish: str = "eos"  # eos (done) | length (a turn hit max_new_tokens) | max_turns | error
    error: str | None = None  # what the environment or a tool did wrong, when the episode ended on it
    tool_calls: int = 0


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
        episodes=[e for part in filled for e in part.episodes] if filled and filled[0].episodes is not None else None,
    )


def reward_columns(examples: list[dict]) -> dict[str, list]:
    """What reward functions get besides prompts and completions, one value per row: every dataset column
    as it is in the data (`columns` of a prompt example: lists stay lists, numbers stay numbers), with
    `safety` as a boolean and `messages` the prompt as a message list (conversational data)."""
    names: dict[str, None] = {}
    for ex in examples:
        names.update(dict.fromkeys(ex.get("columns") or {}))
    out = {name: [(ex.get("columns") or {}).get(name) for ex in examples] for name in names}
    for name in ("answer", "safety", "messages"):
        if name in ("safety", "messages") or name not in out:
            if any(ex.get(name) is not None for ex in examples):
                out[name] = [ex.get(name) for ex in examples]
    return out


def _split_at_eos(row: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """(tokens up to and including the first EOS, truncated?)"""
    for i, tok in enumerate(row):
        if tok in eos:
            return row[: i + 1], False
    return row, True


class StopStrings:
    """Stop strings for the decoding loop: a row ends once its completion's text holds one (the stop is kept)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        # the last tokens that can hold a stop: a token decodes to at least one character, or part of one
        self.window = max(len(s) for s in self.stop) + 4

    def _holds(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(s in text for s in self.stop)

    def reached(self, tokens: list[torch.Tensor], ended: torch.Tensor) -> torch.Tensor:
        """Which rows' latest tokens complete a stop string (rows already ended are left alone)."""
        recent = torch.stack(tokens[-self.window :], dim=1).tolist()
        done = ended.tolist()
        hit = [not finished and self._holds(row) for row, finished in zip(recent, done)]
        return torch.tensor(hit, device=ended.device)

    def cut(self, ids: list[int]) -> tuple[list[int], bool]:
        """(the tokens up to the one that completes the first stop string, truncated) of a row without EOS."""
        if not self._holds(ids):
            return ids, True
        end = next(i for i in range(1, len(ids) + 1) if self._holds(ids[:i]))
        return ids[:end], False


def nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """`scores` [rows, vocab] with every token outside the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`: a token
    stays while the tokens more likely than it hold less than `top_p` between them (so the most
    likely token always stays). top_p >= 1 keeps every token.
    """
    if top_p >= 1.0:
        return scores
    ordered, order = scores.sort(-1, descending=True)
    probs = ordered.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
    return scores.masked_fill(drop, float("-inf"))


def truncate(scores: torch.Tensor, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> torch.Tensor:
    """`scores` [rows, vocab] with the tokens sampling leaves out set to -inf: all but the `top_k` most likely
    (0 = off), those less likely than `min_p` times the most likely one (0 = off), then those outside the top-p
    nucleus. The most likely token always stays."""
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if min_p > 0:
        # p_i < min_p * p_max  <=>  s_i - s_max < log(min_p): no softmax needed
        scores = scores.masked_fill(scores - scores.amax(-1, keepdim=True) < math.log(min_p), float("-inf"))
    return nucleus(scores, top_p)


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019): the logit of each token already in the row (`seen`, a
    [rows, vocab] bool mask of prompt and completion so far) divided by `penalty` when positive, multiplied
    when negative, so it becomes less likely for penalty > 1. 1 leaves the logits as they are."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    top_k: int = 0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab], drawn from softmax(logits / temperature) restricted
    to the top-k / min-p / top-p truncation (and renormalised). The update scores samples at the
    temperature alone, as TRL does: truncation shapes what is sampled, not the log-probs trained on.

    Inverse-CDF sampling: one uniform number per row, located in the row's cumulative (unnormalised)
    probabilities. `torch.multinomial` (what `generate` calls) draws one exponential variate per
    vocabulary entry instead (argmax of p / E), which on a CPU was 5-20x the cost of everything
    else here (70 ms against 3 ms per step for 32 rows of a 32k vocabulary). The CDF is accumulated in
    float64 on the CPU (torch's cumsum accumulator for float32) and stored in float32, so each token's
    probability is exact up to float32 rounding of the running sum (at most 2^-24 of the row's total).
    """
    scores = truncate(logits.float() / temperature, top_p, top_k, min_p)
    weights = (scores - scores.amax(-1, keepdim=True)).exp_()  # the row's largest weight is 1: no overflow
    cdf = weights.cumsum_(-1)
    total = cdf[:, -1:]
    target = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype) * total
    # rand < 1, but u * total can round up to total: keep the target below it, so the draw lands on
    # a token with weight (searchsorted's `right` skips zero-weight tokens: equal neighbouring CDF values).
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes each new token's keys and values into room reserved up front.

    transformers' `DynamicLayer` concatenates the whole cache with the new token at every step, copying
    all of it each time (quadratic in the completion length; profiled: ~2 s of an 8.6 s rollout of
    32 samples x 64 tokens). Here `keys` and `values` are views of the first `length` positions of
    buffers sized for the prompt and every new token, so a step copies only the new token's states.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.length = keys.shape[-2]
        self._keys, self._values = (_with_room(states, room) for states in (keys, values))
        self.keys, self.values = self._keys[..., : self.length, :], self._values[..., : self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # more tokens than reserved: fall back to growing by concatenation
            return super().update(key_states, value_states, *args, **kwargs)
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values


def cache_dtype(states: torch.Tensor) -> torch.dtype:
    """The dtype the cache keeps: autocast's when it is on. Under autocast a full fine-tune's keys come out
    fp32 (rotary embeddings multiply by fp32 tables) while values are bf16; attention casts both to bf16
    anyway, so an fp32 key cache would only double its memory and be cast again at every step."""
    device_type = states.device.type
    if states.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return states.dtype


def _with_room(states: torch.Tensor, room: int) -> torch.Tensor:
    """[batch, heads, seq, dim] -> a contiguous [batch, heads, seq + room, dim] buffer that starts with `states`."""
    batch, heads, seq, dim = states.shape
    buffer = states.new_empty(batch, heads, seq + room, dim, dtype=cache_dtype(states))
    buffer[..., :seq, :] = states
    return buffer


def _reserve(cache: DynamicCache, k: int, room: int) -> None:
    """Repeat each cached prompt row k times (its group's rows) and reserve `room` more positions, in
    place. Layers other than the plain full-attention one (sliding windows, ...) are only repeated."""
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys.repeat_interleave(k, dim=0), layer.values.repeat_interleave(k, dim=0)
        if type(layer) is DynamicLayer:
            cache.layers[i] = _PreallocatedLayer(keys, values, room)
        else:
            layer.keys, layer.values = keys, values


@torch.no_grad()
def decode_groups(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    k: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    pad_id: int,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stops: StopStrings | None = None,
) -> torch.Tensor:
    """k sampled continuations of each left-padded prompt row, in rows g*k .. g*k+k-1: [rows * k, new]
    tokens, `pad_id` after a row's first EOS.

    Cherry's own KV-cache decoding loop. A group's k samples share their prompt, so the prompt runs
    through the model once per group, not k times: its KV cache and last-position logits are then
    repeated k times (prefill is most of a rollout's work when prompts are long and completions short;
    this divides it by k). Each step feeds every row's last token with position ids that follow the
    attention mask, as `generate` does, and samples with `sample_next`. Rows that have ended keep
    being fed padding (the batch keeps its shape) until every row has ended or `max_new_tokens` is reached.
    A row also ends at a stop string (`stops`); its tokens after that are padding too.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    _reserve(cache, k, max_new_tokens)
    logits = logits.repeat_interleave(k, dim=0)
    mask = attention_mask.repeat_interleave(k, dim=0)
    position = positions[:, -1:].repeat_interleave(k, dim=0)
    eos = torch.tensor(eos_ids, device=logits.device)
    ended = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    seen = None
    if repetition_penalty != 1.0:  # the tokens of each row's prompt, then of its completion as it grows
        counts = torch.zeros_like(logits, dtype=torch.int32)
        seen = counts.scatter_add_(1, input_ids.repeat_interleave(k, dim=0), mask.int()) > 0
    tokens = []
    for step in range(max_new_tokens):
        if seen is not None:
            logits = penalise_repeats(logits, seen, repetition_penalty)
        token = sample_next(logits, temperature, top_p, top_k=top_k, min_p=min_p).masked_fill_(ended, pad_id)
        tokens.append(token)
        ended |= torch.isin(token, eos)
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if stops is not None:
            ended |= stops.reached(tokens, ended)
        if step + 1 == max_new_tokens or bool(ended.all()):  # the one host sync per token
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
    return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0] * k, 0)


@dataclass
class Sampling:
    """How the policy samples: the online settings `sample_rollout` and `sample_episodes` share."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | None = None
    batch_size: int = 256  # rows decoded together, at most (fewer when their KV caches would not fit)

    @classmethod
    def of(cls, spec) -> Sampling:
        return cls(
            max_new_tokens=spec.max_new_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            min_p=spec.min_p,
            repetition_penalty=spec.repetition_penalty,
            stop=spec.stop,
        )


class Decoder:
    """Samples continuations of token-id prompts from a model, in chunks of rows that fit: `sample_rollout`'s
    (one turn) and `sample_episodes`' (a turn of every episode still running) way to call `decode_groups`."""

    def __init__(self, model, tokenizer, sampling: Sampling):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.eos = _eos_ids(model, tokenizer)
        if not self.eos:
            raise ValueError("sampling needs an EOS token: neither the tokenizer nor the generation config names one")
        if sampling.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0 (got {sampling.temperature})")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.stops = StopStrings(tokenizer, sampling.stop) if sampling.stop else None
        self.device = next(model.parameters()).device

    def __call__(self, prompts: list[list[int]], k: int = 1) -> list[tuple[list[int], bool]]:
        """(tokens, truncated) of k samples of each prompt, rows g*k .. g*k+k-1 for prompt g. A sample ends at
        EOS (kept) or a stop string (kept in its text); one that reaches `max_new_tokens` is truncated."""
        sampling, eos_set = self.sampling, set(self.eos)
        longest = max((len(p) for p in prompts), default=0) + sampling.max_new_tokens
        per_chunk = max(1, min(sampling.batch_size, decoding_rows(self.model, self.device, longest)) // k)
        out = []
        for start in range(0, len(prompts), per_chunk):  # whole groups per call
            input_ids, attention_mask = left_pad(prompts[start : start + per_chunk], self.pad_id)
            new_tokens = decode_groups(
                self.model,
                input_ids.to(self.device),
                attention_mask.to(self.device),
                k,
                max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                eos_ids=self.eos,
                pad_id=self.pad_id,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repetition_penalty=sampling.repetition_penalty,
                stops=self.stops,
            )
            for new in new_tokens.tolist():
                ids, cut = _split_at_eos(new, eos_set)
                if cut and self.stops is not None:
                    ids, cut = self.stops.cut(ids)
                out.append((ids, cut))
        return out

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


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
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    batch_size: int = 256,
) -> Rollout:
    """k samples per example (`prompt_ids`), drawn from the global torch RNG in chunks of about `batch_size` rows.
    A sample ends at EOS or at a stop string (kept in its text); one that reaches `max_new_tokens` is truncated."""
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, stop, batch_size)
    decode = Decoder(model, tokenizer, sampling)
    rows = [ex for ex in examples for _ in range(k)]
    was_training = model.training
    model.eval()
    started = time.time()
    try:
        samples = decode([ex["prompt_ids"] for ex in examples], k)
    finally:
        model.train(was_training)
    completions = [ids for ids, _ in samples]
    truncated = [cut for _, cut in samples]
    texts = [decode.text(ids) for ids in completions]
    return Rollout(rows, completions, texts, truncated, k, seconds=time.time() - started)


KV_CACHE_SHARE = 0.5  # of the GPU memory free when a rollout starts, for one chunk's KV cache


def decoding_rows(model, device: torch.device, tokens: int, free_bytes: int | None = None) -> int:
    """How many rows' KV caches of `tokens` positions fit in a share of the GPU's free memory (rows of a
    chunk decode together: 256 rows of 2k tokens of an 8B model would need about 100 GB). No bound off
    the GPU, where memory is the host's and the 256-row default holds."""
    if free_bytes is None:
        if device.type != "cuda":
            return 1 << 30
        free_bytes = torch.cuda.mem_get_info(device)[0]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    width = (dtype or next(model.parameters()).dtype).itemsize
    per_row = 2 * config.num_hidden_layers * heads * head_dim * max(1, tokens) * width  # keys and values
    return max(1, int(free_bytes * KV_CACHE_SHARE) // per_row)


def score_rollout(rollout: Rollout, reward, missing_eos_penalty: float = 0.0) -> None:
    """Fill `rollout.rewards` (total, minus `missing_eos_penalty` on truncated samples; 0 for an episode that
    ended on an environment's error) and its components."""
    result = reward.reward(
        rollout.prompts, rollout.texts, rollout.prompt_ids, rollout.completion_ids, rollout.columns()
    )
    total = torch.tensor(result.total, dtype=torch.float32)
    if missing_eos_penalty:
        total = total - missing_eos_penalty * torch.tensor(rollout.truncated, dtype=torch.float32)
    if rollout.episodes is not None:  # an episode whose environment failed gets no reward at all
        total = total.masked_fill(torch.tensor([e.finish == "error" for e in rollout.episodes]), 0.0)
    rollout.rewards = total
    rollout.components = result.components
