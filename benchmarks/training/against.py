"""`cherry bench METHOD --against trl`: Cherry and TRL on the same model, rows and settings, side by side.

The parent process builds one case in a temporary directory: a random-init model (and, for DPO and
KTO, a second random-init model as the frozen reference) saved with `save_pretrained`, the demo's
byte-level tokenizer saved beside it, and a JSONL data file. Each side then trains on it in a fresh
child process (`python -m benchmarks.training.against SIDE CASES_JSON`), so neither side's imports or
allocations count against the other (`compare_in_one_process_per_side` runs several methods per child,
importing the libraries once: the test suite's quick check):

- cherry: `engine.train.train` with a spec that turns off evaluation, samples and the reference
  precompute (TRL computes the reference per batch by default too);
- trl: TRL's own trainer for the method (benchmarks/training/trl_side.py; only that child imports TRL).

Both sides: fp32, the same threads, batch, lengths, learning rate, constant schedule, gradient
clipping at 1.0, beta, loss type, no label smoothing, no truncation (every row fits `max_length`).
Timing is step to step (the end of one optimizer step to the end of the next: batching, forward,
backward, optimizer, logging), after `warmup` steps that are not timed (at least the first step,
which has no step end before it); the median of the timed steps is reported. Memory: the child's
peak RSS at the end of its last step, above its RSS once its libraries were imported (on a GPU:
peak allocated). Offline methods report the first step's loss of
each side, computed before any update, which must agree: it shows both sides train on the same
tokens with the same objective. Online methods (GRPO, RLOO) report sampled completions per second,
with the rollout (sampling) and the rest of the step timed separately.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from engine.registry import is_online

# The methods this benchmark drives, each with the TRL trainer it is measured against.
TRL_TRAINERS = {
    "dpo": "DPOTrainer",
    "kto": "KTOTrainer",
    "sft": "SFTTrainer",
    "grpo": "GRPOTrainer",
    "rloo": "RLOOTrainer",
}
METHODS = tuple(TRL_TRAINERS)
LOSS_TOLERANCE = 1e-4
ALPHABET = "abcdefghijklmnopqrstuvwxyz "  # one byte = one token with the byte-level tokenizer


@dataclass(frozen=True)
class Shape:
    """A model and batch shape. Offline rows are `prompt_len + completion_len` tokens (+ EOS)."""

    family: str  # "llama" or "qwen2"
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie_embeddings: bool
    batch: int  # offline: pairs / rows per step; online: prompts per step
    prompt_len: int
    completion_len: int
    group: int  # online: samples per prompt
    new_tokens: tuple[int, ...]  # online: completion lengths measured
    about: str
    # offline: row i's prompt and completion are its share of the full lengths, evenly from 1/spread to 1
    length_spread: int = 1


SHAPES = {
    # Seconds per side: what the test suite runs.
    "tiny": Shape("llama", 512, 64, 2, 2, 2, 128, False, 4, 24, 8, 4, (8,), "a 0.15M-parameter Llama (tests)"),
    # Qwen2-0.5B's vocabulary and tied head on a small body: the LM head is most of the work.
    "head-heavy": Shape(
        "qwen2", 151936, 256, 2, 4, 2, 1024, True, 4, 96, 32, 8, (8, 64), "151,936 vocabulary, hidden 256 x 2 layers"
    ),
    # A Llama-2-sized vocabulary under a wider, deeper body and longer completions.
    "body-heavy": Shape(
        "llama", 32000, 512, 8, 8, 8, 1376, False, 4, 64, 128, 8, (8, 64), "32,000 vocabulary, hidden 512 x 8 layers"
    ),
    # Prompts three times the completions under a small head: the body's work on prompts dominates.
    "prompt-heavy": Shape(
        "llama", 8192, 256, 4, 4, 4, 688, False, 8, 192, 64, 4, (8,), "8,192 vocabulary, hidden 256 x 4 layers"
    ),
    # prompt-heavy's model with rows whose lengths vary tenfold: about half a padded batch is padding.
    "varied-lengths": Shape(
        "llama",
        8192,
        256,
        4,
        4,
        4,
        688,
        False,
        8,
        192,
        64,
        4,
        (8,),
        "8,192 vocabulary, hidden 256 x 4 layers, row lengths varying tenfold",
        length_spread=10,
    ),
}


@dataclass
class Case:
    """One comparison: what both children read (written as JSON on their command line)."""

    method: str
    shape: str
    dir: str
    steps: int = 3
    warmup: int = 1
    threads: int = 1
    device: str = "cpu"
    new_tokens: int = 0  # online only
    lr: float = 1e-6
    beta: float = 0.1
    seed: int = 0
    max_length: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def geometry(self) -> Shape:
        return SHAPES[self.shape]

    @property
    def model_dir(self) -> str:
        return str(Path(self.dir) / "model")

    @property
    def ref_dir(self) -> str:
        return str(Path(self.dir) / "reference")

    @property
    def data_file(self) -> str:
        return str(Path(self.dir) / "data.jsonl")

    @property
    def first_end(self) -> int:
        """The step end the first timed interval starts from: the last warm-up step's (the first step's without one)."""
        return max(self.warmup, 1) - 1

    @property
    def total_steps(self) -> int:
        return self.first_end + 1 + self.steps


# --- the case: model, reference, tokenizer and rows, written once and read by both sides


def build_model(shape: Shape, seed: int, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = (
        (Qwen2Config, Qwen2ForCausalLM) if shape.family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_class(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=shape.tie_embeddings,
        # Wider than the usual 0.02 so that a random model's log-probs differ from token to token:
        # otherwise every first-step loss is ln 2 (DPO) or ln V (SFT) and agreeing on it shows nothing.
        initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return model_class(config)


def _text(generator, n: int) -> str:
    import torch

    picks = torch.randint(0, len(ALPHABET), (n,), generator=generator).tolist()
    return "".join(ALPHABET[i] for i in picks).strip(" ").ljust(n, "a")


def row_lengths(shape: Shape) -> list[tuple[int, int]]:
    """(prompt, completion) tokens of each offline row: the full lengths, or with a length spread, shares
    of them evenly from 1/spread (the shortest row) to 1 (the longest), in a shuffled order."""
    import torch

    if shape.length_spread <= 1:
        return [(shape.prompt_len, shape.completion_len)] * shape.batch
    shares = torch.linspace(1.0 / shape.length_spread, 1.0, shape.batch)
    order = torch.randperm(shape.batch, generator=torch.Generator().manual_seed(0)).tolist()
    return [
        (max(1, round(shape.prompt_len * float(shares[i]))), max(1, round(shape.completion_len * float(shares[i]))))
        for i in order
    ]


def build_rows(case: Case) -> list[dict]:
    """Rows in the plain-text format both Cherry and TRL read (no chat template: one byte = one token)."""
    import torch

    shape, generator = case.geometry, torch.Generator().manual_seed(case.seed)
    lengths = row_lengths(shape)
    if case.method == "dpo":
        return [
            {
                "prompt": _text(generator, prompt),
                "chosen": _text(generator, completion),
                "rejected": _text(generator, completion),
            }
            for prompt, completion in lengths
        ]
    if case.method == "kto":
        # One prompt for every row: the KL estimate then scores the prompt with every completion of the
        # batch whichever way each side pairs them up (TRL cycles completions within the batch, Cherry
        # through a seeded permutation), so the two first-step losses are comparable.
        prompt = _text(generator, shape.prompt_len)
        return [
            {"prompt": prompt, "completion": _text(generator, completion), "label": i % 2 == 0}
            for i, (_, completion) in enumerate(lengths)
        ]
    if case.method == "sft":
        return [
            {"prompt": _text(generator, prompt), "completion": _text(generator, completion)}
            for prompt, completion in lengths
        ]
    # Online: prompts of different lengths (half to the full length), so left padding is exercised.
    lengths = torch.randint(shape.prompt_len // 2, shape.prompt_len + 1, (shape.batch,), generator=generator).tolist()
    return [{"prompt": _text(generator, n)} for n in lengths]


def write_case(case: Case) -> None:
    from engine.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 4096
    build_model(case.geometry, case.seed, tokenizer).save_pretrained(case.model_dir)
    tokenizer.save_pretrained(case.model_dir)
    if case.method in ("dpo", "kto"):
        # A different random model as the reference: with reference = policy every first-step log-ratio
        # is 0 and the loss is a constant (ln 2 for DPO), whatever each side computed.
        build_model(case.geometry, case.seed + 1, tokenizer).save_pretrained(case.ref_dir)
        tokenizer.save_pretrained(case.ref_dir)
    rows = build_rows(case)
    Path(case.data_file).write_text("".join(json.dumps(row) + "\n" for row in rows))


# --- measuring inside a child


def current_rss_gb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StepClock:
    """Step-end times, the first step's loss and peak memory, recorded by either side's hook."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.baseline_gb = current_rss_gb()
        self.ends: list[float] = []
        self.rollout_seconds: list[float] = []
        self.first_loss: float | None = None
        self.tokens: list[int] = []
        self.peak_gb = 0.0
        self.peak_rss_gb = 0.0

    def step_end(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.peak_rss_gb = peak_rss_gb()
        if self.cuda:
            self.peak_gb = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.peak_gb = self.peak_rss_gb - self.baseline_gb

    def result(self, case: Case) -> dict:
        intervals = [b - a for a, b in zip(self.ends[case.first_end :], self.ends[case.first_end + 1 :])]
        if not intervals:
            raise RuntimeError(f"only {len(self.ends)} steps ended; {case.total_steps} were asked for")
        step_seconds = sorted(intervals)[len(intervals) // 2]  # median: robust to a noisy neighbour
        timed_rollouts = self.rollout_seconds[case.first_end + 1 : case.total_steps]
        out = {
            "step_seconds": step_seconds,
            "timed_steps": len(intervals),
            "first_loss": self.first_loss,
            "peak_mem_gb": self.peak_gb,
            "peak_rss_gb": self.peak_rss_gb,
            "memory": "peak CUDA allocated" if self.cuda else "peak RSS above the RSS after imports",
            "tokens_per_step": self.tokens[0] if self.tokens and not is_online(case.method) else None,
        }
        shape = case.geometry
        if is_online(case.method):
            completions = shape.batch * shape.group
            out["completions_per_s"] = completions / step_seconds
            if timed_rollouts:
                rollout = sorted(timed_rollouts)[len(timed_rollouts) // 2]
                out["rollout_seconds"] = rollout
                out["update_seconds"] = step_seconds - rollout
        elif self.tokens:
            out["tokens_per_s"] = self.tokens[0] / step_seconds
        return out


def cherry_spec(case: Case):
    from engine.spec import build_spec

    shape = case.geometry
    values = dict(
        algorithm=case.method,
        model=case.model_dir,
        dataset=case.data_file,
        dtype="fp32",
        device=case.device,
        num_threads=case.threads,
        seed=case.seed,
        batch_size=shape.batch,
        grad_accum=1,
        max_steps=case.total_steps,
        lr=case.lr,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=case.max_length,
        max_prompt_length=case.max_length - 1,
        eval_split=0.0,
        eval_steps=0,
        sample_steps=0,
        num_samples=0,
        kl_samples=0,
        save_steps=0,
        logging_steps=1,
        precompute_ref_logps=False,
    )
    if case.method in ("dpo", "kto"):
        values.update(ref_model=case.ref_dir, beta=case.beta)
    if case.method == "dpo":
        values.update(loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0)
    if is_online(case.method):
        values.update(
            num_generations=shape.group,
            max_new_tokens=case.new_tokens,
            temperature=1.0,
            top_p=1.0,
            rewards="benchmarks.training.reward:bench_reward",
            beta=0.0,
            num_iterations=1,
        )
    if case.method == "grpo":
        values.update(loss_type="dapo", scale_rewards="group")
    return build_spec(values)


def run_cherry(case: Case) -> dict:
    from engine.train import train

    if case.extra.get("padded"):
        # Packing off: every batch takes the padded path, the fallback of a batch that cannot be packed.
        import engine.packing

        engine.packing.packed_logps = lambda *args, **kwargs: None

    clock = StepClock(case.device)  # after the imports: their memory is not the run's

    class Hook:
        """A Reporter that stamps the end of each training step (its metrics row)."""

        def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
            if "train/loss" not in metrics:
                return
            clock.step_end()
            if clock.first_loss is None:
                clock.first_loss = float(metrics["train/loss"])
            if "time/rollout_s" in metrics:
                clock.rollout_seconds.append(float(metrics["time/rollout_s"]))

        def log_samples(self, step, samples) -> None:
            pass

        def log_event(self, kind, message, **data) -> None:
            pass

        def rewind(self, step) -> None:
            pass

    with tempfile.TemporaryDirectory() as out_dir:
        summary = train(cherry_spec(case), out_dir, reporter=Hook())
    clock.tokens = [summary["tokens"] // max(summary["step"], 1)] if not is_online(case.method) else []
    return clock.result(case)


# --- the parent: build the case, run both sides, compare


def run_side(side: str, cases: list[Case]) -> list[dict]:
    """Run `cases` one after another in one fresh child process for `side`; their results in order."""
    threads = cases[0].threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = [sys.executable, "-m", "benchmarks.training.against", side, json.dumps([asdict(c) for c in cases])]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        methods = ", ".join(c.method for c in cases)
        raise RuntimeError(f"the {side} side of `bench {methods}` failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trl_missing() -> str | None:
    """Why TRL cannot run here (None when it can), without importing it."""
    from importlib.util import find_spec

    if find_spec("trl") is None:
        return 'TRL is not installed: pip install -e ".[bench]" installs the version the benchmark was written for'
    return None


def make_case(
    method: str, shape: str, tmp: str, *, steps: int, warmup: int, threads: int, device: str, new_tokens: int | None
) -> Case:
    geometry, online = SHAPES[shape], is_online(method)
    new = new_tokens if new_tokens is not None else geometry.new_tokens[0]
    return Case(
        method=method,
        shape=shape,
        dir=tmp,
        steps=steps,
        warmup=warmup,
        threads=threads,
        device=device,
        new_tokens=new if online else 0,
        # Room for every row with its EOS (and, online, every sample): nothing is truncated on either side.
        max_length=geometry.prompt_len + (new if online else geometry.completion_len) + 8,
    )


def pair(case: Case, cherry: dict, trl: dict) -> dict:
    """Both sides' results on one case, with their ratios and (offline) whether the first-step losses agree."""
    online = is_online(case.method)
    rate = "completions_per_s" if online else "tokens_per_s"
    out = {
        "method": case.method,
        "shape": case.shape,
        "about": case.geometry.about,
        "case": {k: v for k, v in asdict(case).items() if k not in ("dir", "extra")},
        "cherry": cherry,
        "trl": trl,
        "rate": rate,
        "speed_ratio": cherry[rate] / trl[rate],
        "memory_ratio": cherry["peak_mem_gb"] / max(trl["peak_mem_gb"], 1e-9),
    }
    if not online:
        out["loss_abs_diff"] = abs(cherry["first_loss"] - trl["first_loss"])
        out["losses_agree"] = out["loss_abs_diff"] <= LOSS_TOLERANCE
    return out


def compare(
    method: str,
    shape: str,
    *,
    steps: int = 3,
    warmup: int = 1,
    threads: int = 1,
    device: str = "cpu",
    new_tokens: int | None = None,
) -> dict:
    """Build the case, run Cherry then TRL, each in its own fresh process, and return both results and their ratios."""
    return compare_in_one_process_per_side(
        [method], shape, steps=steps, warmup=warmup, threads=threads, device=device, new_tokens=new_tokens
    )[0]


def compare_in_one_process_per_side(
    methods: list[str],
    shape: str,
    *,
    steps: int = 3,
    warmup: int = 1,
    threads: int = 1,
    device: str = "cpu",
    new_tokens: int | None = None,
) -> list[dict]:
    """Several methods with one child process per side, which runs them one after another: the libraries
    are imported once per side instead of once per method (the test suite's quick check of every method).
    Peak memory then is each side's peak so far, not each method's own; `compare` measures one method alone."""
    with tempfile.TemporaryDirectory(prefix="cherry-bench-") as tmp:
        cases = []
        for method in methods:
            (Path(tmp) / method).mkdir()
            settings = dict(steps=steps, warmup=warmup, threads=threads, device=device, new_tokens=new_tokens)
            cases.append(make_case(method, shape, str(Path(tmp) / method), **settings))
            write_case(cases[-1])
        cherry, trl = run_side("cherry", cases), run_side("trl", cases)
        results = [pair(case, c, t) for case, c, t in zip(cases, cherry, trl)]
        # Rows of different lengths: Cherry with its rows padded too (packing off), in the same invocation.
        varied = [i for i, case in enumerate(cases) if case.geometry.length_spread > 1 and not is_online(case.method)]
        if varied:
            padded = [replace(cases[i], extra={**cases[i].extra, "padded": True}) for i in varied]
            for i, row in zip(varied, run_side("cherry", padded)):
                results[i]["cherry_padded"] = row
                results[i]["packing_ratio"] = results[i]["cherry"]["tokens_per_s"] / row["tokens_per_s"]
    return results


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "datasets", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def report_lines(result: dict) -> list[str]:
    """The table `cherry bench METHOD --against trl` prints."""
    case, online = result["case"], is_online(result["method"])
    rate = result["rate"]
    unit = "completions/s" if online else "tokens/s"
    shape = SHAPES[result["shape"]]
    if online:
        what = f"{shape.batch} prompts x {shape.group} samples x {case['new_tokens']} new tokens"
    elif shape.length_spread > 1:
        what = (
            f"{shape.batch} rows of up to {shape.prompt_len} prompt + {shape.completion_len} completion tokens,"
            f" the shortest 1/{shape.length_spread} of the longest"
        )
    else:
        what = f"{shape.batch} rows of {shape.prompt_len} prompt + {shape.completion_len} completion tokens"
    lines = [
        f"{result['method'].upper()} vs TRL, shape {result['shape']} ({result['about']}): {what}; "
        f"{case['device']}, fp32, {case['threads']} thread(s), median of {case['steps']} steps after {case['warmup']} warm-up",
        f"{'side':13s} {unit:>14s} {'step s':>8s} {'rollout s':>10s} {'update s':>9s} {'peak GB':>8s} {'first loss':>12s}",
    ]
    for side in ("cherry", "cherry_padded", "trl"):
        if side not in result:
            continue
        row = result[side]
        loss = f"{row['first_loss']:.6f}" if row["first_loss"] is not None else "-"
        roll = f"{row['rollout_seconds']:10.3f}" if "rollout_seconds" in row else f"{'-':>10s}"
        upd = f"{row['update_seconds']:9.3f}" if "update_seconds" in row else f"{'-':>9s}"
        lines.append(
            f"{side:13s} {row[rate]:14.1f} {row['step_seconds']:8.3f} {roll} {upd} {row['peak_mem_gb']:8.3f} {loss:>12s}"
        )
    tail = (
        f"Cherry/TRL: {result['speed_ratio']:.2f}x the {unit}, {result['memory_ratio']:.2f}x the peak memory "
        f"({result['cherry']['memory']})"
    )
    if not online:
        verdict = "agree" if result["losses_agree"] else f"DISAGREE (tolerance {LOSS_TOLERANCE:g})"
        tail += f"; first-step losses {verdict}: |difference| {result['loss_abs_diff']:.2e}"
    lines.append(tail)
    if "packing_ratio" in result:
        lines.append(
            f"Cherry packed/padded: {result['packing_ratio']:.2f}x the {unit}"
            f" (first-step losses {result['cherry']['first_loss']:.6f}, {result['cherry_padded']['first_loss']:.6f})"
        )
    return lines


def preload_common() -> None:
    """What both sides load sooner or later (torch, transformers' trainer stack, datasets, peft), imported
    before either starts its clock, so that the memory each side reports is its run's, not its libraries'."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers.trainer  # noqa: F401
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM  # noqa: F401


def main(argv: list[str]) -> None:
    side, cases = argv[0], [Case(**fields) for fields in json.loads(argv[1])]
    import torch

    torch.set_num_threads(cases[0].threads)
    preload_common()
    results = []
    for case in cases:
        if side == "cherry":
            results.append(run_cherry(case))
        else:
            from benchmarks.training.trl_side import run_trl

            results.append(run_trl(case, StepClock))
    print(json.dumps(results))


if __name__ == "__main__":  # child-process entry: python -m benchmarks.training.against SIDE CASES_JSON
    main(sys.argv[1:])
