"""The environment contract: what a multi-turn episode's other side is, loaded from your code and called safely.

An environment is a class given like a reward function, by file or module (`environment: ./env.py:MyEnv`);
every episode gets a fresh instance, made with no arguments (docs/tools.md):

    class MyEnv:
        def reset(self, row: dict) -> str | list[dict] | None:
            ...  # the episode's prompt: text, messages, or None for the dataset's own prompt
        def step(self, assistant_text: str) -> tuple[list[dict] | str | None, float, bool]:
            ...  # (what the environment says next, this turn's reward, whether the episode is over)

`row` is the dataset row (its columns, `prompt`, `messages`, `answer`). An observation is a list of
{"role", "content"} messages (a single message or a string, a user message, are accepted too); None says
nothing. The engine calls every method through `guarded`: within `tool_timeout` seconds, any exception
caught, the result's shape checked. What goes wrong is an `EnvironmentFailure` the episode records as
its error; the episode then ends with zero reward and the run goes on.

Tools (`tools: [./tools.py:add]`) build a `ToolEnvironment` (engine/tools.py) that meets the same contract.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

from engine.errors import CherryError, SpecError
from engine.limits import time_limit
from engine.rewards.functions import load_code

ROLES = ("system", "user", "assistant", "tool")


class EnvironmentFailure(Exception):
    """An environment or tool call that raised, ran past its time limit or returned the wrong shape."""


class EpisodeTruncated(Exception):
    """Raised by an environment to end the episode early as truncated (a tool budget spent), not failed."""


# ----------------------------------------------------------------------------- loading, checked at submit


def _takes_one(method: Any) -> bool:
    """Whether a bound method can be called with exactly one positional argument."""
    try:
        inspect.signature(method).bind(None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): trust it
        return True
    return True


def load_environment(entry: str) -> Callable[[], Any]:
    """The environment class (or factory) an `environment` entry names, its contract checked; SpecError naming
    the field when the file, the class or a method is missing or takes the wrong arguments."""
    if not isinstance(entry, str) or ":" not in entry:
        raise SpecError(
            f"environment must be path/to/file.py:ClassName or module:ClassName (got {entry!r})", "environment"
        )
    try:
        factory = load_code(entry, "environment")
    except CherryError as err:
        raise SpecError(str(err), "environment") from err
    if not callable(factory):
        raise SpecError(
            f"environment '{entry}' is a {type(factory).__name__}; it must be a class with reset(row) and step(text)",
            "environment",
        )
    for name, what in (("reset", "reset(self, row)"), ("step", "step(self, assistant_text)")):
        method = getattr(factory, name, None)
        if not callable(method):
            raise SpecError(f"environment '{entry}' has no method {name}; it must define {what}", "environment")
        bound = method.__get__(object()) if inspect.isfunction(method) else method
        if not _takes_one(bound):
            raise SpecError(
                f"environment '{entry}': {name} must take one argument besides self, as {what}; "
                f"its signature is {inspect.signature(method)}",
                "environment",
            )
    if inspect.isclass(factory):
        try:
            inspect.signature(factory).bind()
        except TypeError:
            raise SpecError(
                f"environment '{entry}': the class must be constructible with no arguments (one instance per episode); "
                f"its signature is {inspect.signature(factory)}",
                "environment",
            ) from None
        except ValueError:
            pass
    return factory


# ----------------------------------------------------------------------------- calling, guarded


def guarded(what: str, call: Callable[[], Any], timeout: float | None) -> Any:
    """`call()` within `timeout` seconds; EnvironmentFailure naming `what` when it raises or runs past it."""
    try:
        with time_limit(timeout, what):
            return call()
    except EpisodeTruncated:
        raise
    except Exception as err:  # noqa: BLE001 - user code: whatever it raises ends its episode, not the run
        message = str(err) if isinstance(err, CherryError) else f"{what} raised {type(err).__name__}: {err}"
        raise EnvironmentFailure(message) from err


def as_messages(value: Any, what: str, default_role: str = "user") -> list[dict] | None:
    """An observation or prompt as a message list (None stays None); EnvironmentFailure for any other shape."""
    if value is None:
        return None
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise EnvironmentFailure(f"{what} returned a {type(value).__name__}; give a list of {{role, content}} messages")
    messages = []
    for message in value:
        ok = isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
        if not ok:
            raise EnvironmentFailure(
                f"{what} returned the message {message!r}; each must be {{'role': one of {', '.join(ROLES)}, "
                "'content': text}"
            )
        messages.append(dict(message))
    return messages


def check_step(value: Any, what: str) -> tuple[list[dict] | None, float, bool]:
    """An environment step's result as (observation messages or None, reward, done); EnvironmentFailure when it
    is not a 3-tuple with a finite number and a bool."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise EnvironmentFailure(f"{what} returned {value!r:.80}; it must return (observation, reward, done)")
    observation, reward, done = value
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise EnvironmentFailure(f"{what} returned the reward {reward!r}; it must be a finite number")
    if not isinstance(done, bool) and done not in (0, 1):
        raise EnvironmentFailure(f"{what} returned done={done!r}; it must be True or False")
    return as_messages(observation, what), float(reward), bool(done)
