"""Mixed precision: fp32 trainable weights and optimizer state, bf16 autocast forward passes (CPU too),
final weights in the model's own dtype or `save_dtype`, and precision settings refused where they cannot work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import CherryError
from engine.loop.checkpoint import checkpoints, read_checkpoint_state
from engine.reporting import MemoryReporter
from engine.train import train
from tests.e2e.test_train import dpo_spec

QUIET = dict(eval_steps=0, sample_steps=0, eval_split=0.0, warmup_ratio=0.0)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_bf16_mixed_precision_moves_the_weights_as_fp32_does(tiny_model_dir, tiny_pairs, tmp_path):
    """At lr 1e-6 an Adam step (~1e-6) is far below bf16's spacing near a weight; with fp32 master weights
    the bf16 run still moves every weight by about what the fp32 run does, in about the same direction."""
    start = _weights(tiny_model_dir)
    runs = {}
    for dtype in ("fp32", "bf16"):
        reporter = MemoryReporter()
        spec = dpo_spec(tiny_model_dir, tiny_pairs, dtype=dtype, lr=1e-6, max_steps=20, save_steps=100, **QUIET)
        summary = train(spec, tmp_path / dtype, reporter)
        assert summary["status"] == "completed" and summary["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        assert summary["save_dtype"] == "float32"  # the tiny model came in fp32
        final = _weights(tmp_path / dtype / "final")
        names = [name for name in start if name in final]
        runs[dtype] = (
            torch.cat([(final[n].float() - start[n].float()).flatten() for n in names]),
            reporter.series("train/loss"),
        )
        optimizer = read_checkpoint_state(checkpoints(tmp_path / dtype)[-1])["optimizer"]["state"]
        assert {t.dtype for s in optimizer.values() for t in s.values() if t.dim()} == {torch.float32}
    (delta32, losses32), (delta16, losses16) = runs["fp32"], runs["bf16"]
    assert delta32.norm() > 0 and delta16.norm() > 0
    cosine = torch.nn.functional.cosine_similarity(delta32, delta16, dim=0).item()
    ratio = (delta16.norm() / delta32.norm()).item()
    # measured on the CPU: cosine 0.9999, norm ratio 1.0001, losses within 5e-4
    assert cosine > 0.99, cosine
    assert 0.95 < ratio < 1.05, ratio
    assert len(losses16) == len(losses32) == 20
    assert losses16 == pytest.approx(losses32, abs=5e-3)


def test_save_dtype_sets_the_final_weights_dtype(tiny_model_dir, tiny_pairs, tmp_path):
    spec = dpo_spec(tiny_model_dir, tiny_pairs, dtype="bf16", save_dtype="bf16", max_steps=2, save_steps=100, **QUIET)
    train(spec, tmp_path / "run", MemoryReporter())
    assert {t.dtype for t in _weights(tmp_path / "run" / "final").values()} == {torch.bfloat16}
    # checkpoints keep the fp32 training weights, so a resume continues exactly
    assert {t.dtype for t in _weights(checkpoints(tmp_path / "run")[-1] / "model").values()} == {torch.float32}


def test_lora_adapters_stay_fp32_on_a_bf16_base(tiny_model_dir, tiny_pairs, tmp_path):
    spec = dpo_spec(
        tiny_model_dir, tiny_pairs, dtype="bf16", max_steps=2, save_steps=100, lora={"r": 4, "alpha": 8}, **QUIET
    )
    assert train(spec, tmp_path / "run", MemoryReporter())["status"] == "completed"
    adapter = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}


def test_fp16_on_a_cpu_is_refused_at_submit(tiny_model_dir, tiny_pairs):
    with pytest.raises(CherryError, match=r"dtype fp16 needs a CUDA GPU.*--set dtype=bf16"):
        dpo_spec(tiny_model_dir, tiny_pairs, dtype="fp16", device="cpu")
    with pytest.raises(CherryError, match="save_dtype must be auto or one of fp32, bf16, fp16"):
        dpo_spec(tiny_model_dir, tiny_pairs, save_dtype="int8")
