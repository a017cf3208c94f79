"""Chain of Hindsight (Liu, Sferrazza, Abbeel 2023): learn from feedback phrases, not a reward.

Each pair becomes one sequence  x + f_a + y_a + f_b + y_b  with the blocks (positive phrase +
chosen, negative phrase + rejected) in a seeded random order; each completion keeps its EOS, so
a block ends where the model should stop. The loss is the token-mean NLL on completion tokens
only (prompt and phrases are masked). At inference the positive phrase is appended to the
prompt. Defaults (presets/coh.yaml): phrases " A good answer: " / " A bad answer: ", lr as SFT.

The paper's two regularisers:
- `coh_mask_ratio` (default 0.05, the paper's 0-5%): in each training sequence a fraction drawn
  uniformly from [0, coh_mask_ratio] of the tokens after the first is hidden from attention
  (no later token can attend to them), so the model cannot simply copy one answer into the
  other. Eval is never masked. 0 = off.
- `coh_pretrain_dataset` (default none = off) with weight `coh_pretrain_coef` (default 1.0): a
  token-mean NLL on rows of that dataset (text, prompt/completion or messages; completion tokens
  only) is added to each optimizer step's loss, `batch_size` rows drawn per micro-batch. The
  model keeps its general language modelling while it learns the feedback format. Logged as
  `pretrain_loss` (train) and `eval/pretrain_loss` (the dataset's own held-out split).

Eval also logs the NLL gap the paper's controllability rests on, on the eval pairs
(token-mean NLL per completion token):
- eval/coh/chosen_nll_positive, eval/coh/chosen_nll_negative: the chosen answer right after the
  positive and after the negative phrase; eval/coh/nll_gap = negative - positive (> 0 once the
  model ties the good answer to the positive phrase);
- eval/coh/rejected_nll_gap = NLL(rejected | positive) - NLL(rejected | negative) (> 0 once the
  bad answer is tied to the negative phrase).
"""

from __future__ import annotations

import random

import torch

from engine.algorithms.base import Algorithm
from engine.algorithms.sft import collate_sft, completion_tokens, perplexity, token_metrics
from engine.batching import collate_completions, pad_right
from engine.data import prepare
from engine.logprobs import completion_logps
from engine.losses.sft import sft_loss


def mask_earlier_tokens(
    attention_mask: torch.Tensor, max_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A copy of a right-padded [B, T] attention mask with some attended tokens set to 0.

    Each row draws its ratio uniformly from [0, max_ratio], then hides each attended token after
    the first with that probability. The first token stays (every query keeps a key to attend to)
    and padding stays padding. Positions are unchanged: the model still places every token by
    its index, it only cannot look at the hidden ones.
    """
    if max_ratio <= 0:
        return attention_mask
    rows, width = attention_mask.shape
    ratio = torch.rand(rows, 1, generator=generator, device=attention_mask.device) * max_ratio
    hide = torch.rand(rows, width, generator=generator, device=attention_mask.device) < ratio
    hide[:, 0] = False
    return attention_mask.masked_fill(hide & attention_mask.bool(), 0)


class ChainOfHindsight(Algorithm):
    """SFT's token-mean NLL, units and metrics, on chains built from preference pairs."""

    def __init__(self, spec):
        super().__init__(spec)
        self.pretrain: list[dict] | None = None  # the regulariser's rows (train part)
        self.pretrain_eval: list[dict] = []

    def prepare_examples(self, examples: list[dict], tokenizer) -> None:
        self.pad_id = tokenizer.pad_token_id
        self.positive_ids = tokenizer(self.spec.coh_positive, add_special_tokens=False)["input_ids"]
        self.negative_ids = tokenizer(self.spec.coh_negative, add_special_tokens=False)["input_ids"]
        if self.spec.coh_pretrain_dataset and self.spec.coh_pretrain_coef > 0 and self.pretrain is None:
            self._load_pretrain(tokenizer)
        rng = random.Random(self.spec.seed)
        for ex in examples:
            blocks = [(self.positive_ids, ex["chosen_ids"]), (self.negative_ids, ex["rejected_ids"])]
            if rng.random() < 0.5:  # a fixed order would teach "the second answer is the bad one"
                blocks.reverse()
            ids, mask = list(ex["prompt_ids"]), [0] * len(ex["prompt_ids"])
            for phrase, completion in blocks:
                ids += phrase + completion
                mask += [0] * len(phrase) + [1] * len(completion)
            ex["coh_ids"], ex["coh_mask"] = ids[: self.spec.max_length], mask[: self.spec.max_length]

    def _load_pretrain(self, tokenizer) -> None:
        spec = self.spec
        data = prepare(
            spec.coh_pretrain_dataset,
            tokenizer,
            kind="sft",
            max_length=spec.max_length,
            max_prompt_length=spec.max_prompt_length,
            eval_split=spec.eval_split,
            seed=spec.seed,
            overlong=spec.overlong,
        )
        self.pretrain, self.pretrain_eval = data.train, data.eval[: spec.eval_max_examples]

    def generation_prompt(self, prompt_ids: list[int]) -> list[int]:
        return prompt_ids + self.positive_ids

    def collate(self, examples, pad_id):
        input_ids = pad_right([ex["coh_ids"] for ex in examples], pad_id)
        completion_mask = pad_right([ex["coh_mask"] for ex in examples], 0)
        attention_mask = pad_right([[1] * len(ex["coh_ids"]) for ex in examples], 0)
        index = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "index": index,
        }

    def units(self, batch):
        return completion_tokens(batch)

    def derived_metrics(self, means):
        return perplexity(means)

    def loss(self, models, batch, rows):
        policy = models.policy
        # Training hides some earlier tokens from attention; eval scores the plain chains, with no regulariser.
        attention_mask = (
            mask_earlier_tokens(batch["attention_mask"], self.spec.coh_mask_ratio)
            if policy.training
            else batch["attention_mask"]
        )
        out = completion_logps(policy, batch["input_ids"], attention_mask, batch["completion_mask"], stats=True)
        loss, metrics = sft_loss(out.token_logps), token_metrics(out)
        if not policy.training:
            return loss, metrics
        if self.pretrain:
            # Draws from the global RNG, whose state checkpoints keep: a resumed run draws the same rows.
            picks = torch.randint(len(self.pretrain), (self.spec.batch_size,)).tolist()
            nll_sum, count = self._nll(policy, [self.pretrain[i] for i in picks])
            pretrain_nll = nll_sum / max(1, count)
            units = self.units(batch)
            # The loop divides by the step's completion tokens: units * nll adds coef * nll per step.
            loss = loss + self.spec.coh_pretrain_coef * pretrain_nll * units
            metrics["pretrain_loss"] = pretrain_nll.item() * units
        return loss, metrics

    def _nll(self, model, rows: list[dict]) -> tuple[torch.Tensor, int]:
        """(summed NLL, token count) of SFT rows' completion tokens."""
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate_sft(rows, self.pad_id).items()}
        out = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        return -out.token_logps.sum(), int(out.token_logps.numel())

    @torch.no_grad()
    def eval_metrics(self, models, examples, collate):
        model = models.policy
        metrics: dict[str, float] = {}
        if examples:
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for start in range(0, len(examples), self.spec.eval_rows):
                chunk = examples[start : start + self.spec.eval_rows]
                for side in ("chosen", "rejected"):
                    for sign, phrase in (("+", self.positive_ids), ("-", self.negative_ids)):
                        nll_sum, count = self._conditioned_nll(model, chunk, phrase, side)
                        sums[side + sign] = sums.get(side + sign, 0.0) + nll_sum
                        counts[side + sign] = counts.get(side + sign, 0) + count
            nll = {key: sums[key] / max(1, counts[key]) for key in sums}
            metrics.update(
                {
                    "coh/chosen_nll_positive": nll["chosen+"],
                    "coh/chosen_nll_negative": nll["chosen-"],
                    "coh/nll_gap": nll["chosen-"] - nll["chosen+"],
                    "coh/rejected_nll_gap": nll["rejected+"] - nll["rejected-"],
                }
            )
        if self.pretrain_eval:
            parts = [
                self._nll(model, self.pretrain_eval[i : i + self.spec.eval_rows])
                for i in range(0, len(self.pretrain_eval), self.spec.eval_rows)
            ]
            metrics["pretrain_loss"] = sum(s.item() for s, _ in parts) / max(1, sum(c for _, c in parts))
        return metrics

    def _conditioned_nll(self, model, examples: list[dict], phrase: list[int], side: str) -> tuple[float, int]:
        """(sum of NLL, token count) of the `side` completions right after prompt + phrase."""
        device = next(model.parameters()).device
        limit = self.spec.max_length
        prompts = [(ex["prompt_ids"] + phrase)[:limit] for ex in examples]
        completions = [ex[f"{side}_ids"][: max(0, limit - len(p))] for ex, p in zip(examples, prompts)]
        batch = collate_completions(prompts, completions, self.pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        return -out.token_logps.sum().item(), int(out.token_logps.numel())
