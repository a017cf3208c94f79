"""Reward functions of your own: load `module:function` or `path/to/file.py:function`, check its
signature, call it the way the loop does and check what it returns.

A function is called by keyword, as TRL calls reward functions (docs/data.md)::

    def my_reward(completions, answer, **kwargs) -> list[float | None]:
        ...                                   # one number per completion, or None: no reward here

It gets `prompts`, `completions`, `completion_ids`, `step`, `epoch` and every dataset column by
name, values as in the data (for conversational data prompts and completions are message lists).
A function without `**kwargs` is passed only what it names; a named parameter other than the
standard ones is a column it needs. An older fn(p, c, ...) naming neither `prompts` nor
`completions` gets those two by position. `async def` functions are awaited together (combine.py).
A wrong length, a non-number or a non-finite score is refused naming the function; an exception
raised inside names the function and the first sample that fails on its own (the original
traceback is kept as the cause).
"""

from __future__ import annotations

import asyncio
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
from engine.nonfinite import NonFiniteError

CODE_PATHS_ENV = "CHERRY_CODE_PATHS"


def allowed_code_paths() -> list[Path] | None:
    """The directories $CHERRY_CODE_PATHS allows reward code to be imported from (os.pathsep-separated);
    None when it is unset: any file or importable module may be named (whoever queues runs is trusted)."""
    value = os.environ.get(CODE_PATHS_ENV)
    if value is None:
        return None
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip()]


def check_code_path(entry: str, origin: str | Path | None, what: str = "rewards entry") -> None:
    """Refuse code (a reward, an environment, a tool) that lies outside $CHERRY_CODE_PATHS (when set)."""
    allowed = allowed_code_paths()
    if allowed is None:
        return
    where = Path(origin).resolve() if origin else None
    if where is None or not any(where.is_relative_to(root) for root in allowed):
        shown = os.pathsep.join(map(str, allowed)) or "(empty)"
        raise CherryError(
            f"{what} '{entry}': its code ({where or 'not a file'}) is outside {CODE_PATHS_ENV}={shown}; "
            f"move it under one of those directories or add its directory to {CODE_PATHS_ENV} on this machine"
        )


def _module_origin(target: str) -> str | None:
    """Where `import target` would load from, without running it (None when it cannot be found)."""
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):  # a parent package missing, or an empty name
        return None
    return found.origin if found is not None and found.has_location else None


def load_code(entry: str, what: str = "rewards entry") -> Any:
    """The object a `module:name` or `path/to/file.py:name` entry names (a reward function, an environment
    class, a tool); a CherryError naming `what` and the entry when it cannot be found or imported."""
    target, _, attr = entry.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise CherryError(f"{what} '{entry}': no such file {path} (relative paths are taken from {Path.cwd()})")
        check_code_path(entry, path, what)
        name = "cherry_reward_" + re.sub(r"\W", "_", str(path.resolve()))
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CherryError(f"{what} '{entry}': {path} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise CherryError(
                f"{what} '{entry}': running {path} failed ({type(err).__name__}: {err}); fix the file"
            ) from err
    else:
        if allowed_code_paths() is not None:  # checked before any of the module's code runs
            check_code_path(entry, _module_origin(target.split(".")[0]), what)  # finding `a.b` imports `a`
            check_code_path(entry, _module_origin(target), what)
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as err:
            if err.name and (target == err.name or target.startswith(err.name + ".")):
                raise CherryError(
                    f"{what} '{entry}': no module named '{target}'; put its folder on PYTHONPATH, "
                    f"or give the file: path/to/{target.replace('.', '/')}.py:{attr}"
                ) from None
            raise CherryError(f"{what} '{entry}': importing '{target}' failed ({err}); install what it needs") from err
        except Exception as err:
            raise CherryError(f"{what} '{entry}': importing '{target}' failed ({type(err).__name__}: {err})") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:10]
            hint = f" (it defines: {', '.join(defined)})" if defined else ""
            raise CherryError(f"{what} '{entry}': '{target}' has no attribute '{attr}'{hint}")
        obj = getattr(obj, part)
    return obj


def load_reward_function(entry: str) -> Callable[..., Any]:
    """The callable named by a `module:function` or `path/to/file.py:function` entry."""
    obj = load_code(entry)
    if not callable(obj):
        raise CherryError(
            f"rewards entry '{entry}': '{entry.rpartition(':')[2]}' is a {type(obj).__name__}, not a function; it must be "
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
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    if _positional_call(sig):
        try:
            sig.bind_partial([], [])
            return
        except TypeError:
            pass
    elif takes_any or "completions" in sig.parameters:
        return
    raise CherryError(
        f"rewards entry '{entry}': the function must take its arguments by keyword, e.g. "
        f"fn(completions, **kwargs) or fn(prompts, completions, answer, **kwargs), and return one number per "
        f"completion; its signature is {sig}"
    )


# Keyword arguments a reward function gets from the loop itself, never from a dataset column.
STANDARD_KWARGS = ("prompts", "completions", "completion_ids", "step", "epoch")


def _positional_call(sig: inspect.Signature) -> bool:
    """An older fn(p, c, ...) that names neither `prompts` nor `completions`: the first two go by position."""
    params = sig.parameters
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if "prompts" in params or "completions" in params:
        return False
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params.values())


def function_needs(fn: Callable[..., Any]) -> set[str]:
    """The dataset columns a function reads: its required named parameters other than the standard ones."""
    sig = _signature(fn)
    if sig is None:
        return set()
    params = list(sig.parameters.values())
    skipped = params[:2] if _positional_call(sig) else []
    return {
        p.name
        for p in params
        if p not in skipped
        and p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in STANDARD_KWARGS
    }


def reward_call(fn: Callable[..., Any], available: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of a call: everything by keyword, as TRL calls reward functions; a function
    without **kwargs gets only what it names; an older fn(p, c, ...) gets prompts and completions by position."""
    sig = _signature(fn)
    if sig is None:
        return (), available
    args: tuple = ()
    if _positional_call(sig):
        args = (available["prompts"], available["completions"])
        available = {k: v for k, v in available.items() if k not in ("prompts", "completions")}
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return args, available
    names = {p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return args, {k: v for k, v in available.items() if k in names}


def check_call(entry: str, fn: Callable[..., Any], available: set[str]) -> None:
    """CherryError unless fn can be called with the keyword arguments named in `available`."""
    sig = _signature(fn)
    if sig is None:
        return
    args, kwargs = reward_call(fn, dict.fromkeys(available | {"prompts", "completions"}))
    try:
        sig.bind(*args, **kwargs)
    except TypeError as err:
        missing = sorted(function_needs(fn) - available)
        what = (
            f"the column(s) {', '.join(missing)}, which the data does not have"
            if missing
            else f"arguments it cannot be given ({err})"
        )
        columns = sorted(available - set(STANDARD_KWARGS))
        raise CherryError(
            f"reward '{entry}' needs {what} (data columns: {', '.join(columns) or 'none'}); add the column, "
            "rename one to it with column_map, or write it as fn(completions, **kwargs) and read kwargs.get(...)"
        ) from None


def check_scores(entry: str, scores: Any, n: int) -> list[float | None]:
    """A reward function's output as floats (None: no reward from it for that completion), or CherryError
    saying what is wrong with it."""
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
    out: list[float | None] = []
    for i, value in enumerate(scores):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise CherryError(
                f"reward '{entry}' returned {value!r} ({type(value).__name__}) for completion {i}; scores must be "
                "numbers (or None for no reward from this function)"
            )
        value = float(value)
        if not math.isfinite(value):
            raise NonFiniteError(  # the loop skips the step (skip_nonfinite_steps) or ends the run
                f"reward '{entry}' returned {value} for completion {i}; scores must be finite numbers "
                "(return None where this function has no reward for a completion)"
            )
        out.append(value)
    return out


def _one_sample(available: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    return {k: v[i : i + 1] if isinstance(v, list) and len(v) == n else v for k, v in available.items()}


def _sample_text(available: dict[str, Any], i: int) -> str:
    prompt = available["prompts"][i]
    text = prompt if isinstance(prompt, str) else repr(prompt)
    return text if len(text) <= 60 else text[:57] + "..."


def _raised(entry: str, err: Exception, where: str) -> CherryError:
    return CherryError(f"reward '{entry}' raised {type(err).__name__}: {err} ({where})")


def call_reward_function(entry: str, fn: Callable[..., Any], available: dict[str, Any]) -> list[float | None]:
    """Call fn by keyword (`available`: prompts, completions, completion_ids, the dataset's columns, step,
    epoch) the way the loop does and check what it returns. An exception is re-raised naming the
    function and the first sample it fails on alone."""
    n = len(available["completions"])
    check_call(entry, fn, set(available))
    args, kwargs = reward_call(fn, available)
    try:
        scores = fn(*args, **kwargs)
    except CherryError:
        raise
    except Exception as err:
        raise _raised(entry, err, _failing_sample(fn, available, n)) from err
    return check_scores(entry, scores, n)


def _failing_sample(fn: Callable[..., Any], available: dict[str, Any], n: int) -> str:
    """Where a batch call failed: the first sample that fails alone, or the batch when none does."""
    for i in range(n):
        args, kwargs = reward_call(fn, _one_sample(available, i, n))
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                asyncio.run(result)
        except Exception:  # noqa: BLE001 - looking for the sample that fails
            return f"on sample {i}, prompt {_sample_text(available, i)!r}"
    return f"on the batch of {n} samples; each alone passes"


async def call_async_reward_function(
    entry: str, fn: Callable[..., Any], available: dict[str, Any]
) -> list[float | None]:
    """`call_reward_function` for an `async def` function (the loop awaits all of them together)."""
    n = len(available["completions"])
    check_call(entry, fn, set(available))
    args, kwargs = reward_call(fn, available)
    try:
        scores = await fn(*args, **kwargs)
    except CherryError:
        raise
    except Exception as err:
        where = f"on the batch of {n} samples"
        for i in range(n):
            one_args, one_kwargs = reward_call(fn, _one_sample(available, i, n))
            try:
                await fn(*one_args, **one_kwargs)
            except Exception:  # noqa: BLE001
                where = f"on sample {i}, prompt {_sample_text(available, i)!r}"
                break
        raise _raised(entry, err, where) from err
    return check_scores(entry, scores, n)


def is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
