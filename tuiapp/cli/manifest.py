"""Run manifests on the command line (engine/manifest.py): the manifest `cherry show` prints, and
`cherry compare`, which lists the settings and the manifest facts that differ between runs.

A manifest is read from the run directory when this machine has it, else from the run's "manifest"
event in the store (streamed from the worker's host in Redis mode). Nothing here imports torch.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from tuiapp.cli.options import echo, friendly
from tuiapp.text import manifest_diff, setting_text, spec_diff


def run_manifest(store, run) -> dict[str, Any] | None:
    from engine.manifest import read_manifest

    manifest = read_manifest(run.out_dir) if run.out_dir else None
    if manifest is not None:
        return manifest
    events = [e for e in store.events(run.id) if e["kind"] == "manifest"]
    return events[-1]["data"].get("manifest") if events else None


def manifest_lines(manifest: dict[str, Any]) -> list[str]:
    """The manifest for a terminal: one line per part."""
    packages = ", ".join(f"{k} {v or '-'}" for k, v in (manifest.get("packages") or {}).items())
    commit = manifest.get("commit")
    data = manifest.get("data") or {}
    rows = data.get("rows") or {}
    device = manifest.get("device") or {}
    lines = [f"  packages    {packages}"]
    commit_text = (commit["sha"] + (" (with local changes)" if commit.get("dirty") else "")) if commit else "-"
    lines.append(f"  commit      {commit_text}")
    lines.append(
        f"  data        {data.get('fingerprint') or '-'}  ({rows.get('rows', '?')} rows -> "
        f"{rows.get('train', '?')} train / {rows.get('eval', '?')} eval)"
    )
    sources = data.get("sources") or []
    if len(sources) > 1:
        lines += [f"    {s.get('name')}: {s.get('fingerprint') or '-'}" for s in sources]
    lines.append(f"  seed        {manifest.get('seed')}")
    lines.append(
        f"  device      {device.get('device')} ({device.get('name') or '-'}), {device.get('world_size')} "
        f"process(es) {device.get('parallelism')}, {device.get('num_threads')} threads"
    )
    for part in ("precision", "determinism"):
        lines.append(f"  {part:11s} " + ", ".join(f"{k} {v}" for k, v in (manifest.get(part) or {}).items()))
    if manifest.get("earlier"):
        lines.append(f"  resumed     {len(manifest['earlier'])} time(s): the earlier manifests are in manifest.json")
    return lines


def show_manifest(store, run) -> None:
    """`cherry show`'s manifest part."""
    manifest = run_manifest(store, run)
    echo("manifest:" if manifest else "manifest: - (written when the run loads its data)")
    for line in manifest_lines(manifest) if manifest else []:
        echo(line)


def diff_lines(names: list[str], diff: list[tuple[str, list]]) -> list[str]:
    """One line per differing key: each run's value in a column."""
    width = max([len(key) for key, _ in diff] + [3])
    cells = [[setting_text(v) for v in values] for _, values in diff]
    columns = [max([len(n)] + [len(row[i]) for row in cells]) for i, n in enumerate(names)]
    lines = [f"  {'':{width}s}  " + "  ".join(f"{n:{w}s}" for n, w in zip(names, columns))]
    for (key, _), row in zip(diff, cells):
        lines.append(f"  {key:{width}s}  " + "  ".join(f"{c:{w}s}" for c, w in zip(row, columns)).rstrip())
    return lines


def register(app: typer.Typer) -> None:
    @app.command()
    @friendly
    def compare(
        runs: list[str] = typer.Argument(..., help="Two or more run ids (or unique parts of them)."),
        as_json: bool = typer.Option(False, "--json", help="{settings, manifest}: each key's values, per run."),
    ) -> None:
        """The settings and the manifest facts (package versions, commit, data fingerprint, device,
        precision) that differ between runs."""
        from jobs.runs import Jobs

        if len(runs) < 2:
            raise typer.BadParameter("give two or more runs", param_hint="RUNS")
        jobs = Jobs()
        resolved = [jobs.resolve(text) for text in runs]
        settings = spec_diff([r.spec for r in resolved])
        manifests = [run_manifest(jobs.store, r) for r in resolved]
        facts = manifest_diff(manifests)
        if as_json:
            out = {"runs": [r.id for r in resolved], "settings": dict(settings), "manifest": dict(facts)}
            echo(json.dumps(out, indent=2, default=str))
            return
        names = [r.id for r in resolved]
        echo("settings that differ:" if settings else "settings: the same in every run")
        for line in diff_lines(names, settings) if settings else []:
            echo(line)
        missing = [r.id for r, m in zip(resolved, manifests) if m is None]
        echo("manifest facts that differ:" if facts else "manifest: the same in every run")
        for line in diff_lines(names, facts) if facts else []:
            echo(line)
        if missing:
            echo(f"no manifest for {', '.join(missing)} (runs from before manifests, or not started)")
