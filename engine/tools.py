"""Tools: Python functions the policy may call mid-episode, as an environment (engine/environments.py).

`tools: [./tools.py:add, mymodule:search]` names them. Each function's JSON schema comes from its
signature (parameter names, annotations, defaults) and its docstring (the first paragraph describes the
tool; `name: text` lines under an `Args:` heading describe its parameters). The prompt shows the tools
through the chat template's own `tools=` argument where the template reads it, else in a system message
that also shows the call format. A call is written as

    <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>

(the format of Qwen/Hermes templates); an assistant turn that is nothing but such a JSON object (Llama 3.1's
format, "parameters" for "arguments") counts too. Each call's result comes back as a tool message
{"role": "tool", "name": ..., "content": str(result)}; a call that cannot be parsed, names no known tool,
has the wrong arguments, raises or runs past `tool_timeout` comes back as a tool message starting with
"error:", so the model can read it and retry. A turn without a call ends the episode (its text is the answer
the reward functions score). After `max_tool_calls` calls the episode ends, truncated.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from typing import Any

from engine.environments import EnvironmentFailure, EpisodeTruncated, guarded, load_environment
from engine.errors import CherryError, SpecError
from engine.rewards.functions import load_code

CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
RESULT_CHARS = 2000  # a tool result longer than this is cut: it becomes prompt tokens of every later turn
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


def load_tools(entries: list[str] | str) -> dict[str, Callable[..., Any]]:
    """The functions `tools` names, by name; SpecError naming the field when one is missing or not a function."""
    entries = [entries] if isinstance(entries, str) else list(entries)
    tools: dict[str, Callable[..., Any]] = {}
    for entry in entries:
        if not isinstance(entry, str) or ":" not in entry:
            raise SpecError(f"tools entries are path/to/file.py:function or module:function (got {entry!r})", "tools")
        try:
            fn = load_code(entry, "tools entry")
        except CherryError as err:
            raise SpecError(str(err), "tools") from err
        if not inspect.isfunction(fn) and not inspect.ismethod(fn):
            raise SpecError(f"tools entry '{entry}' is a {type(fn).__name__}, not a function", "tools")
        if any(p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) for p in inspect.signature(fn).parameters.values()):
            raise SpecError(
                f"tools entry '{entry}': the model calls tools by keyword; {fn.__name__}{inspect.signature(fn)} "
                "takes positional-only arguments",
                "tools",
            )
        if fn.__name__ in tools:
            raise SpecError(f"tools: two tools are named '{fn.__name__}'; rename one", "tools")
        tools[fn.__name__] = fn
    return tools


def _docstring_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(the description: the docstring's first paragraph, {parameter: its `name: text` line under Args:})."""
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            match = re.match(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)", stripped)
            if match:
                params[match.group(1)] = match.group(2).strip()
            elif stripped and not line.startswith((" ", "\t")):
                in_args = False  # the next section
    return description, params


def tool_schema(fn: Callable[..., Any]) -> dict:
    """The OpenAI-style function schema chat templates read: name, description, parameters (JSON schema)."""
    description, described = _docstring_parts(fn)
    properties, required = {}, []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is param.VAR_KEYWORD:
            continue
        kind = _JSON_TYPES.get(param.annotation if not isinstance(param.annotation, str) else None)
        if isinstance(param.annotation, str):  # `from __future__ import annotations` leaves them as text
            kind = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}.get(param.annotation)
        prop: dict[str, Any] = {"type": kind or "string"}
        if name in described:
            prop["description"] = described[name]
        properties[name] = prop
        if param.default is param.empty:
            required.append(name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": fn.__name__, "description": description, "parameters": parameters}}


def tools_system_message(schemas: list[dict]) -> str:
    """The tools and the call format, for a chat template that does not render `tools=` itself."""
    listed = "\n".join(json.dumps(s["function"]) for s in schemas)
    return (
        "You can call these tools:\n"
        f"{listed}\n"
        'To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>; its result comes back '
        "in a tool message. When you have the answer, reply without a tool call."
    )


def parse_tool_calls(text: str) -> list[dict | str]:
    """The tool calls of an assistant turn: {"name", "arguments"} per well-formed call, the error text (a str)
    for each malformed one; [] when the turn calls nothing."""
    blocks = CALL.findall(text)
    if not blocks:
        stripped = text.strip()
        if not (stripped.startswith("{") and stripped.endswith("}") and '"name"' in stripped):
            return []
        blocks = [stripped]
    calls: list[dict | str] = []
    for block in blocks:
        try:
            call = json.loads(block.strip())
        except json.JSONDecodeError as err:
            calls.append(f"error: the tool call is not valid JSON ({err.msg}): {block.strip()[:200]}")
            continue
        arguments = call.get("arguments", call.get("parameters", {})) if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            calls.append(f'error: a tool call is {{"name": NAME, "arguments": {{...}}}}; got {block.strip()[:200]}')
            continue
        calls.append({"name": call["name"], "arguments": arguments})
    return calls


class ToolEnvironment:
    """One episode with tools: each assistant turn's calls run, their results are the next observation."""

    times_its_calls = True  # each tool call has its own time limit; the step as a whole has none

    def __init__(self, tools: dict[str, Callable[..., Any]], max_tool_calls: int, timeout: float | None):
        self.tools, self.max_tool_calls, self.timeout = tools, max_tool_calls, timeout
        self.tool_schemas = [tool_schema(fn) for fn in tools.values()]
        self.tool_calls = 0
        self.called: list[dict] = []  # the last turn's well-formed calls, for the rollout store

    def reset(self, row: dict) -> None:
        return None  # the dataset's prompt; the episode runner shows the tools with it

    def step(self, assistant_text: str) -> tuple[list[dict] | None, float, bool]:
        calls = parse_tool_calls(assistant_text)
        self.called = [c for c in calls if isinstance(c, dict)]
        if not calls:
            return None, 0.0, True  # an answer: the reward functions score it
        results = []
        for call in calls:
            if self.tool_calls >= self.max_tool_calls:
                raise EpisodeTruncated(f"more than max_tool_calls={self.max_tool_calls} tool calls")
            self.tool_calls += 1
            name = call["name"] if isinstance(call, dict) else None
            results.append({"role": "tool", "name": name or "", "content": self.run(call)})
        return results, 0.0, False

    def run(self, call: dict | str) -> str:
        """A call's result as text; an error the model can read when it fails."""
        if isinstance(call, str):
            return call
        fn = self.tools.get(call["name"])
        if fn is None:
            return f"error: no tool named '{call['name']}'; the tools are {', '.join(self.tools)}"
        try:
            inspect.signature(fn).bind(**call["arguments"])
        except TypeError as err:
            return f"error: {call['name']}{inspect.signature(fn)} cannot take {call['arguments']}: {err}"
        try:
            result = guarded(f"tool '{call['name']}'", lambda: fn(**call["arguments"]), self.timeout)
        except EnvironmentFailure as err:
            return f"error: {err}"
        text = result if isinstance(result, str) else json.dumps(result, default=str)
        return text if len(text) <= RESULT_CHARS else text[:RESULT_CHARS] + " ...(cut)"


def tool_environment(tools: dict[str, Callable[..., Any]], max_tool_calls: int, timeout: float | None):
    """A factory of fresh tool environments (one per episode)."""
    return lambda: ToolEnvironment(tools, max_tool_calls, timeout)


def episode_factory(spec) -> Callable[[], Any] | None:
    """What makes each episode's environment: the `environment` class, a tool environment of `tools`, or None
    (single-turn sampling)."""
    if spec.environment:
        return load_environment(spec.environment)
    if spec.tools:
        return tool_environment(load_tools(spec.tools), spec.max_tool_calls, spec.tool_timeout)
    return None


def check_episode_code(spec) -> None:
    """At submit: the environment class and every tool load and have the right signatures (SpecError naming the field)."""
    if getattr(spec, "environment", None) or getattr(spec, "tools", None):
        episode_factory(spec)
