"""What produced a run, in RUN_DIR/manifest.json: package versions, the project's commit, the data's
fingerprint and row counts, the seed, the device, precision and determinism settings.

Rank 0 writes it once the run's data is loaded (`Run.load_data`, engine/loop/core.py) and reports it
as a "manifest" event too, so front ends on other machines see it (the store keeps events). Nothing
here may fail a run: a version, a commit or a fingerprint that cannot be read is null. A resumed run
writes a new manifest and keeps the earlier ones under "earlier" (newest first): a run resumed with
other packages says so.

    written_at   float  when (Unix time)
    packages     {python, torch, transformers, peft, datasets, cherry: version | null}
    commit       {sha, dirty} | null   the project checkout's git commit, and whether files differ from it
                                       (null: Cherry runs from an installed package, or git is not there)
    data         {fingerprint, sources: [{name, split, fingerprint, rows, kept, train, eval}], rows: the
                  data report's counts (rows, kept, dropped_*, truncated, train, eval)}
                 `fingerprint` is the sha256 of a local file's or folder's contents, or a hub dataset's
                 `datasets` fingerprint; the data's is the sha256 of its sources' (null when one has none)
    seed         int
    device       {device, name, world_size, parallelism, num_threads}
    precision    {dtype, frozen_dtype, save_dtype, tf32_matmul, tf32_cudnn}
    determinism  {deterministic_algorithms, cudnn_deterministic, cudnn_benchmark}
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from engine.diskspace import write_text

MANIFEST_FILE = "manifest.json"
PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "datasets": "datasets",
    "cherry": "cherry-rlhf",
}
PROJECT_ROOT = Path(__file__).resolve().parent.parent
GIT_TIMEOUT_S = 3.0


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, distribution in PACKAGES.items():
        try:
            out[name] = version(distribution)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return None


def project_commit() -> dict[str, Any] | None:
    """{sha, dirty} of the checkout Cherry runs from; None for an installed package (no .git beside it)."""
    if not (PROJECT_ROOT / ".git").exists():  # a directory, or a worktree's file
        return None
    head = _git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = bool(status.stdout.strip()) if status is not None and status.returncode == 0 else None
    return {"sha": head.stdout.strip(), "dirty": dirty}


def data_fingerprints(spec, data) -> dict[str, Any]:
    """The run's sources with their fingerprints and the counts `prepare` reported (`data.sources`)."""
    from engine.data.sources import fingerprint, spec_sources

    sources = []
    for source, counts in zip(spec_sources(spec), data.sources or [{}] * len(spec_sources(spec))):
        try:
            print_ = fingerprint(source, source.split)
        except Exception:  # noqa: BLE001 - a manifest never fails a run; the data already loaded
            print_ = None
        sources.append(
            {
                "name": counts.get("name", source.name),
                "split": source.split,
                "fingerprint": print_,
                **{k: counts.get(k) for k in ("rows", "kept", "train", "eval")},
            }
        )
    prints = [s["fingerprint"] for s in sources]
    whole = hashlib.sha256("\n".join(prints).encode()).hexdigest() if prints and None not in prints else None
    return {"fingerprint": whole, "sources": sources, "rows": dict(data.stats)}


def build_manifest(run, data) -> dict[str, Any]:
    import torch  # here: front ends read manifests without importing torch

    spec = run.spec
    device = run.device
    return {
        "written_at": round(time.time(), 3),
        "packages": package_versions(),
        "commit": project_commit(),
        "data": data_fingerprints(spec, data),
        "seed": spec.seed,
        "device": {
            "device": str(device),
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None,
            "world_size": run.world.size,
            "parallelism": spec.parallelism,
            "num_threads": torch.get_num_threads(),
        },
        "precision": {
            "dtype": str(run.dtype).removeprefix("torch."),
            "frozen_dtype": str(run.precision.frozen_dtype).removeprefix("torch."),
            "save_dtype": str(run.save_dtype).removeprefix("torch."),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        },
        "determinism": {
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
    }


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_manifest(run, data) -> None:
    """Rank 0: RUN_DIR/manifest.json (earlier ones kept on a resume) and a "manifest" event."""
    if not run.world.is_main:
        return
    manifest = build_manifest(run, data)
    earlier = read_manifest(run.out_dir) if run.resume else None
    if earlier is not None:
        manifest["earlier"] = [{k: v for k, v in earlier.items() if k != "earlier"}, *earlier.get("earlier", [])]
    write_text(run.out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2))
    packages = manifest["packages"]
    commit = manifest["commit"]
    summary = ", ".join(f"{name} {packages[name]}" for name in ("torch", "transformers") if packages[name])
    if commit:
        summary += f", commit {commit['sha'][:10]}" + (" (with local changes)" if commit["dirty"] else "")
    if manifest["data"]["fingerprint"]:
        summary += f", data {manifest['data']['fingerprint'][:12]}"
    run.reporter.log_event("manifest", summary, manifest=manifest)
