"""The reward-source grammar: what a `rewards` entry of a run spec may say.

A run spec names its rewards as strings in `rewards: list[str]`, optionally weighted by
`reward_weights: list[float]` (one per source, default all 1.0). The reward of a completion is
the weighted sum of its sources; each source is also logged on its own.

    exact_match          1.0 when completion.strip() == answer.strip(), else 0.0. Needs an `answer`
                         column on every prompt.
    regex:PATTERN        1.0 when re.fullmatch(PATTERN, completion.strip(), re.DOTALL), else 0.0: a
                         format reward. Everything after the first colon is the pattern.
    length:TARGET        -|n - TARGET| / TARGET, n = len(completion_ids) (the completion's tokens as
                         the loop passes them, its EOS included when it finished). TARGET is a
                         positive integer.
    rm:PATH_OR_ID        a reward model: an earlier Cherry `rm` run directory (its final/ weights
                         are used), a local sequence-classification model directory, or a hub id.
                         It scores prompt + completion, batched, without gradients. When the reward
                         model's tokenizer has the policy's vocabulary, the policy's token ids are
                         scored as they are; otherwise the texts are tokenised again with the reward
                         model's tokenizer (with its own chat template when the columns carry the
                         conversation as `messages`), and its EOS is appended when the policy's
                         completion ended with the policy's EOS.
    environment          the episode's per-turn rewards from its environment, summed (runs with an
                         `environment` or `tools`: docs/tools.md).
    module:function      a Python function of yours: a module importable from PYTHONPATH, or a file
    path/to/file.py:fn   (relative paths are taken from the working directory); `function` may be a
                         dotted attribute (`module:Class.method`). A module named exact_match,
                         regex, length or rm must be given as a file path.

The component names (metric keys, `Reward.names`) are `exact_match`, `regex`, `length`, `rm`, `environment` and
the Python function's name; a repeated name gets a suffix (`regex`, `regex_2`).
"""

from __future__ import annotations

import re

from engine.errors import SpecError

KINDS = ("exact_match", "regex", "length", "rm", "environment", "python")
# What an LLM judge template (the `judge_template` setting) must contain: the question and the two answers.
JUDGE_PLACEHOLDERS = ("{prompt}", "{answer_1}", "{answer_2}")
_BUILTIN_PREFIXES = ("regex", "length", "rm")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
GRAMMAR = (
    "a reward source is exact_match, regex:PATTERN, length:TARGET, rm:PATH_OR_ID, environment, "
    "module:function or path/to/file.py:function"
)


def parse_reward_source(text: str) -> tuple[str, str]:
    """(kind, argument) of one `rewards` entry; kind is one of KINDS. SpecError when malformed.

    exact_match -> ("exact_match", ""); regex:P -> ("regex", P); length:N -> ("length", "N");
    rm:X -> ("rm", X); module:fn or file.py:fn -> ("python", the whole entry).
    """
    if not isinstance(text, str):
        raise SpecError(f"rewards entry {text!r} is not a string; {GRAMMAR}")
    entry = text.strip()
    if not entry:
        raise SpecError(f"rewards has an empty entry; {GRAMMAR}")
    head, sep, arg = entry.partition(":")
    if head == "exact_match":
        if sep:
            raise SpecError(
                f"rewards entry '{text}': exact_match takes no argument (it compares with the `answer` column); write exact_match"
            )
        return "exact_match", ""
    if head == "environment":
        if sep:
            raise SpecError(
                f"rewards entry '{text}': environment takes no argument (it is the environment's own reward); write environment"
            )
        return "environment", ""
    if head in _BUILTIN_PREFIXES and not sep:
        example = {"regex": "regex:^\\d+$", "length": "length:200", "rm": "rm:runs/<run-id>"}[head]
        raise SpecError(f"rewards entry '{text}': {head} needs an argument after a colon, e.g. {example}")
    if head == "regex":
        pattern = text.partition(":")[2]  # verbatim: spaces can belong to the pattern
        if not pattern:
            raise SpecError(
                f"rewards entry '{text}': the regular expression is empty; write regex:PATTERN, e.g. regex:^\\d+$"
            )
        try:
            re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise SpecError(
                f"rewards entry '{text}': invalid regular expression ({err}); fix the pattern after 'regex:'"
            ) from None
        return "regex", pattern
    if head == "length":
        try:
            target = int(arg.strip())
        except ValueError:
            raise SpecError(
                f"rewards entry '{text}': the length target must be a whole number of tokens, e.g. length:200"
            ) from None
        if target <= 0:
            raise SpecError(
                f"rewards entry '{text}': the length target must be a positive number of tokens (got {target})"
            )
        return "length", str(target)
    if head == "rm":
        if not arg.strip():
            raise SpecError(
                f"rewards entry '{text}': rm needs a reward model: rm:runs/<run-id>, rm:path/to/model or rm:<hub id>"
            )
        return "rm", arg.strip()
    if not sep:
        raise SpecError(f"rewards entry '{text}': unknown reward source; {GRAMMAR}")
    target, _, func = entry.rpartition(":")
    target, func = target.strip(), func.strip()
    if not func:
        raise SpecError(
            f"rewards entry '{text}': the function name after the colon is missing; write {target or 'module'}:function_name"
        )
    if not _DOTTED.fullmatch(func):
        raise SpecError(
            f"rewards entry '{text}': '{func}' is not a Python function name; write module:function or path/to/file.py:function"
        )
    if not target:
        raise SpecError(
            f"rewards entry '{text}': the module before the colon is missing; write module:{func} or path/to/file.py:{func}"
        )
    if not (target.endswith(".py") or _DOTTED.fullmatch(target)):
        raise SpecError(
            f"rewards entry '{text}': '{target}' is neither an importable module name (like pkg.rewards) nor a .py file; "
            f"write module:{func} or path/to/file.py:{func}"
        )
    return "python", f"{target}:{func}"


def required_columns(sources: list[str]) -> set[str]:
    """Dataset columns the built-in sources need (torch-free; user functions are not imported)."""
    needed: set[str] = set()
    for source in sources:
        if parse_reward_source(source)[0] == "exact_match":
            needed.add("answer")
    return needed


def base_name(kind: str, arg: str) -> str:
    if kind == "python":
        return arg.rpartition(":")[2].rpartition(".")[2]
    return kind
