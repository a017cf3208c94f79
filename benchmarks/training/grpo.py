"""`cherry bench grpo --against ablation`: one optimisation switched off, not a comparison with another tool.

A GRPO step is a rollout (sample k completions for each prompt) and an update (recompute the
samples' log-probs with gradients, loss, backward, AdamW). On the same tiny Llama-architecture
model, prompts and samples, in one process: the rollout (Cherry's `sample_rollout`, all prompts x k
in one left-padded batch with the KV cache) is timed once, and the update twice: with the engine's
completion-only log-probs (`completion_logps`, the LM head on completion positions only) and with
that optimisation removed (`full_logits_logps`, logits and log-softmax at every position).

A random model seldom samples EOS, so every sample runs to max_new_tokens. Times are medians of
`repeats`. What Cherry's online step is worth against what users run instead is
`cherry bench grpo --against trl` (benchmarks/training/against.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.training import bench_device
from engine.batching import collate_completions
from engine.logprobs import completion_logps, full_logits_logps
from engine.losses.advantages import group_advantages
from engine.losses.online import aggregate_token_loss, clipped_policy_loss
from engine.rollout import sample_rollout


@dataclass
class GRPOBenchConfig:
    prompts: int = 8  # prompts per step
    k: int = 8  # samples per prompt
    prompt_len: int = 64
    max_new_tokens: int = 32
    vocab: int = 32000
    hidden: int = 256
    layers: int = 2
    repeats: int = 3
    threads: int = 0
    device: str = "auto"
    seed: int = 0


class _Tokenizer:
    """The two things sampling needs from a tokenizer, for a model without one."""

    def __init__(self, eos: int, pad: int):
        self.eos_token_id, self.pad_token_id = eos, pad

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def build_case(cfg: GRPOBenchConfig, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.hidden * 4,
        num_hidden_layers=cfg.layers,
        num_attention_heads=max(1, cfg.hidden // 64),
        num_key_value_heads=max(1, cfg.hidden // 64),
        max_position_embeddings=cfg.prompt_len + cfg.max_new_tokens + 8,
        tie_word_embeddings=False,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    # Prompts of different lengths, so left padding is exercised as in real data.
    lengths = torch.randint(cfg.prompt_len // 2, cfg.prompt_len + 1, (cfg.prompts,), generator=generator).tolist()
    examples = [
        {"prompt": str(i), "prompt_ids": torch.randint(3, cfg.vocab, (n,), generator=generator).tolist()}
        for i, n in enumerate(lengths)
    ]
    return model, _Tokenizer(eos=1, pad=0), examples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def grpo_update(logps_fn, model, optimizer, rollout, k: int, device) -> int:
    """One GRPO update on the rollout (random rewards: the cost does not depend on them); returns tokens."""
    batch = {key: v.to(device) for key, v in collate_completions(rollout.prompt_ids, rollout.completion_ids, 0).items()}
    out = logps_fn(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    width = int(out.counts.max())
    mask = torch.arange(width, device=device)[None, :] < out.counts[:, None]
    logps = torch.zeros(mask.shape, device=device, dtype=out.token_logps.dtype)
    logps[mask] = out.token_logps
    rewards = torch.rand(len(rollout.completion_ids), generator=torch.Generator().manual_seed(0)).to(device)
    advantages = group_advantages(rewards, k)
    per_token, _ = clipped_policy_loss(logps, logps.detach(), advantages, mask.float())
    loss_sum, units = aggregate_token_loss(per_token, mask.float(), "dapo")
    (loss_sum / units).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return int(batch["attention_mask"].sum())


def run(cfg: GRPOBenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = bench_device(cfg.device)
    model, tokenizer, examples = build_case(cfg, device)
    sampling = dict(k=cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=1.0)
    results: dict[str, dict] = {}
    times, tokens, rollout = [], 0, None
    for _ in range(cfg.repeats):
        torch.manual_seed(cfg.seed)
        _sync(device)
        started = time.perf_counter()
        result = sample_rollout(model, tokenizer, examples, **sampling)
        _sync(device)
        times.append(time.perf_counter() - started)
        tokens = sum(result.lengths)
        rollout = rollout or result
    seconds = _median(times)
    samples = cfg.prompts * cfg.k
    results["rollout"] = {"seconds": seconds, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for name, logps_fn in (("completion_only", completion_logps), ("full_logits", full_logits_logps)):
        times, tokens = [], 0
        grpo_update(logps_fn, model, optimizer, rollout, cfg.k, device)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(cfg.repeats):
            _sync(device)
            started = time.perf_counter()
            tokens = grpo_update(logps_fn, model, optimizer, rollout, cfg.k, device)
            _sync(device)
            times.append(time.perf_counter() - started)
        seconds = _median(times)
        row = {"seconds": seconds, "samples_per_s": cfg.prompts * cfg.k / seconds, "tokens_per_s": tokens / seconds}
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        results[f"update_{name}"] = row
    return {
        "config": asdict(cfg),
        "device": str(device),
        **results,
        # what switching the optimisation off costs, in this ablation only
        "update_ratio": results["update_completion_only"]["tokens_per_s"]
        / results["update_full_logits"]["tokens_per_s"],
    }
