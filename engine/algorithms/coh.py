"""Chain of Hindsight (Liu, Sferrazza, Abbeel 2023): learn from feedback phrases, not a reward.

Each pair becomes one sequence  x + f_a + y_a + f_b + y_b  with the blocks (positive phrase +
chosen, negative phrase + rejected) in a seeded random order; each completion keeps its EOS, so
a block ends where the model should stop. The loss is the token-mean NLL on completion tokens
only (prompt and phrases are masked). At inference the positive phrase is appended to the
prompt. Defaults (presets/coh.yaml): phrases " A good answer: " / " A bad answer: ", lr as SFT.
The paper's optional extras (masking 0-5% of earlier tokens, a pretraining NLL term) are not
implemented.
"""

from __future__ import annotations

import random

import torch

from engine.algorithms.sft import SFT
from engine.batching import pad_right


class ChainOfHindsight(SFT):
    """SFT's token-mean NLL, units and metrics, on chains built from preference pairs."""

    kind = "preference"

    def prepare_examples(self, examples: list[dict], tokenizer) -> None:
        self.positive_ids = tokenizer(self.spec.coh_positive, add_special_tokens=False)["input_ids"]
        negative_ids = tokenizer(self.spec.coh_negative, add_special_tokens=False)["input_ids"]
        rng = random.Random(self.spec.seed)
        for ex in examples:
            blocks = [(self.positive_ids, ex["chosen_ids"]), (negative_ids, ex["rejected_ids"])]
            if rng.random() < 0.5:  # a fixed order would teach "the second answer is the bad one"
                blocks.reverse()
            ids, mask = list(ex["prompt_ids"]), [0] * len(ex["prompt_ids"])
            for phrase, completion in blocks:
                ids += phrase + completion
                mask += [0] * len(phrase) + [1] * len(completion)
            ex["coh_ids"], ex["coh_mask"] = ids[: self.spec.max_length], mask[: self.spec.max_length]

    def generation_prompt(self, prompt_ids: list[int]) -> list[int]:
        return prompt_ids + self.positive_ids

    def collate(self, examples, pad_id):
        input_ids = pad_right([ex["coh_ids"] for ex in examples], pad_id)
        completion_mask = pad_right([ex["coh_mask"] for ex in examples], 0)
        attention_mask = pad_right([[1] * len(ex["coh_ids"]) for ex in examples], 0)
        index = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask, "index": index}
