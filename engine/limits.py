"""Bounds on what data, presets and user code may cost: a time limit per call, a bounded YAML reader.

- `time_limit(seconds, what)`: raise `TimeLimitExceeded` when the block runs longer (SIGALRM, so it
  interrupts pure-Python loops and regular expressions alike). Only the main thread can take signals:
  elsewhere the block runs unbounded, which is where the engine never calls user code.
- `load_yaml(text, where)`: YAML's safe loader, refused beyond `YAML_MAX_BYTES` or when aliases would
  expand it beyond `YAML_MAX_NODES` nodes (a few hundred bytes of nested aliases can name billions).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from engine.errors import CherryError, SpecError

YAML_MAX_BYTES = 1_000_000  # presets, sweeps and pipelines are a few kilobytes
YAML_MAX_NODES = 100_000  # values after aliases are expanded
JSONL_MAX_LINE_CHARS = 8_000_000  # one example; a longer line is refused before it is parsed
CHAT_TEMPLATE_SECONDS = 10.0  # one conversation through a chat template; real templates take milliseconds


class TimeLimitExceeded(CherryError):
    """A call ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Run the block with at most `seconds` of wall time (None or 0: no limit)."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeLimitExceeded(f"{what} took longer than {seconds:g}s and was stopped")

    previous = signal.signal(signal.SIGALRM, expire)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:  # an enclosing limit keeps (roughly) its own deadline
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - seconds, 0.001))


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], where: str) -> int:
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise CherryError(f"{where}: a YAML alias refers to itself; write the value out")
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, open_nodes, where) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_size(k, sizes, open_nodes, where) + _expanded_size(v, sizes, open_nodes, where)
    open_nodes.discard(key)
    sizes[key] = total
    if total > YAML_MAX_NODES:
        raise CherryError(
            f"{where}: its YAML aliases expand to more than {YAML_MAX_NODES:,} values; "
            "write the values out instead of nesting aliases"
        )
    return total


def load_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)` within the bounds above; CherryError naming `where` when refused.
    A YAMLError for malformed YAML passes through (callers word that one themselves)."""
    if len(text) > YAML_MAX_BYTES:
        raise CherryError(
            f"{where} is {len(text):,} characters; YAML files Cherry reads are at most {YAML_MAX_BYTES:,}"
        )
    loader = yaml.SafeLoader(text)
    try:  # one parse: the node graph is measured, then built
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set(), where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, where: str | None = None) -> Any:
    """`load_yaml` of a file; the size is checked before the file is read whole."""
    path = Path(path)
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:
        raise CherryError(f"{where or path} is {size:,} bytes; YAML files Cherry reads are at most {YAML_MAX_BYTES:,}")
    return load_yaml(path.read_text(), where or str(path))


def check_limits(spec) -> None:
    """The bounds' settings: reward_timeout is a number of seconds, 0 for none."""
    value = spec.reward_timeout
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise SpecError(f"reward_timeout is seconds per reward call, >= 0 (0 = no limit); got {value!r}")
