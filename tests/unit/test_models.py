"""Model loading choices: pad token, device and dtype, clear errors."""

from __future__ import annotations

import pytest
import torch

from engine.errors import ModelError
from engine.models import load_causal_lm, load_tokenizer, pick_device, pick_dtype


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
