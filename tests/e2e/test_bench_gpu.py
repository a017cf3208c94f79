"""`cherry bench gpu`: the dry run goes through the same code on the CPU; without a GPU the full check says it skipped."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tuiapp.cli import app as cli


def test_mfu_counts_the_work_that_runs_and_the_peak_table_knows_the_variants():
    from transformers import Qwen2Config

    from benchmarks.training.gpu import QWEN2_05B, mfu, peak_bf16_flops, train_flops

    assert peak_bf16_flops("NVIDIA H200") == peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12 and peak_bf16_flops("NVIDIA H100 NVL") == 835e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("a GPU nobody listed") is None
    assert mfu(3e14, 989e12) == pytest.approx(3e14 / 989e12) and mfu(3e14, None) is None

    # The bench's DPO batch at the 0.5B shape: rows of 512 positions, 128 of them completion. Per position:
    # body 6 x 357.9M = 2.147 GFLOP, head 6 x 136.1M x 128/512 = 0.204, causal attention about 0.066.
    config = Qwen2Config(**QWEN2_05B)
    params = 494_032_768  # Qwen2-0.5B's weights, the tied embedding counted once
    rows = 16
    attention = torch.ones(rows, 512, dtype=torch.long)
    completion = torch.zeros(rows, 512, dtype=torch.long)
    completion[:, 384:] = 1
    per_position = train_flops(config, params, attention, completion) / attention.sum().item()
    assert per_position == pytest.approx(2.147e9 + 0.204e9 + 0.066e9, rel=0.01)
    assert 6 * params / per_position == pytest.approx(1.23, abs=0.01)  # what 6 x all params overstated
    # padding is not work, and the head costs only where completions are
    padded = torch.cat([attention, torch.zeros(rows, 100, dtype=torch.long)], dim=1)
    assert train_flops(config, params, padded, torch.cat([completion, 0 * padded[:, 512:]], 1)) == pytest.approx(
        train_flops(config, params, attention, completion)
    )


def test_the_weight_update_check_fails_outside_its_threshold(monkeypatch):
    from benchmarks.training import gpu

    assert gpu.update_check_passes({"cosine": 0.99, "norm_ratio": 1.02})
    assert not gpu.update_check_passes({"cosine": 0.5, "norm_ratio": 1.0})
    assert not gpu.update_check_passes({"cosine": 0.99, "norm_ratio": 2.0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "UPDATE_CHECK", {"min_cosine": 1.5, "norm_ratio": (0.8, 1.25)})  # unreachable
    result = CliRunner().invoke(cli, ["bench", "gpu", "--dry-run"])
    assert result.exit_code == 1 and "FAIL (needs cosine >= 1.5" in result.output, result.output


def test_dry_run_runs_the_whole_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, even on a GPU machine
    result = CliRunner().invoke(cli, ["bench", "gpu", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["device"] == "cpu" and report["config"]["tiny"] and report["peak_memory_gb"] is None
    assert report["dpo"]["tokens_per_s"] > 0 and report["grpo"]["update_tokens_per_s"] > 0
    assert report["grpo"]["rollout_tokens_per_s"] > 0
    check = report["weight_update_check"]
    assert check["cosine"] > 0.9 and 0.8 < check["norm_ratio"] < 1.25 and check["passed"], check
    text = CliRunner().invoke(cli, ["bench", "gpu", "--dry-run"])
    assert text.exit_code == 0, text.output
    for phrase in (
        "tiny dry-run model",
        "6 x head weights x completion positions",
        "DPO",
        "GRPO",
        "peak GPU memory: n/a",
        "PASS",
    ):
        assert phrase in text.output, phrase


def test_without_a_gpu_it_says_it_skipped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(cli, ["bench", "gpu"])
    assert result.exit_code == 0
    assert "SKIPPED: no CUDA GPU" in result.output and "--dry-run" in result.output
