"""Model loading choices: pad token, device and dtype, clear errors."""

from __future__ import annotations

import pytest
import torch

from engine.errors import CherryError, ModelError
from engine.models import Precision, load_causal_lm, load_tokenizer, pick_device, pick_dtype


def test_tokenizer_without_pad_token_reuses_eos(tmp_path):
    from engine.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id


def test_device_and_dtype_choices():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(ModelError, match="no CUDA GPU is visible; use --set device=cpu"):
            pick_device("cuda")
        assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="could not load a causal LM from"):
        load_causal_lm(str(tmp_path), dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ModelError, match="not a local directory and the hub did not provide it"):
        load_tokenizer("cherry-tests/surely-not-on-any-hub-42")


def test_dropout_is_switched_off(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_pick_dtype_refuses_what_the_device_cannot_do(monkeypatch):
    with pytest.raises(CherryError, match=r"fp16 needs a CUDA GPU.*--set dtype=bf16"):
        pick_dtype("fp16", torch.device("cpu"))  # device auto that ended up on the CPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(CherryError, match=r"bf16 has no tensor cores on this GPU \(Tesla V100\).*--set dtype=fp16"):
        pick_dtype("bf16", torch.device("cuda"))
    assert pick_dtype("auto", torch.device("cuda")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), torch.float32), ((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_dtype_is_bf16_only_where_the_runs_gpu_has_bf16_tensor_cores(monkeypatch, capability, expected):
    # torch's is_bf16_supported() says yes on V100/T4 (emulated bf16): the choice must not follow it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert pick_dtype("auto", torch.device("cuda", 3)) == expected
    assert asked == [torch.device("cuda", 3)]  # the run's GPU, not the current one


def test_one_process_on_cuda_n_makes_gpu_n_current(monkeypatch):
    from engine.distributed import World, rank_device

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(device))
    assert rank_device(torch.device("cuda", 2), World()) == torch.device("cuda", 2)
    assert current == [torch.device("cuda", 2)]
    rank_device(torch.device("cuda"), World())  # no index: the current device is already the one used
    rank_device(torch.device("cpu"), World())
    assert current == [torch.device("cuda", 2)]


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights():
    layer = torch.nn.Linear(4, 4)
    with Precision(torch.bfloat16, torch.device("cpu")).autocast():
        out = layer(torch.ones(1, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with Precision(torch.float32, torch.device("cpu")).autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.float32


def test_fp16_loss_scaling_unscales_before_the_step_and_skips_overflow():
    # Users get fp16 on CUDA only; the scaler's arithmetic is the same on the CPU, where it can be tested.
    precision = Precision(torch.float16, torch.device("cpu"))
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scale = precision.scaler.get_scale()
    precision.backward((2 * weight).sum())
    assert weight.grad.tolist() == [2 * scale] * 3  # scaled, so small fp16 gradients do not underflow
    precision.unscale(optimizer)
    assert weight.grad.tolist() == [2.0] * 3  # clipping sees true gradients
    precision.step(optimizer)
    assert weight.tolist() == pytest.approx([0.8] * 3)
    optimizer.zero_grad()
    precision.backward((weight * float("inf")).sum())
    precision.unscale(optimizer)
    precision.step(optimizer)
    assert weight.tolist() == pytest.approx([0.8] * 3)  # an overflowing step is skipped
    assert precision.scaler.get_scale() == scale / 2  # and the scale backs off
    assert Precision(torch.bfloat16, torch.device("cpu")).scaler is None


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def test_adamw_is_fused_on_gpus_only(device):
    from types import SimpleNamespace

    from engine.loop.schedule import build_optimizer

    spec = SimpleNamespace(
        lr=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.999,
        weight_decay=0.0,
        warmup_steps=0,
        warmup_ratio=0.0,
        lr_scheduler="constant",
    )
    optimizer, _ = build_optimizer(spec, [torch.nn.Parameter(torch.ones(3, device=device))], total_steps=1)
    assert bool(optimizer.defaults["fused"]) == (device == "cuda")
