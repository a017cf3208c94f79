"""What a sharded policy (`parallelism: fsdp`) holds, on 2 gloo processes on the CPU.

It scores completions with the memory-bounded chunked LM head, run inside the model's own forward call
where FSDP gathers the root unit's weights: log-probs and gradients equal one process's, and no head
call sees more rows than a chunk. It loads with only rank 0 reading the weights: the others build the
modules on the meta device and receive their shards, and the model equals one loaded whole, then sharded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.distributed import World
from tests.unit.test_gpu_path import _free_port


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """4 right-padded rows, prompts of 3 tokens, completions of 7 to 10 tokens (34 in all)."""
    generator = torch.Generator().manual_seed(1)
    lengths = [13, 11, 10, 12]
    input_ids = torch.randint(1, vocab, (4, max(lengths)), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        completion_mask[row, 3:length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _scores(model, batch, rows: list[int]):
    """(per-row log-prob sums, the loss) of `rows`: a weighted sum, so each row's gradient differs."""
    from engine.logprobs import completion_logps

    picked = {key: value[rows] for key, value in batch.items()}
    out = completion_logps(model, picked["input_ids"], picked["attention_mask"], picked["completion_mask"])
    weights = torch.tensor([1.0 + r for r in rows])
    return out.sums, (out.sums * weights).sum() + out.token_logps.pow(2).sum()


def _rank_main(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import engine.logprobs as logprobs
    from engine.models import load_causal_lm
    from engine.sharding import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = load_causal_lm(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    vocab = model.config.vocab_size
    # Chunks of 4 rows, the first kept for backward and the rest recomputed there: all of the head's paths.
    logprobs.HEAD_CHUNK_ELEMENTS = logprobs.HEAD_KEEP_ELEMENTS = 4 * vocab
    batch = _batch(vocab)

    whole = load_causal_lm(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    one_sums, one_loss = _scores(whole, batch, [0, 1, 2, 3])
    one_loss.backward()

    shard_model(model, World(rank, 2), torch.device("cpu"))
    # the head's probe ran a forward; the parameters (the optimizer's) are still the shards, not gathered copies
    all_shards = all(isinstance(p, DTensor) for p in model.parameters())
    head_rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: head_rows.append(out.shape[:-1].numel()))
    mine = [rank, rank + 2]  # each rank its half of the batch: the summed gradient is the whole batch's
    sums, loss = _scores(model, batch, mine)
    forward_rows = list(head_rows)
    loss.backward()  # (the hook makes the head hooked: the backward recomputes through it, in chunks too)
    gradients = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    summary = {
        "sums_error": float((sums - one_sums[mine]).detach().abs().max()),
        "grad_error": max(float((gradients[n] - p.grad).abs().max()) for n, p in whole.named_parameters()),
        "grad_scale": max(float(p.grad.abs().max()) for p in whole.parameters()),
        "head_rows": head_rows,
        "forward_rows": forward_rows,
        "completion_tokens": int(batch["completion_mask"][mine][:, 1:].sum()),
        "chunked": logprobs.chunked_head(model) is not None,
        "all_shards": all_shards,
    }
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


def test_a_sharded_model_scores_with_the_chunked_head_and_matches_one_process(tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(_free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        summary = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert summary["chunked"] and summary["all_shards"]
        assert summary["sums_error"] < 1e-5
        assert summary["grad_scale"] > 1e-2 and summary["grad_error"] < 1e-5 * summary["grad_scale"]
        # The head never ran on all completion positions at once (the model's own forward would: one call
        # on every predicting position), only on chunks of at most 4 rows, each position once.
        assert summary["completion_tokens"] > 4
        assert max(summary["head_rows"]) <= 4 and sum(summary["forward_rows"]) == summary["completion_tokens"]


def _load_rank_main(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from engine.logprobs import completion_logps
    from engine.models import load_causal_lm, load_reward_model, sequence_rewards
    from engine.sharding import full_model_state, load_sharded, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world, cpu = World(rank, 2), torch.device("cpu")
    loads: list[bool] = []

    def recording(load):
        def wrapped(*args, weights: bool = True, **kwargs):
            loads.append(weights)
            return load(*args, weights=weights, **kwargs)

        return wrapped

    summary: dict = {}
    for kind, load in (("policy", load_causal_lm), ("reward", load_reward_model)):
        torch.manual_seed(0)  # as every rank seeds before loading (a reward model's fresh head is drawn)
        whole = load(model_dir, dtype=torch.float32, device=cpu)
        after_whole = torch.get_rng_state()
        shard_model(whole, world, cpu)
        torch.manual_seed(0)
        sharded = load_sharded(recording(load), model_dir, world, cpu)
        same_rng = torch.equal(torch.get_rng_state(), after_whole)  # rank 1 drew nothing, and goes on as rank 0
        batch = _batch(sharded.config.vocab_size)
        if kind == "policy":
            score = lambda model: completion_logps(model, **batch).sums  # noqa: E731
        else:
            score = lambda model: sequence_rewards(model, batch["input_ids"], batch["attention_mask"])  # noqa: E731
        expected, got = full_model_state(whole), full_model_state(sharded)
        saved_twice = None
        if rank == 0 and kind == "policy":  # as a run writes its last checkpoint, then final/ from the same state
            from safetensors.torch import load_file

            for folder in ("a", "b"):
                sharded.save_pretrained(Path(out_dir, folder), state_dict=got)
            written = [load_file(str(Path(out_dir, folder, "model.safetensors"))) for folder in ("a", "b")]
            saved_twice = all(
                w.keys() == written[0].keys() and all(torch.equal(w[n], got[n]) for n in w) for w in written
            )
        summary[kind] = {
            "params": [len(list(m.parameters())) for m in (whole, sharded)],
            "all_shards": all(isinstance(p, DTensor) for p in sharded.parameters()),
            "same_rng": same_rng,
            "names": sorted(expected) == sorted(got),
            "weights_error": max((float((expected[n] - got[n]).abs().max()) for n in expected), default=0.0),
            "scores_error": float((score(whole) - score(sharded)).detach().abs().max()),
            "loads": loads[:],
            "saved_twice": saved_twice,
        }
        loads.clear()
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


def test_a_sharded_load_reads_the_weights_on_rank_0_only_and_equals_a_whole_load(tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_load_rank_main, args=(_free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    for rank, summary in enumerate(ranks):
        for kind in ("policy", "reward"):
            got = summary[kind]
            # rank 1 builds the modules only; rank 0 too, then reads the weights once
            assert got["loads"] == ([False, True] if rank == 0 else [False]), kind
            assert got["params"][0] == got["params"][1], kind  # the tied head stays tied to the embedding
            assert got["all_shards"] and got["same_rng"], kind
            assert got["scores_error"] < 1e-6, kind
    for kind in ("policy", "reward"):  # the gathered state (rank 0's): every weight as a whole load's
        assert ranks[0][kind]["names"] and ranks[0][kind]["weights_error"] == 0.0, kind
    # save_pretrained reverts the renamings from_pretrained made, which rank 0 keeps from its own load;
    # without them transformers empties the state dict it writes, and a second write has no weights
    assert ranks[0]["policy"]["saved_twice"]
