"""Stepwise rows: a score position at the separator after every step, whole steps truncated,
bad rows named by file, row and field, and exact labels in the built-in running-sum set."""

import re

import pytest

from tether.config import DataConfig
from tether.data.stepwise import (builtin_stepwise_rows, load_stepwise_data, running_sum_rows,
                                  tokenize_stepwise, validate_stepwise_row)
from tether.errors import ConfigError, DataError

ROW = {"prompt": "Add 2, 3, 4.", "completions": ["2 + 3 = 5", "5 + 4 = 9"], "labels": [True, True]}


def tok(row, tokenizer, separator="\n", max_length=256, truncation=True):
    sep_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    return tokenize_stepwise(row, tokenizer, separator=separator, separator_ids=sep_ids,
                             max_length=max_length, truncation=truncation, source="s.jsonl",
                             row_index=7)


def test_score_position_is_the_separator_after_each_step(default_tokenizer):
    ids = lambda text: default_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ex = tok(ROW, default_tokenizer)
    prompt, s1, s2, sep = ids("Add 2, 3, 4."), ids("2 + 3 = 5"), ids("5 + 4 = 9"), ids("\n")
    assert len(sep) == 1
    assert ex.input_ids == prompt + s1 + sep + s2 + sep  # each piece tokenised alone, joined
    assert ex.step_positions == [len(prompt) + len(s1), len(ex.input_ids) - 1]
    assert all(ex.input_ids[p] == sep[0] for p in ex.step_positions)
    assert ex.step_labels == [True, True]
    # a multi-token separator: the score sits on its last token
    ex = tok(ROW, default_tokenizer, separator=" ки\n")
    sep = ids(" ки\n")
    assert len(sep) > 1
    assert ex.input_ids[ex.step_positions[0] - len(sep) + 1:ex.step_positions[0] + 1] == sep
    assert ex.step_positions[1] == len(ex.input_ids) - 1


def test_conversational_prompt_uses_the_generation_prompt(default_tokenizer):
    row = dict(ROW, prompt=[{"role": "user", "content": "Add 2, 3, 4."}])
    ex = tok(row, default_tokenizer)
    head = default_tokenizer.apply_chat_template(row["prompt"], tokenize=False,
                                                 add_generation_prompt=True)
    n = len(default_tokenizer(head, add_special_tokens=False)["input_ids"])
    assert default_tokenizer.decode(ex.input_ids[:n]) == head
    assert default_tokenizer.decode(ex.input_ids[n:]) == "2 + 3 = 5\n5 + 4 = 9\n"


def test_truncation_drops_whole_trailing_steps(default_tokenizer):
    full = tok(ROW, default_tokenizer)
    cut = tok(ROW, default_tokenizer, max_length=len(full.input_ids) - 1)
    assert cut.input_ids == full.input_ids[:full.step_positions[0] + 1]
    assert cut.step_positions == full.step_positions[:1] and cut.step_labels == [True]
    with pytest.raises(DataError, match=r"s.jsonl, row 7, field 'completions': is too long"):
        tok(ROW, default_tokenizer, max_length=len(full.input_ids) - 1, truncation=False)
    with pytest.raises(DataError, match="no step fits"):
        tok(ROW, default_tokenizer, max_length=3)


@pytest.mark.parametrize("change, field, words", [
    ({"labels": [True]}, "labels", "1 labels for 2 steps"),
    ({"labels": [True, "yes"]}, "labels[1]", "must be true or false, got 'yes'"),
    ({"labels": [True, 0]}, "labels[1]", "must be true or false, got 0"),
    ({"labels": True}, "labels", "must be a list"),
    ({"completions": ["2 + 3 = 5", ""]}, "completions[1]", "empty step"),
    ({"completions": []}, "completions", "non-empty list"),
    ({"completions": ["2 + 3 = 5", 9]}, "completions[1]", "must be a string, got int"),
    ({"completions": ["2 + 3 = 5\n", "x"]}, "completions[0]", "contains the step separator"),
    ({"prompt": 3}, "prompt", "string or a list of messages"),
    ({"prompt": [{"role": "robot", "content": "hi"}]}, "prompt[0].role", "must be one of"),
])
def test_bad_row_names_file_row_field(change, field, words):
    row = {**ROW, **change}
    with pytest.raises(DataError) as err:
        validate_stepwise_row(row, "s.jsonl", 7, "\n")
    assert str(err.value).startswith(f"s.jsonl, row 7, field '{field}': ")
    assert words in str(err.value)
    with pytest.raises(DataError, match=r"row 7, field 'labels': missing"):
        validate_stepwise_row({"prompt": "p", "completions": ["a"]}, "s.jsonl", 7, "\n")


def test_load_splits_whole_rows_and_refuses_a_bad_separator(default_tokenizer):
    rows = running_sum_rows(20)
    train, held = load_stepwise_data(DataConfig(eval_fraction=0.2), default_tokenizer,
                                     separator="\n", rows=rows)
    assert (len(train), len(held)) == (16, 4)
    assert sum(len(e.step_labels) for e in train + held) == sum(len(r["labels"]) for r in rows)
    with pytest.raises(ConfigError, match="step_separator"):
        load_stepwise_data(DataConfig(), default_tokenizer, separator="", rows=rows)


def test_running_sum_labels_are_exact():
    """Each step "s + x = r" is correct iff r is the true partial sum of the prompt's numbers;
    so after the first wrong step every step is wrong, and steps are locally consistent (each
    starts from the result the previous step reached)."""
    rows = builtin_stepwise_rows()
    assert len(rows) == 400 and rows == builtin_stepwise_rows()  # deterministic
    n_wrong = 0
    for row in rows:
        xs = [int(x) for x in re.findall(r"\d+", row["prompt"])]
        shown = xs[0]
        for k, (step, label) in enumerate(zip(row["completions"], row["labels"], strict=True)):
            s, x, r = map(int, re.fullmatch(r"(\d+) \+ (\d+) = (-?\d+)", step).groups())
            assert (s, x) == (shown, xs[k + 1])
            assert label == (r == sum(xs[:k + 2]))
            shown = r
        labels = row["labels"]
        if False in labels:
            n_wrong += 1
            assert not any(labels[labels.index(False):])
        validate_stepwise_row(row, "built-in", 1, "\n")
    assert 0.4 < n_wrong / len(rows) < 0.8
    assert rows[0] == {"prompt": "Add 9, 9, 8, 1, 1.",
                       "completions": ["9 + 9 = 18", "18 + 8 = 26", "26 + 1 = 30", "30 + 1 = 31"],
                       "labels": [True, True, False, False]}
