"""scripts/gpu-check.sh --dry-run: on any machine it prints the plan and says whether the wheelhouse is complete
(exit 0 either way, so it runs where no wheelhouse has been built); the real check needs a CUDA GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"


def _dry_run(wheelhouse: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), "--dry-run", "--wheelhouse", str(wheelhouse), "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_dry_run_prints_the_plan_and_what_the_wheelhouse_lacks(tmp_path):
    out = _dry_run(tmp_path / "nowhere")
    assert out.returncode == 0, out.stderr
    for check in (
        "install:",
        "cuda-tests:",
        "bench-gpu:",
        "dpo-bf16:",
        "grpo-bf16:",
        "dpo-fp16:",
        "resume:",
        "two-gpus:",
    ):
        assert check in out.stdout, check
    assert "MISSING: no wheels in" in out.stdout and "wheelhouse NOT READY" in out.stdout


def test_the_dry_run_checks_every_pinned_wheel(tmp_path):
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "cherry_rlhf-0.1.0-py3-none-any.whl").write_bytes(b"")
    (house / "cherry_benchmarks-0.1.0-py3-none-any.whl").write_bytes(b"")
    (house / "PyYAML-6.0.4-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"")
    (house / "requirements.txt").write_text("pyyaml==6.0.4\ntyping-extensions==4.16.0\n")
    out = _dry_run(house)
    assert out.returncode == 0 and "MISSING: typing-extensions==4.16.0" in out.stdout and "NOT READY" in out.stdout
    assert "MISSING: pyyaml" not in out.stdout  # wheel names are matched as pip matches them
    (house / "typing_extensions-4.16.0-py3-none-any.whl").write_bytes(b"")
    out = _dry_run(house)
    assert "wheelhouse READY" in out.stdout and "MISSING" not in out.stdout, out.stdout


def test_the_dry_run_checks_that_the_target_has_what_the_wheelhouse_leaves_out(tmp_path):
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "cherry_rlhf-0.1.0-py3-none-any.whl").write_bytes(b"")
    (house / "cherry_benchmarks-0.1.0-py3-none-any.whl").write_bytes(b"")
    (house / "requirements.txt").write_text("")
    (house / "skipped.txt").write_text("numpy==2.0.0\n")  # installed here (torch's test stack has it)
    out = _dry_run(house)
    assert "numpy" in out.stdout and "from the target" in out.stdout and "wheelhouse READY" in out.stdout, out.stdout
    (house / "skipped.txt").write_text("numpy==2.0.0\nno-such-distribution==1.0\n")
    out = _dry_run(house)
    assert "MISSING: no-such-distribution" in out.stdout and "NOT READY" in out.stdout, out.stdout
