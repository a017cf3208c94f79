"""Pairwise judges for online DPO (OAIF, arXiv 2402.04792).

A judge returns, for each pair (A, B) of completions of a prompt, the probability that A is
better (`JudgeResult.prob_a`) and whether both orders agree (`JudgeResult.consistent`). Online
DPO's other judge, `judge: reward`, needs no class: it is sigmoid(r_A - r_B) on the rewards the
rollout already has (engine/algorithms/online_dpo.py).

- `LLMJudge(model)`: a causal LM is shown the question and the two answers as "Answer 1" and
  "Answer 2" (`DEFAULT_JUDGE_TEMPLATE`, or your own template with the placeholders `{prompt}`,
  `{answer_1}`, `{answer_2}`), rendered as one user turn through the tokenizer's chat template when
  it has one, else as plain text followed by `PLAIN_JUDGE_SUFFIX`. One forward pass (left-padded,
  no generation) reads the next-token probabilities of "1" and "2", renormalised over the two. Each
  pair is judged in BOTH orders to cancel position bias. The request shown is the `messages`
  column when the data is conversational (the rendered prompt would carry the policy's chat
  markup), else the prompt text:
  p_A = 1/2 [P("1" | A shown first) + P("2" | B shown first)], and `consistent[i]` says whether the
  two orders picked the same winner (the position-consistency metric). The digits must each be
  one token right after the prompt; a tokenizer that merges them with neighbouring text is refused.
- `judge_pairs(prob_a, tie_margin)`: the winner of each pair (0 = A, 1 = B) and whether to skip it:
  near-ties |p - 0.5| < tie_margin, and exact ties, carry no preference and are skipped (OAIF).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from engine.batching import left_pad
from engine.data.tokenise import appends_eos
from engine.errors import CherryError
from engine.models import freeze, load_causal_lm, load_tokenizer, pick_device, pick_dtype
from engine.rewards.sources import JUDGE_PLACEHOLDERS

_PLACEHOLDER = re.compile(r"\{prompt\}|\{answer_1\}|\{answer_2\}")


@dataclass
class JudgeResult:
    prob_a: list[float]  # probability that completion A is better than B
    consistent: list[bool] | None  # both presentation orders chose the same winner; None for order-free judges
    # P(the answer shown first is better) in each order: A shown first, then B shown first (LLM judge only)
    a_first: list[float] | None = None
    b_first: list[float] | None = None


DEFAULT_JUDGE_TEMPLATE = (
    "Two assistants answered the same request. Decide which answer serves the user better: the one that is "
    "correct, helpful and to the point.\n\n"
    "Request:\n{prompt}\n\n"
    "Answer 1:\n{answer_1}\n\n"
    "Answer 2:\n{answer_2}\n\n"
    "Which answer is better? Reply with one digit: 1 or 2."
)
PLAIN_JUDGE_SUFFIX = "\n\nThe better answer is Answer"  # plain-text judges continue with " 1" or " 2"


def _question_text(prompt: str, conversation: Any) -> str:
    """The request as the judge reads it: the conversation's messages when the data has them
    (the rendered prompt would carry the policy's chat markup), else the prompt text."""
    if isinstance(conversation, list) and conversation:
        turns = [m for m in conversation if isinstance(m, dict)]
        if len(turns) == 1 and turns[0].get("role") == "user":
            return str(turns[0].get("content", ""))
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in turns)
    return prompt


class LLMJudge:
    """A causal LM asked which of two answers is better, read from its "1" / "2" next-token
    probabilities, in both presentation orders (OAIF)."""

    def __init__(
        self,
        model_path_or_id: str,
        device: str = "cpu",
        template: str | None = None,
        *,
        batch_size: int = 8,
        use_chat_template: bool | None = None,
        trust_remote_code: bool = False,
    ):
        self.template = DEFAULT_JUDGE_TEMPLATE if template is None else template
        missing = [p for p in JUDGE_PLACEHOLDERS if p not in self.template]
        if missing:
            raise CherryError(
                f"judge template lacks {', '.join(missing)}; it must contain {', '.join(JUDGE_PLACEHOLDERS)}"
            )
        self.source = model_path_or_id
        self.batch_size = batch_size
        target = pick_device(device)
        try:
            self.tokenizer = load_tokenizer(model_path_or_id, trust_remote_code=trust_remote_code)
            self.model = freeze(
                load_causal_lm(
                    model_path_or_id,
                    dtype=pick_dtype("auto", target),
                    device=target,
                    trust_remote_code=trust_remote_code,
                )
            )
        except CherryError as err:
            raise type(err)(f"judge '{model_path_or_id}': {err}") from None
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise CherryError(
                f"judge '{model_path_or_id}': its tokenizer has no chat template; leave use_chat_template unset"
            )
        self.use_chat = has_template if use_chat_template is None else use_chat_template
        self._strip_eos = (not self.use_chat) and appends_eos(self.tokenizer)
        self.choice_ids: tuple[int, int] | None = None
        self.encode(["probe"], ["first"], ["second"])  # refuse a tokenizer without single-token digits now

    def render(self, question: str, answer_1: str, answer_2: str) -> str:
        # One pass over the template: a question or answer that itself holds "{answer_2}" stays as written.
        values = {"{prompt}": question, "{answer_1}": answer_1, "{answer_2}": answer_2}
        body = _PLACEHOLDER.sub(lambda m: values[m.group(0)], self.template)
        if self.use_chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            )
        return body + PLAIN_JUDGE_SUFFIX

    def encode(self, questions: list[str], first: list[str], second: list[str]) -> list[list[int]]:
        """Judge-prompt token ids per row (ending right before the choice digit); sets choice_ids."""
        texts = [self.render(q, a, b) for q, a, b in zip(questions, first, second)]
        sep = "" if self.use_chat else " "
        tok = self.tokenizer
        enc = {d: tok([t + sep + d for t in texts], add_special_tokens=not self.use_chat)["input_ids"] for d in "12"}
        rows: list[list[int]] = []
        for one, two in zip(enc["1"], enc["2"]):
            one, two = list(one), list(two)
            if self._strip_eos:
                one, two = one[:-1], two[:-1]
            ok = len(one) == len(two) and len(one) >= 2 and one[:-1] == two[:-1] and one[-1] != two[-1]
            choice = (one[-1], two[-1]) if ok else None
            if ok and [tok.decode([c]).strip() for c in choice] != ["1", "2"]:
                ok = False
            if not ok or (self.choice_ids is not None and choice != self.choice_ids):
                raise CherryError(
                    f"judge '{self.source}': its tokenizer does not give '1' and '2' one token each right after the judge "
                    f"prompt (the prompt + '1' ends in ids {one[-3:]}, + '2' in {two[-3:]}); the judge reads the "
                    "probabilities of those two tokens, so use a judge model whose tokenizer encodes the digits 1 and 2 as "
                    "single tokens, or a template that ends where a digit can follow"
                )
            self.choice_ids = choice
            rows.append(one[:-1])
        return rows

    def choice_probs(
        self, prompts: list[str], first: list[str], second: list[str], columns: dict[str, list] | None = None
    ) -> list[float]:
        """P("1"), renormalised over "1" and "2", with `first` shown as Answer 1: one order only."""
        conversations = (columns or {}).get("messages") or [None] * len(prompts)
        rows = self.encode([_question_text(p, m) for p, m in zip(prompts, conversations)], list(first), list(second))
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                input_ids, mask = left_pad(rows[start : start + self.batch_size], pad_id)
                input_ids, mask = input_ids.to(device), mask.to(device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                try:
                    logits = self.model(
                        input_ids=input_ids,
                        attention_mask=mask,
                        position_ids=positions,
                        use_cache=False,
                        logits_to_keep=1,
                    ).logits[:, -1, :]
                except TypeError:  # a model without logits_to_keep
                    logits = self.model(
                        input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False
                    ).logits[:, -1, :]
                two = logits[:, list(self.choice_ids)].float()
                out.extend(torch.softmax(two, dim=-1)[:, 0].tolist())
        return out

    def prefer(
        self,
        prompts: list[str],
        completions_a: list[str],
        completions_b: list[str],
        prompt_ids: list[list[int]] | None = None,
        a_ids: list[list[int]] | None = None,
        b_ids: list[list[int]] | None = None,
        columns: dict[str, list] | None = None,
    ) -> JudgeResult:
        if not completions_a:
            return JudgeResult([], [], [], [])
        a_first = self.choice_probs(prompts, completions_a, completions_b, columns)  # P("1") = A better
        b_first = self.choice_probs(prompts, completions_b, completions_a, columns)  # P("1") = B better
        prob_a = [0.5 * (p + (1.0 - q)) for p, q in zip(a_first, b_first)]
        consistent = [(p > 0.5) == (q < 0.5) for p, q in zip(a_first, b_first)]
        return JudgeResult(prob_a, consistent, a_first, b_first)


def judge_tallies(
    winners: list[int],
    skip: list[bool],
    lengths_a: list[int],
    lengths_b: list[int],
    consistent: list[bool] | None = None,
    rewards_a: list[float] | None = None,
    rewards_b: list[float] | None = None,
) -> dict[str, tuple[int, int]]:
    """What a judge decided on a batch of pairs (winner 0 = A, 1 = B), as (count, out of) tallies that add up
    across steps, so a run can report its judge's preferences as a whole:

    - decided_frac: pairs not skipped as near-ties, out of all pairs.
    - shorter_preferred_frac: decided pairs of unequal length (tokens) where the shorter completion won.
    - reward_agreement (with rewards): decided pairs with unequal rewards where the higher-reward completion won.
    - position_consistency (an order-sensitive judge): pairs whose two presentation orders chose the same winner.
    """
    decided = [i for i, s in enumerate(skip) if not s]
    shorter_won = [
        winners[i] == (0 if lengths_a[i] < lengths_b[i] else 1) for i in decided if lengths_a[i] != lengths_b[i]
    ]
    out = {"decided_frac": (len(decided), len(skip)), "shorter_preferred_frac": (sum(shorter_won), len(shorter_won))}
    if rewards_a is not None and rewards_b is not None:
        agree = [
            winners[i] == (0 if rewards_a[i] > rewards_b[i] else 1) for i in decided if rewards_a[i] != rewards_b[i]
        ]
        out["reward_agreement"] = (sum(agree), len(agree))
    if consistent is not None:
        out["position_consistency"] = (sum(consistent), len(consistent))
    return out


def judge_pairs(prob_a: list[float], tie_margin: float) -> tuple[list[int], list[bool]]:
    """(winner per pair: 0 = A, 1 = B; skip per pair). Exact ties and |p - 0.5| < tie_margin are skipped."""
    if not 0.0 <= tie_margin < 0.5:
        raise CherryError(f"judge_tie_margin must be in [0, 0.5) (got {tie_margin})")
    winners = [0 if p >= 0.5 else 1 for p in prob_a]
    skip = [p == 0.5 or abs(p - 0.5) < tie_margin for p in prob_a]
    return winners, skip
