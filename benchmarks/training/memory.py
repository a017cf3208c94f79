"""Peak memory of one policy forward + backward through the completion log-probs, per LM-head path.

`python -m benchmarks.training.memory --tokens 1024 4096` runs each (path, completion tokens) case in a
fresh process on a head-heavy model (a 151,936-token vocabulary, as in the Qwen2 family, on a
small 2-layer body) and prints the step's peak: on the CPU the rise of the process's peak resident
set (VmHWM, reset just before the step) over its resident set before the step; on a GPU
`torch.cuda.max_memory_allocated` over the memory allocated before it.

Paths: `chunked` (`completion_logps`: the head in bounded chunks, recomputed in backward) and
`model-forward` (`model_forward_logps`: the model's own forward on completion positions, whose
`[tokens, vocab]` logits and log-softmax are kept for backward); and `body`, the same step with
the head left out (the sum of the body's last hidden states as the loss), so that a path's peak
minus the body's is what its LM-head part adds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.training import bench_device
from engine.batching import collate_completions

PATH_NAMES = ("chunked", "model-forward", "body")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def run_case(path: str, tokens: int, *, vocab: int, hidden: int, layers: int, rows: int, device: str) -> dict:
    """One forward + backward in this process; the peak memory it added, in MiB."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine.logprobs import completion_logps, model_forward_logps

    torch.set_num_threads(1)
    dev = bench_device(device)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=tokens // rows + 128,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).to(dev)
    per_row = tokens // rows
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (64,), generator=generator).tolist() for _ in range(rows)]
    completions = [torch.randint(3, vocab, (per_row,), generator=generator).tolist() for _ in range(rows)]
    batch = {k: v.to(dev) for k, v in collate_completions(prompts, completions, pad_id=0).items()}
    fn = completion_logps if path == "chunked" else model_forward_logps
    if path == "chunked":  # the one-off probe that checks the head, outside the measured step
        from engine.logprobs import chunked_head

        assert chunked_head(model) is not None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kib("VmRSS") * 1024
        _reset_peak_rss()
    if path == "body":
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden.last_hidden_state.sum().backward()
        counts, logps_sum = int(batch["completion_mask"].sum()), 0.0
    else:
        out = fn(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], stats=True)
        out.sums.sum().backward()
        counts, logps_sum = int(out.counts.sum()), float(out.sums.sum())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {
        "path": path,
        "completion_tokens": counts,
        "vocab": vocab,
        "device": str(dev),
        "step_peak_mib": round((peak - before) / 2**20, 1),
        "logps_sum": logps_sum,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="completion tokens per micro-batch")
    parser.add_argument("--paths", nargs="+", default=list(PATH_NAMES), choices=PATH_NAMES)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # path:tokens, run in this process (the child)
    args = parser.parse_args(argv)
    shape = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "rows": args.rows,
        "device": args.device,
    }
    if args.case:
        path, tokens = args.case.split(":")
        print(json.dumps(run_case(path, int(tokens), **shape)))
        return 0
    for tokens in args.tokens:
        for path in args.paths:
            child = [sys.executable, "-m", "benchmarks.training.memory", "--case", f"{path}:{tokens}"]
            child += ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--layers", str(args.layers)]
            child += ["--rows", str(args.rows), "--device", args.device]
            done = subprocess.run(child, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{path} at {tokens} tokens failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            print(done.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
