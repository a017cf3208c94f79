"""The GPU path's mechanisms, exercised on the CPU: where checkpoint state is loaded, the sharding mesh and
mixed-precision policy, the worker's GPU and thread assignment, the rollout KV cache's dtype and memory
bound, the chunked head's backward under autocast, and prepare / precomputed reference work split over
ranks (2 gloo processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.distributed import World

# ---------------------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu_reading_its_state_once(
    tiny_model_dir, tiny_pairs, tmp_path, monkeypatch
):
    """state.pt whose tensors are tagged as saved on cuda:3 (as a GPU run's are) loads on this CPU machine:
    without map_location='cpu' torch would try to restore them onto cuda:3 and fail."""
    import torch.serialization

    import engine.loop.checkpoint as checkpoint
    from engine.reporting import MemoryReporter
    from engine.train import train
    from tests.e2e.test_train import dpo_spec

    spec = dpo_spec(tiny_model_dir, tiny_pairs, max_steps=4, save_steps=2, eval_steps=0, sample_steps=0)
    straight = MemoryReporter()
    run = tmp_path / "run"
    train(spec, run, straight)
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-0000004")  # as if it had stopped after step 2
    state = run / "checkpoints" / "step-0000002" / "state.pt"
    saved = torch.load(state, weights_only=True)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:3")
        torch.save(saved, state)
    with pytest.raises(RuntimeError):  # what the old map_location=None did with it here
        torch.load(state, weights_only=True)

    loads = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        loads.append((Path(path).name, kwargs.get("mmap"), kwargs.get("map_location")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", counting_load)
    resumed = MemoryReporter()
    summary = train(spec, run, resumed, resume=True)
    assert summary["step"] == 4
    assert resumed.series("train/loss") == pytest.approx(straight.series("train/loss")[2:], abs=1e-6)
    assert all(where == "cpu" for _, _, where in loads)
    assert [mmap for name, mmap, _ in loads if name == "state.pt"] == [True, False]  # the check, then one read


# ---------------------------------------------------------------------------------------- sharding


def test_shards_live_on_the_runs_device_with_a_mixed_precision_policy(monkeypatch):
    """fully_shard's default mesh is the machine's accelerator (CUDA where there is one, even for a CPU
    run); the mesh must be the run's device, and bf16 runs cast gathered weights once per unit."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from engine.sharding import shard_options

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        world = World(0, 1)
        fp32 = shard_options(world, torch.device("cpu"), torch.float32)
        assert fp32["mesh"].device_type == "cpu" and "mp_policy" not in fp32
        bf16 = shard_options(world, torch.device("cpu"), torch.bfloat16)
        policy = bf16["mp_policy"]
        assert isinstance(policy, MixedPrecisionPolicy)
        assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_test_suite_hides_gpus_unless_it_selects_the_gpu_tests(request):
    # tests/conftest.py: recorded CPU numbers and 2-process runs would otherwise run on GPU 0 in bf16
    if "gpu" in (request.config.getoption("markexpr") or "").replace("not gpu", ""):
        pytest.skip("this session selected the CUDA tests: GPUs stay visible")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- the worker


def test_worker_slots_split_the_cores_and_keep_runs_off_each_others_gpus(monkeypatch, tmp_path):
    import jobs.slots as worker

    monkeypatch.setattr(worker, "machine_cores", lambda: 16)
    cpu = worker.child_environment({"PATH": "/bin"}, tmp_path, None, 4)
    assert cpu["OMP_NUM_THREADS"] == "4"  # 16 cores, 4 slots
    assert cpu["CUDA_VISIBLE_DEVICES"] == ""  # 4 CPU slots would all pick GPU 0
    alone = worker.child_environment({"PATH": "/bin"}, tmp_path, None, 1)
    assert alone["OMP_NUM_THREADS"] == "16" and "CUDA_VISIBLE_DEVICES" not in alone  # one slot may use the GPUs
    # --gpus 0,1 count among the GPUs the worker itself was given (a scheduler's CUDA_VISIBLE_DEVICES=4,5,6)
    gpu = worker.child_environment({"CUDA_VISIBLE_DEVICES": "4,5,6"}, tmp_path, "0,1", 2)
    assert gpu["CUDA_VISIBLE_DEVICES"] == "4,5" and gpu["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert gpu["OMP_NUM_THREADS"] == "8" and gpu["CHERRY_HOME"] == str(tmp_path)
    assert worker.child_environment({}, tmp_path, "2", 1)["CUDA_VISIBLE_DEVICES"] == "2"


def test_torch_takes_its_thread_count_from_the_slot_environment():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "1", out.stderr  # (torch caps it at the cores it has)


# ---------------------------------------------------------------------------------------- the KV cache


def test_the_kv_cache_is_kept_in_the_autocast_dtype_and_sized_to_free_memory(tiny_model_dir):
    from engine.models import load_causal_lm
    from engine.rollout import _with_room, decoding_rows

    keys = torch.randn(2, 4, 5, 8)  # fp32, as RoPE leaves a full fine-tune's keys under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        buffer = _with_room(keys, 3)
    assert buffer.dtype == torch.bfloat16 and buffer.shape == (2, 4, 8, 8)
    assert torch.equal(buffer[..., :5, :], keys.bfloat16())
    assert _with_room(keys, 3).dtype == torch.float32  # no autocast: the model's own dtype

    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    # tiny model: 2 layers x 4 heads x 8 dims, K and V: 128 values per position; 100 positions in fp32
    per_row = 2 * 2 * 4 * 8 * 100 * 4
    assert decoding_rows(model, torch.device("cuda"), 100, free_bytes=10 * per_row) == 5  # half the free memory
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (CUDA's autocast cannot be switched on here)
        assert decoding_rows(model, torch.device("cpu"), 100, free_bytes=10 * per_row) == 10  # bf16: half a row
    assert decoding_rows(model, torch.device("cpu"), 100) >= 256  # the host's memory: no bound


# ---------------------------------------------------------------------------------------- the chunked head


def test_the_chunked_heads_own_backward_under_bf16_autocast_gives_autograds_gradients(monkeypatch):
    """The in-place weight-gradient path now runs under autocast too (one cast of the head, no fp32 [V, H]
    per chunk); it must give what plain autograd through the same chunks gives (a hooked head takes that path)."""
    import engine.logprobs as logprobs

    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 7 * 50)  # 7 rows a chunk
    monkeypatch.setattr(logprobs, "HEAD_KEEP_ELEMENTS", 0)  # every chunk recomputed in backward
    torch.manual_seed(0)
    hidden0, targets = torch.randn(40, 16), torch.randint(0, 50, (40,))
    results = []
    for hooked in (False, True):
        linear = torch.nn.Linear(16, 50, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(50, 16, generator=torch.Generator().manual_seed(1)))
        if hooked:
            linear.register_forward_hook(lambda module, args, out: None)
        head = logprobs._Head(decoder=None, module=linear, post=[], vocab=50)
        assert head.plain_linear is not hooked
        hidden = hidden0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = logprobs.chunked_head_logps(head, hidden, targets, temperature=0.7)[0]
        (logps * torch.linspace(-1, 1, 40)).sum().backward()
        results.append((logps.detach(), hidden.grad, linear.weight.grad))
    for own, autograd in zip(*results):
        assert torch.equal(own, autograd)


# ---------------------------------------------------------------------------------------- work split over ranks


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    from engine.algorithms.base import Models
    from engine.algorithms.online_rows import across_ranks
    from engine.reference import PrecomputedReference

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world = World(rank, 2)
    scored: list[int] = []

    def score_rows(rows):
        scored.extend(rows)
        return [torch.tensor([float(r) * 10]) for r in rows]

    models = Models(policy=None, tokenizer=None, device=torch.device("cpu"), world=world)
    chunks = [list(range(0, 5)), list(range(5, 8)), [8]]
    results = [t.item() for t in across_ranks(models, chunks, score_rows)]
    lockstep_scored: list[int] = []
    across_ranks(
        Models(policy=None, tokenizer=None, device=torch.device("cpu"), world=world, lockstep=True),
        chunks,
        lambda rows: lockstep_scored.extend(rows) or [torch.zeros(1)] * len(rows),
    )

    class CountingReference:
        batches = 0

        def logps(self, batch):
            CountingReference.batches += 1
            return torch.cat([batch["x"], batch["x"] + 0.5])  # 2 rows per example: all first rows, then seconds

    examples = [{"x": float(i)} for i in range(10)]
    table = PrecomputedReference.build(
        {"train": examples, "eval": examples[:3]},
        lambda chunk: {"x": torch.tensor([e["x"] for e in chunk])},
        CountingReference(),
        rows_per_example=2,
        batch_size=3,
        device=torch.device("cpu"),
        cache_file=Path(out_dir) / "ref.safetensors",
        world=world,
    )
    summary = {
        "scored": scored,
        "results": results,
        "lockstep_scored": lockstep_scored,
        "ref_batches": CountingReference.batches,
        "train_table": table.tables["train"].tolist(),
    }
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


def test_prepare_scoring_and_precomputed_reference_are_split_over_ranks(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    # each rank scores its share of each micro-batch (the rows it trains on), never the whole rollout
    assert ranks[0]["scored"] == [0, 1, 2, 5, 6, 8] and ranks[1]["scored"] == [3, 4, 7]
    assert ranks[0]["results"] == ranks[1]["results"] == [10.0 * i for i in range(9)]  # gathered in order
    assert ranks[1]["lockstep_scored"] == [3, 4, 7, 8]  # a sharded policy: a filler where its share is empty
    # 4 train batches + 1 eval batch, split 3 + 2 instead of rank 0 computing all 5 while rank 1 waits
    assert (ranks[0]["ref_batches"], ranks[1]["ref_batches"]) == (3, 2)
    expected = [[float(i), i + 0.5] for i in range(10)]
    assert ranks[0]["train_table"] == ranks[1]["train_table"] == expected
    assert (tmp_path / "ref.safetensors").exists()  # rank 0 wrote the cache


def test_a_sharded_bf16_run_trains_under_the_mixed_precision_policy(tiny_model_dir, tiny_pairs, tmp_path):
    """fsdp in bf16 on 2 gloo processes (the policy casts each unit's gathered weights to bf16) follows the
    one-process bf16 run with the global batch, to bf16's precision."""
    from engine.reporting import MemoryReporter
    from engine.train import train
    from tests.e2e.test_train import dpo_spec

    quiet = dict(
        eval_steps=0, sample_steps=0, eval_split=0.0, warmup_ratio=0.0, save_steps=100, max_steps=3, dtype="bf16"
    )
    one, two = MemoryReporter(), MemoryReporter()
    train(dpo_spec(tiny_model_dir, tiny_pairs, batch_size=8, **quiet), tmp_path / "one", one)
    summary = train(
        dpo_spec(tiny_model_dir, tiny_pairs, batch_size=4, num_processes=2, parallelism="fsdp", **quiet),
        tmp_path / "two",
        two,
    )
    assert summary["dtype"] == "bfloat16" and summary["world_size"] == 2
    assert two.series("train/loss") == pytest.approx(one.series("train/loss"), abs=2e-2)
