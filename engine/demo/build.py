"""Build the embedded demo: a tiny Llama that is partially skilled at two verifiable tasks,
and datasets for every algorithm family, deterministically from a seed.

    python -m engine.demo.build presets/demo [--seed 0]

Steps: byte-level tokenizer -> random-init ~0.9M-parameter Llama -> SFT (answer-only loss) until
the greedy exact-match accuracy on the held-out `eval.jsonl` first reaches a partial target ->
preference / unpaired data sampled from that model -> save.

The model is stopped part-way on purpose, so that preference training has room to show a gain.
Each task is learned in a sudden jump (from ~0% to ~90% within ~100 steps once it starts), so
the stopping point is checked every `eval_every` steps and needs every task above
`min_task_accuracy`. With seed 0 both jumps overlap and the build stops with both tasks part-way;
with other seeds one task may be well ahead of the other (see the per-task accuracies in
`info.json`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.batching import collate_completions
from engine.data import prepare
from engine.demo.tasks import TASKS, make_tasks
from engine.demo.tokenizer import build_tokenizer
from engine.generation import decode_completions, generate
from engine.logprobs import completion_logps
from engine.loop.evaluation import exact_match_accuracy
from engine.rewards import exact_match


@dataclass
class DemoConfig:
    n_eval: int = 200
    n_sft_pool: int = 8000  # the examples the demo model is trained on
    n_sft: int = 2000  # sft.jsonl (other training prompts)
    n_pairs: int = 2000
    n_unpaired: int = 2000
    n_prompts: int = 2000
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 64
    tie_embeddings: bool = False  # untied: +33k parameters
    lr: float = 2e-3
    warmup_steps: int = 20
    batch_size: int = 64
    eval_every: int = 10
    target_accuracy: float = 0.35  # stop at the first evaluation reaching this overall ...
    min_task_accuracy: float = 0.15  # ... with every task at least this good
    max_steps: int = 3000
    max_new_tokens: int = 16
    sample_tries: int = 4


# ---------------------------------------------------------------------------------------------
# encoding

# Demo rows are far shorter than this (<= 25 tokens); the limit only guards the position table.
MAX_TOKENS = 64


def chat_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat_completion(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _encode(tokenizer, items: list[dict]) -> list[dict]:
    """Add prompt_ids / completion_ids to task items, tokenised the engine's one way (engine.data)."""
    rows = [{"prompt": chat_prompt(it["prompt"]), "completion": chat_completion(it["answer"])} for it in items]
    examples = prepare(
        rows, tokenizer, kind="sft", max_length=MAX_TOKENS, max_prompt_length=MAX_TOKENS - 1, eval_split=0.0
    ).train
    for item, example in zip(items, examples, strict=True):
        item["prompt_ids"], item["completion_ids"] = example["prompt_ids"], example["completion_ids"]
    return items


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
        tie_word_embeddings=cfg.tie_embeddings,
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


def evaluate_tasks(model, tokenizer, examples: list[dict], max_new_tokens: int = 16) -> dict:
    """Greedy exact-match accuracy overall and per task (examples carry prompt_ids, answer, task)."""
    result = exact_match_accuracy(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    per_task = {}
    for kind in TASKS:
        flags = [ok for ok, ex in zip(result["correct"], examples) if ex["task"] == kind]
        per_task[kind] = round(sum(flags) / len(flags), 4) if flags else 0.0
    return {"accuracy": round(result["accuracy"], 4), "per_task": per_task}


def sft_until_target(
    model, tokenizer, train: list[dict], held_out: list[dict], cfg: DemoConfig, seed: int, log
) -> dict:
    """Answer-only SFT, evaluated every `eval_every` steps; stops at the first evaluation whose
    held-out accuracy reaches `target_accuracy` with every task at `min_task_accuracy` or more."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    step = 0
    history = []
    t0 = time.time()
    loss = torch.tensor(float("nan"))  # the last step's loss, reported at eval points
    model.train()
    while True:
        if step > 0 and step % cfg.eval_every == 0:
            ev = evaluate_tasks(model, tokenizer, held_out, cfg.max_new_tokens)
            history.append({"step": step, **ev})
            reached = ev["accuracy"] >= cfg.target_accuracy and min(ev["per_task"].values()) >= cfg.min_task_accuracy
            if reached or step % (5 * cfg.eval_every) == 0 or step >= cfg.max_steps:
                log(
                    f"sft step {step}: loss {loss.item():.3f}, held-out accuracy {ev['accuracy']:.3f} ("
                    + ", ".join(f"{k} {v:.3f}" for k, v in ev["per_task"].items())
                    + f") [{time.time() - t0:.0f}s]"
                )
            if reached or step >= cfg.max_steps:
                if not reached:
                    log(f"warning: SFT stopped at max_steps={cfg.max_steps} before reaching the target")
                model.eval()
                return {"steps": step, "target_reached": reached, "history": history, **ev}
            model.train()
        if len(order) < cfg.batch_size:
            epoch = list(range(len(train)))
            rng.shuffle(epoch)
            order.extend(epoch)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = collate_completions(
            [train[i]["prompt_ids"] for i in idx], [train[i]["completion_ids"] for i in idx], tokenizer.pad_token_id
        )
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        out = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        loss = -out.token_logps.mean()  # mean NLL over completion tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1


# ---------------------------------------------------------------------------------------------
# sampled datasets


def perturb(answer: str, rng: random.Random) -> str:
    """A wrong answer close to the right one: one character changed (a digit or a letter)."""
    alphabet = "0123456789" if answer.isdigit() else "abcdefghijklmnopqrstuvwxyz"
    pos = rng.randrange(len(answer))
    choices = [c for c in alphabet if c != answer[pos] and not (pos == 0 and c == "0" and len(answer) > 1)]
    return answer[:pos] + rng.choice(choices) + answer[pos + 1 :]


# The shipped demo data was drawn with transformers' default top-k of 50 (then implicit); keeping it
# explicit here rebuilds the same files from the seed.
DEMO_SAMPLING_TOP_K = 50


def sample_texts(model, tokenizer, items: list[dict], max_new_tokens: int) -> list[str]:
    ids = generate(
        model,
        tokenizer,
        [it["prompt_ids"] for it in items],
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_k=DEMO_SAMPLING_TOP_K,
    )
    return decode_completions(tokenizer, ids)


def make_pairs(model, tokenizer, items: list[dict], cfg: DemoConfig, seed: int) -> tuple[list[dict], int]:
    """chosen = gold answer; rejected = a wrong non-empty sample of the model (temperature 1), up to
    `sample_tries` draws per prompt; prompts the model always got right fall back to a perturbed
    sample. Returns the rows and the fallback count."""
    torch.manual_seed(seed)
    rejected: list[str | None] = [None] * len(items)
    last: list[str] = [it["answer"] for it in items]
    for _ in range(cfg.sample_tries):
        todo = [i for i, r in enumerate(rejected) if r is None]
        if not todo:
            break
        texts = sample_texts(model, tokenizer, [items[i] for i in todo], cfg.max_new_tokens)
        for i, text in zip(todo, texts):
            last[i] = text
            if text.strip() and exact_match(text, items[i]["answer"]) == 0.0:
                rejected[i] = text
    rng = random.Random(seed)
    fallbacks = 0
    for i, r in enumerate(rejected):
        if r is None:
            fallbacks += 1
            base = last[i].strip() if last[i].strip() else items[i]["answer"]
            candidate = perturb(base, rng)
            while exact_match(candidate, items[i]["answer"]) == 1.0:
                candidate = perturb(base, rng)
            rejected[i] = candidate
    rows = [
        {
            "prompt": chat_prompt(it["prompt"]),
            "chosen": chat_completion(it["answer"]),
            "rejected": chat_completion(rej),
        }
        for it, rej in zip(items, rejected)
    ]
    return rows, fallbacks


def make_unpaired(model, tokenizer, items: list[dict], cfg: DemoConfig, seed: int) -> list[dict]:
    """One model sample per prompt (temperature 1), labelled by exact match."""
    torch.manual_seed(seed)
    texts = sample_texts(model, tokenizer, items, cfg.max_new_tokens)
    return [
        {
            "prompt": chat_prompt(it["prompt"]),
            "completion": chat_completion(text),
            "label": exact_match(text, it["answer"]) == 1.0,
        }
        for it, text in zip(items, texts)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# build


def build_demo(out_dir: Path, seed: int = 0, log: Callable[[str], None] = print, cfg: DemoConfig | None = None) -> dict:
    """Build the demo model, tokenizer and datasets into `out_dir`; return the info dict."""
    import transformers

    cfg = cfg or DemoConfig()
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(seed)

    tokenizer = build_tokenizer()
    held_out = _encode(tokenizer, make_tasks(cfg.n_eval, seed + 1000))
    held_out_prompts = {it["prompt"] for it in held_out}
    sft_pool = _encode(
        tokenizer,
        make_tasks(cfg.n_sft_pool, seed + 1, exclude=held_out_prompts),
    )
    n_data = cfg.n_sft + cfg.n_pairs + cfg.n_unpaired + cfg.n_prompts
    data_items = _encode(tokenizer, make_tasks(n_data, seed + 2, exclude=held_out_prompts))
    cuts = [0, cfg.n_sft, cfg.n_sft + cfg.n_pairs, cfg.n_sft + cfg.n_pairs + cfg.n_unpaired, n_data]
    sft_items, pair_items, unpaired_items, prompt_items = (data_items[a:b] for a, b in zip(cuts, cuts[1:]))
    longest = max(len(it["prompt_ids"]) + len(it["completion_ids"]) for it in held_out + sft_pool + data_items)
    log(f"tasks: {len(held_out)} held-out, {len(sft_pool)} SFT pool, {n_data} for datasets; longest {longest} tokens")

    model = build_model(tokenizer, cfg, seed)
    params = n_params(model)
    log(f"model: Llama {cfg.num_layers}x{cfg.hidden_size}, {params:,} parameters")

    sft = sft_until_target(model, tokenizer, sft_pool, held_out, cfg, seed, log)
    log(f"SFT stopped after {sft['steps']} steps: held-out accuracy {sft['accuracy']:.3f} {sft['per_task']}")

    write_jsonl(
        out_dir / "sft.jsonl",
        [{"prompt": chat_prompt(it["prompt"]), "completion": chat_completion(it["answer"])} for it in sft_items],
    )
    pairs, fallbacks = make_pairs(model, tokenizer, pair_items, cfg, seed + 3)
    write_jsonl(out_dir / "pairs.jsonl", pairs)
    log(f"pairs: {len(pairs)} ({fallbacks} rejected answers by perturbation)")
    unpaired = make_unpaired(model, tokenizer, unpaired_items, cfg, seed + 4)
    write_jsonl(out_dir / "unpaired.jsonl", unpaired)
    n_true = sum(r["label"] for r in unpaired)
    log(f"unpaired: {len(unpaired)} ({n_true} labelled True)")
    write_jsonl(
        out_dir / "prompts.jsonl",
        [{"prompt": chat_prompt(it["prompt"]), "answer": it["answer"]} for it in prompt_items],
    )
    write_jsonl(
        out_dir / "eval.jsonl", [{"prompt": chat_prompt(it["prompt"]), "answer": it["answer"]} for it in held_out]
    )

    model_dir = out_dir / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    info = {
        "seed": seed,
        "parameters": params,
        "architecture": {
            "type": "llama",
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "layers": cfg.num_layers,
            "heads": cfg.num_heads,
            "vocab_size": len(tokenizer),
            "tied_embeddings": cfg.tie_embeddings,
        },
        "sft": {
            "steps": sft["steps"],
            "target_reached": sft["target_reached"],
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "pool_size": len(sft_pool),
            "target_accuracy": cfg.target_accuracy,
            "min_task_accuracy": cfg.min_task_accuracy,
            "eval_every": cfg.eval_every,
        },
        "held_out_accuracy": sft["accuracy"],
        "held_out_accuracy_per_task": sft["per_task"],
        "datasets": {
            "sft.jsonl": cfg.n_sft,
            "pairs.jsonl": len(pairs),
            "unpaired.jsonl": len(unpaired),
            "prompts.jsonl": len(prompt_items),
            "eval.jsonl": len(held_out),
        },
        "pairs_rejected_fallbacks": fallbacks,
        "unpaired_true": n_true,
        "build_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"demo built in {info['build_seconds']}s -> {out_dir}")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded demo model and datasets.")
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("presets/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    build_demo(args.out_dir, seed=args.seed)


if __name__ == "__main__":
    main()
