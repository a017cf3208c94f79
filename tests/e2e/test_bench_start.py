"""`cherry bench start`: the generated case is UltraFeedback-shaped, and a small run times Cherry cold
(the cache written), Cherry warm (the cache loaded) and, where TRL is installed, TRL's DPOTrainer."""

from __future__ import annotations

import json
import tempfile
from importlib.util import find_spec
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.training.start import ANSWER_WORDS, PROMPT_WORDS, StartCase, compare_start, report_lines, write_case
from tuiapp.cli import app as cli


def test_the_case_is_a_conversational_preference_file_with_a_chat_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from engine.data import prepare

    case = StartCase(dir=str(tmp_path), rows=40)
    write_case(case)
    rows = [json.loads(line) for line in Path(case.data_file).read_text().splitlines()]
    assert len(rows) == 40
    words = [len(row["prompt"][0]["content"].split()) for row in rows]
    answers = [len(row[k][0]["content"].split()) for row in rows for k in ("chosen", "rejected")]
    assert PROMPT_WORDS[0] <= min(words) < max(words) <= PROMPT_WORDS[1]
    assert ANSWER_WORDS[0] <= min(answers) < max(answers) <= ANSWER_WORDS[1]
    assert {row["chosen"][0]["role"] for row in rows} == {"assistant"}
    tokenizer = AutoTokenizer.from_pretrained(case.model_dir)
    data = prepare(case.data_file, tokenizer, kind="preference", max_length=1024, eval_split=0.0)
    assert data.conversational and data.stats["kept"] == 40
    per_word = sum(len(ex["prompt_ids"]) for ex in data.train) / sum(words)
    assert 1.0 < per_word < 2.0  # a trained BPE: about a token and a third per word, as English text


def _check_sides(result: dict, sides: tuple[str, ...]) -> None:
    assert tuple(result["sides"]) == sides
    assert [result["sides"][s]["cache_hit"] for s in ("cherry-cold", "cherry-warm")] == [False, True]
    for row in result["sides"].values():
        assert 0 < row["first_step_only_s"] < row["first_step_s"]
    assert len(report_lines(result)) == 3 + len(sides) + ("cold_vs_trl" in result)


def test_cherry_cold_writes_the_cache_and_warm_loads_it(tmp_path):
    result = compare_start(300, against_trl=False, directory=str(tmp_path))
    _check_sides(result, ("cherry-cold", "cherry-warm"))


@pytest.mark.slow
@pytest.mark.skipif(find_spec("trl") is None, reason='TRL is not installed (pip install -e ".[bench]")')
def test_against_trl_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the case is written there
    out = CliRunner().invoke(cli, ["bench", "start", "--rows", "200", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)["result"]
    _check_sides(result, ("cherry-cold", "cherry-warm", "trl-cold", "trl-warm"))
    assert result["cold_vs_trl"] > 0 and result["warm_vs_trl"] > 0


def test_bad_options_are_named():
    out = CliRunner().invoke(cli, ["bench", "start", "--rows", "0"])
    assert out.exit_code != 0 and "--rows must be >= 1" in out.output
    out = CliRunner().invoke(cli, ["bench", "start", "--against", "naive"])
    assert out.exit_code != 0 and "--against must be trl or none" in out.output
