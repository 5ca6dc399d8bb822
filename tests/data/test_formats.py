"""Data: every file type loads, every malformed row names file, row and field, and prompt and
completion are tokenised separately so the boundary never merges tokens."""

import json

import pytest

from tether.config import DataConfig
from tether.data.formats import load_sft_examples, read_rows, tokenize_sft, validate_row
from tether.errors import DataError

CHAT = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "completion": [{"role": "assistant", "content": "2 + 2 = 4\nAnswer: 4"}]}


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _load(path, tok, **cfg):
    return load_sft_examples(DataConfig(path=str(path), eval_fraction=0.0, **cfg), tok)


# ------------------------------------------------------------------ malformed rows


@pytest.mark.parametrize("rows, row, field, words", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '], 2, None,
     "not valid JSON"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "label": True}], 2, "completion",
     "missing"),
    ([{"prompt": "a", "completion": 7}], 1, "completion", "must be a string"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "  "}], 2, "completion",
     "is empty"),
    ([{"prompt": [{"role": "robot", "content": "hi"}], "completion": []}], 1, "prompt[0].role",
     "role must be one of"),
    ([{"messages": [{"role": "user", "content": 3}]}], 1, "messages[0].content",
     "content must be a string"),
    (['[1, 2]'], 1, None, "must be a JSON object"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "chosen": "b", "rejected": "c"}], 2,
     None, "is a preference row"),
    ([{"question": "a"}], 1, None, "no recognised fields"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, default_tokenizer, rows, row, field,
                                                words):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        _load(path, default_tokenizer)
    message = str(err.value)
    assert message.startswith(f"{path}, row {row}")
    if field is not None:
        assert f"field '{field}'" in message
    assert words in message
    assert "Traceback" not in message and "\n" not in message


def test_overlong_prompt_with_truncation_off_names_row_and_counts(tmp_path, default_tokenizer):
    rows = [{"prompt": "short", "completion": "ok"},
            {"prompt": "word " * 100, "completion": "the end"}]
    path = _jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match=r"long\.jsonl, row 2, field 'completion': is too long: "
                                        r"\d+ tokens but data.max_length is 32"):
        _load(path, default_tokenizer, max_length=32, truncation=False)
    with pytest.raises(DataError, match=r"row 2, field 'prompt': prompt is \d+ tokens"):
        _load(path, default_tokenizer, max_length=32, truncation=True)


def test_cli_reports_bad_row_in_one_line(tmp_path, capsys):
    from tether.cli import main

    path = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": 1}])
    assert main(["sft", f"--data.path={path}", "--run.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tether: error: {path}, row 1, field 'completion': must be a string, "
                   "got int")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ file types and formats


def test_all_four_file_types_give_the_same_rows(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    _jsonl(tmp_path / "r.jsonl", rows)
    (tmp_path / "r.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for name in ("r.jsonl", "r.json", "r.parquet", "saved"):
        assert [r for _, r in read_rows(tmp_path / name)] == rows, name
    with pytest.raises(DataError, match="no split 'test' \\(splits: train\\)"):
        read_rows(tmp_path / "saved", split="test")


def test_format_detection():
    cases = {"language_modeling": [{"text": "x"}, {"messages": CHAT["prompt"] + CHAT["completion"]}],
             "prompt_completion": [{"prompt": "a", "completion": "b"}, CHAT],
             "prompt_only": [{"prompt": "a"}],
             "preference": [{"prompt": "a", "chosen": "b", "rejected": "c"},
                            {"chosen": CHAT["completion"], "rejected": CHAT["completion"]}],
             "unpaired_preference": [{"prompt": "a", "completion": "b", "label": False}]}
    for fmt, rows in cases.items():
        for row in rows:
            assert validate_row(row, "f", 1) == fmt
    with pytest.raises(DataError, match="field 'label': must be true or false"):
        validate_row({"prompt": "a", "completion": "b", "label": "yes"}, "f", 1)


# ------------------------------------------------------------------ tokenisation


def _tok(row, tok, **kw):
    args = dict(max_length=512, truncation=True, completion_only_loss=True, source="f",
                row_index=1)
    args.update(kw)
    return tokenize_sft(row, tok, **args)


def test_boundary_never_merges_tokens(default_tokenizer):
    """"hel" + "lo" tokenised jointly is one token "hello"; ours keeps ids(hel) + ids(lo)."""
    tok = default_tokenizer
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids("hello") != ids("hel") + ids("lo")  # the joint tokenisation would merge
    ex = _tok({"prompt": "hel", "completion": "lo"}, tok)
    assert ex.input_ids == ids("hel") + ids("lo") + [tok.eos_token_id]
    n_prompt = len(ids("hel"))
    assert ex.loss_mask == [False] * n_prompt + [True] * (len(ids("lo")) + 1)


def test_chat_loss_mask_selects_exactly_the_assistant_reply(default_tokenizer):
    tok = default_tokenizer
    ex = _tok(CHAT, tok)
    target = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert tok.decode(target) == "2 + 2 = 4\nAnswer: 4<|im_end|>\n"
    prompt = [t for t, m in zip(ex.input_ids, ex.loss_mask) if not m]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    full = tok.apply_chat_template(CHAT["prompt"] + CHAT["completion"], tokenize=False)
    assert tok.decode(ex.input_ids) == full


def test_multi_turn_messages_train_on_every_assistant_turn_only(default_tokenizer):
    tok = default_tokenizer
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    ex = _tok({"messages": msgs}, tok)
    spans, current = [], []
    for t, m in zip(ex.input_ids, ex.loss_mask):
        if m:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans.append(tok.decode(current)) if current else None
    assert spans == ["Hello!<|im_end|>\n", "Goodbye.<|im_end|>\n"]
    everything = _tok({"messages": msgs}, tok, completion_only_loss=False)
    assert everything.loss_mask == [False] + [True] * (len(everything.input_ids) - 1)


def test_truncation_keeps_the_prompt_and_cuts_the_completion(default_tokenizer):
    tok = default_tokenizer
    row = {"prompt": "The prompt.", "completion": " one two three four five six seven"}
    n_prompt = len(tok("The prompt.", add_special_tokens=False)["input_ids"])
    ex = _tok(row, tok, max_length=n_prompt + 3)
    assert len(ex.input_ids) == n_prompt + 3
    assert ex.loss_mask == [False] * n_prompt + [True] * 3
    assert tok.decode(ex.input_ids[:n_prompt]) == "The prompt."


def test_eval_split_is_seeded_and_disjoint(default_tokenizer):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    cfg = DataConfig(eval_fraction=0.2)
    train, held = load_sft_examples(cfg, default_tokenizer, rows=rows)
    train2, held2 = load_sft_examples(cfg, default_tokenizer, rows=rows)
    assert len(train) == 16 and len(held) == 4
    assert [e.input_ids for e in held] == [e.input_ids for e in held2]
    assert not {tuple(e.input_ids) for e in held} & {tuple(e.input_ids) for e in train}
