"""Reward functions of your own: load `module:function` or `path/to/file.py:function`, check its
signature, call it the way the loop does and check what it returns.

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
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.errors import CherryError

# Keyword arguments a reward function gets from the loop itself, never from a dataset column.
_LOOP_KWARGS = ("completion_ids",)


CODE_PATHS_ENV = "CHERRY_CODE_PATHS"


def allowed_code_paths() -> list[Path] | None:
    """The directories $CHERRY_CODE_PATHS allows reward code to be imported from (os.pathsep-separated);
    None when it is unset: any file or importable module may be named (whoever queues runs is trusted)."""
    value = os.environ.get(CODE_PATHS_ENV)
    if value is None:
        return None
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip()]


def check_code_path(entry: str, origin: str | Path | None) -> None:
    """Refuse a reward whose code lies outside $CHERRY_CODE_PATHS (when set)."""
    allowed = allowed_code_paths()
    if allowed is None:
        return
    where = Path(origin).resolve() if origin else None
    if where is None or not any(where.is_relative_to(root) for root in allowed):
        shown = os.pathsep.join(map(str, allowed)) or "(empty)"
        raise CherryError(
            f"rewards entry '{entry}': its code ({where or 'not a file'}) is outside {CODE_PATHS_ENV}={shown}; "
            f"move it under one of those directories or add its directory to {CODE_PATHS_ENV} on this machine"
        )


def _module_origin(target: str) -> str | None:
    """Where `import target` would load from, without running it (None when it cannot be found)."""
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):  # a parent package missing, or an empty name
        return None
    return found.origin if found is not None and found.has_location else None


def load_reward_function(entry: str) -> Callable[..., Any]:
    """The callable named by a `module:function` or `path/to/file.py:function` entry."""
    target, _, attr = entry.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise CherryError(
                f"rewards entry '{entry}': no such file {path} (relative paths are taken from {Path.cwd()})"
            )
        check_code_path(entry, path)
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
            raise CherryError(
                f"rewards entry '{entry}': running {path} failed ({type(err).__name__}: {err}); fix the file"
            ) from err
    else:
        if allowed_code_paths() is not None:  # checked before any of the module's code runs
            check_code_path(entry, _module_origin(target.split(".")[0]))  # finding `a.b` imports `a`
            check_code_path(entry, _module_origin(target))
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as err:
            if err.name and (target == err.name or target.startswith(err.name + ".")):
                raise CherryError(
                    f"rewards entry '{entry}': no module named '{target}'; put its folder on PYTHONPATH, "
                    f"or give the file: path/to/{target.replace('.', '/')}.py:{attr}"
                ) from None
            raise CherryError(
                f"rewards entry '{entry}': importing '{target}' failed ({err}); install what it needs"
            ) from err
        except Exception as err:
            raise CherryError(
                f"rewards entry '{entry}': importing '{target}' failed ({type(err).__name__}: {err})"
            ) from err
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


def function_needs(fn: Callable[..., Any]) -> set[str]:
    """Keyword arguments a function requires beyond (prompts, completions): the columns it reads."""
    sig = _signature(fn)
    if sig is None:
        return set()
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    return {
        p.name
        for p in params
        if p not in positional
        and p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
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
        raise CherryError(
            f"reward '{entry}' returned {len(scores)} scores for {n} completions; return exactly one per completion"
        )
    out: list[float] = []
    for i, value in enumerate(scores):
        if value is None:
            raise CherryError(f"reward '{entry}' returned None for completion {i}; return 0.0 for \"not applicable\"")
        if not isinstance(value, numbers.Real):
            raise CherryError(
                f"reward '{entry}' returned {value!r} ({type(value).__name__}) for completion {i}; scores must be numbers"
            )
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
            missing = sorted(function_needs(fn) - set(kwargs))
            what = (
                f"column(s) {', '.join(missing)}, which the data does not have"
                if missing
                else f"arguments it cannot be given ({sig})"
            )
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
