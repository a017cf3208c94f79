"""`cherry bench gpu`: the dry run goes through the same code on the CPU; without a GPU the full check says it skipped."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tuiapp.cli import app as cli


def test_mfu_formula_and_peak_table():
    from engine.bench.gpu import mfu, peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H200") == peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("a GPU nobody listed") is None
    # 0.5e9 params at 100k tokens/s: 6 * 0.5e9 * 1e5 = 3e14 FLOP/s of 989e12
    assert mfu(500_000_000, 100_000, 989e12) == pytest.approx(3e14 / 989e12)
    assert mfu(500_000_000, 100_000, None) is None


def test_dry_run_runs_the_whole_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, even on a GPU machine
    result = CliRunner().invoke(cli, ["bench", "gpu", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["device"] == "cpu" and report["config"]["tiny"] and report["peak_memory_gb"] is None
    assert report["dpo"]["tokens_per_s"] > 0 and report["grpo"]["update_tokens_per_s"] > 0
    assert report["grpo"]["rollout_tokens_per_s"] > 0
    check = report["weight_update_check"]
    assert check["cosine"] > 0.9 and 0.8 < check["norm_ratio"] < 1.25, check
    text = CliRunner().invoke(cli, ["bench", "gpu", "--dry-run"])
    assert text.exit_code == 0, text.output
    for phrase in ("tiny dry-run model", "MFU = 6 x params", "DPO", "GRPO", "peak GPU memory: n/a", "cosine"):
        assert phrase in text.output, phrase


def test_without_a_gpu_it_says_it_skipped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(cli, ["bench", "gpu"])
    assert result.exit_code == 0
    assert "SKIPPED: no CUDA GPU" in result.output and "--dry-run" in result.output
