"""Reward sources and pairwise judges for the online methods (GRPO, RLOO, PPO, online DPO,
best-of-K, ReST).

This module imports no torch or transformers at import time (front ends import it to validate a
spec instantly); models are loaded inside `build_reward` and `LLMJudge`.

Reward sources
--------------
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
    module:function      a Python function of yours: a module importable from PYTHONPATH, or a file
    path/to/file.py:fn   (relative paths are taken from the working directory); `function` may be a
                         dotted attribute (`module:Class.method`). A module named exact_match,
                         regex, length or rm must be given as a file path.

The component names (metric keys, `Reward.names`) are `exact_match`, `regex`, `length`, `rm` and
the Python function's name; a repeated name gets a suffix (`regex`, `regex_2`).

Writing a reward function
-------------------------
Every source except `rm:` is (and the built-ins themselves are) a function with this signature::

    def my_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        answers = kwargs["answer"]            # a dataset column, one value per completion
        lengths = [len(ids) for ids in kwargs["completion_ids"]]
        return [...]                          # one finite number per completion

`kwargs` holds the dataset's extra columns as lists aligned with `completions` (e.g. `answer`,
`safety`, `messages`), plus `completion_ids` (the completion token ids). Take `**kwargs` so new
columns never break the function; a function without `**kwargs` is passed only the keyword
arguments it names, and one that requires a column the data does not have is refused with a
message naming it. The result must be a list (or tuple / array) with one finite number per
completion; None is refused: return 0.0 for "not applicable". An exception raised inside the
function stops the run with a message naming the reward entry (the original traceback is kept
as the cause).

Helpfulness + safety (Llama 2, arXiv 2307.09288)
------------------------------------------------
With `safety_model` (a second reward model, same forms as `rm:`), the `rm:` source's score becomes
Llama 2's combined reward, `engine.scoring.helpful_safety_scores`: the safety model's score on
prompts tagged by a boolean `safety` column (all False when the column is absent) or whose
safety probability is below `safety_threshold` (0.15), else the helpfulness score, then logit and
whitened over the scored batch. The raw scores are kept in `RewardResult.extras` as `rm/helpful`
and `rm/safety`. It needs exactly one `rm:` source.

Pairwise judges (online DPO / OAIF, arXiv 2402.04792)
-----------------------------------------------------
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

import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import CherryError, SpecError

KINDS = ("exact_match", "regex", "length", "rm", "python")
_BUILTIN_PREFIXES = ("regex", "length", "rm")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
# Keyword arguments a reward function gets from the loop itself, never from a dataset column.
_LOOP_KWARGS = ("completion_ids",)
_GRAMMAR = (
    "a reward source is exact_match, regex:PATTERN, length:TARGET, rm:PATH_OR_ID, "
    "module:function or path/to/file.py:function"
)


def exact_match(completion: str, answer: str) -> float:
    """Verifier reward: 1.0 when the completion equals the gold answer after stripping
    surrounding whitespace on both, else 0.0."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


# ----------------------------------------------------------------------------------------------
# Parsing (torch-free)


def parse_reward_source(text: str) -> tuple[str, str]:
    """(kind, argument) of one `rewards` entry; kind is one of KINDS. SpecError when malformed.

    exact_match -> ("exact_match", ""); regex:P -> ("regex", P); length:N -> ("length", "N");
    rm:X -> ("rm", X); module:fn or file.py:fn -> ("python", the whole entry).
    """
    if not isinstance(text, str):
        raise SpecError(f"rewards entry {text!r} is not a string; {_GRAMMAR}")
    entry = text.strip()
    if not entry:
        raise SpecError(f"rewards has an empty entry; {_GRAMMAR}")
    head, sep, arg = entry.partition(":")
    if head == "exact_match":
        if sep:
            raise SpecError(
                f"rewards entry '{text}': exact_match takes no argument (it compares with the `answer` column); write exact_match"
            )
        return "exact_match", ""
    if head in _BUILTIN_PREFIXES and not sep:
        example = {"regex": "regex:^\\d+$", "length": "length:200", "rm": "rm:runs/<run-id>"}[head]
        raise SpecError(f"rewards entry '{text}': {head} needs an argument after a colon, e.g. {example}")
    if head == "regex":
        pattern = text.partition(":")[2]  # verbatim: spaces can belong to the pattern
        if not pattern:
            raise SpecError(f"rewards entry '{text}': the regular expression is empty; write regex:PATTERN, e.g. regex:^\\d+$")
        try:
            re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise SpecError(f"rewards entry '{text}': invalid regular expression ({err}); fix the pattern after 'regex:'") from None
        return "regex", pattern
    if head == "length":
        try:
            target = int(arg.strip())
        except ValueError:
            raise SpecError(f"rewards entry '{text}': the length target must be a whole number of tokens, e.g. length:200") from None
        if target <= 0:
            raise SpecError(f"rewards entry '{text}': the length target must be a positive number of tokens (got {target})")
        return "length", str(target)
    if head == "rm":
        if not arg.strip():
            raise SpecError(f"rewards entry '{text}': rm needs a reward model: rm:runs/<run-id>, rm:path/to/model or rm:<hub id>")
        return "rm", arg.strip()
    if not sep:
        raise SpecError(f"rewards entry '{text}': unknown reward source; {_GRAMMAR}")
    target, _, func = entry.rpartition(":")
    target, func = target.strip(), func.strip()
    if not func:
        raise SpecError(f"rewards entry '{text}': the function name after the colon is missing; write {target or 'module'}:function_name")
    if not _DOTTED.fullmatch(func):
        raise SpecError(
            f"rewards entry '{text}': '{func}' is not a Python function name; write module:function or path/to/file.py:function"
        )
    if not target:
        raise SpecError(f"rewards entry '{text}': the module before the colon is missing; write module:{func} or path/to/file.py:{func}")
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


def _base_name(kind: str, arg: str) -> str:
    if kind == "python":
        return arg.rpartition(":")[2].rpartition(".")[2]
    return kind


# ----------------------------------------------------------------------------------------------
# Built-in reward functions, written with the same signature as a user's function


def exact_match_reward(prompts: list[str], completions: list[str], answer: list[str | None] | None = None, **kwargs: Any) -> list[float]:
    """1.0 where the completion equals the `answer` column (whitespace-stripped), else 0.0."""
    if answer is None or any(a is None for a in answer):
        missing = len(completions) if answer is None else sum(a is None for a in answer)
        raise CherryError(
            f"reward 'exact_match' needs an 'answer' column: {missing} of {len(completions)} prompts have none; "
            "add an `answer` field to every row of the dataset, or use another reward source"
        )
    return [exact_match(c, str(a)) for c, a in zip(completions, answer)]


def regex_reward(pattern: str) -> Callable[..., list[float]]:
    """A format reward: 1.0 where re.fullmatch(pattern, completion.strip(), re.DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def regex(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0 if compiled.fullmatch(c.strip()) else 0.0 for c in completions]

    return regex


def length_reward(target: int) -> Callable[..., list[float]]:
    """-|n - target| / target with n the number of completion tokens."""

    def length(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [-abs(len(ids) - target) / target for ids in completion_ids]

    return length


# ----------------------------------------------------------------------------------------------
# User functions


def load_reward_function(entry: str) -> Callable[..., Any]:
    """The callable named by a `module:function` or `path/to/file.py:function` entry."""
    target, _, attr = entry.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise CherryError(f"rewards entry '{entry}': no such file {path} (relative paths are taken from {Path.cwd()})")
        name = "cherry_reward_" + re.sub(r"\W", "_", str(path.resolve()))
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CherryError(f"rewards entry '{entry}': {path} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise CherryError(f"rewards entry '{entry}': running {path} failed ({type(err).__name__}: {err}); fix the file") from err
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as err:
            if err.name and (target == err.name or target.startswith(err.name + ".")):
                raise CherryError(
                    f"rewards entry '{entry}': no module named '{target}'; put its folder on PYTHONPATH, "
                    f"or give the file: path/to/{target.replace('.', '/')}.py:{attr}"
                ) from None
            raise CherryError(f"rewards entry '{entry}': importing '{target}' failed ({err}); install what it needs") from err
        except Exception as err:
            raise CherryError(f"rewards entry '{entry}': importing '{target}' failed ({type(err).__name__}: {err})") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:10]
            hint = f" (it defines: {', '.join(defined)})" if defined else ""
            raise CherryError(f"rewards entry '{entry}': '{target}' has no attribute '{attr}'{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CherryError(
            f"rewards entry '{entry}': '{attr}' is a {type(obj).__name__}, not a function; it must be "
            "fn(prompts, completions, **kwargs) -> list[float]"
        )
    _signature_check(entry, obj)
    return obj


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables
        return None


def _signature_check(entry: str, fn: Callable[..., Any]) -> None:
    sig = _signature(fn)
    if sig is None:
        return
    try:
        sig.bind_partial([], [])
    except TypeError:
        raise CherryError(
            f"rewards entry '{entry}': the function must take (prompts, completions, **kwargs) and return one number "
            f"per completion; its signature is {sig}"
        ) from None


def _function_needs(fn: Callable[..., Any]) -> set[str]:
    """Keyword arguments a function requires beyond (prompts, completions): the columns it reads."""
    sig = _signature(fn)
    if sig is None:
        return set()
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    return {
        p.name for p in params
        if p not in positional and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in _LOOP_KWARGS
    }


def _kwargs_for(fn: Callable[..., Any], available: dict[str, list]) -> dict[str, list]:
    sig = _signature(fn)
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return available
    names = {p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in available.items() if k in names}


def check_scores(entry: str, scores: Any, n: int) -> list[float]:
    """A reward function's output as floats, or CherryError saying what is wrong with it."""
    if hasattr(scores, "tolist") and not isinstance(scores, (list, tuple)):
        scores = scores.tolist()  # numpy arrays, torch tensors
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise CherryError(
            f"reward '{entry}' returned a {type(scores).__name__}; it must return a list with one number per completion ({n})"
        )
    if len(scores) != n:
        raise CherryError(f"reward '{entry}' returned {len(scores)} scores for {n} completions; return exactly one per completion")
    out: list[float] = []
    for i, value in enumerate(scores):
        if value is None:
            raise CherryError(f"reward '{entry}' returned None for completion {i}; return 0.0 for \"not applicable\"")
        if not isinstance(value, numbers.Real):
            raise CherryError(f"reward '{entry}' returned {value!r} ({type(value).__name__}) for completion {i}; scores must be numbers")
        value = float(value)
        if not math.isfinite(value):
            raise CherryError(f"reward '{entry}' returned {value} for completion {i}; scores must be finite numbers")
        out.append(value)
    return out


def call_reward_function(
    entry: str, fn: Callable[..., Any], prompts: list[str], completions: list[str], kwargs: dict[str, list]
) -> list[float]:
    """Call fn(prompts, completions, **kwargs) the way the loop does and check what it returns."""
    passed = _kwargs_for(fn, kwargs)
    sig = _signature(fn)
    if sig is not None:
        try:
            sig.bind(prompts, completions, **passed)
        except TypeError:
            missing = sorted(_function_needs(fn) - set(kwargs))
            what = f"column(s) {', '.join(missing)}, which the data does not have" if missing else f"arguments it cannot be given ({sig})"
            raise CherryError(
                f"reward '{entry}' needs {what}; available: {', '.join(sorted(kwargs)) or 'none'}. "
                "Write it as fn(prompts, completions, **kwargs)"
            ) from None
    try:
        scores = fn(list(prompts), list(completions), **passed)
    except CherryError:
        raise
    except Exception as err:
        raise CherryError(f"reward '{entry}' raised {type(err).__name__}: {err}") from err
    return check_scores(entry, scores, len(completions))


# ----------------------------------------------------------------------------------------------
# Reward models


def _appends_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer ends every encoded sequence with EOS (then prompts lose it)."""
    eos, bos = tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None)
    probe = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return bool(probe) and eos is not None and probe[-1] == eos and (len(probe) > 1 or bos != eos)


class RewardModelScorer:
    """Raw scores of one reward model on prompt + completion, in the policy's ids or re-tokenised."""

    def __init__(self, entry: str, source: str, policy_tokenizer: Any, *, device: str = "cpu", batch_size: int = 16):
        from engine.scoring import load_reward_source

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
        self._strip_prompt_eos = None if self.same_vocab else _appends_eos(self.tokenizer)

    def __call__(self, prompts: list[str], completions: list[str], prompt_ids: list[list[int]],
                 completion_ids: list[list[int]], columns: dict[str, list]) -> list[float]:
        from engine.scoring import score_completions

        if not self.same_vocab:
            prompt_ids, completion_ids = self.retokenise(prompts, completions, completion_ids, columns)
        if any(len(p) + len(c) == 0 for p, c in zip(prompt_ids, completion_ids)):
            raise ValueError(f"{self.entry}: an empty prompt + completion cannot be scored")
        return score_completions(self.model, self.tokenizer, prompt_ids, completion_ids, self.batch_size)

    def retokenise(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                   columns: dict[str, list]) -> tuple[list[list[int]], list[list[int]]]:
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
                    full = tok.apply_chat_template(conversation + [{"role": "assistant", "content": completion}], tokenize=False)
                    if full.startswith(prompt_text):
                        comp_text = full[len(prompt_text):]
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


# ----------------------------------------------------------------------------------------------
# The combined reward


@dataclass
class RewardResult:
    total: list[float]  # weighted sum of the components, one per completion
    components: dict[str, list[float]]  # each source's (unweighted) score, keyed by Reward.names
    extras: dict[str, list[float]] = field(default_factory=dict)  # raw helpful/safety scores when combined


ScoreFn = Callable[[list[str], list[str], list[list[int]], list[list[int]], dict[str, list]], list[float]]


@dataclass
class RewardSource:
    entry: str  # as written in the spec
    kind: str  # one of KINDS
    name: str  # component / metric name
    weight: float
    score: ScoreFn  # (prompts, completions, prompt_ids, completion_ids, columns) -> scores
    needs: set[str] = field(default_factory=set)


def _function_source(entry: str, fn: Callable[..., Any]) -> ScoreFn:
    def score(prompts, completions, prompt_ids, completion_ids, columns):
        kwargs = {k: v for k, v in columns.items() if k not in ("prompts", "completions")}
        kwargs["completion_ids"] = completion_ids
        return call_reward_function(entry, fn, prompts, completions, kwargs)

    return score


class Reward:
    """A weighted sum of reward sources; build it with `build_reward`."""

    def __init__(self, sources: list[RewardSource], *, safety: RewardModelScorer | None = None, safety_threshold: float = 0.15):
        if not sources:
            raise CherryError(f"rewards is empty: name at least one reward source; {_GRAMMAR}")
        self.sources = sources
        self.safety = safety
        self.safety_threshold = safety_threshold

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    @property
    def needs_columns(self) -> set[str]:
        return set().union(*(s.needs for s in self.sources))

    def reward(self, prompts: list[str], completions: list[str], prompt_ids: list[list[int]],
               completion_ids: list[list[int]], columns: dict[str, list] | None = None) -> RewardResult:
        columns = dict(columns or {})
        n = len(completions)
        for what, values in (("prompts", prompts), ("prompt_ids", prompt_ids), ("completion_ids", completion_ids), *columns.items()):
            if len(values) != n:
                raise ValueError(f"reward: {what} has {len(values)} rows for {n} completions")
        components: dict[str, list[float]] = {}
        extras: dict[str, list[float]] = {}
        for source in self.sources:
            scores = source.score(list(prompts), list(completions), prompt_ids, completion_ids, columns) if n else []
            if source.kind == "rm" and self.safety is not None and n:
                from engine.scoring import helpful_safety_scores

                safety = self.safety(list(prompts), list(completions), prompt_ids, completion_ids, columns)
                tags = [bool(v) for v in columns.get("safety", [False] * n)]
                extras["rm/helpful"], extras["rm/safety"] = scores, safety
                scores = helpful_safety_scores(scores, safety, tags, self.safety_threshold)
            components[source.name] = [float(s) for s in scores]
        total = [sum(s.weight * components[s.name][i] for s in self.sources) for i in range(n)]
        return RewardResult(total=total, components=components, extras=extras)

    __call__ = reward


def build_reward(
    sources: list[str],
    weights: list[float] | None = None,
    *,
    tokenizer: Any,
    device: str = "cpu",
    safety_model: str | None = None,
    safety_threshold: float = 0.15,
    batch_size: int = 16,
) -> Reward:
    """Parse, load and check every source. `tokenizer` is the policy's (it decides whether a reward
    model can read the policy's token ids directly); reward models go to `device`."""
    if isinstance(sources, str):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise CherryError(f"rewards is empty: name at least one reward source; {_GRAMMAR}")
    if weights is None:
        weights = [1.0] * len(sources)
    weights = list(weights)
    if len(weights) != len(sources):
        raise CherryError(
            f"reward_weights has {len(weights)} value(s) for {len(sources)} reward source(s) ({', '.join(sources)}): "
            "give one weight per source"
        )
    for source, weight in zip(sources, weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
            raise CherryError(f"reward_weights: the weight of '{source}' must be a finite number (got {weight!r})")
    parsed = [parse_reward_source(s) for s in sources]
    rm_sources = [s for s, (kind, _) in zip(sources, parsed) if kind == "rm"]
    if safety_model and len(rm_sources) != 1:
        raise CherryError(
            "safety_reward_model combines with exactly one helpfulness reward model, "
            + ("but rewards has no rm: entry; add rm:PATH" if not rm_sources
               else f"but rewards has {len(rm_sources)} ({', '.join(rm_sources)}); keep one")
        )
    if not 0.0 <= safety_threshold <= 1.0:
        raise CherryError(f"safety_threshold is a probability in [0, 1] (got {safety_threshold})")

    built: list[RewardSource] = []
    seen: dict[str, int] = {}
    for entry, (kind, arg), weight in zip(sources, parsed, weights):
        base = _base_name(kind, arg)
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        while name in {s.name for s in built}:
            seen[base] += 1
            name = f"{base}_{seen[base]}"
        needs: set[str] = set()
        if kind == "rm":
            score: ScoreFn = RewardModelScorer(f"rewards entry '{entry}'", arg, tokenizer, device=device, batch_size=batch_size)
        else:
            if kind == "exact_match":
                fn = exact_match_reward
                needs = {"answer"}
            elif kind == "regex":
                fn = regex_reward(arg)
            elif kind == "length":
                fn = length_reward(int(arg))
            else:
                fn = load_reward_function(arg)
                needs = _function_needs(fn)
            score = _function_source(entry, fn)
        built.append(RewardSource(entry=entry, kind=kind, name=name, weight=float(weight), score=score, needs=needs))
    safety = None
    if safety_model:
        safety = RewardModelScorer(f"safety_reward_model '{safety_model}'", safety_model, tokenizer, device=device, batch_size=batch_size)
    return Reward(built, safety=safety, safety_threshold=safety_threshold)


# ----------------------------------------------------------------------------------------------
# Pairwise judges


@dataclass
class JudgeResult:
    prob_a: list[float]  # probability that completion A is better than B
    consistent: list[bool] | None  # both presentation orders chose the same winner; None for order-free judges


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


DEFAULT_JUDGE_TEMPLATE = (
    "Two assistants answered the same request. Decide which answer serves the user better: the one that is "
    "correct, helpful and to the point.\n\n"
    "Request:\n{prompt}\n\n"
    "Answer 1:\n{answer_1}\n\n"
    "Answer 2:\n{answer_2}\n\n"
    "Which answer is better? Reply with one digit: 1 or 2."
)
PLAIN_JUDGE_SUFFIX = "\n\nThe better answer is Answer"  # plain-text judges continue with " 1" or " 2"
JUDGE_PLACEHOLDERS = ("{prompt}", "{answer_1}", "{answer_2}")


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

    def __init__(self, model_path_or_id: str, device: str = "cpu", template: str | None = None, *,
                 batch_size: int = 8, use_chat_template: bool | None = None, trust_remote_code: bool = False):
        from engine.models import freeze, load_causal_lm, load_tokenizer, pick_device, pick_dtype

        self.template = DEFAULT_JUDGE_TEMPLATE if template is None else template
        missing = [p for p in JUDGE_PLACEHOLDERS if p not in self.template]
        if missing:
            raise CherryError(f"judge template lacks {', '.join(missing)}; it must contain {', '.join(JUDGE_PLACEHOLDERS)}")
        self.source = model_path_or_id
        self.batch_size = batch_size
        target = pick_device(device)
        try:
            self.tokenizer = load_tokenizer(model_path_or_id, trust_remote_code=trust_remote_code)
            self.model = freeze(load_causal_lm(model_path_or_id, dtype=pick_dtype("auto", target), device=target,
                                               trust_remote_code=trust_remote_code))
        except CherryError as err:
            raise type(err)(f"judge '{model_path_or_id}': {err}") from None
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise CherryError(f"judge '{model_path_or_id}': its tokenizer has no chat template; leave use_chat_template unset")
        self.use_chat = has_template if use_chat_template is None else use_chat_template
        self._strip_eos = (not self.use_chat) and _appends_eos(self.tokenizer)
        self.choice_ids: tuple[int, int] | None = None
        self.encode(["probe"], ["first"], ["second"])  # refuse a tokenizer without single-token digits now

    def render(self, question: str, answer_1: str, answer_2: str) -> str:
        body = (self.template.replace("{prompt}", question).replace("{answer_1}", answer_1).replace("{answer_2}", answer_2))
        if self.use_chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
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

    def choice_probs(self, prompts: list[str], first: list[str], second: list[str],
                     columns: dict[str, list] | None = None) -> list[float]:
        """P("1"), renormalised over "1" and "2", with `first` shown as Answer 1: one order only."""
        import torch

        from engine.batching import left_pad

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
                    logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                        use_cache=False, logits_to_keep=1).logits[:, -1, :]
                except TypeError:  # a model without logits_to_keep
                    logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                        use_cache=False).logits[:, -1, :]
                two = logits[:, list(self.choice_ids)].float()
                out.extend(torch.softmax(two, dim=-1)[:, 0].tolist())
        return out

    def prefer(self, prompts: list[str], completions_a: list[str], completions_b: list[str], prompt_ids: list[list[int]] | None = None,
               a_ids: list[list[int]] | None = None, b_ids: list[list[int]] | None = None,
               columns: dict[str, list] | None = None) -> JudgeResult:
        if not completions_a:
            return JudgeResult([], [])
        a_first = self.choice_probs(prompts, completions_a, completions_b, columns)  # P("1") = A better
        b_first = self.choice_probs(prompts, completions_b, completions_a, columns)  # P("1") = B better
        prob_a = [0.5 * (p + (1.0 - q)) for p, q in zip(a_first, b_first)]
        consistent = [(p > 0.5) == (q < 0.5) for p, q in zip(a_first, b_first)]
        return JudgeResult(prob_a, consistent)


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
    shorter_won = [winners[i] == (0 if lengths_a[i] < lengths_b[i] else 1) for i in decided if lengths_a[i] != lengths_b[i]]
    out = {"decided_frac": (len(decided), len(skip)), "shorter_preferred_frac": (sum(shorter_won), len(shorter_won))}
    if rewards_a is not None and rewards_b is not None:
        agree = [winners[i] == (0 if rewards_a[i] > rewards_b[i] else 1) for i in decided if rewards_a[i] != rewards_b[i]]
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
