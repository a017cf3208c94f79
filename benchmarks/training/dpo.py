"""`cherry bench dpo --against ablation`: one optimisation switched off, not a comparison with another tool.

The same DPO step (policy forward + backward, reference forward, AdamW step) on the same tiny
Llama-architecture model and batch, twice: with the engine's completion-only log-probs (the LM head
on completion positions only) and with that optimisation removed (`full_logits_logps`: logits and
log-softmax at every position, then masked). Each path runs in its own fresh process so that peak
memory is measured without the other's allocations; the report gives tokens/s and peak memory of
both and their ratios, and checks that the two losses agree. What the optimisation is worth against
what users run instead is `cherry bench dpo --against trl` (benchmarks/training/against.py).
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.training import bench_device
from engine.batching import collate_preference
from engine.logprobs import completion_logps, full_logits_logps
from engine.losses.dpo import dpo_loss

PATHS = {"completion-only": completion_logps, "full-logits": full_logits_logps}


@dataclass
class BenchConfig:
    seq_len: int = 256  # prompt + completion tokens per sequence
    prompt_len: int = 192  # long prompts, short answers: the usual shape of preference data
    pairs: int = 8
    vocab: int = 32000  # Llama-2-sized vocabulary: the LM head is where the full-logits path loses
    hidden: int = 256
    layers: int = 2
    steps: int = 5
    warmup: int = 1
    threads: int = 0
    device: str = "auto"
    seed: int = 0


def build_case(cfg: BenchConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.hidden * 4,
        num_hidden_layers=cfg.layers,
        num_attention_heads=max(1, cfg.hidden // 64),
        num_key_value_heads=max(1, cfg.hidden // 64),
        max_position_embeddings=max(cfg.seq_len, 64),
        tie_word_embeddings=False,
    )
    policy = LlamaForCausalLM(config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    completion_len = cfg.seq_len - cfg.prompt_len

    def ids(n: int) -> list[int]:
        return torch.randint(3, cfg.vocab, (n,), generator=generator).tolist()

    examples = [
        {
            "index": i,
            "prompt_ids": ids(cfg.prompt_len),
            "chosen_ids": ids(completion_len),
            "rejected_ids": ids(completion_len),
        }
        for i in range(cfg.pairs)
    ]
    return policy, reference, collate_preference(examples, pad_id=0)


def dpo_step_loss(logps_fn, policy, reference, batch) -> torch.Tensor:
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    pairs = batch["index"].numel()
    policy_sums = logps_fn(policy, *args).sums
    with torch.no_grad():
        ref_sums = logps_fn(reference, *args).sums
    losses, _ = dpo_loss(policy_sums[:pairs], policy_sums[pairs:], ref_sums[:pairs], ref_sums[pairs:], beta=0.1)
    return losses.mean()


def run_path(path: str, cfg: BenchConfig) -> dict:
    """Time one path in this process (called in a fresh child process by `compare`)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = bench_device(cfg.device)
    policy, reference, batch = build_case(cfg)
    policy.to(device)
    reference.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    logps_fn = PATHS[path]
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = dpo_step_loss(logps_fn, policy, reference, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - started)
    tokens = int(batch["attention_mask"].sum())
    step_seconds = sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - baseline_rss
    return {
        "path": path,
        "step_seconds": step_seconds,
        "tokens_per_s": tokens / step_seconds,
        "peak_mem_gb": peak_gb,
        "device": str(device),
        "memory": "peak CUDA allocated" if device.type == "cuda" else "peak RSS growth during steps",
    }


def losses_agree(cfg: BenchConfig) -> float:
    policy, reference, batch = build_case(cfg)
    kept = dpo_step_loss(completion_logps, policy, reference, batch).item()
    full = dpo_step_loss(full_logits_logps, policy, reference, batch).item()
    return abs(kept - full)


def compare(cfg: BenchConfig) -> dict:
    results = {}
    for path in PATHS:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.training.dpo", path, json.dumps(asdict(cfg))],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark of the {path} path failed:\n{proc.stderr[-2000:]}")
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    kept, full = results["completion-only"], results["full-logits"]
    return {
        "config": asdict(cfg),
        "completion_only": kept,
        "full_logits": full,
        # what switching the optimisation off costs, in this ablation only
        "throughput_ratio": kept["tokens_per_s"] / full["tokens_per_s"],
        "memory_ratio": full["peak_mem_gb"] / max(kept["peak_mem_gb"], 1e-9),
        "loss_abs_diff": losses_agree(cfg),
    }


if __name__ == "__main__":  # child-process entry: python -m benchmarks.training.dpo PATH CONFIG_JSON
    print(json.dumps(run_path(sys.argv[1], BenchConfig(**json.loads(sys.argv[2])))))
