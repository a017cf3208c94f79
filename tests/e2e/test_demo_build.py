"""The embedded demo: tokenizer, task generators, verifier, generation, and the committed assets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.demo.tasks import make_tasks, task_of
from engine.demo.tokenizer import build_tokenizer
from engine.generation import decode_completions, generate
from engine.rewards import exact_match

torch.set_num_threads(1)

DEMO = Path(__file__).resolve().parents[2] / "presets" / "demo"
COLUMNS = {
    "sft.jsonl": {"prompt", "completion"},
    "pairs.jsonl": {"prompt", "chosen", "rejected"},
    "unpaired.jsonl": {"prompt", "completion", "label"},
    "prompts.jsonl": {"prompt", "answer"},
    "eval.jsonl": {"prompt", "answer"},
}


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def gold(prompt: str) -> str:
    if task_of(prompt) == "reverse":
        return prompt.removeprefix("reverse: ")[::-1]
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_bytes_round_trip(tok):
    text = "37+48= reverse: garden — héllo wörld 🍒\n\ttabs & \x00 nul"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))  # one token per byte, id == byte value
    assert tok.decode(ids) == text
    assert len(tok) == 261
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.padding_side == "right"
    for special in ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]:
        assert tok.convert_tokens_to_ids(special) >= 256


def test_chat_template_prefix_property(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "37+48="}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "85"}], tokenize=False)
    assert prompt == "<|system|>be brief<|end|><|user|>37+48=<|end|><|assistant|>"
    assert full.startswith(prompt) and full[len(prompt) :] == "85<|end|>"
    p_ids = tok.encode(prompt, add_special_tokens=False)
    f_ids = tok.encode(full, add_special_tokens=False)
    assert f_ids[: len(p_ids)] == p_ids
    assert f_ids[len(p_ids) :] == [ord("8"), ord("5"), tok.eos_token_id]


def test_tokenizer_save_load_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").exists()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "reverse: ñandú 🍒"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.padding_side) == (
        tok.eos_token_id,
        tok.pad_token_id,
        "right",
    )
    messages = [{"role": "user", "content": "12+34="}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


# ----------------------------------------------------------------------------- tasks, reward


def test_tasks_seeded_correct_and_disjoint():
    a, b = make_tasks(300, seed=7), make_tasks(300, seed=7)
    assert a == b
    assert a != make_tasks(300, seed=8)
    assert len({t["prompt"] for t in a}) == 300
    assert {t["task"] for t in a} == {"addition", "reverse"}
    for t in a:
        assert t["answer"] == gold(t["prompt"]) and task_of(t["prompt"]) == t["task"]
        if t["task"] == "reverse":
            word = t["prompt"].removeprefix("reverse: ")
            assert 3 <= len(word) <= 6 and word.isalpha() and word.islower()
        else:
            x, y = t["prompt"].rstrip("=").split("+")
            assert 10 <= int(x) <= 99 and 10 <= int(y) <= 99
    held_out = {t["prompt"] for t in a}
    train = make_tasks(2000, seed=8, exclude=held_out)
    assert not held_out & {t["prompt"] for t in train}


def test_exact_match():
    assert exact_match("85", "85") == 1.0
    assert exact_match(" 85\n", "85") == 1.0
    assert exact_match("85", " 85 ") == 1.0
    assert exact_match("58", "85") == 0.0
    assert exact_match("850", "85") == 0.0
    assert exact_match("", "85") == 0.0
    assert exact_match("Nedrag", "nedrag") == 0.0


# ----------------------------------------------------------------------------- generation


def _tiny_model(tok, eos_scale: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # make EOS likely enough that some rows stop early and others run out
        model.lm_head.weight[tok.eos_token_id] *= eos_scale
    return model


def _greedy_one(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_generate_greedy_matches_unpadded_loop(tok):
    model = _tiny_model(tok, eos_scale=2.0)
    model.train()
    texts = ["a", "hello there", "37+48=", "reverse: garden", "xyz", "é", "<|user|>12+3=<|end|><|assistant|>"]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    got = generate(model, tok, prompts, max_new_tokens=10, batch_size=4)  # two batches, mixed lengths
    expected = [_greedy_one(model, p, 10, tok.eos_token_id) for p in prompts]
    assert got == expected
    assert any(len(g) < 10 for g in got) and any(len(g) == 10 for g in got)  # some stopped at EOS
    assert all(tok.eos_token_id not in g for g in got)
    assert model.training  # mode restored
    texts_out = decode_completions(tok, got)
    assert len(texts_out) == len(prompts) and all(isinstance(t, str) for t in texts_out)


def test_generate_sampling_seeded(tok):
    model = _tiny_model(tok, eos_scale=2.0).eval()
    prompts = [tok.encode(t, add_special_tokens=False) for t in ["37+48=", "reverse: abc", "q"]]
    torch.manual_seed(3)
    a = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(3)
    b = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert a == b and all(len(x) <= 8 for x in a)
    assert not model.training  # eval mode kept


def test_build_demo_tiny(tmp_path):
    from engine.demo.build import DemoConfig, build_demo

    cfg = DemoConfig(
        n_eval=12,
        n_sft_pool=64,
        n_sft=10,
        n_pairs=10,
        n_unpaired=10,
        n_prompts=10,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        batch_size=8,
        eval_every=2,
        max_steps=4,
        sample_tries=2,
    )
    lines: list[str] = []
    info = build_demo(tmp_path / "d", seed=1, log=lines.append, cfg=cfg)
    assert lines and info["sft"]["steps"] == 4 and info["datasets"]["pairs.jsonl"] == 10
    for name, cols in COLUMNS.items():
        rows = read_jsonl(tmp_path / "d" / name)
        assert rows and set(rows[0]) == cols
    assert (tmp_path / "d" / "model" / "model.safetensors").exists()
    assert json.loads((tmp_path / "d" / "info.json").read_text()) == info
    for row in read_jsonl(tmp_path / "d" / "pairs.jsonl"):
        answer = gold(row["prompt"][0]["content"])
        assert exact_match(row["rejected"][0]["content"], answer) == 0.0
        assert exact_match(row["chosen"][0]["content"], answer) == 1.0


# ----------------------------------------------------------------------------- committed demo


@pytest.fixture(scope="module")
def info():
    return json.loads((DEMO / "info.json").read_text())


def test_demo_model_reproduces_recorded_accuracy(info):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.loop.evaluation import exact_match_accuracy

    tok = AutoTokenizer.from_pretrained(DEMO / "model")
    model = AutoModelForCausalLM.from_pretrained(DEMO / "model")
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    rows = read_jsonl(DEMO / "eval.jsonl")
    from engine.data import prepare
    from engine.demo.build import MAX_TOKENS

    examples = prepare(
        rows, tok, kind="prompt", max_length=MAX_TOKENS, max_prompt_length=MAX_TOKENS - 1, eval_split=0.0
    ).train
    result = exact_match_accuracy(model, tok, examples)
    assert result["accuracy"] == pytest.approx(info["held_out_accuracy"], abs=0.02)
    assert 0.2 <= result["accuracy"] <= 0.7
    for kind, recorded in info["held_out_accuracy_per_task"].items():
        flags = [ok for ok, r in zip(result["correct"], rows) if task_of(r["prompt"][0]["content"]) == kind]
        assert sum(flags) / len(flags) == pytest.approx(recorded, abs=0.04)


def test_demo_datasets(info):

    data = {name: read_jsonl(DEMO / name) for name in COLUMNS}
    for name, rows in data.items():
        assert len(rows) == info["datasets"][name]
        for row in rows:
            assert set(row) == COLUMNS[name], name
            assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
    eval_prompts = {r["prompt"][0]["content"] for r in data["eval.jsonl"]}
    assert len(eval_prompts) == len(data["eval.jsonl"])
    for name in ("sft.jsonl", "pairs.jsonl", "unpaired.jsonl", "prompts.jsonl"):
        assert not eval_prompts & {r["prompt"][0]["content"] for r in data[name]}, name
    for name in ("eval.jsonl", "prompts.jsonl"):
        assert all(r["answer"] == gold(r["prompt"][0]["content"]) for r in data[name])
    for r in data["sft.jsonl"]:
        assert r["completion"] == [{"role": "assistant", "content": gold(r["prompt"][0]["content"])}]
    for r in data["pairs.jsonl"]:
        answer = gold(r["prompt"][0]["content"])
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert chosen != rejected
        assert exact_match(chosen, answer) == 1.0 and exact_match(rejected, answer) == 0.0
    labels = [r["label"] for r in data["unpaired.jsonl"]]
    assert all(isinstance(x, bool) for x in labels) and 0 < sum(labels) < len(labels)
    assert sum(labels) == info["unpaired_true"]
    for r in data["unpaired.jsonl"]:
        assert r["label"] == (exact_match(r["completion"][0]["content"], gold(r["prompt"][0]["content"])) == 1.0)
