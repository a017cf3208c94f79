"""`cherry bench gpu`: DPO and GRPO steps at a real 0.5B-class shape in bf16 mixed precision.

The model is a random-init Qwen2 with Qwen2-0.5B's shape (24 layers, hidden 896, 151,936-token
vocabulary); nothing is downloaded. The run uses the training engine's own pieces: `Precision`
(fp32 weights and AdamW state, bf16 autocast forward passes), `completion_logps`, the DPO loss,
`sample_rollout` and the GRPO loss. It reports:

- tokens/s of a DPO step (policy forward + backward, frozen bf16 reference forward, AdamW) and of a
  GRPO step's rollout and update;
- model FLOPs utilisation, MFU = the work that runs per second / the GPU's peak dense bf16 FLOP/s.
  The work of a batch (`train_flops`; 6 = forward 2 + backward 4 FLOPs per weight per position):
  6 x the body's weights at every position, 6 x the LM head's weights at completion positions only
  (the chunked head runs nowhere else; embedding lookups cost nothing), and causal attention's
  6 x layers x hidden x the positions each one attends to. The frozen reference's forward is not
  counted;
- peak GPU memory;
- the weight-update check: the same DPO steps at lr 1e-6 from the same start in fp32 and in bf16
  mixed precision move the weights by about the same amount in about the same direction (cosine
  of the two weight deltas, ratio of their norms); it passes within `UPDATE_CHECK` and the command
  exits 1 when it does not.

`tiny=True` (`--dry-run`) runs the same code on a tiny config, on the CPU when there is no GPU.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.training.dpo import dpo_step_loss
from benchmarks.training.grpo import _Tokenizer, grpo_update
from engine.batching import collate_completions, collate_preference
from engine.logprobs import completion_logps
from engine.models import Precision
from engine.rollout import sample_rollout

# Peak dense bf16 tensor FLOP/s (no sparsity) by a name the GPU reports; the first match wins, so a
# variant comes before its family (an H100 PCIe or NVL is slower than the SXM part).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)

# Qwen2-0.5B's shape (its config.json), random-init here.
QWEN2_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


@dataclass
class GPUBenchConfig:
    tiny: bool = False  # the dry run: a tiny config, on the CPU when there is no GPU
    pairs: int = 8  # DPO pairs per step
    seq_len: int = 512  # DPO tokens per row
    prompt_len: int = 384
    prompts: int = 8  # GRPO prompts per step
    k: int = 8  # GRPO samples per prompt
    grpo_prompt_len: int = 128
    max_new_tokens: int = 128
    steps: int = 5  # timed steps (median reported)
    check_steps: int = 10  # steps of the bf16-vs-fp32 weight-update check
    check_lr: float = 1e-6
    seed: int = 0

    @classmethod
    def dry_run(cls) -> GPUBenchConfig:
        return cls(
            tiny=True,
            pairs=2,
            seq_len=24,
            prompt_len=16,
            prompts=2,
            k=2,
            grpo_prompt_len=8,
            max_new_tokens=6,
            steps=2,
            check_steps=5,
        )


def peak_bf16_flops(gpu_name: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in gpu_name.lower():
            return flops
    return None


# The weight-update check passes when bf16 mixed precision moves the weights in about fp32's direction
# (cosine of the two deltas at least this) by about as much (their norms' ratio within this range).
UPDATE_CHECK = {"min_cosine": 0.9, "norm_ratio": (0.8, 1.25)}


def update_check_passes(check: dict) -> bool:
    low, high = UPDATE_CHECK["norm_ratio"]
    return check["cosine"] >= UPDATE_CHECK["min_cosine"] and low <= check["norm_ratio"] <= high


def train_flops(config, params: int, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> float:
    """Model FLOPs of one forward and backward of a right-padded batch by a model of `params` weights: the
    body's weights at every real position, the LM head's at completion positions, causal attention over
    each position's prefix."""
    vocab, hidden = config.vocab_size, config.hidden_size
    head = vocab * hidden
    body = params - head * (1 if config.tie_word_embeddings else 2)  # less the embedding and the head
    lengths = attention_mask.sum(-1).double()
    positions = float(lengths.sum())
    attended = float((lengths * (lengths + 1) / 2).sum())  # position p attends to p + 1 positions
    completions = float(completion_mask.sum())
    # attention per layer per attended position: QK^T and AV, 2 x 2 x hidden forward, x 3 with backward
    return 6 * body * positions + 6 * head * completions + 12 * config.num_hidden_layers * hidden * attended


def mfu(flops_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOP/s over the GPU's peak: the fraction of the GPU the training work uses."""
    return None if not peak_flops else flops_per_s / peak_flops


def build_model(cfg: GPUBenchConfig, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    config = Qwen2Config(**(TINY if cfg.tiny else QWEN2_05B), eos_token_id=1, pad_token_id=0, bos_token_id=2)
    return Qwen2ForCausalLM(config).to(device)  # fp32 weights: what trains stays fp32


def preference_batch(cfg: GPUBenchConfig, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(cfg.seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    completion = cfg.seq_len - cfg.prompt_len
    examples = [
        {"index": i, "prompt_ids": ids(cfg.prompt_len), "chosen_ids": ids(completion), "rejected_ids": ids(completion)}
        for i in range(cfg.pairs)
    ]
    return {k: v.to(device) for k, v in collate_preference(examples, pad_id=0).items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    started = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - started, result


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _autocast_logps(precision: Precision):
    """completion_logps with its forward under the run's autocast (the backward runs outside it)."""

    def logps(model, *args, **kwargs):
        with precision.autocast():
            return completion_logps(model, *args, **kwargs)

    return logps


def dpo_steps(policy, reference, batch, precision: Precision, steps: int, lr: float) -> list[float]:
    """`steps` DPO steps (loss, backward, AdamW) in `precision`; returns each step's seconds."""
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    logps = _autocast_logps(precision)
    seconds = []
    for _ in range(steps):

        def step():
            precision.backward(dpo_step_loss(logps, policy, reference, batch))
            precision.step(optimizer)
            optimizer.zero_grad(set_to_none=True)

        seconds.append(_timed(step, precision.device)[0])
    return seconds


def weight_update_check(cfg: GPUBenchConfig, start, reference, batch, device: torch.device) -> dict:
    """The same DPO steps from the same start in fp32 and in bf16 mixed precision: their weight deltas."""
    before = {name: p.detach().clone() for name, p in start.named_parameters()}
    deltas = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        policy = copy.deepcopy(start)
        dpo_steps(policy, reference, batch, Precision(dtype, device), cfg.check_steps, cfg.check_lr)
        deltas[name] = torch.cat([(p.detach() - before[n]).flatten().float() for n, p in policy.named_parameters()])
        del policy
    fp32, bf16 = deltas["fp32"], deltas["bf16"]
    return {
        "steps": cfg.check_steps,
        "lr": cfg.check_lr,
        "cosine": torch.nn.functional.cosine_similarity(fp32, bf16, dim=0).item(),
        "norm_ratio": (bf16.norm() / fp32.norm().clamp(min=1e-30)).item(),
    }


def run(cfg: GPUBenchConfig) -> dict:
    """The whole check on the GPU (or, for the tiny dry run without one, the CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not cfg.tiny:
        raise RuntimeError("the full GPU check needs a CUDA GPU; use the dry run on the CPU")
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_flops = peak_bf16_flops(gpu_name) if device.type == "cuda" else None
    precision = Precision(torch.bfloat16, device)
    policy = build_model(cfg, device)
    params = sum(p.numel() for p in policy.parameters())
    reference = copy.deepcopy(policy).to(precision.frozen_dtype).eval().requires_grad_(False)
    batch = preference_batch(cfg, policy.config.vocab_size, device)

    check = weight_update_check(cfg, policy, reference, batch, device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dpo_seconds = _median(dpo_steps(policy, reference, batch, precision, cfg.steps + 1, 1e-6)[1:])  # 1 warm-up
    dpo_tokens = int(batch["attention_mask"].sum())
    dpo = {"step_seconds": dpo_seconds, "tokens_per_s": dpo_tokens / dpo_seconds}
    # The policy's forward and backward; the reference's forward is extra work, not counted.
    dpo_flops = train_flops(policy.config, params, batch["attention_mask"], batch["completion_mask"])
    dpo["flops_per_token"] = dpo_flops / dpo_tokens
    dpo["mfu"] = mfu(dpo_flops / dpo_seconds, peak_flops)

    generator = torch.Generator().manual_seed(cfg.seed)
    lengths = torch.randint(cfg.grpo_prompt_len // 2, cfg.grpo_prompt_len + 1, (cfg.prompts,), generator=generator)
    examples = [
        {
            "prompt": str(i),
            "prompt_ids": torch.randint(3, policy.config.vocab_size, (int(n),), generator=generator).tolist(),
        }
        for i, n in enumerate(lengths)
    ]
    tokenizer = _Tokenizer(eos=1, pad=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    logps = _autocast_logps(precision)
    rollout_times, update_times, sampled, trained = [], [], 0, 0
    for _ in range(cfg.steps + 1):
        with precision.autocast():
            seconds, rollout = _timed(
                lambda: sample_rollout(
                    policy, tokenizer, examples, k=cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=1.0
                ),
                device,
            )
        rollout_times.append(seconds)
        sampled = sum(rollout.lengths)
        seconds, trained = _timed(lambda: grpo_update(logps, policy, optimizer, rollout, cfg.k, device), device)
        update_times.append(seconds)
    rollout_s, update_s = _median(rollout_times[1:]), _median(update_times[1:])
    update_batch = collate_completions(rollout.prompt_ids, rollout.completion_ids, 0)  # what grpo_update trains on
    update_flops = train_flops(policy.config, params, update_batch["attention_mask"], update_batch["completion_mask"])
    grpo = {
        "rollout_seconds": rollout_s,
        "rollout_tokens_per_s": sampled / rollout_s,
        "update_seconds": update_s,
        "update_tokens_per_s": trained / update_s,
        "update_flops_per_token": update_flops / trained,
        "update_mfu": mfu(update_flops / update_s, peak_flops),
    }
    check["passed"] = update_check_passes(check)
    return {
        "config": asdict(cfg),
        "device": gpu_name,
        "params": params,
        "peak_bf16_flops": peak_flops,
        "dpo": dpo,
        "grpo": grpo,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "weight_update_check": check,
    }
