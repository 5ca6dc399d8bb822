"""Data: every file type loads, every malformed row names file, row and field (the table of bad
inputs is test_bad_inputs.py), and prompt and completion are tokenised separately so the boundary
never merges tokens."""

import json

import pytest

from tether.config import DataConfig
from tether.data.formats import load_sft_examples, read_rows, tokenize_sft, validate_row
from tether.errors import DataError

CHAT = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "completion": [{"role": "assistant", "content": "2 + 2 = 4\nAnswer: 4"}]}
OK = {"prompt": "a", "completion": "b"}


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _load(path, tok, **cfg):
    return load_sft_examples(DataConfig(path=str(path), eval_fraction=0.0, **cfg), tok)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _tok(row, tok, **kw):
    args = dict(max_length=512, truncation=True, completion_only_loss=True, source="f",
                row_index=1)
    args.update(kw)
    return tokenize_sft(row, tok, **args)


def _selected(ex, want=True):
    return [t for t, m in zip(ex.input_ids, ex.loss_mask) if m == want]


# ------------------------------------------------------------------ malformed rows


def _msg(role, content):
    return {"role": role, "content": content}


def test_overlong_rows_with_truncation_off_name_row_field_and_counts(tmp_path, default_tokenizer):
    tok = default_tokenizer
    long_prompt = "word " * 100
    path = _jsonl(tmp_path / "long.jsonl", [{"prompt": "short", "completion": "ok"},
                                            {"prompt": long_prompt, "completion": "the end"}])
    n_prompt = len(_ids(tok, long_prompt))
    with pytest.raises(DataError) as err:
        _load(path, tok, max_length=32, truncation=False)
    assert str(err.value) == (
        f"{path}, row 2, field 'prompt': prompt is {n_prompt} tokens but data.max_length is 32: "
        "no room for the completion (raise data.max_length or shorten the prompt)")
    # truncation cannot help either: it keeps the prompt whole
    with pytest.raises(DataError, match=rf"row 2, field 'prompt': prompt is {n_prompt} tokens"):
        _load(path, tok, max_length=32, truncation=True)

    long_completion = " and".join(["x"] * 40)
    path = _jsonl(tmp_path / "long2.jsonl", [{"prompt": "Q:", "completion": long_completion}])
    n = len(_ids(tok, "Q:")) + len(_ids(tok, long_completion)) + 1  # + EOS
    with pytest.raises(DataError) as err:
        _load(path, tok, max_length=32, truncation=False)
    assert str(err.value) == (
        f"{path}, row 1, field 'completion': is too long: prompt + completion is {n} tokens "
        f"(prompt {len(_ids(tok, 'Q:'))}) but data.max_length is 32 (raise it, or set "
        "data.truncation=true to cut the completion)")

    path = _jsonl(tmp_path / "long3.jsonl", [{"text": long_completion}])
    with pytest.raises(DataError, match=r"long3\.jsonl, row 1, field 'text': is too long: "
                                        rf"{n - len(_ids(tok, 'Q:'))} tokens but data.max_length "
                                        "is 32"):
        _load(path, tok, max_length=32, truncation=False)


def test_cli_reports_bad_row_in_one_line(tmp_path, capsys):
    from tether.cli import main

    path = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": 1}])
    assert main(["sft", f"--data.path={path}", "--run.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tether: error: {path}, row 1, field 'completion': must be a string, "
                   "got int")


# ------------------------------------------------------------------ file types and formats


def test_all_file_types_give_the_same_rows_and_examples(tmp_path, default_tokenizer):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    _jsonl(tmp_path / "r.jsonl", rows)
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "split.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    (tmp_path / "data.json").write_text(json.dumps({"data": rows}))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved_ds"))
    DatasetDict({"train": Dataset.from_list(rows),
                 "test": Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "saved"))
    names = ("r.jsonl", "r.json", "split.json", "data.json", "r.parquet", "saved_ds", "saved")
    first = None
    for name in names:
        assert read_rows(tmp_path / name) == [(1, rows[0]), (2, rows[1])], name
        train, held = _load(tmp_path / name, default_tokenizer)
        assert held == [] and len(train) == 2
        first = first or train
        assert train == first, name
    assert read_rows(tmp_path / "saved", split="test") == [(1, rows[0])]
    assert read_rows(tmp_path / "split.json", split="test") == [(1, rows[0])]
    with pytest.raises(DataError, match=r"saved: no split 'dev' \(splits: train, test\); set "
                                        "data.split"):
        read_rows(tmp_path / "saved", split="dev")


def test_columnar_files_drop_the_nulls_of_unused_columns(tmp_path):
    """One parquet schema for rows of two formats (and messages with an optional key) reads
    back with None in the columns a row does not use; those are absent fields, not nulls."""
    from datasets import Dataset

    rows = [{"text": "plain"},
            {"messages": [{"role": "user", "content": "hi", "name": "ann"},
                          {"role": "assistant", "content": "hello"}]}]
    Dataset.from_dict({"text": ["plain", None], "messages": [None, rows[1]["messages"]]}
                      ).to_parquet(str(tmp_path / "mixed.parquet"))
    read = [r for _, r in read_rows(tmp_path / "mixed.parquet")]
    assert read == rows
    assert [validate_row(r, "f", i) for i, r in enumerate(read, 1)] == ["language_modeling"] * 2


def test_format_detection():
    cases = {"language_modeling": [{"text": "x"}, {"messages": CHAT["prompt"] + CHAT["completion"]}],
             "prompt_completion": [{"prompt": "a", "completion": "b"}, CHAT,
                                   {"prompt": "", "completion": "b"}],
             "prompt_only": [{"prompt": "a"}, {"prompt": CHAT["prompt"]}],
             "preference": [{"prompt": "a", "chosen": "b", "rejected": "c"},
                            {"chosen": "b", "rejected": "c"},
                            {"chosen": CHAT["prompt"] + CHAT["completion"],
                             "rejected": CHAT["prompt"] + CHAT["completion"]},
                            {"prompt": CHAT["prompt"], "chosen": CHAT["completion"],
                             "rejected": CHAT["completion"]}],
             "unpaired_preference": [{"prompt": "a", "completion": "b", "label": False},
                                     dict(CHAT, label=True)]}
    for fmt, rows in cases.items():
        for row in rows:
            assert validate_row(row, "f", 1) == fmt, row


@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "a", "completion": "b", "label": "yes"}, "label", "must be true or false"),
    ({"prompt": "a", "chosen": "b"}, "rejected", "missing"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, "chosen", "is empty"),
    ({"prompt": CHAT["prompt"], "chosen": CHAT["completion"],
      "rejected": [_msg("bot", "no")]}, "rejected[0].role", "must be one of"),
    ({"prompt": CHAT["prompt"], "chosen": CHAT["completion"], "rejected": "4"}, "rejected",
     "is a plain string but 'prompt' is a list of messages"),
])
def test_preference_rows_are_validated_for_later_recipes(row, field, words):
    with pytest.raises(DataError) as err:
        validate_row(row, "prefs.jsonl", 4)
    assert str(err.value).startswith(f"prefs.jsonl, row 4, field '{field}': {words}")


# ------------------------------------------------------------------ tokenisation


@pytest.mark.parametrize("prompt, completion", [("hel", "lo"), ("The answer is ", "Paris")])
def test_boundary_never_merges_tokens(default_tokenizer, prompt, completion):
    """Tokenised jointly, "hel" + "lo" is the single token "hello" and "is " + "Paris" is
    "is" + " Paris"; tether keeps ids(prompt) + ids(completion): the tokens the model must
    produce after exactly that prompt."""
    tok = default_tokenizer
    assert _ids(tok, prompt + completion) != _ids(tok, prompt) + _ids(tok, completion)
    ex = _tok({"prompt": prompt, "completion": completion}, tok)
    assert ex.input_ids == _ids(tok, prompt) + _ids(tok, completion) + [tok.eos_token_id]
    # the loss mask selects exactly the completion (and EOS), decoded back to its text
    assert ex.loss_mask == [False] * len(_ids(tok, prompt)) + [True] * (len(_ids(tok, completion)) + 1)
    assert tok.decode(_selected(ex)) == completion + tok.eos_token
    assert tok.decode(_selected(ex, False)) == prompt


def test_chat_loss_mask_selects_exactly_the_assistant_reply(default_tokenizer):
    tok = default_tokenizer
    ex = _tok(CHAT, tok)
    assert tok.decode(_selected(ex)) == "2 + 2 = 4\nAnswer: 4<|im_end|>\n"
    prompt_text = tok.apply_chat_template(CHAT["prompt"], tokenize=False,
                                          add_generation_prompt=True)
    assert ex.input_ids[:ex.loss_mask.index(True)] == _ids(tok, prompt_text)
    assert tok.decode(_selected(ex, False)) == prompt_text
    full = tok.apply_chat_template(CHAT["prompt"] + CHAT["completion"], tokenize=False)
    assert tok.decode(ex.input_ids) == full
    # without completion_only_loss every token but the first is a target
    everything = _tok(CHAT, tok, completion_only_loss=False)
    assert everything.input_ids == ex.input_ids
    assert everything.loss_mask == [False] + [True] * (len(ex.input_ids) - 1)


def test_empty_conversational_prompt_trains_on_the_rendered_reply(default_tokenizer):
    tok = default_tokenizer
    ex = _tok({"prompt": [], "completion": CHAT["completion"]}, tok)
    full = tok.apply_chat_template(CHAT["completion"], tokenize=False)
    assert ex.input_ids == _ids(tok, full)
    assert ex.loss_mask == [False] + [True] * (len(ex.input_ids) - 1)


def test_multi_turn_messages_train_on_every_assistant_turn_only(default_tokenizer):
    tok = default_tokenizer
    msgs = [_msg("system", "Be brief."), _msg("user", "Hi"), _msg("assistant", "Hello!"),
            _msg("user", "Bye"), _msg("assistant", "Goodbye.")]
    ex = _tok({"messages": msgs}, tok)
    spans, current = [], []
    for t, m in zip(ex.input_ids + [None], ex.loss_mask + [False]):
        if m:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["Hello!<|im_end|>\n", "Goodbye.<|im_end|>\n"]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    everything = _tok({"messages": msgs}, tok, completion_only_loss=False)
    assert everything.loss_mask == [False] + [True] * (len(everything.input_ids) - 1)


def test_text_rows_train_on_every_token_but_the_first_and_end_with_eos(default_tokenizer):
    tok = default_tokenizer
    ex = _tok({"text": "The quick brown fox."}, tok)
    assert ex.input_ids == _ids(tok, "The quick brown fox.") + [tok.eos_token_id]
    assert ex.loss_mask == [False] + [True] * (len(ex.input_ids) - 1)


def test_chat_template_problems_are_data_errors(default_tokenizer, monkeypatch):
    tok = default_tokenizer
    monkeypatch.setattr(tok, "chat_template",
                        "{% for m in messages %}{% if m['role'] == 'system' %}"
                        "{{ raise_exception('System role not supported') }}{% endif %}"
                        "{{ m['content'] }}{% endfor %}")
    row = {"prompt": [_msg("system", "s"), _msg("user", "q")], "completion": CHAT["completion"]}
    with pytest.raises(DataError, match=r"^f, row 1, field 'prompt': the chat template rejects "
                                        "these messages: System role not supported$"):
        _tok(row, tok)
    # a template that renders the last message differently cannot be split at the prompt
    monkeypatch.setattr(tok, "chat_template",
                        "{% for m in messages %}{% if loop.last %}[last]{% endif %}"
                        "{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match=r"field 'completion': the chat template does not render "
                                        "the prompt as a prefix"):
        _tok(CHAT, tok)


def test_truncation_keeps_the_prompt_and_cuts_the_completion(default_tokenizer):
    tok = default_tokenizer
    row = {"prompt": "The prompt.", "completion": " one two three four five six seven"}
    n_prompt = len(_ids(tok, "The prompt."))
    for completion_only_loss in (True, False):
        ex = _tok(row, tok, max_length=n_prompt + 3, completion_only_loss=completion_only_loss)
        assert ex.input_ids == _ids(tok, "The prompt.") + _ids(tok, row["completion"])[:3]
        assert tok.decode(ex.input_ids[n_prompt:]) == " one two three"
        assert ex.loss_mask[n_prompt:] == [True] * 3
    assert ex.loss_mask[:n_prompt] == [False] + [True] * (n_prompt - 1)  # completion_only_loss off
    # a chat row keeps its whole prompt (system, user, assistant header)
    ex = _tok(CHAT, tok, max_length=52)
    n_chat_prompt = ex.loss_mask.index(True)
    assert len(ex.input_ids) == 52 and n_chat_prompt < 52
    assert tok.decode(ex.input_ids[:n_chat_prompt]).endswith("<|im_start|>assistant\n")
    with pytest.raises(DataError, match=rf"prompt is {n_chat_prompt} tokens but data.max_length "
                                        f"is {n_chat_prompt}"):
        _tok(CHAT, tok, max_length=n_chat_prompt)


def test_eval_split_is_seeded_and_disjoint(default_tokenizer, tmp_path):
    tok = default_tokenizer
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    cfg = DataConfig(eval_fraction=0.2)
    train, held = load_sft_examples(cfg, tok, rows=rows)
    train2, held2 = load_sft_examples(cfg, tok, rows=rows)
    assert len(train) == 16 and len(held) == 4
    assert held == held2 and train == train2
    assert not {tuple(e.input_ids) for e in held} & {tuple(e.input_ids) for e in train}
    everything = [_tok(r, tok) for r in rows]
    assert [everything.index(e) for e in train] == sorted(everything.index(e) for e in train)
    assert load_sft_examples(DataConfig(eval_fraction=0.0), tok, rows=rows)[1] == []
    assert len(load_sft_examples(DataConfig(eval_fraction=1.0), tok, rows=rows)[0]) == 1
    # eval_path: every row of `rows` trains, the eval file's rows evaluate; its errors name it
    _jsonl(tmp_path / "eval.jsonl", rows[:3])
    train, held = load_sft_examples(DataConfig(eval_path=str(tmp_path / "eval.jsonl")), tok,
                                    rows=rows)
    assert len(train) == 20 and held == everything[:3]
    _jsonl(tmp_path / "bad_eval.jsonl", [OK, {"prompt": "a"}])
    with pytest.raises(DataError, match=r"bad_eval\.jsonl, row 2: is a prompt only row"):
        load_sft_examples(DataConfig(eval_path=str(tmp_path / "bad_eval.jsonl")), tok, rows=rows)
