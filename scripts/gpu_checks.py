"""The GPU check's training runs (scripts/gpu-check.sh runs each as `python scripts/gpu_checks.py NAME OUT_DIR`).

Each check trains the embedded demo model on its own data for a few steps on CUDA and prints one line
of JSON with what it measured; it exits 1 when its condition fails. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine.reporting import MemoryReporter
from engine.spec import resolve_spec
from engine.train import train

QUICK = ["eval_steps=0", "sample_steps=0", "num_samples=0", "kl_samples=0", "num_threads=4"]


def spec(preset: str, *overrides: str):
    from engine.spec import demo_dir

    return resolve_spec(str(demo_dir() / f"{preset}.yaml"), [*QUICK, *overrides])


def run(preset: str, out: Path, *overrides: str, resume: bool = False) -> tuple[dict, list[float]]:
    reporter = MemoryReporter()
    summary = train(spec(preset, *overrides), out, reporter, resume=resume)
    return summary, reporter.series("train/loss")


def finite(losses: list[float]) -> bool:
    return bool(losses) and all(x == x and abs(x) != float("inf") for x in losses)


def report(ok: bool, **facts) -> None:
    print(json.dumps({"ok": ok, **facts}))
    sys.exit(0 if ok else 1)


def dpo_bf16(out: Path) -> None:
    summary, losses = run("dpo", out, "device=cuda", "dtype=bf16", "max_steps=10")
    report(
        finite(losses) and summary["dtype"] == "bfloat16" and summary["device"].startswith("cuda"),
        losses=losses[:3],
        tokens_per_s=summary["tokens_per_s"],
        peak_memory_gb=summary["peak_memory_gb"],
    )


def grpo_bf16(out: Path) -> None:
    summary, losses = run("grpo", out, "device=cuda", "dtype=bf16", "max_steps=4", "beta=0.04")
    report(finite(losses), losses=losses, peak_memory_gb=summary["peak_memory_gb"], step=summary["step"])


def dpo_fp16(out: Path) -> None:
    summary, losses = run("dpo", out, "device=cuda", "dtype=fp16", "max_steps=10")
    report(
        finite(losses) and summary["dtype"] == "float16", losses=losses[:3], peak_memory_gb=summary["peak_memory_gb"]
    )


def resume(out: Path) -> None:
    """An uninterrupted run against one stopped at its checkpoint and resumed: the same losses (to
    CUDA's nondeterminism), and the resumed run's optimizer state back on the GPU."""
    import shutil

    common = ["device=cuda", "dtype=bf16", "save_steps=4", "seed=3", "max_steps=8"]
    _, straight = run("dpo", out, *common)
    shutil.rmtree(out / "checkpoints" / "step-0000008")  # as if it had stopped after step 4
    _, resumed = run("dpo", out, *common, resume=True)
    diff = max((abs(a - b) for a, b in zip(straight[4:], resumed)), default=float("inf"))
    report(len(resumed) == 4 and diff < 1e-3, max_loss_difference=diff, straight=straight[4:], resumed=resumed)


def checkpoint_on_cpu(out: Path) -> None:
    """A checkpoint written on the GPU resumes on the CPU (its state is read onto the CPU)."""
    run("dpo", out, "device=cuda", "dtype=bf16", "save_steps=2", "max_steps=2")
    summary, losses = run("dpo", out, "device=cpu", "dtype=fp32", "save_steps=2", "max_steps=4", resume=True)
    report(summary["step"] == 4 and finite(losses), losses=losses)


def two_gpus(out: Path) -> None:
    """2 processes (ddp and fsdp) against one with the global batch: the same losses; each rank's peak
    GPU memory (rank 0's summary) and held training state, ddp against fsdp."""
    if torch.cuda.device_count() < 2:
        print(json.dumps({"ok": True, "skipped": f"{torch.cuda.device_count()} GPU"}))
        return
    common = ["device=cuda", "dtype=bf16", "max_steps=6", "lr=1e-5"]
    one, one_losses = run("dpo", out / "one", *common, "batch_size=32")
    facts, ok = {}, True
    for parallelism in ("ddp", "fsdp"):
        summary, losses = run(
            "dpo", out / parallelism, *common, "batch_size=16", "num_processes=2", f"parallelism={parallelism}"
        )
        diff = max(abs(a - b) for a, b in zip(one_losses, losses))
        ok &= len(losses) == len(one_losses) and diff < 2e-2  # bf16: summation order differs per split
        facts[parallelism] = {
            "max_loss_difference": diff,
            "peak_memory_gb_rank0": summary["peak_memory_gb"],
            "held_state_gb": summary["held_state_gb"],
        }
    ok &= facts["fsdp"]["held_state_gb"] < 0.6 * facts["ddp"]["held_state_gb"]
    report(ok, one_process_peak_gb=one["peak_memory_gb"], **facts)


CHECKS = {
    "dpo-bf16": dpo_bf16,
    "grpo-bf16": grpo_bf16,
    "dpo-fp16": dpo_fp16,
    "resume": resume,
    "checkpoint-on-cpu": checkpoint_on_cpu,
    "two-gpus": two_gpus,
}

if __name__ == "__main__":
    name, out = sys.argv[1], Path(sys.argv[2])
    if not torch.cuda.is_available():
        report(False, error="no CUDA GPU visible")
    CHECKS[name](out)
