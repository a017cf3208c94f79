"""engine.data: loading, format detection, normalisation, tokenisation, truncation and splits.

Everything is local: a byte-level tokenizer built in memory (one token per ASCII character, plus
specials) and small files written under tmp_path.
"""

from __future__ import annotations

import json

import pytest

from engine import data
from engine.data import FORMATS, KIND_OF_FORMAT, PRESETS_FOR_KIND, detect_format, load_rows, prepare
from engine.data.normalise import split_implicit
from engine.errors import DataError, SpecError

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def build_tokenizer(chat_template: str | None = TEMPLATE, eos: str = "</s>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def enc(tok):
    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    return encode


@pytest.fixture(scope="module")
def BOS(tok):
    return tok.bos_token_id


@pytest.fixture(scope="module")
def EOS(tok):
    return tok.eos_token_id


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def message_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, "errors are one line"
    return msg


# ----------------------------------------------------------------------------------------------
# Tokenizer sanity (the rest of the file relies on one token per ASCII character)


def test_tokenizer_fixture_is_byte_level_with_bos(tok, enc, BOS, EOS):
    assert enc("abc") == [64, 65, 66]
    assert tok("abc")["input_ids"] == [BOS, 64, 65, 66]
    assert enc("x</s>")[-1] == EOS
    assert tok.apply_chat_template([user("hi")], tokenize=False, add_generation_prompt=True) == (
        "<|user|>hi<|end|><|assistant|>"
    )


# ----------------------------------------------------------------------------------------------
# Loading


def write_rows(rows: list[dict], tmp_path, kind: str) -> str:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    elif kind == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "json_lines_in_json":
        path = tmp_path / "data.json"
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    elif kind == "csv":
        path = tmp_path / "data.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == "tsv":
        path = tmp_path / "data.tsv"
        pd.DataFrame(rows).to_csv(path, index=False, sep="\t")
    elif kind == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "saved":
        import datasets

        datasets.disable_progress_bars()
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "saved_dict":
        import datasets

        datasets.disable_progress_bars()
        path = tmp_path / "saved_dict"
        ds = datasets.Dataset.from_list(rows)
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return str(path)


FILE_KINDS = ["jsonl", "json", "json_lines_in_json", "csv", "tsv", "parquet", "saved", "saved_dict"]


@pytest.mark.parametrize("file_kind", FILE_KINDS)
def test_load_rows_reads_every_file_type_as_plain_python(tmp_path, file_kind):
    rows = [
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": 'say "hi",\nplease', "completion": "héllo\u2028world", "label": False},
    ]
    loaded = load_rows(write_rows(rows, tmp_path, file_kind))
    assert loaded == rows
    assert all(type(r) is dict and type(r["label"]) is bool for r in loaded)


def test_load_rows_conversational_parquet_and_saved_dir_give_plain_lists(tmp_path):
    rows = [{"messages": [user("hi"), assistant("yo")]}, {"messages": [user("a"), assistant("b")]}]
    for kind in ("parquet", "saved"):
        loaded = load_rows(write_rows(rows, tmp_path, kind))
        assert loaded == rows
        assert type(loaded[0]["messages"]) is list and type(loaded[0]["messages"][0]) is dict


def test_load_rows_saved_dataset_dict_picks_split(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    path = write_rows(rows, tmp_path, "saved_dict")
    assert load_rows(path) == rows
    assert load_rows(path, split="test") == [{"text": "a"}]
    with pytest.raises(DataError) as err:
        load_rows(path, split="validation")
    assert "no split 'validation'" in message_error(err) and "train, test" in str(err.value)


def test_load_rows_directory_with_one_data_file(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    (tmp_path / "test.jsonl").write_text('{"text": "b"}\n', encoding="utf-8")
    assert load_rows(str(tmp_path)) == [{"text": "a"}]
    assert load_rows(str(tmp_path), split="test") == [{"text": "b"}]


def test_load_rows_max_rows(tmp_path):
    rows = [{"text": str(i)} for i in range(10)]
    assert load_rows(write_rows(rows, tmp_path, "jsonl"), max_rows=3) == rows[:3]
    assert load_rows(write_rows(rows, tmp_path, "saved"), max_rows=2) == rows[:2]


def test_csv_missing_values_become_none_and_label_cells_become_booleans(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,label,answer,margin\nhi,,1,42,\nyo,x,FALSE,,2.5\n", encoding="utf-8")
    assert load_rows(str(path)) == [
        {"prompt": "hi", "completion": None, "label": True, "answer": "42", "margin": None},
        {"prompt": "yo", "completion": "x", "label": False, "answer": None, "margin": 2.5},
    ]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_text_columns_are_text_even_when_they_look_like_numbers(tmp_path, tok, suffix, sep):
    """The issue's file: answers to sums are numbers to pandas, text to the user (and the tokenizer)."""
    path = tmp_path / f"sums{suffix}"
    lines = ["prompt,chosen,rejected", "12+53=,65,75", "1+1=,02,2.0", "NA?,NA,null"]
    path.write_text("".join(line.replace(",", sep) + "\n" for line in lines), encoding="utf-8")
    assert load_rows(str(path))[:2] == [
        {"prompt": "12+53=", "chosen": "65", "rejected": "75"},
        {"prompt": "1+1=", "chosen": "02", "rejected": "2.0"},
    ]
    out = prepare(str(path), tok, kind="preference", eval_split=0)
    assert [(ex["prompt"], ex["chosen"], ex["rejected"]) for ex in out.train] == [
        ("12+53=", "65", "75"),
        ("1+1=", "02", "2.0"),
        ("NA?", "NA", "null"),
    ]


def test_a_json_number_in_a_text_column_stays_an_error(tmp_path, tok):
    """JSON says what type a value is, so a number where text belongs is the file's mistake."""
    path = tmp_path / "sums.jsonl"
    path.write_text('{"prompt": "12+53=", "chosen": 65, "rejected": "75"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare(str(path), tok, kind="preference", eval_split=0)
    assert "column 'chosen' holds int 65; expected a string" in message_error(err)


def test_a_csv_label_that_is_not_a_boolean_is_named(tmp_path, tok):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\n2+2=,4,maybe\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare(str(path), tok, kind="unpaired", eval_split=0)
    assert "'label' must be a boolean (true/false, or 0/1), got str 'maybe'" in message_error(err)


@pytest.mark.parametrize("source", ["./nope.jsonl", "/tmp/cherry-missing-dir/missing.jsonl", "data/sub/x.parquet"])
def test_missing_local_file_says_it_does_not_exist(source):
    with pytest.raises(DataError) as err:
        load_rows(source)
    assert message_error(err).startswith(f"dataset file {source} does not exist")


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert f"{path} line 3 is not valid JSON" in message_error(err)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert message_error(err) == f"{path} line 2 is a JSON list, not an object of columns"


def test_corrupt_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert f"{path} is not valid JSON (line 3 column" in message_error(err)


def test_json_lines_in_json_file_with_bad_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{oops}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert f"{path} line 3 is not valid JSON" in message_error(err)


def test_corrupt_parquet_and_unsupported_type(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as err:
        load_rows(str(bad))
    assert message_error(err).startswith(f"{bad} is not a readable Parquet file")
    txt = tmp_path / "data.txt"
    txt.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(str(txt))
    assert "unsupported file type '.txt'" in message_error(err)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert "is not UTF-8 text" in message_error(err)


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert message_error(err) == f"dataset {path} is empty (no rows); give a dataset with at least one row"


def test_empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        load_rows(str(path))


def test_hub_failure_is_wrapped(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_rows("someone/some-dataset")
    msg = message_error(err)
    assert "could not load 'someone/some-dataset' (split 'train') as a Hugging Face hub dataset" in msg
    assert "ConnectionError: Couldn't reach the Hugging Face Hub" in msg
    assert "pass a local .jsonl/.json/.parquet/.csv file" in msg


def test_hub_success_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(source, split):
        calls.append((source, split))
        return datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}, {"text": "c"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rows("org/name", split="test", max_rows=2) == [{"text": "a"}, {"text": "b"}]
    assert calls == [("org/name", "test")]


# ----------------------------------------------------------------------------------------------
# Every format from every file type

PLAIN_CASES = {
    "preference": (
        [
            {"prompt": "Q1", "chosen": "good", "rejected": "bad", "extra": 7},
            {"prompt": "Q2", "chosen": "yes", "rejected": "no", "extra": 8},
        ],
        [{"prompt": "Q1", "chosen": "good", "rejected": "bad"}, {"prompt": "Q2", "chosen": "yes", "rejected": "no"}],
    ),
    "preference_implicit": (
        [
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
            {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
        ],
        [
            {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello there", "rejected": " Go away"},
            {"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"},
        ],
    ),
    "unpaired": (
        [{"prompt": "Q1", "completion": "good", "label": True}, {"prompt": "Q2", "completion": "bad", "label": False}],
        [{"prompt": "Q1", "completion": "good", "label": True}, {"prompt": "Q2", "completion": "bad", "label": False}],
    ),
    "sft": (
        [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": "A2"}],
        [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": "A2"}],
    ),
    "messages": (
        [
            {"messages": [user("hi"), assistant("yo")]},
            {
                "messages": [
                    {"role": "system", "content": "be nice"},
                    user("a"),
                    assistant("b"),
                    user("c"),
                    assistant("d"),
                ]
            },
        ],
        [
            {"prompt": "<|user|>hi<|end|><|assistant|>", "completion": "yo<|end|>"},
            # SFT on a conversation: the completion runs from the first assistant turn (only its
            # assistant turns carry loss: see test_multi_turn_sft_masks_every_assistant_turn)
            {
                "prompt": "<|system|>be nice<|end|><|user|>a<|end|><|assistant|>",
                "completion": "b<|end|><|user|>c<|end|><|assistant|>d<|end|>",
            },
        ],
    ),
    "text": (
        [{"text": "hello world"}, {"text": "second"}],
        [{"prompt": "", "completion": "hello world"}, {"prompt": "", "completion": "second"}],
    ),
    "prompt_only": (
        [{"prompt": "2+2=", "answer": "4"}, {"prompt": "3+3=", "answer": "6"}],
        [{"prompt": "2+2=", "answer": "4"}, {"prompt": "3+3=", "answer": "6"}],
    ),
}


def test_cases_cover_every_format():
    assert set(PLAIN_CASES) == set(FORMATS) == set(KIND_OF_FORMAT)


@pytest.mark.parametrize(
    "fmt, file_kind",
    [
        (fmt, kind)
        for fmt in PLAIN_CASES
        for kind in ("jsonl", "json", "csv", "tsv", "parquet", "saved")
        if not (fmt == "messages" and kind in ("csv", "tsv"))
    ],  # CSV cells cannot hold message lists
)
def test_every_format_from_every_file_type(tmp_path, tok, fmt, file_kind):
    rows, expected = PLAIN_CASES[fmt]
    path = write_rows(rows, tmp_path, file_kind)
    kind = KIND_OF_FORMAT[fmt]
    out = prepare(path, tok, kind=kind, eval_split=0)
    assert (out.format, out.conversational) == (fmt, fmt == "messages")
    text_keys = {
        "preference": ("prompt", "chosen", "rejected"),
        "unpaired": ("prompt", "completion", "label"),
        "sft": ("prompt", "completion"),
        "prompt": ("prompt", "answer"),
    }[kind]
    assert [{k: ex[k] for k in text_keys} for ex in out.train] == expected
    assert [ex["index"] for ex in out.train] == [0, 1]
    assert out.eval == []
    assert out.stats == {
        "rows": 2,
        "kept": 2,
        "dropped_empty": 0,
        "dropped_identical": 0,
        "dropped_overlong": 0,
        "truncated": 0,
        "train": 2,
        "eval": 0,
    }


# ----------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, ("preference", False)),
        ({"prompt": [user("p")], "chosen": [assistant("c")], "rejected": [assistant("r")]}, ("preference", True)),
        (
            {"prompt": "p", "chosen": [user("p"), assistant("c")], "rejected": [user("p"), assistant("r")]},
            ("preference", True),
        ),
        ({"chosen": "Human: hi Assistant: a", "rejected": "Human: hi Assistant: b"}, ("preference_implicit", False)),
        (
            {"chosen": [user("hi"), assistant("a")], "rejected": [user("hi"), assistant("b")]},
            ("preference_implicit", True),
        ),
        ({"prompt": "p", "completion": "c", "label": False}, ("unpaired", False)),
        ({"prompt": [user("p")], "completion": [assistant("c")], "label": 1}, ("unpaired", True)),
        ({"prompt": "p", "completion": "c"}, ("sft", False)),
        ({"prompt": [user("p")], "completion": [assistant("c")]}, ("sft", True)),
        ({"messages": [user("p"), assistant("c")], "id": 3}, ("messages", True)),
        ({"text": "t", "meta": {"a": 1}}, ("text", False)),
        ({"prompt": "p"}, ("prompt_only", False)),
        ({"prompt": [user("p")], "answer": "a"}, ("prompt_only", True)),
    ],
)
def test_detect_format(row, expected):
    assert detect_format([row]) == expected


def test_misnamed_column_lists_found_columns_expected_formats_and_suggestion():
    rows = [{"question": "What is 2+2?", "chosen": "4", "rejected": "5"}]
    with pytest.raises(DataError) as err:
        detect_format(rows)
    msg = message_error(err)
    assert "no known dataset format matches the columns found: question, chosen, rejected" in msg
    assert "did you mean 'prompt' instead of 'question'?" in msg
    for name, cols in data.FORMAT_COLUMNS.items():
        assert f"{name} ({', '.join(cols)}" in msg
    assert "preference (prompt, chosen, rejected)" in msg


def test_question_column_blocks_implicit_detection_even_with_a_shared_prefix():
    rows = [{"question": "q", "chosen": "The answer is 4", "rejected": "The answer is 5"}]
    with pytest.raises(DataError, match="did you mean 'prompt' instead of 'question'"):
        detect_format(rows)


def test_chosen_rejected_without_shared_prefix_is_not_implicit():
    with pytest.raises(DataError) as err:
        detect_format([{"chosen": "4", "rejected": "5"}])
    msg = message_error(err)
    assert "share no prompt prefix" in msg and "did you mean" not in msg


def test_unknown_columns_and_typo_suggestions():
    with pytest.raises(DataError) as err:
        detect_format([{"foo": 1, "bar": 2}])
    msg = message_error(err)
    assert msg.startswith(
        "no known dataset format matches the columns found: foo, bar. Expected the columns of one of:"
    )
    with pytest.raises(DataError) as err:
        detect_format([{"promt": "p", "completions": "c"}])
    assert "did you mean 'prompt' instead of 'promt', 'completion' instead of 'completions'?" in str(err.value)
    with pytest.raises(DataError) as err:
        detect_format([{"conversations": [user("a")]}])
    assert "did you mean 'messages' instead of 'conversations'?" in str(err.value)


def test_wrong_value_type_names_column_and_row():
    with pytest.raises(DataError) as err:
        detect_format([{"prompt": "p", "chosen": 3, "rejected": "r"}])
    assert message_error(err) == (
        "row 0: column 'chosen' holds int 3; expected a string or a list of {role, content} messages"
    )
    with pytest.raises(DataError, match="column 'messages' holds str 'hi'; expected a list of"):
        detect_format([{"messages": "hi"}])
    with pytest.raises(DataError, match=r"row 1: column 'completion' holds list \['a'\]"):
        prepare(
            [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ["a"]}], build_tokenizer(), kind="sft"
        )


# ----------------------------------------------------------------------------------------------
# Normalisation: implicit prompts, conversational rendering, token ids


def test_plain_preference_ids(tok, enc, BOS, EOS):
    out = prepare([{"prompt": "Q: hi", "chosen": " yes", "rejected": " no"}], tok, kind="preference", eval_split=0)
    ex = out.train[0]
    assert ex == {
        "index": 0,
        "prompt_ids": [BOS] + enc("Q: hi"),
        "chosen_ids": enc(" yes") + [EOS],
        "rejected_ids": enc(" no") + [EOS],
        "prompt": "Q: hi",
        "chosen": " yes",
        "rejected": " no",
        "margin": None,
        "messages": None,
    }
    # tokenised separately: ids are the concatenation, not the joint tokenisation
    assert ex["prompt_ids"][1:] + ex["chosen_ids"][:-1] == enc("Q: hi yes")


def test_hh_rlhf_multi_turn_prompt_ends_after_last_assistant_marker(tok, enc, BOS, EOS):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: I think a cat walks in."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: I refuse."
    out = prepare([{"chosen": chosen, "rejected": rejected}], tok, kind="preference", eval_split=0)
    ex = out.train[0]
    # the answers share the word "I": the cut still lands right after "Assistant:"
    assert ex["prompt"] == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    assert (ex["chosen"], ex["rejected"]) == (" I think a cat walks in.", " I refuse.")
    assert ex["prompt_ids"] == [BOS] + enc(ex["prompt"])
    assert ex["chosen_ids"] == enc(" I think a cat walks in.") + [EOS]


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("Q: what colour? A: blue sky", "Q: what colour? A: black", ("Q: what colour? A:", " blue sky", " black")),
        ("Say it: Yes", "Say it: Yesterday", ("Say it:", " Yes", " Yesterday")),
        ("Tell me\n\nSure thing", "Tell me\n\nNo", ("Tell me", "\n\nSure thing", "\n\nNo")),
        ("Q:yes", "Q:no", ("Q:", "yes", "no")),
        ("abc", "abd", ("", "abc", "abd")),
    ],
)
def test_implicit_prompt_backs_off_to_a_word_boundary(chosen, rejected, expected):
    assert split_implicit(chosen, rejected) == expected


def test_conversational_preference_renders_with_chat_template(tok, enc, EOS):
    rows = [
        {
            "prompt": [{"role": "system", "content": "sys"}, user("hi")],
            "chosen": [assistant("yo")],
            "rejected": [assistant("go")],
        }
    ]
    out = prepare(rows, tok, kind="preference", eval_split=0)
    ex = out.train[0]
    assert (out.format, out.conversational) == ("preference", True)
    assert ex["prompt"] == "<|system|>sys<|end|><|user|>hi<|end|><|assistant|>"
    assert (ex["chosen"], ex["rejected"]) == ("yo<|end|>", "go<|end|>")
    # rendered text carries its own specials: no BOS added
    assert ex["prompt_ids"] == enc(ex["prompt"])
    assert ex["chosen_ids"] == enc("yo<|end|>") + [EOS]
    assert ex["messages"] == rows[0]["prompt"]
    assert out.summary().startswith("preference (conversational): 1 rows -> 1 train / 0 eval")


def test_conversational_implicit_pairs(tok):
    rows = [
        {
            "chosen": [user("a"), assistant("b"), user("c"), assistant("good")],
            "rejected": [user("a"), assistant("b"), user("c"), assistant("bad")],
        }
    ]
    ex = prepare(rows, tok, kind="preference", eval_split=0).train[0]
    assert ex["prompt"] == "<|user|>a<|end|><|assistant|>b<|end|><|user|>c<|end|><|assistant|>"
    assert (ex["chosen"], ex["rejected"]) == ("good<|end|>", "bad<|end|>")
    assert ex["messages"] == [user("a"), assistant("b"), user("c")]


def test_conversational_implicit_pairs_with_different_prompts_fail(tok):
    rows = [
        {"chosen": [user("a"), assistant("x")], "rejected": [user("a"), assistant("x")]},
        {"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},
    ]
    with pytest.raises(DataError) as err:
        prepare(rows, tok, kind="preference")
    assert message_error(err).startswith("row 1: chosen and rejected conversations differ before their last")


def test_string_prompt_with_full_conversations_in_completions(tok):
    # UltraFeedback-binarized layout: prompt is a string, chosen/rejected hold the whole chat
    rows = [{"prompt": "hi", "chosen": [user("hi"), assistant("yo")], "rejected": [user("hi"), assistant("no")]}]
    ex = prepare(rows, tok, kind="preference", eval_split=0).train[0]
    assert (ex["prompt"], ex["chosen"], ex["rejected"]) == ("<|user|>hi<|end|><|assistant|>", "yo<|end|>", "no<|end|>")


def test_mixed_string_and_messages_are_wrapped_as_turns(tok):
    rows = [{"prompt": "hi", "completion": [assistant("yo")]}, {"prompt": [user("a")], "completion": "b"}]
    out = prepare(rows, tok, kind="sft", eval_split=0)
    assert [(ex["prompt"], ex["completion"]) for ex in out.train] == [
        ("<|user|>hi<|end|><|assistant|>", "yo<|end|>"),
        ("<|user|>a<|end|><|assistant|>", "b<|end|>"),
    ]


def test_messages_without_assistant_turn_are_dropped_as_empty(tok):
    rows = [{"messages": [user("a"), assistant("b")]}, {"messages": [user("only a question")]}]
    out = prepare(rows, tok, kind="sft", eval_split=0)
    assert out.stats["dropped_empty"] == 1 and len(out.train) == 1


def test_text_format_prompt_is_bos_only(tok, enc, BOS, EOS):
    ex = prepare([{"text": "hello"}], tok, kind="sft", eval_split=0).train[0]
    assert ex == {
        "index": 0,
        "prompt_ids": [BOS],
        "completion_ids": enc("hello") + [EOS],
        "prompt": "",
        "completion": "hello",
        "messages": None,
    }


def test_eos_appended_exactly_once(tok, enc, EOS):
    out = prepare(
        [{"prompt": "p", "completion": "done</s>"}, {"prompt": "p", "completion": "more"}],
        tok,
        kind="sft",
        eval_split=0,
    )
    assert out.train[0]["completion_ids"] == enc("done") + [EOS]
    assert out.train[1]["completion_ids"] == enc("more") + [EOS]


def test_eos_not_doubled_when_chat_template_ends_turns_with_eos(enc):
    tok_end = build_tokenizer(eos="<|end|>")
    end_id = tok_end.eos_token_id
    rows = [{"messages": [user("hi"), assistant("yo")]}]
    ex = prepare(rows, tok_end, kind="sft", eval_split=0).train[0]
    assert ex["completion_ids"] == enc("yo") + [end_id]
    assert ex["completion_ids"].count(end_id) == 1


def test_no_chat_template_for_conversational_data():
    rows = [{"messages": [user("hi"), assistant("yo")]}]
    with pytest.raises(DataError) as err:
        prepare(rows, build_tokenizer(chat_template=None), kind="sft")
    assert "the tokenizer has no chat template" in message_error(err)
    # plain data is fine without a template
    out = prepare([{"prompt": "a", "completion": "b"}], build_tokenizer(chat_template=None), kind="sft", eval_split=0)
    assert out.train[0]["completion"] == "b"


def test_chat_template_that_is_not_prefix_consistent():
    # the generation prompt differs from the way an assistant turn is rendered
    bad = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[bot]{% endif %}"
    )
    with pytest.raises(DataError) as err:
        prepare([{"messages": [user("hi"), assistant("yo")]}], build_tokenizer(chat_template=bad), kind="sft")
    assert "chat template is not prefix-consistent (row 0)" in message_error(err)


def test_chat_template_error_is_a_data_error():
    strict = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    rows = [{"messages": [{"role": "tool", "content": "x"}, assistant("yo")]}]
    with pytest.raises(DataError) as err:
        prepare(rows, build_tokenizer(chat_template=strict), kind="sft")
    assert message_error(err).startswith("row 0: the tokenizer's chat template failed on this conversation")
    assert "no tools here" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Truncation and dropping


def test_prompt_truncation_keeps_the_end_and_the_bos(tok, enc, BOS, EOS):
    out = prepare(
        [{"prompt": "abcdefghij", "completion": "xy"}],
        tok,
        kind="sft",
        max_prompt_length=5,
        max_length=100,
        eval_split=0,
    )
    ex = out.train[0]
    assert ex["prompt_ids"] == [BOS] + enc("ghij")
    assert ex["completion_ids"] == enc("xy") + [EOS]
    assert out.stats["truncated"] == 1


def test_conversational_prompt_truncation_keeps_the_end(tok, enc):
    rows = [{"prompt": [user("abcdefghij")], "completion": [assistant("x")]}]
    ex = prepare(rows, tok, kind="sft", max_prompt_length=6, eval_split=0).train[0]
    assert ex["prompt_ids"] == enc("ghij<|end|><|assistant|>")
    assert ex["prompt"] == "<|user|>abcdefghij<|end|><|assistant|>"  # texts are not truncated


def test_completion_truncation_cuts_from_the_right_without_eos(tok, enc, BOS):
    out = prepare(
        [{"prompt": "ab", "chosen": "0123456789", "rejected": "xyz"}],
        tok,
        kind="preference",
        max_length=8,
        max_prompt_length=4,
        eval_split=0,
    )
    ex = out.train[0]
    assert ex["prompt_ids"] == [BOS] + enc("ab")
    assert ex["chosen_ids"] == enc("01234")  # 3 prompt + 5 = max_length; EOS cut off
    assert ex["rejected_ids"] == enc("xyz") + [tok.eos_token_id]  # 4 tokens fit
    assert out.stats["truncated"] == 1 and out.stats["dropped_overlong"] == 0


def test_preference_prompt_and_completions_truncated_together(tok, enc, BOS):
    out = prepare(
        [{"prompt": "abcdefgh", "chosen": "0123456789", "rejected": "ABCDEFGHIJ"}],
        tok,
        kind="preference",
        max_length=10,
        max_prompt_length=4,
        eval_split=0,
    )
    ex = out.train[0]
    assert ex["prompt_ids"] == [BOS] + enc("fgh")
    assert ex["chosen_ids"] == enc("012345") and ex["rejected_ids"] == enc("ABCDEF")
    assert out.stats["truncated"] == 1


def test_overlong_drop_mode(tok):
    rows = [
        {"prompt": "ab", "completion": "0123456789"},  # completion too long
        {"prompt": "abcdefghij", "completion": "x"},  # prompt too long
        {"prompt": "ab", "completion": "xy"},
    ]  # fits: 3 + 3
    out = prepare(rows, tok, kind="sft", max_length=8, max_prompt_length=4, overlong="drop", eval_split=0)
    assert [ex["completion"] for ex in out.train] == ["xy"]
    assert out.stats == {
        "rows": 3,
        "kept": 1,
        "dropped_empty": 0,
        "dropped_identical": 0,
        "dropped_overlong": 2,
        "truncated": 0,
        "train": 1,
        "eval": 0,
    }
    out = prepare(rows, tok, kind="sft", max_length=8, max_prompt_length=4, eval_split=0)
    assert out.stats["truncated"] == 2 and out.stats["dropped_overlong"] == 0


def test_row_with_no_room_for_the_completion_is_dropped_when_truncating(tok):
    rows = [{"prompt": "abcdefgh", "completion": "x"}, {"prompt": "a", "completion": "x"}]
    out = prepare(rows, tok, kind="sft", max_length=5, max_prompt_length=256, eval_split=0)
    assert out.stats["dropped_overlong"] == 1 and out.stats["truncated"] == 0
    assert [ex["prompt"] for ex in out.train] == ["a"]


def test_drop_counts_and_summary(tok):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "  ", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": None, "rejected": "b"},
        {"prompt": "p", "chosen": "0123456789" * 3, "rejected": "b"},
        {"prompt": "p" * 20, "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "c", "rejected": "d"},
    ]
    out = prepare(rows, tok, kind="preference", max_length=12, max_prompt_length=30, eval_split=0)
    assert out.stats == {
        "rows": 8,
        "kept": 3,
        "dropped_empty": 3,
        "dropped_identical": 1,
        "dropped_overlong": 1,
        "truncated": 1,
        "train": 3,
        "eval": 0,
    }
    assert out.summary() == (
        "preference: 8 rows -> 3 train / 0 eval; dropped 1 identical, 3 empty, 1 over-long; truncated 1"
    )


def test_summary_uses_thousands_separators():
    out = data.PreparedData(
        format="preference",
        conversational=True,
        train=[],
        eval=[],
        kind="preference",
        stats={
            "rows": 2000,
            "kept": 1997,
            "dropped_empty": 0,
            "dropped_identical": 3,
            "dropped_overlong": 0,
            "truncated": 5,
            "train": 1900,
            "eval": 97,
        },
    )
    assert out.summary() == (
        "preference (conversational): 2,000 rows -> 1,900 train / 97 eval; "
        "dropped 3 identical, 0 empty, 0 over-long; truncated 5"
    )


def test_text_format_allows_empty_prompt_but_not_empty_text(tok):
    out = prepare([{"text": "a"}, {"text": " "}, {"text": None}], tok, kind="sft", eval_split=0)
    assert out.stats["dropped_empty"] == 2 and len(out.train) == 1


def test_all_rows_dropped_explains_why(tok):
    rows = [{"prompt": "p", "chosen": "x", "rejected": "x"}, {"prompt": "", "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError) as err:
        prepare(rows, tok, kind="preference")
    assert message_error(err).startswith(
        "no training rows left after filtering 2 rows: dropped 1 with an empty prompt or completion, "
        "1 with chosen == rejected, 0 over-long"
    )


# ----------------------------------------------------------------------------------------------
# Kinds: mismatches and conversions


def test_unpaired_data_for_preference_algorithm_suggests_kto(tok):
    rows = [{"prompt": "p", "completion": "c", "label": True}]
    with pytest.raises(DataError) as err:
        prepare(rows, tok, kind="preference")
    msg = message_error(err)
    assert "the dataset is unpaired data (format 'unpaired'" in msg
    assert "trains on preference data" in msg
    assert msg.endswith("Presets that train on unpaired data: kto")


@pytest.mark.parametrize(
    "rows, kind, found",
    [
        ([{"text": "t"}], "prompt", "sft"),
        ([{"text": "t"}], "preference", "sft"),
        ([{"prompt": "p"}], "preference", "prompt"),
        ([{"prompt": "p"}], "sft", "prompt"),
        ([{"messages": [user("a"), assistant("b")]}], "unpaired", "sft"),
        ([{"prompt": "p", "completion": "c", "label": False}], "sft", "unpaired"),
    ],
)
def test_kind_mismatch_names_found_kind_and_its_presets(tok, rows, kind, found):
    with pytest.raises(DataError) as err:
        prepare(rows, tok, kind=kind)
    msg = message_error(err)
    assert f"is {found} data" in msg and f"trains on {kind} data" in msg
    assert msg.endswith(f"Presets that train on {found} data: {', '.join(PRESETS_FOR_KIND[found])}")


def test_kind_mismatch_mentions_misspelt_label_column(tok):
    with pytest.raises(DataError) as err:
        prepare([{"prompt": "p", "completion": "c", "labels": True}], tok, kind="unpaired")
    assert "did you mean 'label' instead of 'labels'?" in message_error(err)


def test_preference_for_unpaired_splits_each_pair(tok, enc, EOS):
    rows = [
        {"prompt": "p1", "chosen": "good", "rejected": "bad"},
        {"prompt": "p2", "chosen": "same", "rejected": "same"},
        {"prompt": "p3", "chosen": "yes", "rejected": "no"},
    ]
    out = prepare(rows, tok, kind="unpaired", eval_split=0)
    assert [(ex["prompt"], ex["completion"], ex["label"]) for ex in out.train] == [
        ("p1", "good", True),
        ("p1", "bad", False),
        ("p3", "yes", True),
        ("p3", "no", False),
    ]
    assert out.train[1]["completion_ids"] == enc("bad") + [EOS]
    assert [ex["index"] for ex in out.train] == [0, 1, 2, 3]
    assert out.stats["rows"] == 6 and out.stats["dropped_identical"] == 2
    assert (
        out.summary()
        == "preference as unpaired: 6 rows -> 4 train / 0 eval; dropped 2 identical, 0 empty, 0 over-long; truncated 0"
    )


def test_implicit_pairs_for_unpaired(tok):
    rows = [{"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: bye"}]
    out = prepare(rows, tok, kind="unpaired", eval_split=0)
    assert [(ex["prompt"], ex["completion"], ex["label"]) for ex in out.train] == [
        ("Human: hi Assistant:", " hello", True),
        ("Human: hi Assistant:", " bye", False),
    ]


def test_unpaired_labels_accept_bools_and_0_1(tok):
    rows = [
        {"prompt": "p", "completion": "a", "label": 1},
        {"prompt": "p", "completion": "b", "label": False},
        {"prompt": "p", "completion": "c", "label": 0},
    ]
    out = prepare(rows, tok, kind="unpaired", eval_split=0)
    assert [ex["label"] for ex in out.train] == [True, False, False]
    assert all(type(ex["label"]) is bool for ex in out.train)


@pytest.mark.parametrize(
    "value, shown", [("yes", "str 'yes'"), (2, "int 2"), (None, "NoneType None"), (0.5, "float 0.5")]
)
def test_non_boolean_label_names_row_and_value(tok, value, shown):
    rows = [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "b", "label": value}]
    with pytest.raises(DataError) as err:
        prepare(rows, tok, kind="unpaired")
    assert message_error(err) == f"row 1: 'label' must be a boolean (true/false, or 0/1), got {shown}"


def test_preference_for_sft_uses_chosen(tok):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}, {"prompt": "q", "chosen": "x", "rejected": "x"}]
    out = prepare(rows, tok, kind="sft", eval_split=0)
    assert [(ex["prompt"], ex["completion"]) for ex in out.train] == [("p", "good"), ("q", "x")]
    assert set(out.train[0]) == {"index", "prompt_ids", "completion_ids", "prompt", "completion", "messages"}
    assert out.stats["dropped_identical"] == 0


def test_prompt_kind_from_other_formats(tok, enc, BOS):
    plain = prepare([{"prompt": "p1", "chosen": "a", "rejected": "a", "answer": 7}], tok, kind="prompt", eval_split=0)
    assert plain.train == [
        {
            "index": 0,
            "prompt_ids": [BOS] + enc("p1"),
            "prompt": "p1",
            "answer": "7",
            "messages": None,
            # every other column as it is in the data, for reward functions (the answer stays a number here)
            "columns": {"chosen": "a", "rejected": "a", "answer": 7},
        }
    ]

    conv = prepare(
        [
            {"messages": [user("hi"), assistant("yo"), user("more?"), assistant("sure")]},
            {"messages": [user("just asking")]},
        ],
        tok,
        kind="prompt",
        eval_split=0,
    )
    assert [ex["prompt"] for ex in conv.train] == [
        "<|user|>hi<|end|><|assistant|>yo<|end|><|user|>more?<|end|><|assistant|>",
        "<|user|>just asking<|end|><|assistant|>",
    ]
    assert conv.train[0]["prompt_ids"] == enc(conv.train[0]["prompt"])
    assert conv.train[1]["messages"] == [user("just asking")] and conv.train[1]["answer"] is None

    hh = prepare(
        [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}],
        tok,
        kind="prompt",
        eval_split=0,
    )
    assert hh.train[0]["prompt"] == "\n\nHuman: hi\n\nAssistant:"
    assert hh.summary() == (
        "preference_implicit as prompt: 1 rows -> 1 train / 0 eval; "
        "dropped 0 identical, 0 empty, 0 over-long; truncated 0"
    )


def test_prompt_kind_truncates_prompts_only(tok, enc, BOS):
    out = prepare([{"prompt": "abcdefghij"}, {"prompt": ""}], tok, kind="prompt", max_prompt_length=4, eval_split=0)
    assert out.train[0]["prompt_ids"] == [BOS] + enc("hij")
    assert out.stats["truncated"] == 1 and out.stats["dropped_empty"] == 1


# ----------------------------------------------------------------------------------------------
# Splits


def _rows(n):
    return [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(n)]


def test_split_sizes_and_indices(tok):
    out = prepare(_rows(20), tok, kind="sft", eval_split=0.25, seed=1)
    assert (len(out.train), len(out.eval)) == (15, 5)
    assert (out.stats["train"], out.stats["eval"]) == (15, 5)
    assert [ex["index"] for ex in out.train] == list(range(15))
    assert [ex["index"] for ex in out.eval] == list(range(5))
    prompts = [ex["prompt"] for ex in out.train + out.eval]
    assert sorted(prompts) == sorted(f"p{i}" for i in range(20))
    # each half keeps the source order
    assert [ex["prompt"] for ex in out.train] == sorted((ex["prompt"] for ex in out.train), key=lambda p: int(p[1:]))


def test_split_is_deterministic_by_seed(tok):
    def eval_prompts(seed):
        return [ex["prompt"] for ex in prepare(_rows(40), tok, kind="sft", eval_split=0.2, seed=seed).eval]

    assert eval_prompts(3) == eval_prompts(3)
    assert eval_prompts(3) != eval_prompts(4)
    assert len(eval_prompts(3)) == 8


@pytest.mark.parametrize(
    "n, fraction, expected",
    [
        (2, 0.05, (1, 1)),
        (1, 0.5, (1, 0)),
        (10, 0.0, (10, 0)),
        (10, 0.05, (9, 1)),
        (100, 0.05, (95, 5)),
        (3, 0.9, (1, 2)),
    ],
)
def test_split_edge_sizes(tok, n, fraction, expected):
    out = prepare(_rows(n), tok, kind="sft", eval_split=fraction)
    assert (len(out.train), len(out.eval)) == expected


def test_split_keeps_both_halves_of_a_pair_together(tok):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    out = prepare(rows, tok, kind="unpaired", eval_split=0.3, seed=0)
    assert (len(out.train), len(out.eval)) == (14, 6)
    train_prompts = {ex["prompt"] for ex in out.train}
    assert not train_prompts & {ex["prompt"] for ex in out.eval}


def test_eval_split_is_drawn_before_filtering(tok):
    rows = [{"prompt": f"p{i}", "completion": "c" * (30 if i % 2 else 1)} for i in range(20)]
    base = prepare(rows, tok, kind="sft", eval_split=0.25, seed=5, max_length=100)
    short = prepare(rows, tok, kind="sft", eval_split=0.25, seed=5, max_length=10, overlong="drop")
    assert len(base.eval) == 5 and short.stats["dropped_overlong"] == 10
    # the same source rows are held out; the length limit only removes the over-long ones
    assert [ex["prompt"] for ex in short.eval] == [ex["prompt"] for ex in base.eval if int(ex["prompt"][1:]) % 2 == 0]


def test_eval_source(tmp_path, tok):
    eval_rows = [{"messages": [user("e1"), assistant("r1")]}, {"messages": [user("e2"), assistant("")]}]
    path = write_rows(eval_rows, tmp_path, "jsonl")
    out = prepare(_rows(6), tok, kind="sft", eval_source=path, eval_split=0.5)
    assert len(out.train) == 6 and [ex["index"] for ex in out.train] == list(range(6))
    assert [(ex["index"], ex["completion"]) for ex in out.eval] == [(0, "r1<|end|>")]
    assert out.stats == {
        "rows": 8,
        "kept": 7,
        "dropped_empty": 1,
        "dropped_identical": 0,
        "dropped_overlong": 0,
        "truncated": 0,
        "train": 6,
        "eval": 1,
    }
    assert out.format == "sft"


def test_eval_source_with_wrong_kind_or_nothing_left(tok):
    with pytest.raises(DataError, match="the eval dataset is prompt data"):
        prepare(_rows(3), tok, kind="sft", eval_source=[{"prompt": "p"}])
    with pytest.raises(DataError, match="no eval rows left after filtering 1 rows"):
        prepare(_rows(3), tok, kind="sft", eval_source=[{"prompt": "p", "completion": ""}])
    with pytest.raises(DataError, match="dataset file ./missing-eval.jsonl does not exist"):
        prepare(_rows(3), tok, kind="sft", eval_source="./missing-eval.jsonl")


def test_max_rows(tok):
    out = prepare(_rows(10), tok, kind="sft", max_rows=4, eval_split=0)
    assert [ex["prompt"] for ex in out.train] == ["p0", "p1", "p2", "p3"]
    assert out.stats["rows"] == 4


def test_prepare_from_file_path(tmp_path, tok):
    path = write_rows(_rows(5), tmp_path, "parquet")
    out = prepare(path, tok, kind="sft", eval_split=0.2, seed=0)
    assert (len(out.train), len(out.eval)) == (4, 1)


# ----------------------------------------------------------------------------------------------
# Arguments and batching


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_length": 1}, "max_length"),
        ({"max_prompt_length": 0}, "max_prompt_length"),
        ({"eval_split": 1.0}, "eval_split"),
        ({"eval_split": -0.1}, "eval_split"),
        ({"overlong": "cut"}, "overlong"),
        ({"max_rows": 0}, "max_rows"),
    ],
)
def test_bad_arguments(tok, kwargs, field):
    with pytest.raises(SpecError, match=f"^{field} must be"):
        prepare(_rows(3), tok, kind="sft", **kwargs)


def test_unknown_kind_is_a_programming_error(tok):
    with pytest.raises(ValueError, match="unknown data kind 'dpo'"):
        prepare(_rows(3), tok, kind="dpo")


def test_bad_row_sources(tok):
    with pytest.raises(DataError, match="dataset is empty"):
        prepare([], tok, kind="sft")
    with pytest.raises(DataError, match="dataset row 1 is a str"):
        prepare([{"text": "a"}, "b"], tok, kind="sft")


class CountingTokenizer:
    """Delegates to a real tokenizer and records each __call__."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def __call__(self, text, **kwargs):
        self.calls.append((len(text) if isinstance(text, list) else 1, kwargs.get("add_special_tokens")))
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenisation_is_batched(tok):
    counting = CountingTokenizer(tok)
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(50)]
    out = prepare(rows, counting, kind="preference", eval_split=0.1)
    assert len(out.train) + len(out.eval) == 50
    # one probe for the tokenizer's special tokens, then one batched call per add_special_tokens flag
    assert counting.calls == [(1, True), (50, True), (100, False)]


def test_preference_margin_column_passes_through_and_is_checked(tok):
    rows = [
        {"prompt": "Q", "chosen": " a", "rejected": " b", "margin": 2},
        {"prompt": "Q", "chosen": " c", "rejected": " d", "margin": 0.5},
    ]
    out = prepare(rows, tok, kind="preference", eval_split=0)
    assert [ex["margin"] for ex in out.train] == [2.0, 0.5]
    with pytest.raises(DataError, match="row 0: 'margin' must be a number"):
        prepare([{**rows[0], "margin": "big"}], tok, kind="preference", eval_split=0)


def test_safety_tag_passes_through_and_is_checked(tok):
    rows = [
        {"prompt": "Q", "chosen": " a", "rejected": " b", "safety": True},
        {"prompt": "R", "chosen": " c", "rejected": " d", "safety": 0},
    ]
    out = prepare(rows, tok, kind="preference", eval_split=0)
    assert [ex["safety"] for ex in out.train] == [True, False]
    untagged = prepare([{"prompt": "Q", "chosen": " a", "rejected": " b"}], tok, kind="preference", eval_split=0)
    assert "safety" not in untagged.train[0]
    with pytest.raises(DataError, match="row 0: 'safety' must be a boolean"):
        prepare([{**rows[0], "safety": "yes"}], tok, kind="preference", eval_split=0)


def test_multi_turn_sft_masks_every_assistant_turn(tok):
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "bb"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    ex = prepare([row], tok, kind="sft", eval_split=0).train[0]
    pieces = [tok.decode([t]) for t in ex["completion_ids"]]
    taught = "".join(p for p, m in zip(pieces, ex["loss_mask"]) if m)
    eos = tok.eos_token  # appended after the last turn, and taught
    assert "".join(pieces) == "bb<|end|><|user|>c<|end|><|assistant|>d<|end|>" + eos
    assert taught == "bb<|end|>d<|end|>" + eos  # both assistant turns with their end tokens; not the user turn
    cut = prepare([row], tok, kind="sft", eval_split=0, max_length=len(ex["prompt_ids"]) + 4).train[0]
    assert len(cut["loss_mask"]) == len(cut["completion_ids"]) == 4
