"""Model, data and reward paths checked up front and made absolute (workers may run elsewhere)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from engine.chat_templates import check_chat_template
from engine.errors import SpecError
from engine.registry import is_online
from engine.rewards.sources import parse_reward_source
from engine.spec.schema import RunSpec, presets_dir

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"
_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".tsv", ".gz"}


def demo_dir() -> Path:
    return presets_dir() / "demo"


def looks_local(value: str) -> bool:
    """True when `value` can only be a local path (so a missing one is an error, not a hub id)."""
    return (
        value.startswith((".", "/", "~"))
        or "\\" in value
        or value.endswith("/")
        or Path(value).suffix.lower() in _LOCAL_SUFFIXES
        or not _HUB_ID.match(value)
    )


def resolve_path(value: str, field_name: str, *, kind: str) -> str:
    """A local path made absolute, or a hub id left as is; a missing local path is an error.

    Relative paths are tried against the current directory, then the presets dir, so
    `demo/pairs.jsonl` finds the embedded demo data from anywhere. `demo` as a model is the demo model.
    """
    if kind == "model" and value == "demo":
        return str(demo_dir() / "model")
    expanded = Path(value).expanduser()
    for candidate in (expanded, presets_dir() / expanded):
        if candidate.exists():
            return str(candidate.resolve())
    if looks_local(value):
        what = (
            "a local directory saved with save_pretrained (or a hub id)"
            if kind == "model"
            else ("a .jsonl/.json/.parquet/.csv/.tsv file, a saved datasets directory, or a hub id")
        )
        raise SpecError(f"{field_name}: '{value}' does not exist; give {what}")
    return value


def resolve_paths(spec: RunSpec, *, check_model: bool = True) -> RunSpec:
    """Check model and dataset fields up front and make local paths absolute (workers may run elsewhere).

    `check_model=False` leaves the model alone: a chained run's model is an earlier run's output,
    which does not exist yet.
    """
    if check_model and not spec.model:
        raise SpecError("model is not set: pass --model PATH_OR_HUB_ID (or --model demo)")
    if not spec.dataset and not spec.dataset_mixture:
        raise SpecError("dataset is not set: pass --dataset PATH_OR_HUB_ID (e.g. --dataset demo/pairs.jsonl)")
    if check_model:
        spec.model = resolve_path(spec.model, "model", kind="model")
    if spec.ref_model:
        spec.ref_model = resolve_path(spec.ref_model, "ref_model", kind="model")
    spec.dataset = resolve_path(spec.dataset, "dataset", kind="data") if spec.dataset else None
    importlib.import_module("engine.data.sources").resolve_mixture_paths(spec)
    if spec.eval_dataset:
        spec.eval_dataset = resolve_path(spec.eval_dataset, "eval_dataset", kind="data")
    if spec.eval_prompts:
        spec.eval_prompts = resolve_path(spec.eval_prompts, "eval_prompts", kind="data")
    if is_online(spec.algorithm):
        spec.rewards = [_resolve_reward_source(source) for source in _as_list(spec.rewards)]
        if spec.environment:
            spec.environment = _resolve_code_entry(spec.environment, "environment")
        if spec.tools:
            spec.tools = [_resolve_code_entry(entry, "tools") for entry in _as_list(spec.tools)]
    if spec.value_model:
        spec.value_model = resolve_path(spec.value_model, "value_model", kind="model")
    if spec.safety_reward_model:
        spec.safety_reward_model = resolve_path(spec.safety_reward_model, "safety_reward_model", kind="model")
    if spec.algorithm == "online_dpo" and spec.judge != "reward":
        spec.judge = resolve_path(spec.judge, "judge", kind="model")
    if spec.chat_template:
        spec.chat_template = check_chat_template(spec.chat_template)
    if spec.coh_pretrain_dataset:
        spec.coh_pretrain_dataset = resolve_path(spec.coh_pretrain_dataset, "coh_pretrain_dataset", kind="data")
    return spec


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _resolve_code_entry(entry: str, field_name: str) -> str:
    """A path/to/file.py:name entry with its file made absolute (a module:name entry as it is)."""
    module, _, name = entry.strip().rpartition(":")
    if not module.endswith(".py"):
        return entry.strip()
    path = Path(module).expanduser()
    if not path.is_file():
        raise SpecError(
            f"{field_name}: {module} does not exist; give path/to/file.py:{name} (relative to where you run cherry) "
            f"or an importable module:{name}",
            field_name,
        )
    return f"{path.resolve()}:{name}"


def _resolve_reward_source(source: str) -> str:
    """rm:PATH and path/to/file.py:function entries with their local paths made absolute."""
    kind, arg = parse_reward_source(source)
    if kind == "rm":
        return "rm:" + resolve_path(arg, f"rewards entry '{source}'", kind="model")
    if kind == "python":
        module, _, function = arg.rpartition(":")
        if module.endswith(".py"):
            path = Path(module).expanduser()
            if not path.is_file():
                raise SpecError(
                    f"rewards entry '{source}': {module} does not exist; give path/to/file.py:function "
                    "(relative to where you run cherry) or an importable module:function"
                )
            return f"{path.resolve()}:{function}"
    return source
