"""Build the embedded demo: a tiny Llama that is partially skilled at two verifiable tasks,
and the datasets for every algorithm family, deterministically from a seed.

    python -m engine.demo.build presets/demo [--seed 0]

Steps: byte-level tokenizer -> random-init ~0.9M-parameter Llama -> SFT on `sft.jsonl`
(answer-only loss) until the greedy exact-match accuracy on the held-out `eval.jsonl` first
reaches a partial target -> preference / unpaired data sampled from that model -> save.
The model is left only partly skilled on purpose, so that preference training has room to show
a gain on the held-out set.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.batching import collate_completions
from engine.demo.tasks import TASKS, make_tasks
from engine.demo.tokenizer import build_tokenizer
from engine.evaluate import exact_match_accuracy
from engine.generation import decode_completions, generate
from engine.logprobs import completion_logps
from engine.rewards import exact_match


@dataclass
class DemoConfig:
    n_eval: int = 200
    n_sft: int = 2000
    n_pairs: int = 2000
    n_unpaired: int = 2000
    n_prompts: int = 2000
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 64
    lr: float = 2e-3
    warmup_steps: int = 20
    batch_size: int = 64
    eval_every: int = 10
    target_accuracy: float = 0.35
    max_steps: int = 3000
    max_new_tokens: int = 12
    sample_tries: int = 4


# ---------------------------------------------------------------------------------------------
# encoding


def chat_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat_completion(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def encode_prompt(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(chat_prompt(text), add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)


def encode_completion(tokenizer, prompt_ids: list[int], text: str, prompt: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(chat_prompt(prompt) + chat_completion(text), tokenize=False)
    full = tokenizer.encode(rendered, add_special_tokens=False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise AssertionError("chat template: the generation prompt is not a prefix of the full conversation")
    return full[len(prompt_ids) :]


# ---------------------------------------------------------------------------------------------
# model


def build_model(tokenizer, cfg: DemoConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# SFT


def evaluate_tasks(model, tokenizer, examples: list[dict], max_new_tokens: int) -> dict:
    result = exact_match_accuracy(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    per_task = {}
    for kind in TASKS:
        flags = [ok for ok, ex in zip(result["correct"], examples) if ex["task"] == kind]
        per_task[kind] = sum(flags) / len(flags) if flags else 0.0
    return {"accuracy": result["accuracy"], "per_task": per_task}


def sft_until_target(model, tokenizer, train: list[dict], held_out: list[dict], cfg: DemoConfig, seed: int, log) -> dict:
    """Answer-only SFT; stops at the first evaluation whose held-out accuracy reaches the target."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    step = 0
    history = []
    t0 = time.time()
    model.train()
    while True:
        if step % cfg.eval_every == 0 and step > 0:
            ev = evaluate_tasks(model, tokenizer, held_out, cfg.max_new_tokens)
            history.append({"step": step, **ev})
            log(
                f"sft step {step}: held-out accuracy {ev['accuracy']:.3f} "
                + " ".join(f"{k}={v:.3f}" for k, v in ev["per_task"].items())
                + f" ({time.time() - t0:.0f}s)"
            )
            if ev["accuracy"] >= cfg.target_accuracy or step >= cfg.max_steps:
                model.eval()
                return {"steps": step, "history": history, **ev}
            model.train()
        if len(order) < cfg.batch_size:
            epoch = list(range(len(train)))
            rng.shuffle(epoch)
            order.extend(epoch)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = collate_completions(
            [train[i]["prompt_ids"] for i in idx], [train[i]["completion_ids"] for i in idx], tokenizer.pad_token_id
        )
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        out = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        loss = -out.token_logps.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"sft step {step}: loss {loss.item():.3f}")
