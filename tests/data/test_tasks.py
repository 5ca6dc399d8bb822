"""The built-in arithmetic task: exact answers, an exact verifier, valid SFT rows."""

from tether.data.formats import validate_row
from tether.data.tasks import builtin_sft_rows, heldout_problems, task_accuracy
from tether.data.tasks.arithmetic import _evaluate, arithmetic_problems, extract_answer, format_ok, verify


def test_answers_are_exact():
    assert _evaluate("23 + 45") == 68
    assert _evaluate("18 - 72") == -54
    assert _evaluate("7 + 3 * 4 - 2") == 17  # * before + and -
    for p in arithmetic_problems(50, seed=1, difficulty="hard"):
        expr = p["prompt"][0]["content"].split("What is ")[1].split("?")[0]
        assert p["answer"] == _evaluate(expr)


def test_verifier_reads_the_last_answer():
    assert extract_answer("2 + 2 = 4\nAnswer: 4") == 4
    assert extract_answer("Answer: 3 ... no wait. Answer: -12") == -12
    assert extract_answer("The answer is 4") is None
    assert verify("Answer: 68", 68) and not verify("Answer: 67", 68)
    assert format_ok("x = 1\nAnswer: 1\n") and not format_ok("Answer: 1, I think")


def test_builtin_rows_are_valid_deterministic_and_heldout_is_disjoint():
    rows = builtin_sft_rows()
    assert rows == builtin_sft_rows()
    assert all(validate_row(r, "builtin", i) == "prompt_completion" for i, r in enumerate(rows))
    held = heldout_problems(32, rows)
    assert len(held) == 32
    train_prompts = {r["prompt"][0]["content"] for r in rows}
    assert not any(p["prompt"][0]["content"] in train_prompts for p in held)
    assert task_accuracy(["Answer: %d" % p["answer"] for p in held[:4]] + ["Answer: x"] * 4,
                         held[:8]) == 0.5
