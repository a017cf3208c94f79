"""CUDA checks (`pytest -m gpu`; scripts/gpu-check.sh runs them): what the CPU tests can only simulate.
Skipped where no CUDA GPU is visible (the rest of the suite hides GPUs unless -m gpu selects these)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_auto_dtype_follows_the_gpus_compute_capability():
    from engine.models import pick_dtype

    device = torch.device("cuda", 0)
    native = torch.cuda.get_device_capability(device) >= (8, 0)
    assert pick_dtype("auto", device) == (torch.bfloat16 if native else torch.float32)


def test_checkpoint_state_comes_back_on_the_cpu_and_the_optimizer_moves_it_to_its_parameters(tmp_path):
    from engine.loop.checkpoint import read_checkpoint_state

    param = torch.nn.Parameter(torch.ones(4, device="cuda"))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.ones_like(param)
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": {}, "rng": {}, "state": {}, "extra": {}}
    (tmp_path / "step").mkdir()
    torch.save(state, tmp_path / "step" / "state.pt")
    before = torch.cuda.memory_allocated()
    saved = read_checkpoint_state(tmp_path / "step")
    assert saved["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    assert torch.cuda.memory_allocated() == before  # nothing allocated on a GPU by reading it
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.state[param]["exp_avg"].device == param.device


def test_the_rollout_kv_cache_is_bf16_under_cuda_autocast():
    from engine.rollout import _with_room

    keys = torch.randn(2, 2, 3, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert _with_room(keys, 4).dtype == torch.bfloat16


def test_the_chunked_head_backward_under_bf16_matches_autograd_on_cuda(monkeypatch):
    import engine.logprobs as logprobs

    monkeypatch.setattr(logprobs, "HEAD_KEEP_ELEMENTS", 0)
    torch.manual_seed(0)
    vocab, width, rows = 4096, 256, 3000
    hidden0 = torch.randn(rows, width, device="cuda")
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    grads = []
    for hooked in (False, True):
        linear = torch.nn.Linear(width, vocab, bias=False, device="cuda")
        with torch.no_grad():
            linear.weight.copy_(torch.randn(vocab, width, generator=torch.Generator().manual_seed(1)).cuda())
        if hooked:
            linear.register_forward_hook(lambda module, args, out: None)
        head = logprobs._Head(decoder=None, module=linear, post=[], vocab=vocab)
        hidden = hidden0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps = logprobs.chunked_head_logps(head, hidden, targets)[0]
        logps.sum().backward()
        grads.append((hidden.grad, linear.weight.grad))
    for own, autograd in zip(*grads):
        torch.testing.assert_close(own, autograd, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_split_prepare_scoring_and_the_reference_table(tmp_path):
    """The CPU test's two ranks (gloo) on a machine whose 2 GPUs are visible: each rank scores its share only."""
    from tests.unit import test_gpu_path

    test_gpu_path.test_prepare_scoring_and_precomputed_reference_are_split_over_ranks(tmp_path)
