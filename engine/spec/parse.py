"""From what a user types (YAML values, `--set key=value`, the field's names) to a typed RunSpec."""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, get_args, get_origin

import yaml

from engine.errors import SpecError
from engine.limits import load_yaml
from engine.registry import ALGORITHMS
from engine.spec.aliases import NO_EQUIVALENT, known_names, translate
from engine.spec.schema import DEFAULT_EPSILON, VERBATIM_FIELDS, LoraSpec, RunSpec, spec_fields


def closest(name: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_key(key: str, candidates: list[str], where: str = "") -> SpecError:
    """An unknown key, with the closest Cherry setting or field's name (TRL's names included) as a suggestion."""
    guess = closest(key.split(".")[-1], candidates + ([] if where else known_names()))
    if guess in NO_EQUIVALENT:
        hint = f"did you mean '{guess}'? (Cherry has no equivalent: {NO_EQUIVALENT[guess][1]})"
    elif guess:
        hint = f"did you mean '{guess}'?"
    else:
        hint = f"valid keys: {', '.join(sorted(candidates))}"
    return SpecError(f"unknown {where}key '{key}': {hint}", field=key)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML or `--set` value into the field's type, or say what was expected."""
    args = get_args(hint)
    if list[float] in args:  # "0.5,0.3" or a YAML list of numbers
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        try:
            return [float(v) for v in items]
        except (TypeError, ValueError):
            raise SpecError(f"{key} must be a list of numbers such as 0.5,0.3 (got {value!r})", key) from None
    if any(get_origin(a) is list for a in args):  # "str | list[str]": a name, a list, or "a,b"
        if value is None and type(None) in args:
            return None
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, str) and str not in args:  # list[str] | None: one string is a list of one
            return [value]
        if isinstance(value, str) and "," in value:
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str):
            return value
        raise SpecError(f"{key} must be a name or a list of names, got {value!r}", key)
    if value is None:
        if type(None) in args:
            return None
        raise SpecError(f"{key} cannot be empty: give a value of type {_type_name(hint)}", key)
    if set(args) == {str, int}:  # a word or a count (log_rollouts: all | off | N)
        if isinstance(value, bool):  # YAML 1.1 reads off / no as false, on / yes as true
            return "off" if not value else "on"
        return int(value) if isinstance(value, str) and re.fullmatch(r"\d+", value.strip()) else value
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    return _scalar(key, value, target)


def _scalar(key: str, value: Any, target: Any) -> Any:
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise SpecError(f"{key} must be true or false, got {value!r}", key)
    if target is int:
        if isinstance(value, bool):
            raise SpecError(f"{key} must be an integer, got {value!r}", key)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise SpecError(f"{key} must be an integer, got {value!r}", key)
    if target is float:
        if isinstance(value, bool):
            raise SpecError(f"{key} must be a number, got {value!r}", key)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SpecError(f"{key} must be a number, got {value!r}", key) from None
    if target is str:
        if isinstance(value, (dict, list)):
            raise SpecError(f"{key} must be a string, got {value!r}", key)
        return str(value)
    return value


def _type_name(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args) if args else getattr(hint, "__name__", str(hint))


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` from `--set`: the value read as YAML (a number, a list, null), free-text fields as typed."""
    if "=" not in item:
        raise SpecError(f"--set expects key=value, got '{item}' (for example --set beta=0.2)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key in VERBATIM_FIELDS:
        return key, raw
    try:
        value = load_yaml(raw, f"--set {key}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    return dict(parse_override(item) for item in items or [])


def typed_spec(values: dict[str, Any]) -> RunSpec:
    """A RunSpec from a flat-or-nested dict (Cherry's names or the field's) with each value turned into its
    field's type (not yet checked)."""
    values, notes = translate(values)
    top = spec_fields(RunSpec)
    lora_fields = spec_fields(LoraSpec)
    kwargs: dict[str, Any] = {}
    lora_kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith("lora."):
            sub = key[len("lora.") :]
            if sub not in lora_fields:
                raise unknown_key(key, list(lora_fields), "lora ")
            lora_kwargs[sub] = coerce(key, value, lora_fields[sub])
        elif key == "lora":
            if isinstance(value, LoraSpec):
                value = dataclasses.asdict(value)
            if not isinstance(value, dict):
                raise SpecError("lora must be a mapping, e.g. lora: {r: 16, alpha: 32}", "lora")
            for sub, sub_value in value.items():
                if sub not in lora_fields:
                    raise unknown_key(f"lora.{sub}", list(lora_fields), "lora ")
                lora_kwargs.setdefault(sub, coerce(f"lora.{sub}", sub_value, lora_fields[sub]))
        elif key in top:
            kwargs[key] = coerce(key, value, top[key])
        else:
            raise unknown_key(key, list(top) + [f"lora.{k}" for k in lora_fields])
    _method_defaults(kwargs)
    if notes and not kwargs.get("aliases_used"):
        kwargs["aliases_used"] = notes
    return RunSpec(**kwargs, lora=LoraSpec(**lora_kwargs))


def _method_defaults(kwargs: dict[str, Any]) -> None:
    """The values a method gives the settings a spec leaves unset: its own loss type and clip range."""
    algorithm = ALGORITHMS.get(kwargs.get("algorithm", RunSpec.algorithm))
    if "loss_type" not in kwargs and algorithm is not None:  # each method's own default (GRPO: token-level, as TRL)
        kwargs["loss_type"] = algorithm.default_loss_type
    low, high = clip_defaults(kwargs.get("algorithm", RunSpec.algorithm), kwargs.get("loss_type", "sigmoid"))
    if kwargs.get("epsilon") is None:
        kwargs["epsilon"] = low
    if kwargs.get("epsilon_high") is None:
        kwargs["epsilon_high"] = high
    for key in VERBATIM_FIELDS:  # "\n" typed on a command line or in the app is a line break
        if isinstance(kwargs.get(key), str):
            kwargs[key] = kwargs[key].replace("\\n", "\n")


def clip_defaults(algorithm: str, loss_type: str) -> tuple[float, float | None]:
    """(epsilon, epsilon_high) a spec that leaves them null gets: the GRPO loss_type's paper values, else 0.2 and
    None (= epsilon)."""
    row = ALGORITHMS.get(algorithm)
    if row is not None and loss_type in row.clip_defaults:
        return row.clip_defaults[loss_type]
    return DEFAULT_EPSILON, None
