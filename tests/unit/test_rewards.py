"""Reward sources (verifiers, user functions, reward models, helpful + safety) and pairwise judges."""

from __future__ import annotations

import textwrap

import pytest

from engine.errors import CherryError, SpecError
from engine.rewards import (
    DEFAULT_JUDGE_TEMPLATE,
    LLMJudge,
    build_reward,
    judge_pairs,
    judge_tallies,
    parse_reward_source,
    required_columns,
)


@pytest.fixture(scope="module")
def tok():
    from engine.demo.tokenizer import build_tokenizer

    return build_tokenizer()


def _ids(tok, prompts, completions, eos=True):
    prompt_ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    completion_ids = [
        tok(c, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []) for c in completions
    ]
    return prompt_ids, completion_ids


def _score(reward, tok, prompts, completions, columns=None, eos=True):
    prompt_ids, completion_ids = _ids(tok, prompts, completions, eos)
    return reward.reward(prompts, completions, prompt_ids, completion_ids, columns or {})


# ----------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("exact_match", ("exact_match", "")),
        (" exact_match ", ("exact_match", "")),
        ("regex:^\\d+$", ("regex", "^\\d+$")),
        ("regex:a:b", ("regex", "a:b")),
        ("length:200", ("length", "200")),
        ("rm:runs/abc", ("rm", "runs/abc")),
        ("rm:org/reward-model", ("rm", "org/reward-model")),
        ("pkg.rewards:fmt", ("python", "pkg.rewards:fmt")),
        ("path/to/file.py:score", ("python", "path/to/file.py:score")),
        ("mod:Scorer.score", ("python", "mod:Scorer.score")),
    ],
)
def test_parse_accepts(text, expected):
    assert parse_reward_source(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("exact_match:x", "no argument"),
        ("regex:(", "invalid regular expression"),
        ("regex:", "regular expression is empty"),
        ("length:0", "positive"),
        ("length:-3", "positive"),
        ("length:x", "whole number"),
        ("length", "needs an argument"),
        ("rm:", "rm needs a reward model"),
        ("rm: ", "rm needs a reward model"),
        ("mod:", "function name"),
        (":fn", "module before the colon"),
        ("mod:fn-x", "not a Python function name"),
        ("a/b:fn", "neither an importable module"),
        ("accuracy", "unknown reward source"),
    ],
)
def test_parse_refuses_with_a_message_naming_the_entry(text, words):
    with pytest.raises(SpecError) as err:
        parse_reward_source(text)
    message = str(err.value)
    assert words in message
    if text.strip():
        assert f"'{text}'" in message


def test_required_columns_is_torch_free_and_names_answer():
    assert required_columns(["exact_match", "regex:x", "length:3"]) == {"answer"}
    assert required_columns(["regex:x"]) == set()


# ----------------------------------------------------------------------------------------------
# Built-in sources


def test_builtin_values_weighted_sum_and_components(tok):
    reward = build_reward(["exact_match", "regex:\\d+", "length:4"], [2.0, 0.5, 1.0], tokenizer=tok)
    assert reward.names == ["exact_match", "regex", "length"] and reward.needs_columns == {"answer"}
    completions = ["42", " 42 \n", "abc"]
    result = _score(reward, tok, ["q1", "q2", "q3"], completions, {"answer": ["42", "41", " abc"]})
    assert result.components["exact_match"] == [1.0, 0.0, 1.0]
    assert result.components["regex"] == [1.0, 1.0, 0.0]
    # n = completion tokens incl. EOS: "42" -> 3, " 42 \n" -> 6, "abc" -> 4
    assert result.components["length"] == [-0.25, -0.5, 0.0]
    assert result.total == pytest.approx([2.0 + 0.5 - 0.25, 0.5 - 0.5, 2.0])


def test_regex_is_a_full_match_across_lines(tok):
    reward = build_reward(["regex:<think>.*</think>\\d+"], tokenizer=tok)
    result = _score(reward, tok, ["q"] * 3, ["<think>a\nb</think>7", "<think>a</think>7 extra", "x<think></think>1"])
    assert result.components["regex"] == [1.0, 0.0, 0.0]


def test_duplicate_names_get_a_suffix_and_weights_must_match(tok):
    assert build_reward(["regex:a", "regex:b", "regex:c"], tokenizer=tok).names == ["regex", "regex_2", "regex_3"]
    with pytest.raises(CherryError, match="2 value\\(s\\) for 1 reward source"):
        build_reward(["regex:a"], [1.0, 2.0], tokenizer=tok)
    with pytest.raises(CherryError, match="finite number"):
        build_reward(["regex:a"], [float("nan")], tokenizer=tok)


def test_exact_match_without_answer_column_names_it(tok):
    reward = build_reward(["exact_match"], tokenizer=tok)
    with pytest.raises(CherryError, match="'answer' column"):
        _score(reward, tok, ["q"], ["a"])
    with pytest.raises(CherryError, match="1 of 2 prompts"):
        _score(reward, tok, ["q", "r"], ["a", "b"], {"answer": ["a", None]})


# ----------------------------------------------------------------------------------------------
# User functions

USER_CODE = textwrap.dedent("""
    def scored(prompts, completions, **kwargs):
        return [float(len(ids)) + (10.0 if c == a else 0.0) + (100.0 if p == "hello" else 0.0)
                for p, c, a, ids in zip(prompts, completions, kwargs["answer"], kwargs["completion_ids"])]

    def narrow(prompts, completions, answer):
        return [1.0 if c == a else -1.0 for c, a in zip(completions, answer)]

    def needs_topic(prompts, completions, topic):
        return [0.0 for _ in completions]

    def short(prompts, completions, **kwargs):
        return [1.0]

    def not_a_number(prompts, completions, **kwargs):
        return [float("nan") for _ in completions]

    def infinite(prompts, completions, **kwargs):
        return [float("inf") for _ in completions]

    def text(prompts, completions, **kwargs):
        return "1.0"

    def boom(prompts, completions, **kwargs):
        raise ZeroDivisionError("oops")

    def one_arg(prompts):
        return []

    NOT_A_FUNCTION = 3
""")


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_CODE)
    return path


def test_user_function_from_a_file_gets_columns_and_completion_ids(tok, user_file):
    reward = build_reward([f"{user_file}:scored"], tokenizer=tok)
    assert reward.names == ["scored"]
    result = _score(reward, tok, ["hello", "bye"], ["ab", "xyz"], {"answer": ["ab", "no"], "safety": [None, None]})
    assert result.total == [3.0 + 10.0 + 100.0, 4.0]


def test_user_function_from_a_module_on_sys_path(tok, tmp_path, monkeypatch):
    (tmp_path / "cherry_test_user_rewards.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward(
        ["cherry_test_user_rewards:narrow", "cherry_test_user_rewards:scored"], [1.0, 0.0], tokenizer=tok
    )
    assert reward.names == ["narrow", "scored"] and reward.needs_columns == {"answer"}
    # `narrow` takes no **kwargs: it is given only the column it names
    result = _score(reward, tok, ["q", "q"], ["a", "b"], {"answer": ["a", "c"], "other": [1, 2]})
    assert result.components["narrow"] == [1.0, -1.0] and result.total == [1.0, -1.0]


@pytest.mark.parametrize(
    "func, words",
    [
        ("short", "returned 1 scores for 2 completions"),
        ("not_a_number", "returned nan for completion 0; scores must be finite"),
        ("infinite", "finite"),
        ("text", "returned a str"),
        ("boom", "raised ZeroDivisionError: oops"),
        ("needs_topic", "column(s) topic"),
    ],
)
def test_user_function_bad_results_are_refused(tok, user_file, func, words):
    reward = build_reward([f"{user_file}:{func}"], tokenizer=tok)
    with pytest.raises(CherryError) as err:
        _score(reward, tok, ["q", "q"], ["a", "b"], {"answer": ["a", "b"]})
    assert words in str(err.value) and func in str(err.value)


@pytest.mark.parametrize(
    "entry, words",
    [
        ("{file}:NOT_A_FUNCTION", "is a int, not a function"),
        ("{file}:missing", "has no attribute 'missing'"),
        ("{file}:one_arg", "must take its arguments by keyword, e.g. fn(completions, **kwargs)"),
        ("{dir}/nope.py:fn", "no such file"),
        ("cherry_no_such_module_xyz:fn", "no module named 'cherry_no_such_module_xyz'"),
    ],
)
def test_user_function_loading_errors(tok, user_file, entry, words):
    entry = entry.format(file=user_file, dir=user_file.parent)
    with pytest.raises(CherryError) as err:
        build_reward([entry], tokenizer=tok)
    assert words in str(err.value) and entry in str(err.value)


# ----------------------------------------------------------------------------------------------
# Reward models


def _save_rm(path, tok, seed):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        num_labels=1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rms(tmp_path_factory, tok):
    from engine.demo.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("rms")
    other = build_tokenizer()
    other.add_tokens(["<|extra|>"], special_tokens=True)  # a different vocabulary: texts are re-tokenised
    return {
        "helpful": _save_rm(root / "helpful", tok, 1),
        "safety": _save_rm(root / "safety", tok, 2),
        "run": _save_rm(root / "run" / "final", tok, 3).parent,  # a Cherry rm run dir
        "other": _save_rm(root / "other", other, 4),
    }


def _direct(path, prompt_ids, completion_ids):
    import torch
    from transformers import AutoModelForSequenceClassification

    from engine.models import sequence_rewards

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    with torch.no_grad():
        return [
            sequence_rewards(model, torch.tensor([p + c]), torch.ones(1, len(p) + len(c), dtype=torch.long)).item()
            for p, c in zip(prompt_ids, completion_ids)
        ]


PROMPTS = ["What is 2+2?", "Say hi", "Name a colour please", "x"]
COMPLETIONS = [" 4", " hello there", " red", " a much longer answer here"]


@pytest.mark.parametrize("which", ["helpful", "run", "other"])
def test_rm_source_scores_like_sequence_rewards(tok, rms, which):
    reward = build_reward([f"rm:{rms[which]}"], tokenizer=tok, batch_size=3)
    assert reward.names == ["rm"]
    assert reward.sources[0].score.same_vocab == (which != "other")
    result = _score(reward, tok, PROMPTS, COMPLETIONS)
    expected = _direct(rms[which] / "final" if which == "run" else rms[which], *_ids(tok, PROMPTS, COMPLETIONS))
    assert result.components["rm"] == pytest.approx(expected, abs=1e-5)
    assert result.total == result.components["rm"]


def test_rm_retokenising_appends_eos_only_to_finished_completions(tok, rms):
    reward = build_reward([f"rm:{rms['other']}"], tokenizer=tok)
    prompt_ids, completion_ids = _ids(tok, PROMPTS[:2], COMPLETIONS[:2])
    completion_ids[1] = completion_ids[1][:-1]  # the second one hit the length limit
    _, rm_completions = reward.sources[0].score.retokenise(PROMPTS[:2], COMPLETIONS[:2], completion_ids, {})
    assert rm_completions == completion_ids


def test_missing_rm_dir_is_a_clear_error(tok, tmp_path):
    with pytest.raises(CherryError, match=r"rewards entry 'rm:.*nope'.*no such"):
        build_reward([f"rm:{tmp_path / 'nope'}"], tokenizer=tok)


def test_helpful_and_safety_gating(tok, rms):
    from engine.rewards.reward_model import helpful_safety_scores

    reward = build_reward([f"rm:{rms['helpful']}", "length:3"], tokenizer=tok, safety_model=str(rms["safety"]))
    tags = [True, False, None, True]
    result = _score(reward, tok, PROMPTS, COMPLETIONS, {"safety": tags})
    ids = _ids(tok, PROMPTS, COMPLETIONS)
    helpful, safety = _direct(rms["helpful"], *ids), _direct(rms["safety"], *ids)
    assert result.extras["rm/helpful"] == pytest.approx(helpful, abs=1e-5)
    assert result.extras["rm/safety"] == pytest.approx(safety, abs=1e-5)
    expected = helpful_safety_scores(helpful, safety, [True, False, False, True], 0.15)
    assert result.components["rm"] == pytest.approx(expected, abs=1e-4)
    untagged = helpful_safety_scores(helpful, safety, [False] * 4, 0.15)
    assert not result.components["rm"] == pytest.approx(untagged, abs=1e-4)  # the tags chose the safety score
    # no safety column: every prompt is untagged
    assert _score(reward, tok, PROMPTS, COMPLETIONS).components["rm"] == pytest.approx(untagged, abs=1e-4)
    assert result.total == pytest.approx(
        [rm + length for rm, length in zip(result.components["rm"], result.components["length"])]
    )


def test_safety_model_needs_exactly_one_rm_source(tok, rms):
    with pytest.raises(CherryError, match="no rm: entry"):
        build_reward(["regex:a"], tokenizer=tok, safety_model=str(rms["safety"]))


# ----------------------------------------------------------------------------------------------
# Judges


def test_judge_tallies_count_what_the_judge_preferred():
    # pair 0: A won, A shorter (1 < 2), A's reward higher -> shorter won, agrees with the reward
    # pair 1: B won, B shorter, rewards equal -> shorter won, no reward comparison
    # pair 2: skipped (a near-tie) -> only counts as undecided
    # pair 3: B won, equal lengths, A's reward higher -> no length comparison, disagrees with the reward
    tallies = judge_tallies(
        [0, 1, 0, 1],
        [False, False, True, False],
        [1, 2, 3, 4],
        [2, 1, 3, 4],
        consistent=[True, False, True, True],
        rewards_a=[1.0, 0.0, 0.0, 1.0],
        rewards_b=[0.0, 0.0, 1.0, 0.0],
    )
    assert tallies == {
        "decided_frac": (3, 4),
        "shorter_preferred_frac": (2, 2),
        "reward_agreement": (1, 2),
        "position_consistency": (3, 4),
    }
    # an order-free judge (judge=reward) without rewards to compare: only the first two
    assert judge_tallies([1], [False], [3], [2]) == {"decided_frac": (1, 1), "shorter_preferred_frac": (1, 1)}


def test_judge_pairs_picks_winners_and_skips_near_ties():
    assert judge_pairs([0.7, 0.2, 0.5], 0.05) == ([0, 1, 0], [False, False, True])
    assert judge_pairs([0.5, 0.52, 0.6, 0.3], 0.0)[1] == [True, False, False, False]
    assert judge_pairs([0.5, 0.52, 0.6, 0.3], 0.05) == ([0, 0, 0, 1], [True, True, False, False])


@pytest.fixture(scope="module")
def llm_judge(tiny_model_dir):
    return LLMJudge(str(tiny_model_dir))


JQ = ["What is 2+2?", "Say hi to me politely", "Name a colour", "ok"]
JA = ["4", "hello there friend", "red", "sure thing, here you go"]
JB = ["five", "hi", "the colour blue", "no"]


def _manual_p1(judge, question, first, second):
    import torch

    tok = judge.tokenizer
    body = DEFAULT_JUDGE_TEMPLATE.format(prompt=question, answer_1=first, answer_2=second)
    text = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    one, two = tok("1", add_special_tokens=False)["input_ids"], tok("2", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits[[one[0], two[0]]].float(), -1)[0].item()


def test_llm_judge_scores_both_orders(llm_judge):
    assert isinstance(llm_judge, LLMJudge) and llm_judge.use_chat
    ab = llm_judge.prefer(JQ, JA, JB, None, None, None, {})
    ba = llm_judge.prefer(JQ, JB, JA, None, None, None, {})
    assert all(0.0 < p < 1.0 for p in ab.prob_a)
    assert [x + y for x, y in zip(ab.prob_a, ba.prob_a)] == pytest.approx([1.0] * len(JQ), abs=1e-6)
    first = [_manual_p1(llm_judge, q, a, b) for q, a, b in zip(JQ, JA, JB)]  # P("1" | A first)
    second = [_manual_p1(llm_judge, q, b, a) for q, a, b in zip(JQ, JA, JB)]  # P("1" | B first)
    assert ab.prob_a == pytest.approx([0.5 * (p + 1 - q) for p, q in zip(first, second)], abs=1e-5)
    assert ab.consistent == [(p > 0.5) == (q < 0.5) for p, q in zip(first, second)]
    assert ba.consistent == ab.consistent


@pytest.mark.parametrize("template", [None, "Q {prompt} 1 {answer_1} 2 {answer_2}"])
def test_llm_judge_batched_equals_one_at_a_time(tiny_model_dir, template):
    judge = LLMJudge(
        str(tiny_model_dir), template=template, batch_size=4
    )  # the short template: padding is a large share
    batched = judge.prefer(JQ, JA, JB)
    alone = [judge.prefer([q], [a], [b]) for q, a, b in zip(JQ, JA, JB)]
    assert batched.prob_a == pytest.approx([r.prob_a[0] for r in alone], abs=1e-6)
    assert batched.consistent == [r.consistent[0] for r in alone]


def test_llm_judge_reads_conversations_from_the_messages_column(llm_judge):
    rendered = ["<|user|>What is 2+2?<|end|><|assistant|>"]
    with_messages = llm_judge.prefer(
        rendered, ["4"], ["5"], columns={"messages": [[{"role": "user", "content": "What is 2+2?"}]]}
    )
    plain = llm_judge.prefer(["What is 2+2?"], ["4"], ["5"])
    assert with_messages.prob_a == pytest.approx(plain.prob_a, abs=1e-6)


def test_plain_text_llm_judge_and_merged_digit_tokens(tiny_model_dir):
    judge = LLMJudge(str(tiny_model_dir), use_chat_template=False)
    ab, ba = judge.prefer(JQ, JA, JB), judge.prefer(JQ, JB, JA)
    assert all(0.0 < p < 1.0 for p in ab.prob_a)
    assert [x + y for x, y in zip(ab.prob_a, ba.prob_a)] == pytest.approx([1.0] * len(JQ), abs=1e-6)
    judge.tokenizer.add_tokens(["r 1", "r 2"])  # "Answer 1" now ends in one token that is not the digit
    with pytest.raises(CherryError, match=r"one token each.*ids \["):
        judge.prefer(JQ[:1], JA[:1], JB[:1])


def test_llm_judge_template_must_have_its_placeholders(tiny_model_dir):
    with pytest.raises(CherryError, match=r"\{answer_2\}"):
        LLMJudge(str(tiny_model_dir), template="Q: {prompt} A: {answer_1}")
