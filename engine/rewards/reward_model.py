"""Score text with a trained reward model: an earlier Cherry RM run, a local classifier directory
or a hub id; Llama 2's helpfulness + safety combination of two of them.

With `safety_model` (a second reward model, same forms as `rm:`), the `rm:` source's score becomes
Llama 2's combined reward (`helpful_safety_scores`): the safety model's score on prompts tagged by
a boolean `safety` column (all False when the column is absent) or whose safety probability is
below `safety_threshold` (0.15), else the helpfulness score, then logit and whitened over the
scored batch. The raw scores are kept in `RewardResult.extras` as `rm/helpful` and `rm/safety`.
It needs exactly one `rm:` source.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from engine.batching import collate_completions
from engine.data.tokenise import appends_eos
from engine.errors import CherryError
from engine.losses.reward import combine_helpful_safety, logit_whiten
from engine.models import disable_dropout, load_error, load_tokenizer, pick_device, sequence_rewards


def resolve_reward_model(source: str) -> Path | str:
    """A run directory means its final/ weights; anything else is a model dir or hub id."""
    path = Path(source).expanduser()
    if (path / "final").is_dir():
        return path / "final"
    if path.exists():
        return path
    if source.startswith((".", "/", "~")):
        raise CherryError(f"--reward-model {source}: no such run directory or model directory")
    return source


def load_reward_source(source: str, device: str = "auto"):
    """(model, tokenizer) for scoring; a LoRA reward adapter is loaded onto its base."""
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_reward_model(source)
    target = pick_device(device)
    tokenizer = load_tokenizer(str(resolved))
    try:
        if isinstance(resolved, Path) and (resolved / "adapter_config.json").exists():
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(resolved, num_labels=1)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(resolved, num_labels=1)
    except Exception as err:
        raise load_error("a reward model", str(resolved), err) from None
    disable_dropout(model)
    return model.to(target).eval(), tokenizer


@torch.no_grad()
def score_completions(
    model, tokenizer, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 16
) -> list[float]:
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = collate_completions(
            prompts[start : start + batch_size], completions[start : start + batch_size], tokenizer.pad_token_id
        )
        scores.extend(
            sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
        )
    return scores


def helpful_safety_scores(
    helpful: list[float], safety: list[float], is_safety_prompt: list[bool], threshold: float = 0.15
) -> list[float]:
    """Llama 2's combined reward over a set of scored rows: the safety RM's score where the prompt is
    safety-tagged or that score is below `threshold`, else the helpfulness score (both as sigmoid
    probabilities), then whitened logits (engine.losses.reward)."""
    combined = combine_helpful_safety(
        torch.sigmoid(torch.tensor(helpful, dtype=torch.float64)),
        torch.sigmoid(torch.tensor(safety, dtype=torch.float64)),
        torch.tensor(is_safety_prompt),
        threshold,
    )
    return logit_whiten(combined).tolist()


def reward_scorer(model, tokenizer, batch_size: int = 16, safety_model=None, safety_threshold: float = 0.15):
    """A function (prompts, completions, safety tags) -> scores: one RM, or the helpful + safety pair."""

    def score(prompts: list[list[int]], completions: list[list[int]], tags: list[bool]) -> list[float]:
        helpful = score_completions(model, tokenizer, prompts, completions, batch_size)
        if safety_model is None:
            return helpful
        safety = score_completions(safety_model, tokenizer, prompts, completions, batch_size)
        return helpful_safety_scores(helpful, safety, tags, safety_threshold)

    return score


def score_dataset(data, score) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-row scores and a summary. Preference rows give pairwise accuracy and margin."""
    rows = data.train + data.eval
    prompts = [ex["prompt_ids"] for ex in rows]
    tags = [bool(ex.get("safety")) for ex in rows]
    if data.kind == "preference":
        # Chosen and rejected are scored as one set: the combined reward whitens over all of them.
        both = score(
            prompts + prompts, [ex["chosen_ids"] for ex in rows] + [ex["rejected_ids"] for ex in rows], tags + tags
        )
        chosen, rejected = both[: len(rows)], both[len(rows) :]
        scored = [
            {
                "prompt": ex["prompt"],
                "chosen": ex["chosen"],
                "rejected": ex["rejected"],
                "chosen_score": c,
                "rejected_score": r,
            }
            for ex, c, r in zip(rows, chosen, rejected)
        ]
        margins = [c - r for c, r in zip(chosen, rejected)]
        summary = {
            "pairs": len(rows),
            "accuracy": sum(m > 0 for m in margins) / len(margins),
            "margin_mean": sum(margins) / len(margins),
            **_stats(chosen + rejected),
        }
        return scored, summary
    scores = score(prompts, [ex["completion_ids"] for ex in rows], tags)
    scored = [{"prompt": ex["prompt"], "completion": ex["completion"], "score": s} for ex, s in zip(rows, scores)]
    return scored, {"rows": len(rows), **_stats(scores)}


def _stats(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"score_mean": mean, "score_std": std, "score_min": min(values), "score_max": max(values)}


class RewardModelScorer:
    """Raw scores of one reward model on prompt + completion, in the policy's ids or re-tokenised."""

    def __init__(self, entry: str, source: str, policy_tokenizer: Any, *, device: str = "cpu", batch_size: int = 16):
        path = Path(source).expanduser()
        if source.startswith((".", "/", "~")) and not path.exists():
            raise CherryError(f"{entry}: no such run directory or model directory {path}")
        try:
            self.model, self.tokenizer = load_reward_source(source, device)
        except CherryError as err:
            raise type(err)(f"{entry}: {err}") from None
        self.entry = entry
        self.batch_size = batch_size
        self.policy_eos = getattr(policy_tokenizer, "eos_token_id", None)
        self.same_vocab = policy_tokenizer is not None and policy_tokenizer.get_vocab() == self.tokenizer.get_vocab()
        self._strip_prompt_eos = None if self.same_vocab else appends_eos(self.tokenizer)

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        columns: dict[str, list],
    ) -> list[float]:
        if not self.same_vocab:
            prompt_ids, completion_ids = self.retokenise(prompts, completions, completion_ids, columns)
        if any(len(p) + len(c) == 0 for p, c in zip(prompt_ids, completion_ids)):
            raise ValueError(f"{self.entry}: an empty prompt + completion cannot be scored")
        return score_completions(self.model, self.tokenizer, prompt_ids, completion_ids, self.batch_size)

    def retokenise(
        self, prompts: list[str], completions: list[str], completion_ids: list[list[int]], columns: dict[str, list]
    ) -> tuple[list[list[int]], list[list[int]]]:
        """The texts in the reward model's tokens, laid out as engine.data lays out training rows."""
        tok = self.tokenizer
        messages = columns.get("messages") if getattr(tok, "chat_template", None) else None
        finished = [bool(ids) and self.policy_eos is not None and ids[-1] == self.policy_eos for ids in completion_ids]
        plain_rows, chat_rows, comp_texts = [], [], []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            conversation = messages[i] if messages is not None else None
            if isinstance(conversation, list) and conversation:
                prompt_text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
                comp_text = completion
                if finished[i]:
                    full = tok.apply_chat_template(
                        conversation + [{"role": "assistant", "content": completion}], tokenize=False
                    )
                    if full.startswith(prompt_text):
                        comp_text = full[len(prompt_text) :]
                chat_rows.append((i, prompt_text))
            else:
                plain_rows.append((i, prompt))
                comp_text = completion
            comp_texts.append(comp_text)
        prompt_ids: list[list[int]] = [[] for _ in prompts]
        for rows, special in ((plain_rows, True), (chat_rows, False)):
            if rows:
                encoded = tok([text for _, text in rows], add_special_tokens=special)["input_ids"]
                for (i, _), ids in zip(rows, encoded):
                    ids = list(ids)
                    if special and self._strip_prompt_eos and ids and ids[-1] == tok.eos_token_id:
                        ids.pop()
                    prompt_ids[i] = ids
        comp_ids = [list(ids) for ids in tok(comp_texts, add_special_tokens=False)["input_ids"]] if comp_texts else []
        for ids, done in zip(comp_ids, finished):
            if done and (not ids or ids[-1] != tok.eos_token_id):
                ids.append(tok.eos_token_id)
        return prompt_ids, comp_ids
