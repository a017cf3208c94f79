"""Collect the wheels Cherry needs, except torch, for a machine without network (`make wheelhouse`).

The list is Cherry's own wheel, its benchmarks' (benchmarks/: the check runs `cherry bench gpu`) and the
closure of Cherry's runtime requirements plus pytest (scripts/gpu-check.sh runs the CUDA tests), at the
versions installed in this environment, leaving out torch and what only torch needs (the target has its
own CUDA torch and torch's dependencies). Markers are judged for the target (CPython on Linux x86_64 at
--python-version). Binary wheels come from the index for the target's Python and platform; a package
published only as source is built here into a pure-Python wheel.

    python scripts/wheelhouse.py [--dest wheelhouse] [--python-version 3.12] [--skip pyarrow,pandas]

`--skip` leaves out distributions the target already has (checked there by gpu-check.sh --dry-run).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

EXTRA_FOR_CHECK = ["pytest"]  # `pytest -m gpu` on the target
NOT_COLLECTED = {
    "torch",
    "triton",
    "cherry-rlhf",
    "pip",
    "setuptools",
    "wheel",
}  # the target's own torch; Cherry is built as a wheel
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64"]
CAP_MIB = 64


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def marker_env(python_version: str) -> dict[str, str]:
    return {
        "python_version": python_version,
        "python_full_version": python_version + ".0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
    }


def closure(roots: list[str], python_version: str) -> dict[str, str]:
    """name -> installed version of every distribution `roots` need (with their requirements), torch's
    own subtree left out unless something else needs it."""
    env = marker_env(python_version)
    seen: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in seen or name in NOT_COLLECTED or name.startswith("nvidia-"):
            continue
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            seen[name] = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"wheelhouse: {req.name} is not installed here; run `make .venv/.installed` first")
        for line in metadata.requires(req.name) or []:
            dep = Requirement(line)
            if dep.marker is not None and not Marker(str(dep.marker)).evaluate(env):
                continue
            todo.append(dep)
    return seen


def cherry_requirements(root: Path) -> list[str]:
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [r for r in project["dependencies"] if canonical(Requirement(r).name) != "torch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default="wheelhouse")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--skip", default="", help="comma-separated distributions the target already has")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    dest = Path(args.dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    skip = {canonical(s) for s in args.skip.split(",") if s.strip()}
    wanted = closure(cherry_requirements(root) + EXTRA_FOR_CHECK, args.python_version)
    pins = [f"{name}=={version}" for name, version in sorted(wanted.items()) if name not in skip]
    (dest / "requirements.txt").write_text("".join(p + "\n" for p in pins))
    # what the target must already have: gpu-check.sh --dry-run checks each there
    skipped = [f"{name}=={version}" for name, version in sorted(wanted.items()) if name in skip]
    (dest / "skipped.txt").write_text("".join(p + "\n" for p in skipped))
    pip = [sys.executable, "-m", "pip"]
    for project in (root, root / "benchmarks"):  # cherry-rlhf, cherry-benchmarks (no requirements of its own)
        subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(dest), str(project)], check=True)
    target = ["--python-version", args.python_version, "--implementation", "cp", "--only-binary=:all:"]
    target += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    for pin in pins:
        got = subprocess.run([*pip, "download", "--no-deps", "-q", "-d", str(dest), *target, pin])
        if got.returncode != 0:  # published as source only: pure Python, built here
            subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(dest), pin], check=True)
    wheels = sorted(dest.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"wheelhouse: {len(wheels)} wheels, {total:.1f} MiB in {dest}")
    if total > CAP_MIB:
        largest = ", ".join(f"{w.name.split('-')[0]} {w.stat().st_size / 2**20:.0f}" for w in wheels[:4])
        print(
            f"wheelhouse: over {CAP_MIB} MiB (largest, MiB: {largest}); for a target that already has some of "
            "them: make wheelhouse WHEELHOUSE_SKIP=pyarrow,pandas,numpy (the default)"
        )


if __name__ == "__main__":
    main()
