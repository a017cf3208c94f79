"""Run specs: a preset (YAML) plus the user's settings, validated before anything heavy is loaded.

The package imports no torch, so front ends can validate a spec instantly. Every problem a user can
cause becomes a `SpecError` that names the field and the fix. By concern:
- schema: RunSpec, its defaults and help (presets/_base.yaml), which settings a method reads;
- aliases: TRL's and transformers' names for Cherry's settings;
- parse: values as typed (YAML, `--set`) into the fields' types;
- checks: impossible values; follow: settings that follow the ones you set;
- presets: presets, config files and `resolve_spec`; paths: model/data/reward paths made absolute.
"""

from engine.spec.aliases import ALIASES, NO_EQUIVALENT, translate
from engine.spec.checks import check_values
from engine.spec.follow import follow_explicit
from engine.spec.parse import clip_defaults, closest, coerce, parse_override, typed_spec
from engine.spec.paths import demo_dir, looks_local, resolve_path, resolve_paths
from engine.spec.presets import (
    RESUME_SETTINGS,
    list_presets,
    load_config,
    load_preset,
    load_spec_file,
    preset_chain,
    preset_path,
    refuse_unread,
    resolve_spec,
    with_resume_settings,
)
from engine.spec.schema import (
    DTYPES,
    REPO_ROOT,
    LoraSpec,
    RunSpec,
    method_settings,
    methods_reading,
    presets_dir,
    report_targets,
    setting_help,
    short_name,
    spec_fields,
)


def build_spec(values: dict) -> RunSpec:
    """A RunSpec from a flat-or-nested dict; unknown keys, wrong types and impossible values are refused."""
    spec = typed_spec(values)
    check_values(spec)
    return spec


__all__ = [
    "ALIASES",
    "DTYPES",
    "NO_EQUIVALENT",
    "REPO_ROOT",
    "RESUME_SETTINGS",
    "LoraSpec",
    "RunSpec",
    "build_spec",
    "check_values",
    "clip_defaults",
    "closest",
    "coerce",
    "demo_dir",
    "follow_explicit",
    "list_presets",
    "load_config",
    "load_preset",
    "load_spec_file",
    "looks_local",
    "method_settings",
    "methods_reading",
    "parse_override",
    "preset_chain",
    "preset_path",
    "presets_dir",
    "refuse_unread",
    "report_targets",
    "resolve_path",
    "resolve_paths",
    "resolve_spec",
    "setting_help",
    "short_name",
    "spec_fields",
    "translate",
    "typed_spec",
    "with_resume_settings",
]
