"""The new-run form's fields and the helpers behind them, free of any widget: which settings the form shows,
a preset's choices, defaults and help, the equivalent command line, the sweep grid, and the dataset preview."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from rich.text import Text

from jobs import CherryError
from tuiapp.data import RunInfo
from tuiapp.user_presets import list_user_presets

# The hyper-parameters the form shows; anything else goes in "more settings" as key=value.
FORM_FIELDS = (
    "name",
    "lr",
    "beta",
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "warmup_ratio",
    "lr_scheduler",
    "loss_type",
    "label_smoothing",
    "lora.r",
    "max_length",
    "max_prompt_length",
    "eval_steps",
    "sample_steps",
    "save_steps",
    "num_threads",
)
EXTRA = "extra"
_KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w.]*):\s*(.*?)\s*(?:#\s*(.*))?$")


def spec_api():
    """engine.spec (torch-free), imported when the form is first used so `cherry` starts fast."""
    import engine.spec

    return engine.spec


def method_fields(algorithm: str | None = None) -> tuple[str, ...]:
    """Fields only some methods have (the engine registry's `form_fields`): those of `algorithm`, or of
    every method when it is None. Online methods show how they sample and what rewards them."""
    from engine.registry import ALGORITHMS, all_form_fields

    if algorithm is None:
        return all_form_fields()
    row = ALGORITHMS.get(algorithm)
    return row.form_fields if row is not None else ()


def reads(algorithm: str | None, key: str) -> bool:
    """Whether a run of `algorithm` reads setting `key` (the form hides the ones it does not)."""
    from engine.registry import ALGORITHMS

    if algorithm not in ALGORITHMS:
        return True
    return key.split(".")[0] in spec_api().method_settings(algorithm)


def preset_choices(home: Path | None = None) -> list[tuple[str, str]]:
    """(label, preset) of the presets, the demo runs (`demo/dpo` etc.), then your saved ones (by path)."""
    out = [(f"{name}  {desc.split(':')[0][:30]}", name) for name, desc in spec_api().list_presets()]
    for path in sorted(spec_api().demo_dir().glob("*.yaml")):
        out.append((f"demo/{path.stem}  the demo's {path.stem} run", f"demo/{path.stem}"))
    if home is not None:
        for desc, path in list_user_presets(home):
            out.append((f"{path.stem}  (yours)", str(path)))
    return out


def model_choices(runs: list[RunInfo]) -> list[tuple[str, str]]:
    """(label, model) of the Model picker: the demo model, then each completed run's final weights, newest
    first (a reward model's are not a policy to start from)."""
    out = [("demo (the embedded ~1M demo model)", "demo")]
    for run in reversed(runs):
        final = Path(run.out_dir) / "final"
        if run.status == "completed" and run.algorithm != "rm" and final.is_dir():
            out.append((f"{run.name} (final weights)", str(final)))
    return out


def dataset_choices() -> list[tuple[str, str]]:
    """(label, dataset) of the Dataset picker: the demo's datasets."""
    return [(f"demo/{p.name}", f"demo/{p.name}") for p in sorted(spec_api().demo_dir().glob("*.jsonl"))]


def after_choices(runs: list[RunInfo]) -> list[tuple[str, str]]:
    """(label, run id) of the After run picker: runs queued, running or completed, newest first."""
    return [
        (f"{r.name} ({r.status})", r.id)
        for r in reversed(runs)
        if r.status in ("queued", "running", "completed") and r.algorithm != "rm"
    ]


def preset_description(preset: str) -> str:
    descriptions = dict(spec_api().list_presets())
    if preset in descriptions:
        return descriptions[preset]
    if preset.startswith("demo/"):
        return f"the demo's {preset.split('/')[-1]} run: demo model and data, tuned for a CPU"
    try:
        from engine.limits import load_yaml_file

        data = load_yaml_file(Path(preset).expanduser()) or {}
        return f"{Path(preset).name}: {data.get('description') or 'a preset file'}"
    except (OSError, ValueError, AttributeError, CherryError):
        return preset


def preset_help(name: str) -> dict[str, str]:
    """Each setting's comment in the preset's YAML (the preset's own, else its base's)."""
    found: dict[str, str] = {}
    try:
        chain = spec_api().preset_chain(name)
        algorithm = spec_api().load_preset(name).get("algorithm")
        if algorithm and algorithm != name:  # a demo run: fall back on its algorithm's preset
            chain += [p for p in spec_api().preset_chain(algorithm) if p not in chain]
    except CherryError:
        return dict(spec_api().setting_help())
    for path in chain:
        parent = None
        for line in path.read_text().splitlines():
            m = _KEY_LINE.match(line)
            if not m:
                continue
            indent, key, value, comment = m.groups()
            if not indent:
                parent = key if not value else None
            elif parent:
                key = f"{parent}.{key}"
            if comment and key not in found:
                found[key] = comment.strip()
    return {**spec_api().setting_help(), **found}


def flat_values(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key == "lora":  # settings such as column_map hold a mapping as their value
            for sub, sub_value in value.items():
                out[f"{key}.{sub}"] = sub_value
        else:
            out[key] = value
    return out


def defaults_for(preset: str) -> dict[str, Any]:
    from engine.spec import RunSpec

    base = flat_values(RunSpec().to_dict())
    base.update(flat_values(spec_api().load_preset(preset)))
    return base


def show_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).replace(
        "\n", "\\n"
    )  # a one-line input: a judge_template's line breaks show as \n (read back as such)


def error_field(message: str, keys: list[str]) -> str | None:
    """The form field an engine error names (its message starts with the key, by convention)."""
    text = message.strip()
    m = re.match(r"unknown (?:lora )?key '([^']+)'", text)
    if m:
        return m.group(1) if m.group(1) in keys else EXTRA
    for key in sorted(keys, key=len, reverse=True):
        if re.match(rf"(--)?{re.escape(key)}\b(?![.])", text):
            return key
    for key, words in (("model", ("model ",)), ("dataset", ("dataset", "no known dataset format"))):
        if text.startswith(words):
            return key
    if "adam_beta" in text:
        return EXTRA
    return None


def submit_command(
    preset: str,
    model: str,
    dataset: str,
    overrides: list[str],
    after: str | None,
    grid: dict[str, list[str]] | None = None,
    experiment: str = "",
) -> str:
    """The `cherry submit` line of the form, or its `cherry sweep` line when fields hold lists."""
    parts = ["cherry", "sweep" if grid else "submit", "--preset", preset]
    if model:
        parts += ["--model", model]
    if dataset:
        parts += ["--dataset", dataset]
    for item in overrides:
        parts += ["--set", item]
    for key, values in (grid or {}).items():
        parts += ["--grid", f"{key}={','.join(values)}"]
    if grid and experiment:
        parts += ["--name", experiment]
    if after:
        parts += ["--after", after]
    return " ".join(shlex.quote(p) for p in parts)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def sweep_grid(values: dict[str, str], defaults: dict[str, Any]) -> dict[str, list[str]]:
    """The numeric fields given as comma-separated lists (lr `5e-7,1e-6,2e-6`): key -> the values to sweep.
    A field is numeric when its default is a number, or it has none and every listed value is one."""
    grid = {}
    for key, value in values.items():
        if "," not in value:
            continue
        parts = [v.strip() for v in value.split(",") if v.strip()]
        default = defaults.get(key)
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if (numeric or default is None) and parts and all(_number(v) for v in parts):
            grid[key] = parts
    return grid


def dataset_preview(value: str, algorithm: str, rows_shown: int = 2) -> Text:
    """Detected format, row count, problems for this algorithm, and the first rows."""
    from engine.data import check_dataset, detect_format, load_rows
    from tuiapp.data import algorithm_row

    out = Text()
    if not value:
        return out
    try:
        path = spec_api().resolve_path(value, "dataset", kind="data")
    except CherryError as err:
        return Text(str(err), style="red")
    if not Path(path).exists():
        return Text(f"hub dataset {value}: checked when the run starts", style="dim")
    try:
        rows = load_rows(path)
        fmt, conversational = detect_format(rows)
    except CherryError as err:  # DataError is one
        return Text(str(err), style="red")
    out.append(f"format: {fmt}{' (conversational)' if conversational else ''} · {len(rows):,} rows", style="green")
    try:
        row = algorithm_row(algorithm)
        check_dataset(path, row.data_kind if row is not None else "preference")
    except CherryError as err:
        out.append(f"\n✗ {err}", style="red")
    for row in rows[:rows_shown]:
        out.append("\n")
        for col, cell in list(row.items())[:4]:
            if isinstance(cell, list):
                cell = " | ".join(str(m.get("content", m)) if isinstance(m, dict) else str(m) for m in cell)
            cell = str(cell).replace("\n", "⏎ ")
            out.append(f"{col}: ", style="dim")
            out.append(f"{cell[:40]}{'…' if len(cell) > 40 else ''}   ")
    return out
