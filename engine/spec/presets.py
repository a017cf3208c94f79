"""Presets and config files, and the run spec they resolve to with the user's own settings on top.

Precedence, lowest first: presets/_base.yaml < the preset (`--preset`, with the presets it builds on) <
a config file (`--config`, TRL's shape or a preset's) < `--set`, `--model` and `--dataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from engine.errors import SpecError
from engine.limits import load_yaml_file
from engine.registry import ALGORITHMS
from engine.spec.aliases import translate
from engine.spec.checks import check_values
from engine.spec.follow import follow_explicit
from engine.spec.parse import closest, parse_override, parse_overrides, typed_spec
from engine.spec.paths import resolve_paths
from engine.spec.schema import WRITTEN_BY_CHERRY, RunSpec, method_settings, methods_reading, presets_dir


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every preset YAML in the presets dir."""
    out = []
    for path in sorted(presets_dir().glob("*.yaml")):
        if path.name.startswith("_"):  # shared bases, not presets of their own
            continue
        data = read_yaml(path)
        out.append((path.stem, str(data.get("description", ""))))
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """A preset or config file's mapping; invalid YAML or another shape is a SpecError naming the file."""
    try:
        data = load_yaml_file(path) or {}  # bounded: size and aliases (a YAML bomb is refused)
    except yaml.YAMLError as err:
        raise SpecError(f"{path} is not valid YAML: {err}") from None
    except OSError as err:
        raise SpecError(f"{path} cannot be read: {err.strerror}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path} must be a mapping of key: value")
    return data


def preset_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    # `dpo`, `demo/dpo` and `demo/dpo.yaml` all name files under the presets dir, from anywhere.
    for candidate in (presets_dir() / f"{name}.yaml", presets_dir() / name):
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate
    names = [n for n, _ in list_presets()]
    guess = closest(name, names)
    hint = f"did you mean '{guess}'? " if guess else ""
    raise SpecError(f"unknown preset '{name}': {hint}available presets: {', '.join(names)} (or a path to a .yaml file)")


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's values, merged over its `base` preset's (a variant lists only what it changes)."""
    path = preset_path(name)
    data = read_yaml(path)
    data.pop("description", None)
    base = data.pop("base", None)
    if base is None:
        return data
    if base in _seen:
        raise SpecError(f"preset {path}: base presets form a loop ({' -> '.join(_seen + (base,))})")
    base_path = path.parent / f"{base}.yaml"
    merged = load_preset(str(base_path) if base_path.exists() else base, _seen + (str(name),))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def preset_chain(name: str) -> list[Path]:
    """The preset file followed by the files it builds on (for `cherry presets NAME`)."""
    chain = [preset_path(name)]
    while True:
        base = read_yaml(chain[-1]).get("base")
        if not base or len(chain) > 8:
            return chain
        chain.append(preset_path(str(chain[-1].parent / f"{base}.yaml")))


def load_config(path: str | Path) -> dict[str, Any]:
    """A `--config` file: TRL's flat YAML (its CLI's names) or Cherry's preset shape (with `base:` if it builds on one)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpecError(f"--config {path}: no such file; give a YAML file in TRL's shape or a Cherry preset's")
    return load_preset(str(path.resolve()))


def resolve_spec(
    preset: str | None,
    overrides: list[str] | None = None,
    *,
    model: str | None = None,
    dataset: str | None = None,
    config: str | Path | None = None,
    launch: dict[str, Any] | None = None,
    check_paths: bool = True,
) -> RunSpec:
    """preset < config file < `--set key=value` overrides (+ model/dataset flags) -> a validated RunSpec.

    The field's names (TRL, transformers) land on Cherry's; the notes say which. What the user sets wins
    over the preset: a preset value that would contradict an explicit setting follows it instead
    (`follow_explicit`); two explicit settings that contradict each other, and an explicit setting the
    run's method does not read, are errors. `launch` receives `output_dir` when the caller places the run.
    """
    raw_preset = load_preset(preset) if preset else {}
    raw_config = load_config(config) if config else {}
    raw_set = parse_overrides(overrides)
    algorithm = raw_set.get("algorithm") or raw_config.get("algorithm") or raw_preset.get("algorithm")
    preset_values, notes = translate(raw_preset, algorithm=algorithm)
    config_values, config_notes = translate(raw_config, launch, algorithm=algorithm)
    set_values, set_notes = translate(raw_set, launch, algorithm=algorithm)
    explicit = {**config_values, **set_values}
    if model is not None:
        explicit["model"] = model
    if dataset is not None:
        explicit["dataset"] = dataset
    for key in WRITTEN_BY_CHERRY:
        if key in explicit:
            raise SpecError(f"{key} is written by Cherry (notes on the settings it read); leave it out", key)
    spec = typed_spec({**preset_values, **explicit})
    try:
        preset_spec = typed_spec(preset_values)
    except SpecError:  # a preset value the user overrode anyway: the field defaults stand in for it
        preset_spec = RunSpec()
    refuse_unread(spec.algorithm, explicit)
    spec.aliases_used = notes + config_notes + set_notes or None
    spec.defaults_followed = follow_explicit(spec, {k.split(".")[0] for k in explicit}, preset_spec) or None
    check_values(spec)
    if check_paths:
        resolve_paths(spec)
    return spec


def refuse_unread(algorithm: str, values: dict[str, Any]) -> None:
    """A setting the run's method never reads is an error (it would change nothing), naming the methods that do."""
    if algorithm not in ALGORITHMS:
        return  # check_values names the unknown algorithm
    read = method_settings(algorithm)
    for key in values:
        name = key.split(".")[0]
        if name not in read:
            readers = methods_reading(name)
            raise SpecError(
                f"{name} is not read by {algorithm}, so it would change nothing; it is read by "
                f"{', '.join(readers) or 'no method'}: remove it or choose one of those methods",
                name,
            )


# What a resumed run may change: the split of its global batch over processes and micro-batches, and how many
# non-finite steps it may skip.
RESUME_SETTINGS = ("num_processes", "num_machines", "batch_size", "grad_accum", "parallelism", "skip_nonfinite_steps")


def with_resume_settings(spec: RunSpec, overrides: list[str]) -> RunSpec:
    """A resumed run's spec with `--set` values for RESUME_SETTINGS (the engine then checks that the global
    batch, batch_size x num_processes x grad_accum, is the checkpoint's); any other setting is refused."""
    values = spec.to_dict()
    changes, _ = translate(dict(parse_override(item) for item in overrides), algorithm=spec.algorithm)
    for key, value in changes.items():
        if key not in RESUME_SETTINGS:
            raise SpecError(
                f"--set {key}: a resumed run keeps its settings; only {', '.join(RESUME_SETTINGS)} may change "
                "(with the same global batch). Start a new run to change the rest",
                key,
            )
        values[key] = value
    resumed = typed_spec(values)
    check_values(resumed)
    return resumed


def load_spec_file(path: Path) -> RunSpec:
    spec = typed_spec(read_yaml(Path(path)))
    check_values(spec)
    return spec
