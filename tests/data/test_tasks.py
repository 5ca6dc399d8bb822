"""The built-in arithmetic task: exact answers, an exact verifier, valid short SFT rows."""

import re

import pytest

from tether.config import DataConfig
from tether.data.formats import load_sft_examples, validate_row
from tether.data.tasks import TASKS, arithmetic, builtin_sft_rows, heldout_problems, task_accuracy
from tether.data.tasks.arithmetic import _evaluate, arithmetic_problems, extract_answer, format_ok, verify


def _expr(problem):
    return problem["prompt"][0]["content"].split("What is ")[1].split("?")[0]


def test_answers_are_exact():
    assert _evaluate("23 + 45") == 68
    assert _evaluate("18 - 72") == -54
    assert _evaluate("7 + 3 * 4 - 2") == 17  # * before + and -
    assert _evaluate("12 * 9") == 108
    with pytest.raises(ValueError):
        _evaluate("__import__('os')")
    for difficulty in ("easy", "medium", "hard"):
        for p in arithmetic_problems(50, seed=1, difficulty=difficulty):
            assert p["answer"] == _evaluate(_expr(p))
            assert verify(p["completion"][0]["content"], p["answer"])
            assert format_ok(p["completion"][0]["content"])


def test_difficulties_by_shape():
    for p in arithmetic_problems(100, seed=0, difficulty="easy"):
        assert re.fullmatch(r"\d{1,2} [+-] \d{1,2}", _expr(p)), _expr(p)
    for p in arithmetic_problems(100, seed=0, difficulty="medium"):
        assert re.fullmatch(r"\d{2} \* \d", _expr(p)), _expr(p)
    for p in arithmetic_problems(100, seed=0, difficulty="hard"):
        assert re.fullmatch(r"\d{1,2} [+*-] \d{1,2} [+-] \d{1,2}", _expr(p)), _expr(p)
    with pytest.raises(ValueError, match="difficulty must be one of"):
        arithmetic_problems(0, seed=0, difficulty="impossible")


def test_problems_are_deterministic_and_seeded():
    assert arithmetic_problems(20, seed=3) == arithmetic_problems(20, seed=3)
    assert arithmetic_problems(20, seed=3)[:5] == arithmetic_problems(5, seed=3)
    assert arithmetic_problems(20, seed=3) != arithmetic_problems(20, seed=4)


def test_verifier_reads_the_last_answer():
    assert extract_answer("2 + 2 = 4\nAnswer: 4") == 4
    assert extract_answer("Answer: 3 ... no wait. Answer: -12") == -12
    assert extract_answer("Answer:7") == 7
    assert extract_answer("The answer is 4") is None
    assert extract_answer("") is None
    assert verify("Answer: 68", 68) and not verify("Answer: 67", 68)
    assert not verify("68", 68)  # exact format: a bare number is not an answer
    assert not verify("Answer: 680", 68) and not verify("Answer: -68", 68)
    assert format_ok("x = 1\nAnswer: 1\n") and format_ok("Answer: -3")
    assert not format_ok("Answer: 1, I think") and not format_ok("1") and not format_ok("")


def test_builtin_rows_are_valid_short_deterministic_and_heldout_is_disjoint(default_tokenizer):
    rows = builtin_sft_rows()
    assert rows == builtin_sft_rows() and len(rows) == 200
    assert all(validate_row(r, "builtin", i) == "prompt_completion" for i, r in enumerate(rows))
    assert all(set(r) == {"prompt", "completion"} for r in rows)
    train, held = load_sft_examples(DataConfig(eval_fraction=0.0), default_tokenizer, rows=rows)
    assert len(train) == 200 and held == []
    assert max(sum(e.loss_mask) for e in train) < 30  # short completions (reply + <|im_end|>\n)
    # ~20 of the ~70 tokens are the system prompt SmolLM2's template adds when a row has none
    assert max(len(e.input_ids) for e in train) <= 72
    problems = heldout_problems(32, rows)
    assert len(problems) == 32
    train_prompts = {r["prompt"][0]["content"] for r in rows}
    assert not any(p["prompt"][0]["content"] in train_prompts for p in problems)
    assert task_accuracy(["Answer: %d" % p["answer"] for p in problems[:4]] + ["Answer: x"] * 4,
                         problems[:8]) == 0.5
    assert TASKS["arithmetic"] is arithmetic
