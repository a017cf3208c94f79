"""Pipelines: several runs chained in one submission (InstructGPT's SFT -> reward model -> PPO).

A pipeline file lists stages in order; each names a preset, optional `set` overrides, the stage
it waits for (`after`, whose output becomes its model) and, when its model comes from another
stage than the one it waits for, `model_from`. `{stage}` inside a value is replaced by that
stage's run directory (so PPO's `rewards: rm:{rm}` reads the reward model the `rm` stage trains):

    stages:
      sft: {preset: sft}
      rm:  {preset: rm, after: sft}
      ppo: {preset: ppo, after: rm, model_from: sft, set: {rewards: "rm:{rm}", value_model: "{rm}"}}

Every stage's spec is built and checked before the first is queued, so a typo submits nothing.
Torch-free: the CLI imports it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from engine.errors import SpecError
from engine.limits import load_yaml_file
from engine.spec import closest, presets_dir, resolve_spec
from jobs.runs import Jobs, run_dir
from jobs.store import RunRow

STAGE_KEYS = ("preset", "after", "model_from", "set")


def pipeline_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = presets_dir() / "pipelines" / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    names = list_pipelines()
    guess = closest(name, [n for n, _ in names])
    hint = f"did you mean '{guess}'? " if guess else ""
    raise SpecError(
        f"unknown pipeline '{name}': {hint}available: {', '.join(n for n, _ in names)} (or a path to a .yaml file)"
    )


def list_pipelines() -> list[tuple[str, str]]:
    folder = presets_dir() / "pipelines"
    return [(p.stem, str((load_yaml_file(p) or {}).get("description", ""))) for p in sorted(folder.glob("*.yaml"))]


def load_pipeline(name: str) -> dict[str, dict[str, Any]]:
    """The stages of a pipeline file, checked: known keys, presets given, references to earlier stages."""
    path = pipeline_path(name)
    data = load_yaml_file(path, f"pipeline {path}") or {}
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise SpecError(
            f"pipeline {path}: needs a `stages:` mapping of stage name -> {{preset, after, model_from, set}}"
        )
    seen: list[str] = []
    for stage, body in stages.items():
        where = f"pipeline {path.name}, stage '{stage}'"
        if not isinstance(body, dict) or "preset" not in body:
            raise SpecError(f"{where}: give at least `preset: NAME`")
        for key in body:
            if key not in STAGE_KEYS:
                raise SpecError(f"{where}: unknown key '{key}'; stage keys are {', '.join(STAGE_KEYS)}")
        for key in ("after", "model_from"):
            if body.get(key) is not None and body[key] not in seen:
                raise SpecError(
                    f"{where}: {key}: '{body[key]}' is not an earlier stage ({', '.join(seen) or 'none before it'})"
                )
        if body.get("model_from") and not body.get("after"):
            raise SpecError(f"{where}: model_from needs `after` (the stage to wait for)")
        if not isinstance(body.get("set", {}), dict):
            raise SpecError(f"{where}: `set` must be a mapping of key: value")
        seen.append(stage)
    return stages


def _fill(value: Any, run_dirs: dict[str, str], stages: dict, where: str) -> Any:
    """`{stage}` -> that stage's run directory; other braces (a regex's `{3}`) are left alone."""
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        stage = match.group(1)
        if stage not in stages:
            return match.group(0)
        if stage not in run_dirs:
            raise SpecError(
                f"{where}: '{{{stage}}}' is not an earlier stage ({', '.join(run_dirs) or 'none before it'})"
            )
        return run_dirs[stage]

    return re.sub(r"\{(\w+)\}", replace, value)


def submit_pipeline(
    jobs: Jobs, name: str, overrides: list[str] | None = None, *, model: str | None = None, dataset: str | None = None
) -> list[RunRow]:
    """Queue every stage of a pipeline; `overrides` are `stage.key=value` (or `key=value` for all stages);
    `model` is the first stage's model, `dataset` goes to every stage that names none."""
    stages = load_pipeline(name)
    per_stage: dict[str, list[str]] = {stage: [] for stage in stages}
    for item in overrides or []:
        key = item.split("=", 1)[0]
        stage, _, rest = key.partition(".")
        if stage in stages and rest:
            per_stage[stage].append(item[len(stage) + 1 :])
        else:
            for values in per_stage.values():
                values.append(item)

    def stage_spec(i: int, stage: str, run_dirs: dict[str, str]):
        items = [f"{k}={v}" for k, v in (stages[stage].get("set") or {}).items()] + per_stage[stage]
        sets = [_fill(item, run_dirs, stages, f"pipeline stage '{stage}'") for item in items]
        return resolve_spec(
            stages[stage]["preset"], sets, model=model if i == 0 else None, dataset=dataset, check_paths=False
        )

    # Check every stage before anything is queued, with placeholder paths for the earlier stages' runs.
    placeholders: dict[str, str] = {}
    for i, stage in enumerate(stages):
        stage_spec(i, stage, placeholders)
        placeholders[stage] = str(jobs.home / f"<{stage}>")

    runs: dict[str, RunRow] = {}
    run_dirs: dict[str, str] = {}
    for i, (stage, body) in enumerate(stages.items()):
        spec = stage_spec(i, stage, run_dirs)
        after = runs[body["after"]].id if body.get("after") else None
        model_from = runs[body["model_from"]].id if body.get("model_from") else None
        run = jobs.submit(spec, after=after, model_from=model_from)
        jobs.store.add_event(run.id, "pipeline", f"stage '{stage}' of pipeline {Path(pipeline_path(name)).stem}")
        runs[stage] = run
        run_dirs[stage] = run_dir(run)
    return list(runs.values())
