"""Render conversational items with the tokenizer's chat template, tokenise prompts and completions
in batched calls, truncate or drop over-long rows, and build the token-id examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.data.normalise import Item
from engine.errors import DataError, first_line
from engine.limits import CHAT_TEMPLATE_SECONDS, time_limit

_TOKENIZE_CHUNK = 4096


def appends_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer ends every encoded sequence with EOS (then prompts lose it: a
    completion follows them). One that encodes "" as the single token EOS == BOS only prepends it."""
    eos, bos = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)
    probe = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return bool(probe) and eos is not None and probe[-1] == eos and (len(probe) > 1 or bos != eos)


class TokenQueue:
    """Collects texts, tokenises them in batched calls, and hands back ids by reference."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.texts: dict[bool, list[str]] = {True: [], False: []}
        self.seen: dict[tuple[bool, str], tuple[bool, int]] = {}
        self.ids: dict[bool, list[list[int]]] = {}

    def add(self, text: str, special: bool) -> tuple[bool, int]:
        key = (special, text)
        ref = self.seen.get(key)
        if ref is None:
            ref = (special, len(self.texts[special]))
            self.texts[special].append(text)
            self.seen[key] = ref
        return ref

    def run(self) -> None:
        for special, texts in self.texts.items():
            out: list[list[int]] = []
            for start in range(0, len(texts), _TOKENIZE_CHUNK):
                enc = self.tokenizer(texts[start : start + _TOKENIZE_CHUNK], add_special_tokens=special, verbose=False)
                out.extend(list(ids) for ids in enc["input_ids"])
            self.ids[special] = out

    def get(self, ref: tuple[bool, int]) -> list[int]:
        return list(self.ids[ref[0]][ref[1]])


def _render_chat(tokenizer: Any, messages: list, generation_prompt: bool, i: int, where: str) -> str:
    try:
        # transformers renders templates in a sandboxed jinja environment; the time limit bounds a template
        # whose loops never end (it would hang data preparation)
        with time_limit(CHAT_TEMPLATE_SECONDS, "the chat template"):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are data errors
        raise DataError(
            f"{where} {i}: the tokenizer's chat template failed on this conversation ({first_line(exc)})"
        ) from exc
    if not isinstance(text, str):
        raise DataError("the tokenizer's apply_chat_template(tokenize=False) did not return a string")
    return text


def _assistant_pieces(
    tokenizer: Any, prompt: list, rest: list, prompt_text: str, i: int, where: str
) -> list[tuple[str, bool]]:
    """The rendered conversation after the prompt, cut into (text, is_assistant_turn) pieces.

    Each assistant turn is what rendering it adds after the history plus the generation prompt;
    the text in between (user turns, the generation prompt) carries no loss. Turns after the last
    assistant turn are left out: there is nothing to learn from them.
    """
    pieces: list[tuple[str, bool]] = []
    done, history = prompt_text, list(prompt)
    for message in rest:
        if message.get("role") == "assistant":
            before = _render_chat(tokenizer, history, True, i, where)
            after = _render_chat(tokenizer, history + [message], False, i, where)
            if not (before.startswith(done) and after.startswith(before)):
                raise DataError(
                    f"the tokenizer's chat template is not prefix-consistent ({where} {i}): a conversation rendered "
                    "turn by turn does not extend its earlier rendering, so assistant turns cannot be masked"
                )
            pieces += [(before[len(done) :], False), (after[len(before) :], True)]
            done = after
        history.append(message)
    return [(text, is_assistant) for text, is_assistant in pieces if text]


def render(items: list[Item], tokenizer: Any, queue: TokenQueue, where: str) -> None:
    checked_template = False
    for item in items:
        if item.drop:
            continue
        if isinstance(item.prompt, list):
            if not checked_template:
                if not getattr(tokenizer, "chat_template", None):
                    raise DataError(
                        "the dataset is conversational (lists of {role, content} messages) but the tokenizer "
                        "has no chat template; set one with --set chat_template=chatml (or llama3, a .jinja file, an "
                        "inline template), use a chat model's tokenizer, or give plain-text prompt/completion columns"
                    )
                checked_template = True
            prompt_text = _render_chat(tokenizer, item.prompt, True, item.src, where)
            comp_texts = []
            for comp in item.comps:
                full = _render_chat(tokenizer, item.prompt + comp, False, item.src, where)
                if not full.startswith(prompt_text):
                    raise DataError(
                        f"the tokenizer's chat template is not prefix-consistent ({where} {item.src}): the prompt "
                        "rendered with add_generation_prompt=True is not a prefix of the rendered prompt + "
                        "completion, so the completion cannot be cut out; use a template whose generation "
                        "prompt starts the assistant turn exactly as it is rendered"
                    )
                comp_texts.append(full[len(prompt_text) :])
            prompt_ref = queue.add(prompt_text, False)
            if item.multi_turn:
                pieces = _assistant_pieces(tokenizer, item.prompt, item.comps[0], prompt_text, item.src, where)
                item.segments = [(queue.add(text, False), is_assistant) for text, is_assistant in pieces]
                comp_texts = ["".join(text for text, _ in pieces)]
        else:
            prompt_text, comp_texts = item.prompt, list(item.comps)
            prompt_ref = queue.add(prompt_text, True)
        item.texts = (prompt_text, comp_texts)
        item.refs = (prompt_ref, [queue.add(t, False) for t in comp_texts])


@dataclass
class Options:
    kind: str
    max_length: int
    max_prompt_length: int | None
    overlong: str
    eos_id: int | None
    bos_id: int | None
    strip_prompt_eos: bool  # the tokenizer appends EOS to single sequences: take it off prompts


def _keep_end(ids: list[int], n: int, bos_id: int | None) -> list[int]:
    """The last n tokens; a leading BOS is kept in front of them."""
    if bos_id is not None and ids and ids[0] == bos_id and n >= 2:
        return [bos_id] + ids[len(ids) - (n - 1) :]
    return ids[len(ids) - n :]


def build_example(item: Item, queue: TokenQueue, opts: Options, stats: dict[str, int]) -> dict | None:
    prompt_text, comp_texts = item.texts
    prompt_ref, comp_refs = item.refs
    conversational = isinstance(item.prompt, list)
    prompt_ids = queue.get(prompt_ref)
    if opts.strip_prompt_eos and not conversational and prompt_ids and prompt_ids[-1] == opts.eos_id:
        prompt_ids.pop()
    comps = []
    for ref in comp_refs:
        ids = queue.get(ref)
        if not ids or ids[-1] != opts.eos_id:
            ids.append(opts.eos_id)
        comps.append(ids)
    loss_mask = None
    if item.segments:  # multi-turn SFT: the pieces, tokenised separately, replace the whole completion
        ids, loss_mask = [], []
        for ref, is_assistant in item.segments:
            piece = queue.get(ref)
            ids += piece
            loss_mask += [int(is_assistant)] * len(piece)
        if not ids or ids[-1] != opts.eos_id:
            ids.append(opts.eos_id)
            loss_mask.append(1)
        comps = [ids]

    truncated = False
    prompt_cap = opts.max_prompt_length
    if opts.kind == "prompt" and prompt_cap is None:
        prompt_cap = opts.max_length
    if prompt_cap is not None and len(prompt_ids) > prompt_cap:
        if opts.overlong == "drop":
            stats["dropped_overlong"] += 1
            return None
        prompt_ids = _keep_end(prompt_ids, prompt_cap, opts.bos_id)
        truncated = True
    if opts.kind != "prompt":
        room = opts.max_length - len(prompt_ids)
        if room <= 0:
            stats["dropped_overlong"] += 1
            return None
        if any(len(c) > room for c in comps):
            if opts.overlong == "drop":
                stats["dropped_overlong"] += 1
                return None
            comps = [c[:room] for c in comps]
            loss_mask = loss_mask[:room] if loss_mask is not None else None
            truncated = True
    stats["truncated"] += truncated

    ex: dict[str, Any] = {"index": -1, "prompt_ids": prompt_ids, "prompt": prompt_text}
    if opts.kind == "preference":
        ex.update(
            chosen_ids=comps[0], rejected_ids=comps[1], chosen=comp_texts[0], rejected=comp_texts[1], margin=item.margin
        )
    elif opts.kind == "unpaired":
        ex.update(completion_ids=comps[0], completion=comp_texts[0], label=item.label)
    elif opts.kind == "sft":
        ex.update(completion_ids=comps[0], completion=comp_texts[0])
        if loss_mask is not None:
            ex["loss_mask"] = loss_mask  # 1 on assistant tokens of a multi-turn completion
    else:
        ex["answer"] = item.answer
        ex["columns"] = item.columns or {}
    ex["messages"] = item.prompt if conversational else None
    if item.safety is not None:  # only data that carries the tag has the field
        ex["safety"] = item.safety
    return ex
