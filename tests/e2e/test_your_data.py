"""Data and rewards as users have them: every dataset type of TRL's format table, a directory in the
Hub's repository layout read by config and split, weighted mixtures, column maps, and reward
functions written for TRL (keyword columns, list-valued columns, async, message-list completions)."""

from __future__ import annotations

import json
import textwrap

import pytest

from engine.data import detect_format, load_rows, prepare
from engine.data.checks import check_run_data
from engine.data.sources import DataSource, load_split, spec_sources
from engine.errors import CherryError, DataError, SpecError
from engine.models import load_tokenizer
from engine.reporting import MemoryReporter
from engine.spec import build_spec, resolve_paths
from engine.train import train
from tests.conftest import write_jsonl


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def run_spec(model_dir, algorithm: str, **values):
    settings = dict(
        algorithm=algorithm,
        model=str(model_dir),
        batch_size=2,
        max_steps=1,
        max_length=48,
        max_prompt_length=24,
        eval_split=0.25,
        lr=1e-3,
        eval_steps=0,
        sample_steps=0,
        num_samples=2,
        kl_samples=2,
        save_steps=100,
        logging_steps=1,
        num_threads=1,
    )
    if algorithm in ("grpo", "rloo", "online_dpo"):
        settings.update(num_generations=2, max_new_tokens=4, rewards="length:3")
    settings.update(values)
    return build_spec(settings)


def trains(spec, out_dir) -> MemoryReporter:
    reporter = MemoryReporter()
    summary = train(spec, out_dir, reporter)
    assert summary["status"] == "completed" and summary["step"] == 1, summary
    return reporter


# TRL's dataset types: (name, standard row, conversational row, the formats Cherry detects, methods it serves).
def _u(i):
    return [user(f"q{i}")]


FORMAT_TABLE = [
    ("language_modeling", lambda i: {"text": f"the cat {i} sat"},
     lambda i: {"messages": _u(i) + [assistant("yo")]}, ("text", "messages"), ["sft"]),
    ("prompt_only", lambda i: {"prompt": f"say {i}:"}, lambda i: {"prompt": _u(i)}, ("prompt_only",) * 2, ["grpo"]),
    ("prompt_completion", lambda i: {"prompt": f"q{i}", "completion": "a"},
     lambda i: {"prompt": _u(i), "completion": [assistant("a")]}, ("sft",) * 2, ["sft", "grpo"]),
    ("preference_explicit", lambda i: {"prompt": f"q{i}", "chosen": "good", "rejected": "bad"},
     lambda i: {"prompt": _u(i), "chosen": [assistant("good")], "rejected": [assistant("bad")]},
     ("preference",) * 2, ["dpo", "rm"]),
    ("preference_implicit", lambda i: {"chosen": f"Q{i}: hi A: good", "rejected": f"Q{i}: hi A: bad"},
     lambda i: {"chosen": _u(i) + [assistant("good")], "rejected": _u(i) + [assistant("bad")]},
     ("preference_implicit",) * 2, ["dpo"]),
    ("unpaired_preference", lambda i: {"prompt": f"q{i}", "completion": "ok", "label": i % 2 == 0},
     lambda i: {"prompt": _u(i), "completion": [assistant("ok")], "label": i % 2 == 0}, ("unpaired",) * 2, ["kto"]),
]  # fmt: skip
CASES = [
    pytest.param(make, fmt, algorithm, id=f"{name}-{style}-{algorithm}")
    for name, standard, conversational, formats, methods in FORMAT_TABLE
    for style, make, fmt in (("standard", standard, formats[0]), ("conversational", conversational, formats[1]))
    for algorithm in methods
]


@pytest.mark.parametrize("make, fmt, algorithm", CASES)
def test_every_trl_dataset_type_trains_the_methods_it_serves(tiny_model_dir, tmp_path, make, fmt, algorithm):
    rows = [make(i) for i in range(8)]
    assert detect_format(rows) == (fmt, isinstance(next(iter(rows[0].values())), list))
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    reporter = trains(run_spec(tiny_model_dir, algorithm, dataset=str(data)), tmp_path / "run")
    if fmt == "text":  # no prompt: nothing to answer, so no greedy samples (and no generate on empty prompts)
        assert not [s for s in reporter.samples if "policy" in s]


# ----------------------------------------------------------------------------- the Hub's layout

README = """\
---
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: data/train_prefs-*
  - split: test_prefs
    path: data/test_prefs-*
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
# A dataset card
"""


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def hub_dir(tmp_path):
    """A dataset repository as the Hub lays it out: README configs, parquet files per split."""
    root = tmp_path / "ultrafeedback_like"
    pair = lambda i, tag: {  # noqa: E731
        "prompt": f"{tag}{i}",
        "chosen": [user(f"{tag}{i}"), assistant("good")],
        "rejected": [user(f"{tag}{i}"), assistant("bad")],
        "score_chosen": 8.0,
    }
    write_parquet(root / "data" / "train_prefs-00000-of-00001.parquet", [pair(i, "t") for i in range(10)])
    write_parquet(root / "data" / "test_prefs-00000-of-00001.parquet", [pair(i, "e") for i in range(3)])
    qa = lambda i: {"question": f"add {i} and 1", "answer": f"work #### {i + 1}", "tags": [i, i + 1]}  # noqa: E731
    write_parquet(root / "main" / "train-00000-of-00001.parquet", [qa(i) for i in range(8)])
    write_parquet(root / "main" / "test-00000-of-00001.parquet", [qa(i) for i in range(8, 11)])
    (root / "README.md").write_text(README)
    return root


def test_a_hub_layout_directory_loads_by_split_and_config_and_stays_arrow(hub_dir, tiny_model_dir, tmp_path):
    import datasets

    train_split = load_split(DataSource(str(hub_dir), split="train_prefs"), "train_prefs")
    assert isinstance(train_split, datasets.Dataset) and len(train_split) == 10  # memory-mapped, not dicts
    tok = load_tokenizer(str(tiny_model_dir))
    source = DataSource(str(hub_dir), split="train_prefs", test_split="test_prefs")
    data = prepare(source, tok, kind="preference", cache_dir=tmp_path / "cache")
    assert data.conversational and (data.stats["train"], data.stats["eval"]) == (10, 3)
    assert sorted(ex["prompt"] for ex in data.eval) == [f"<|user|>e{i}<|end|><|assistant|>" for i in range(3)]
    again = prepare(source, tok, kind="preference", cache_dir=tmp_path / "cache")
    assert again.cache_file is not None and list(again.train) == list(data.train)  # keyed on the data's fingerprint

    gsm8k_like = DataSource(str(hub_dir), config="main", split="test", column_map={"prompt": "question"})
    main = prepare(gsm8k_like, tok, kind="prompt", eval_split=0)
    assert [ex["columns"]["tags"] for ex in main.train] == [[8, 9], [9, 10], [10, 11]]  # lists stay lists

    with pytest.raises(DataError, match=r"has no split 'train'; its splits are: train_prefs, test_prefs"):
        load_split(DataSource(str(hub_dir)), "train")
    with pytest.raises(DataError, match=r"has no config 'mian'; its configs are: default, main"):
        load_split(DataSource(str(hub_dir), config="mian"), "train")
    assert len(load_rows(str(hub_dir), "train_prefs")) == 10  # the app's preview and `cherry score` read it too


def test_dpo_trains_on_a_hub_layout_directory_by_split(hub_dir, tiny_model_dir, tmp_path):
    spec = run_spec(
        tiny_model_dir,
        "dpo",
        dataset=str(hub_dir),
        dataset_train_split="train_prefs",
        dataset_test_split="test_prefs",
    )
    check_run_data(resolve_paths(spec), "preference")  # the first rows, streamed, pass the submit check
    reporter = trains(spec, tmp_path / "run")
    data_event = next(e for e in reporter.events if e["kind"] == "data")
    assert (data_event["train"], data_event["eval"]) == (10, 3)
    with pytest.raises(DataError, match="no split 'train'"):
        check_run_data(run_spec(tiny_model_dir, "dpo", dataset=str(hub_dir)), "preference")  # refused at submit


# ----------------------------------------------------------------------------- mixtures and column maps


def test_a_weighted_mixture_of_two_sources_with_a_column_map(tiny_model_dir, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "x", "rejected": "y"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"b{i}", "good": "x", "bad": "y"} for i in range(6)])
    mixture = {
        "datasets": [
            {"path": str(a), "weight": 0.5},
            {"path": str(b), "column_map": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
        ]
    }
    spec = run_spec(tiny_model_dir, "dpo", dataset_mixture=mixture, eval_split=0.5)
    tok = load_tokenizer(str(tiny_model_dir))
    first = prepare(spec_sources(spec), tok, kind="preference", eval_split=0.5, seed=3)
    second = prepare(spec_sources(spec), tok, kind="preference", eval_split=0.5, seed=3)
    assert [s["taken"] for s in first.sources] == [10, 6] and first.stats["rows"] == 16
    assert [ex["prompt"] for ex in first.train] == [ex["prompt"] for ex in second.train]  # seeded
    assert {ex["prompt"][0] for ex in first.eval} == {"a", "b"}  # each source holds out its own eval rows
    lines = first.source_lines()
    assert "weight 0.5: 10 of 20 rows" in lines[0] and "columns prompt <- question" in lines[1]

    reporter = trains(spec, tmp_path / "run")
    assert sum(e["message"].startswith("source ") for e in reporter.events) == 2  # the data report lists each


def test_mixture_and_column_map_mistakes_are_refused_naming_the_field(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "good": "x", "bad": "y"} for i in range(4)])
    for weight in (0, 1.5):
        with pytest.raises(SpecError, match=r"dataset_mixture.datasets\[0\].weight must be in \(0, 1\]"):
            run_spec(tiny_model_dir, "dpo", dataset_mixture={"datasets": [{"path": str(data), "weight": weight}]})
    with pytest.raises(SpecError, match="dataset and dataset_mixture are both set"):
        run_spec(tiny_model_dir, "dpo", dataset=str(data), dataset_mixture={"datasets": [{"path": str(data)}]})
    with pytest.raises(SpecError, match="dataset_test_split and eval_dataset both give the eval rows"):
        run_spec(tiny_model_dir, "dpo", dataset=str(data), dataset_test_split="test", eval_dataset=str(data))
    with pytest.raises(SpecError, match="column_map must map the standard column names"):
        run_spec(tiny_model_dir, "dpo", dataset=str(data), column_map="prompt:question")
    wrong = run_spec(tiny_model_dir, "dpo", dataset=str(data), column_map={"prompt": "query", "chosen": "good"})
    with pytest.raises(DataError, match="names the column 'query', which the data does not have"):
        check_run_data(resolve_paths(wrong), "preference")
    mapped = run_spec(
        tiny_model_dir, "dpo", dataset=str(data), column_map={"prompt": "question", "chosen": "good", "rejected": "bad"}
    )
    check_run_data(resolve_paths(mapped), "preference")
    trains(mapped, tmp_path / "run")


# ----------------------------------------------------------------------------- reward functions as TRL defines them

REWARDS = '''
import asyncio, json, time
from pathlib import Path

LOG = Path(__file__).with_suffix(".log")


def _log(**entry):
    with LOG.open("a") as f:
        f.write(json.dumps(entry) + "\\n")


def digits(completions, target, tags, step, **kwargs):
    """A verifier reading its own columns: `target` (a number) and `tags` (a list)."""
    _log(fn="digits", target=target, tags=tags, step=step, epoch=kwargs["epoch"], keys=sorted(kwargs))
    return [float(str(t) in c) for c, t in zip(completions, target)]


async def slow_a(prompts, completions, **kwargs):
    start = time.time()
    await asyncio.sleep(0.2)
    _log(fn="slow_a", start=start, end=time.time())
    return [0.5 for _ in completions]


async def slow_b(completions, **kwargs):
    start = time.time()
    await asyncio.sleep(0.2)
    _log(fn="slow_b", start=start, end=time.time())
    return [None if i % 2 else 1.0 for i in range(len(completions))]


def chat(prompts, completions, **kwargs):
    _log(fn="chat", prompt=prompts[0], completion=completions[0])
    return [float(len(c[0]["content"])) for c in completions]
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def logged(reward_file) -> list[dict]:
    return [json.loads(line) for line in reward_file.with_suffix(".log").read_text().splitlines()]


def test_grpo_with_trl_style_reward_functions(tiny_model_dir, tmp_path, reward_file):
    rows = [{"prompt": f"add {i}:", "target": i + 1, "tags": [i, "x"]} for i in range(8)]
    data = write_jsonl(tmp_path / "math.jsonl", rows)
    rewards = [f"{reward_file}:digits", f"{reward_file}:slow_a", f"{reward_file}:slow_b"]
    spec = run_spec(tiny_model_dir, "grpo", dataset=str(data), rewards=rewards, eval_steps=1)
    check_run_data(resolve_paths(spec), "prompt")
    reporter = trains(spec, tmp_path / "run")
    calls = logged(reward_file)
    digits = [c for c in calls if c["fn"] == "digits"]
    assert digits and all(isinstance(t, int) for c in digits for t in c["target"])  # values unchanged
    assert all(isinstance(tags, list) for c in digits for tags in c["tags"])  # lists stay lists
    assert digits[0]["step"] == 0 and digits[0]["epoch"] == 0.0 and "completion_ids" in digits[0]["keys"]
    a, b = next(c for c in calls if c["fn"] == "slow_a"), next(c for c in calls if c["fn"] == "slow_b")
    assert a["start"] < b["end"] and b["start"] < a["end"]  # async functions ran concurrently
    means = reporter.series("reward/slow_b/mean")
    assert means and means[0] == 1.0  # None = no reward from that function for the sample, not 0
    assert reporter.series("eval/reward")  # eval prompts carry the same columns as training


def test_eval_prompts_without_a_functions_column_skip_eval_reward(tiny_model_dir, tmp_path, reward_file):
    data = write_jsonl(tmp_path / "m.jsonl", [{"prompt": f"add {i}:", "target": i, "tags": []} for i in range(8)])
    other = write_jsonl(tmp_path / "e.jsonl", [{"prompt": f"e{i}:", "answer": "1"} for i in range(2)])
    spec = run_spec(tiny_model_dir, "grpo", dataset=str(data), eval_prompts=str(other), rewards=f"{reward_file}:digits")
    reporter = trains(spec, tmp_path / "run")
    assert any("no eval/reward: the eval prompts have no tags, target column" in e["message"] for e in reporter.events)
    assert reporter.series("reward/mean") and not reporter.series("eval/reward")


def test_conversational_prompts_and_completions_reach_reward_functions_as_messages(
    tiny_model_dir, tmp_path, reward_file
):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [user(f"say {i}")]} for i in range(8)])
    trains(run_spec(tiny_model_dir, "grpo", dataset=str(data), rewards=f"{reward_file}:chat"), tmp_path / "run")
    call = logged(reward_file)[0]
    assert call["prompt"] == [user(call["prompt"][0]["content"])]
    assert list(call["completion"][0]) == ["role", "content"] and call["completion"][0]["role"] == "assistant"


def test_reward_functions_are_checked_at_submit(tiny_model_dir, tmp_path, reward_file):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "answer": "1"} for i in range(4)])

    def submit(rewards):
        check_run_data(resolve_paths(run_spec(tiny_model_dir, "grpo", dataset=str(data), rewards=rewards)), "prompt")

    with pytest.raises(CherryError, match=r"reward '.*digits' needs the column\(s\) tags, target, which the data"):
        submit(f"{reward_file}:digits")
    with pytest.raises(CherryError, match="has no attribute 'nope'"):
        submit(f"{reward_file}:nope")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_cherry_xyz\n")
    with pytest.raises(CherryError, match="running .*broken.py failed"):
        submit(f"{broken}:f")
    submit([f"{reward_file}:slow_a", f"{reward_file}:chat", "exact_match"])


def test_reward_function_failures_name_the_function_and_sample(tiny_model_dir, tmp_path):
    from engine.rewards import build_reward

    path = tmp_path / "bad.py"
    path.write_text(
        textwrap.dedent(
            """
            def picky(completions, target, **kwargs):
                return [1.0 / t for t in target]

            def wrong_length(completions, **kwargs):
                return [1.0]

            def not_a_number(completions, **kwargs):
                return [float("nan")] * len(completions)

            def words(completions, **kwargs):
                return ["high"] * len(completions)
            """
        )
    )
    tok = load_tokenizer(str(tiny_model_dir))

    def score(name):
        reward = build_reward([f"{path}:{name}"], tokenizer=tok)
        reward(["p0", "p1", "p2"], ["a", "b", "c"], [[1]] * 3, [[2]] * 3, {"target": [1, 0, 2]})

    with pytest.raises(
        CherryError, match=r"reward '.*picky' raised ZeroDivisionError: .* \(on sample 1, prompt 'p1'\)"
    ):
        score("picky")
    with pytest.raises(CherryError, match=r"wrong_length' returned 1 scores for 3 completions"):
        score("wrong_length")
    with pytest.raises(CherryError, match=r"not_a_number' returned nan for completion 0; scores must be finite"):
        score("not_a_number")
    with pytest.raises(CherryError, match=r"words' returned 'high' \(str\) for completion 0"):
        score("words")
