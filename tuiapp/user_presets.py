"""Presets of your own: a form's settings saved as YAML, loadable anywhere a preset is.

Saved under `$CHERRY_HOME/presets/NAME.yaml` (or any path ending in .yaml). A saved preset holds
the algorithm, model and dataset and every setting that differs from Cherry's defaults, so it
loads back to the same run spec with `cherry submit --preset PATH` or from the app's form.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import yaml

from jobs import CherryError

DIR = "presets"
ALWAYS = ("algorithm", "model", "dataset")
NEVER = ("name", "defaults_followed")  # the run's own label, and Cherry's notes on the run's settings


def presets_home(home: Path) -> Path:
    return Path(home) / DIR


def list_user_presets(home: Path) -> list[tuple[str, Path]]:
    """(description or name, path) of the presets saved under this home, by name."""
    from engine.limits import load_yaml_file  # torch-free, but the app's start-up imports no engine module

    out = []
    for path in sorted(presets_home(home).glob("*.y*ml")):
        try:
            data = load_yaml_file(path) or {}
        except (OSError, yaml.YAMLError, CherryError):
            continue
        desc = str(data.get("description") or "") if isinstance(data, dict) else ""
        out.append((desc, path))
    return out


def target_path(text: str, home: Path) -> Path:
    """Where `text` saves: a bare name goes to $CHERRY_HOME/presets/NAME.yaml, a path stays a path."""
    text = text.strip()
    if not text:
        raise CherryError("give the preset a name (or a path ending in .yaml)")
    if "/" in text or text.startswith("~") or text.endswith((".yaml", ".yml")):
        path = Path(text).expanduser()
        if path.suffix not in (".yaml", ".yml"):
            path = path.with_suffix(".yaml")
        return path
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise CherryError(f"preset name {text!r}: use letters, digits, '.', '_' and '-' (or give a path)")
    return presets_home(home) / f"{text}.yaml"


def preset_values(spec: Any) -> dict[str, Any]:
    """What a preset must hold to give back `spec`: the settings that differ from the defaults."""
    from engine.spec import RunSpec

    defaults = RunSpec().to_dict()
    values: dict[str, Any] = {}
    for key, value in spec.to_dict().items():
        if key in NEVER:
            continue
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            changed = {k: v for k, v in value.items() if v != defaults[key].get(k)}
            if changed:
                values[key] = changed
        elif key in ALWAYS or value != defaults.get(key):
            values[key] = value
    return values


def preset_yaml(spec: Any, based_on: str, description: str = "") -> str:
    values = {"description": description or f"saved from the Cherry app, based on {Path(based_on).stem}"}
    values.update(preset_values(spec))
    header = f"# Cherry preset saved {time.strftime('%Y-%m-%d %H:%M')} from the app (based on {based_on}).\n"
    header += "# Use it with `cherry submit --preset THIS_FILE` or pick it in the app's new-run form.\n"
    return header + yaml.safe_dump(values, sort_keys=False, default_flow_style=False)


def save_preset(spec: Any, path: Path, based_on: str, description: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(preset_yaml(spec, based_on, description))
    return path
