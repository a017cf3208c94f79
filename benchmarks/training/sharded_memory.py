"""Peak host memory per rank of a sharded policy (`parallelism: fsdp`), 2 gloo processes on the CPU.

`python -m benchmarks.training.sharded_memory` runs each case on 2 fresh processes and prints one JSON
line per rank: the rise of the process's peak resident set (VmHWM, reset just before the case) over its
resident set before it, in MiB, and that rise over the model's fp32 weights.

Cases: `load-whole` (each rank reads the full weights, then shards them: `load_causal_lm` then
`shard_model`) and `load-sharded` (`load_sharded`: rank 0 reads them, the others build on the meta
device and receive their shards); `step-chunked` (`completion_logps` on the sharded model: the chunked
head inside its own forward) and `step-model-forward` (`model_forward_logps`: the model's own forward,
which keeps `[tokens, vocab]` fp32 logits and log-softmax for backward), one forward + backward each.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
from pathlib import Path

import torch

from benchmarks.training.memory import _reset_peak_rss, _status_kib

CASES = ("load-whole", "load-sharded", "step-chunked", "step-model-forward")


def _save_model(path: Path, vocab: int, hidden: int, layers: int) -> int:
    """A random Qwen2 (untied head) saved at `path`; its parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _rank(rank: int, port: int, case: str, model_dir: str, tokens: int, out_dir: str) -> None:
    import torch.distributed as dist

    import engine.sharding as sharding
    from engine.batching import collate_completions
    from engine.distributed import World
    from engine.logprobs import chunked_head, completion_logps, model_forward_logps
    from engine.models import load_causal_lm
    from engine.sharding import load_sharded, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world, cpu = World(rank, 2), torch.device("cpu")
    # What each case imports (transformers' model code, FSDP, DTensor) before the baseline: the peak is the
    # case's memory, not the libraries'.
    from torch.distributed.checkpoint.state_dict import set_model_state_dict  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    load_causal_lm(model_dir, dtype=torch.float32, device=cpu, weights=False)
    if case.startswith("load"):
        # The chunked head's probe, the sharded model's first forward, gathers the root unit as every
        # training forward does: a peak of the steps, not of the loading. Left out here.
        sharding._use_chunked_head = lambda model: None
    before = _status_kib("VmRSS") * 1024
    _reset_peak_rss()
    if case == "load-whole":
        shard_model(load_causal_lm(model_dir, dtype=torch.float32, device=cpu), world, cpu)
    elif case == "load-sharded":
        load_sharded(load_causal_lm, model_dir, world, cpu)
    else:
        model = load_sharded(load_causal_lm, model_dir, world, cpu)
        vocab, rows = model.config.vocab_size, 4
        generator = torch.Generator().manual_seed(rank)
        prompts = [torch.randint(3, vocab, (32,), generator=generator).tolist() for _ in range(rows)]
        completions = [torch.randint(3, vocab, (tokens // rows,), generator=generator).tolist() for _ in range(rows)]
        batch = collate_completions(prompts, completions, pad_id=0)
        assert chunked_head(model) is not None  # the one-off probe, outside the measured step
        score = completion_logps if case == "step-chunked" else model_forward_logps
        before = _status_kib("VmRSS") * 1024
        _reset_peak_rss()
        score(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sums.sum().backward()
    peak = _status_kib("VmHWM") * 1024
    Path(out_dir, f"{case}-{rank}.json").write_text(json.dumps({"rise": peak - before}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512, help="completion tokens per rank in the step cases")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        n_params = _save_model(model_dir, args.vocab, args.hidden, args.layers)
        weights_mib = n_params * 4 / 2**20
        for case in args.cases:
            mp.spawn(_rank, args=(_free_port(), case, str(model_dir), args.tokens, tmp), nprocs=2, join=True)
            for rank in range(2):
                rise = json.loads((Path(tmp) / f"{case}-{rank}.json").read_text())["rise"] / 2**20
                line = {"case": case, "rank": rank, "weights_mib": round(weights_mib, 1)}
                line |= {"peak_rise_mib": round(rise, 1), "rise_over_weights": round(rise / weights_mib, 2)}
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
