"""`cherry bench start [--against trl]`: time from process start to the first optimizer step on a large
conversational preference file, Cherry cold (empty tokenised-data cache), Cherry warm (cache filled)
and TRL's DPOTrainer (its `datasets` cache empty, then filled), each in a fresh process.

The parent writes one case in a temporary directory, with no network: an UltraFeedback-shaped JSONL
file of N rows (a user prompt of 100-300 words, chosen and rejected assistant answers of 100-400
words, as chat-message lists), a BPE tokenizer trained on that text (about 1.3 tokens a word) with a
chat template, and a small random-init Llama. The model is small on purpose: what is measured is
start-up (imports, reading and tokenising the data or loading the cache, building the models and
the optimizer), not step speed. The clock starts just before the child process is spawned and stops
when the child's first optimizer step has ended (wall clock, the same machine).

Both sides: DPO (sigmoid), fp32 on the CPU, batch 4, max_length 1024 (max_prompt_length 512), the
same number of tokenising processes (Cherry's own choice for the row count), no evaluation, the
reference model a copy of the policy (each side's default when none is given).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SIDES = ("cherry-cold", "cherry-warm", "trl-cold", "trl-warm")
PROMPT_WORDS = (100, 300)
ANSWER_WORDS = (100, 400)
BATCH = 4
MAX_LENGTH = 1024
MAX_PROMPT_LENGTH = 512


@dataclass
class StartCase:
    dir: str
    rows: int
    seed: int = 0
    threads: int = 1
    num_proc: int = 1  # tokenising processes, both sides

    @property
    def data_file(self) -> str:
        return str(Path(self.dir) / "preferences.jsonl")

    @property
    def model_dir(self) -> str:
        return str(Path(self.dir) / "model")

    @property
    def cherry_cache(self) -> str:
        return str(Path(self.dir) / "cherry-cache")

    @property
    def datasets_cache(self) -> str:
        return str(Path(self.dir) / "hf-datasets-cache")


# --- the case: words, rows, tokenizer, model


def _vocabulary(rng, size: int = 3000) -> list[str]:
    """Pseudo-words of one to three syllables, so a trained BPE splits text as it splits English."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "ch", "th"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st"]
    words: set[str] = set()
    while len(words) < size:
        count = int(rng.integers(1, 4))
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(count)))
    return sorted(words)


class TextMaker:
    """Texts of a given word count drawn from a Zipf-like word distribution, with sentences."""

    def __init__(self, seed: int):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.words = np.array(_vocabulary(self.rng), dtype=object)
        weights = 1.0 / np.arange(1, len(self.words) + 1)
        self.p = weights / weights.sum()

    def text(self, low: int, high: int) -> str:
        n = int(self.rng.integers(low, high + 1))
        words = self.rng.choice(self.words, size=n, p=self.p)
        ends = self.rng.integers(8, 20)  # a sentence ends every 8-19 words
        sentences = [" ".join(words[i : i + ends]) for i in range(0, n, ends)]
        return ". ".join(s[:1].upper() + s[1:] for s in sentences) + "."


def preference_rows(rows: int, seed: int):
    """UltraFeedback-shaped rows: a one-turn user prompt, a chosen and a rejected assistant answer."""
    maker = TextMaker(seed)
    for _ in range(rows):
        yield {
            "prompt": [{"role": "user", "content": maker.text(*PROMPT_WORDS)}],
            "chosen": [{"role": "assistant", "content": maker.text(*ANSWER_WORDS)}],
            "rejected": [{"role": "assistant", "content": maker.text(*ANSWER_WORDS)}],
        }


def train_tokenizer(texts, vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on `texts`, with the demo's specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.demo.tokenizer import CHAT_TEMPLATE, EOS, PAD, SPECIALS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="right")
    fast.model_max_length = MAX_LENGTH
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_case(case: StartCase) -> None:
    from transformers.utils import logging as hf_logging

    from benchmarks.training.against import Shape, build_model

    hf_logging.disable_progress_bar()  # save_pretrained's bar would land in `--json` output

    sample: list[str] = []
    with open(case.data_file, "w") as f:
        for i, row in enumerate(preference_rows(case.rows, case.seed)):
            f.write(json.dumps(row) + "\n")
            if i < 1000:
                sample += [row["prompt"][0]["content"], row["chosen"][0]["content"], row["rejected"][0]["content"]]
    tokenizer = train_tokenizer(sample)
    shape = Shape("llama", len(tokenizer), 64, 2, 2, 2, 128, False, BATCH, 0, 0, 0, (), "start-up")
    build_model(shape, case.seed, tokenizer).save_pretrained(case.model_dir)
    tokenizer.save_pretrained(case.model_dir)


# --- the children: each stamps the wall-clock time its first optimizer step ended


def cherry_spec(case: StartCase):
    from engine.spec import build_spec

    return build_spec(
        dict(
            algorithm="dpo",
            model=case.model_dir,
            dataset=case.data_file,
            dtype="fp32",
            device="cpu",
            num_threads=case.threads,
            seed=case.seed,
            batch_size=BATCH,
            grad_accum=1,
            max_steps=1,
            lr=1e-6,
            lr_scheduler="constant",
            warmup_ratio=0.0,
            max_length=MAX_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH,
            beta=0.1,
            loss_type="sigmoid",
            eval_split=0.0,
            eval_steps=0,
            sample_steps=0,
            num_samples=0,
            kl_samples=0,
            save_steps=0,
            logging_steps=1,
            precompute_ref_logps=False,
        )
    )


def run_cherry(case: StartCase) -> dict:
    marks = {"imported": time.time()}  # engine.train and its stack are imported below, inside the clock
    from engine.train import train

    marks["engine_imported"] = time.time()

    class Hook:
        """A Reporter that stamps when the data was ready, the loop started and the first step ended."""

        def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
            if "train/loss" in metrics:
                marks.setdefault("first_step", time.time())

        def log_samples(self, step, samples) -> None:
            pass

        def log_event(self, kind, message, **data) -> None:
            if kind in ("data", "start"):
                marks.setdefault(kind, time.time())
            if "loaded from the cache" in message:
                marks["cache_hit"] = True

        def rewind(self, step) -> None:
            pass

    with tempfile.TemporaryDirectory() as out_dir:
        train(cherry_spec(case), out_dir, reporter=Hook(), cache_dir=case.cherry_cache)
    return marks


def run_trl(case: StartCase) -> dict:
    marks = {"imported": time.time()}
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    marks["engine_imported"] = time.time()
    torch.set_num_threads(case.threads)
    tokenizer = AutoTokenizer.from_pretrained(case.model_dir)
    model = AutoModelForCausalLM.from_pretrained(case.model_dir, dtype=torch.float32)
    dataset = load_dataset("json", data_files=case.data_file, split="train")
    marks["data"] = time.time()

    class FirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.setdefault("start", time.time())

        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("first_step", time.time())

    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=BATCH,
            max_steps=1,
            learning_rate=1e-6,
            lr_scheduler_type="constant",
            beta=0.1,
            loss_type=["sigmoid"],
            max_length=MAX_LENGTH,
            dataset_num_proc=case.num_proc if case.num_proc > 1 else None,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            seed=case.seed,
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(model, None, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainer.add_callback(FirstStep())
        trainer.train()
    return marks


def run_side(side: str, case: StartCase) -> dict:
    """One side in a fresh process: seconds from spawning it to its first step's end, and its marks."""
    env = {**os.environ, "OMP_NUM_THREADS": str(case.threads), "HF_DATASETS_CACHE": case.datasets_cache}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    command = [sys.executable, "-m", "benchmarks.training.start", side.split("-")[0], json.dumps(asdict(case))]
    spawned = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the {side} side of `bench start` failed:\n{proc.stderr[-3000:]}")
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    if "first_step" not in marks:
        raise RuntimeError(f"the {side} side of `bench start` ended without a training step")
    out = {"first_step_s": marks["first_step"] - spawned, "cache_hit": bool(marks.get("cache_hit"))}
    # Where the time went: interpreter start, imports, data (load + tokenise, or the cache), set-up, step 1.
    phases = [("python", "imported"), ("imports", "engine_imported"), ("to_data", "data"), ("to_loop", "start")]
    previous = spawned
    for name, mark in phases:
        if mark in marks:
            out[f"{name}_s"] = marks[mark] - previous
            previous = marks[mark]
    out["first_step_only_s"] = marks["first_step"] - previous
    return out


def compare_start(
    rows: int, *, against_trl: bool, threads: int = 1, seed: int = 0, directory: str | None = None
) -> dict:
    """Write the case, then time Cherry cold, Cherry warm and (with `against_trl`) TRL cold and warm."""
    from engine.data.prepare import tokenise_processes

    with tempfile.TemporaryDirectory(prefix="cherry-bench-start-", dir=directory) as tmp:
        case = StartCase(dir=tmp, rows=rows, seed=seed, threads=threads, num_proc=tokenise_processes(rows))
        started = time.time()
        write_case(case)
        sides = [s for s in SIDES if against_trl or s.startswith("cherry")]
        results = {side: run_side(side, case) for side in sides}
        size_mb = Path(case.data_file).stat().st_size / 2**20
    out = {
        "rows": rows,
        "file_mb": size_mb,
        "case_seconds": time.time() - started,
        "threads": threads,
        "num_proc": case.num_proc,
        "sides": results,
    }
    if not results["cherry-warm"]["cache_hit"] or results["cherry-cold"]["cache_hit"]:
        raise RuntimeError("cherry bench start: the warm run did not load the cache the cold run wrote")
    if against_trl:
        out["cold_vs_trl"] = results["cherry-cold"]["first_step_s"] / results["trl-cold"]["first_step_s"]
        out["warm_vs_trl"] = results["cherry-warm"]["first_step_s"] / results["trl-cold"]["first_step_s"]
    return out


def report_lines(result: dict) -> list[str]:
    lines = [
        f"Time to the first DPO step: {result['rows']:,} conversational preference rows ({result['file_mb']:.0f} MB "
        f"JSONL), a small Llama, CPU, {result['threads']} thread(s), {result['num_proc']} tokenising process(es); "
        "each side a fresh process",
        "phases (s): python = interpreter start; imports = torch, transformers (and TRL); load = tokenizer, models "
        "and data (Cherry: tokenised or from the cache; TRL: the JSON file read); set-up = until the loop starts "
        "(TRL: its tokenising); step 1 = the first optimizer step",
        f"{'side':12s} {'first step s':>12s} {'python':>7s} {'imports':>8s} {'load':>7s} {'set-up':>7s} {'step 1':>7s}",
    ]
    for side, row in result["sides"].items():
        cells = [f"{row.get(k, float('nan')):7.2f}" for k in ("python_s", "imports_s", "to_data_s", "to_loop_s")]
        lines.append(
            f"{side:12s} {row['first_step_s']:12.2f} {cells[0]} {cells[1]:>8s} {cells[2]} {cells[3]} "
            f"{row['first_step_only_s']:7.2f}"
        )
    if "cold_vs_trl" in result:
        lines.append(
            f"Cherry/TRL time to the first step: cold {result['cold_vs_trl']:.2f}x, warm {result['warm_vs_trl']:.2f}x "
            "(TRL cold: its datasets cache empty; below 1 is faster)"
        )
    return lines


def main(argv: list[str]) -> None:
    side, case = argv[0], StartCase(**json.loads(argv[1]))
    marks = run_cherry(case) if side == "cherry" else run_trl(case)
    print(json.dumps(marks))


if __name__ == "__main__":  # child-process entry: python -m benchmarks.training.start cherry|trl CASE_JSON
    main(sys.argv[1:])
