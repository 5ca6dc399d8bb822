"""Bad inputs, one table: each case is a file (its name and contents), the loader a recipe reads
it with, and the one-line message the user must see, naming the file, the row and the field.

Contents: a list of rows (written as JSONL lines; a str item is written as it is), str or bytes
(written as they are), MISSING (no file) or DIRECTORY (an empty directory); a .parquet file's
rows are written with datasets (None is a null cell). "{path}" in a message is the file's path.
Every case goes through the data loaders and config functions, not a training run, so the table
runs in seconds; the CLI prints these same messages as `tether: error: ...` (test_formats.py)."""

import codecs
import json

import pytest

from tether.config import DataConfig, SFTConfig, load_config
from tether.data.formats import load_sft_examples, read_rows, truncation_counts
from tether.data.preference import load_preference_data
from tether.data.prompts import load_prompt_examples
from tether.errors import DataError, TetherError
from tether.recipes.rm import load_reward_pairs

MISSING, DIRECTORY = object(), object()
OK = {"prompt": "a", "completion": "b"}
PAIR = {"prompt": "Sky?", "chosen": " blue", "rejected": " green"}
SAME = {"prompt": "Sky?", "chosen": " blue", "rejected": " blue"}
Q = [{"role": "user", "content": "What is 2 + 2?"}]
A = [{"role": "assistant", "content": "4"}]


def _msg(role, content):
    return {"role": role, "content": content}


def _data(path, **cfg):
    return DataConfig(path=str(path), eval_fraction=0.0, **cfg)


LOADERS = {  # (path, tokenizer) -> what the recipe would train on
    "read": lambda path, tok: read_rows(path),
    "sft": lambda path, tok: load_sft_examples(_data(path), tok),
    "sft_no_truncation": lambda path, tok: load_sft_examples(
        _data(path, max_length=8, truncation=False), tok),
    "dpo": lambda path, tok: load_preference_data(_data(path), tok),
    "kto": lambda path, tok: load_preference_data(_data(path), tok, unpaired=True),
    "rm": lambda path, tok: load_reward_pairs(_data(path), tok),
    "rm_margin": lambda path, tok: load_reward_pairs(_data(path), tok, margin_key="margin"),
    "rl": lambda path, tok: load_prompt_examples(_data(path), tok),
    "config": lambda path, tok: load_config(SFTConfig, path),
    "overrides": lambda path, tok: load_config(SFTConfig, None, path.read_text().split()),
}

LINE_1 = json.dumps(OK) + "\n"  # 35 bytes

CASES = [  # (name, file name, contents, loader, message)
    # --- files ---------------------------------------------------------------------------------
    ("file_not_found", "nope.jsonl", MISSING, "read", "data file not found: {path}"),
    ("unsupported_suffix", "rows.csv", "prompt,completion\n", "read",
     "{path}: unsupported data file type '.csv': use .jsonl, .json, .parquet or a directory"),
    ("directory_not_a_dataset", "empty_dir", DIRECTORY, "read",
     "{path}: is a directory but not one saved with datasets' save_to_disk"),
    ("json_not_valid", "bad.json", '[{"prompt": "a",]', "read",
     "{path}: not valid JSON (Expecting property name enclosed in double quotes at line 1, "
     "column 17)"),
    ("json_object_without_rows", "obj.json", '{"rows": []}', "read",
     "{path}: a .json data file must hold a list of rows, or {\"train\": [...]} or "
     "{\"data\": [...]}; found an object with keys ['rows']"),
    ("json_row_not_object", "list.json", '[{"prompt": "a", "completion": "b"}, 3]', "read",
     "{path}, row 2: a row must be a JSON object, got int"),
    ("parquet_not_parquet", "broken.parquet", "not parquet", "read",
     "{path}: cannot read parquet file"),
    ("jsonl_only_blank_lines", "empty.jsonl", "\n\n", "sft", "{path}: holds no rows"),
    ("jsonl_byte_not_utf8", "latin1.jsonl", LINE_1.encode() + b'{"prompt": "caf\xe9", '
     b'"completion": "b"}\n', "read",
     "{path}, row 2: not valid UTF-8: byte 0xe9 at byte offset 50 (15 into the line); save the "
     "file as UTF-8"),
    ("jsonl_byte_0xff", "ff.jsonl", b'\xff' + LINE_1.encode(), "sft",
     "{path}, row 1: not valid UTF-8: byte 0xff at byte offset 0 (0 into the line)"),
    ("json_byte_not_utf8", "latin1.json", b'[\n{"prompt": "a",\n "completion": "\xff"}]',
     "read", "{path}: not valid UTF-8: byte 0xff at byte offset 34 (line 3); save the file"),
    ("jsonl_bom_is_skipped", "bom.jsonl", codecs.BOM_UTF8 + (LINE_1 + '{"prompt": "a", '
     '"completion": 1}\n').encode(), "sft",
     "{path}, row 2, field 'completion': must be a string, got int"),
    # --- JSON syntax (row = the JSONL line, blank lines counted) --------------------------------
    ("jsonl_line_cut_short", "cut.jsonl", [OK, '{"prompt": "a", "completion": '], "sft",
     "{path}, row 2: not valid JSON (Expecting value at column 31)"),
    ("jsonl_missing_comma_after_blank", "comma.jsonl",
     [OK, "", '{"prompt": "a" "completion": "b"}'], "sft",
     "{path}, row 3: not valid JSON (Expecting ',' delimiter at column 16)"),
    ("jsonl_unterminated_string", "quote.jsonl", ['{"prompt": "a}'], "sft",
     "{path}, row 1: not valid JSON (Unterminated string starting at column 12)"),
    # --- not a row ------------------------------------------------------------------------------
    ("row_is_a_list", "list.jsonl", ["[1, 2]"], "sft",
     "{path}, row 1: a row must be a JSON object, got list"),
    ("row_is_a_string", "str.jsonl", [OK, '"just a string"'], "sft",
     "{path}, row 2: a row must be a JSON object, got string"),
    ("no_recognised_fields", "q.jsonl", [{"question": "a"}], "sft",
     "{path}, row 1: no recognised fields: expected 'text', 'messages', 'prompt' + "
     "'completion'"),
    # --- missing, null, wrong-typed and empty fields ---------------------------------------------
    ("label_without_completion", "label.jsonl", [OK, {"prompt": "a", "label": True}], "sft",
     "{path}, row 2, field 'completion': missing (an unpaired preference row needs prompt, "
     "completion, label)"),
    ("completion_without_prompt", "noprompt.jsonl", [{"completion": "b"}], "sft",
     "{path}, row 1, field 'prompt': missing (a prompt completion row needs prompt, "
     "completion)"),
    ("completion_an_int", "int.jsonl", [{"prompt": "a", "completion": 7}], "sft",
     "{path}, row 1, field 'completion': must be a string, got int"),
    ("completion_json_null", "null.jsonl", [{"prompt": "a", "completion": None}], "sft",
     "{path}, row 1, field 'completion': must be a string, got null"),
    ("completion_parquet_null", "null.parquet", [OK, {"prompt": "c", "completion": None}],
     "sft", "{path}, row 2, field 'completion': is null (a prompt completion row needs prompt, "
     "completion)"),
    ("rejected_parquet_null", "null_rejected.parquet", [PAIR, dict(PAIR, rejected=None)], "dpo",
     "{path}, row 2, field 'rejected': is null (a preference row needs chosen, rejected)"),
    ("chosen_and_rejected_parquet_null", "null_pair.parquet",
     [PAIR, dict(PAIR, chosen=None, rejected=None)], "rm",
     "{path}, row 2, field 'chosen': is null (a preference row needs chosen, rejected)"),
    ("text_a_list", "text.jsonl", [{"text": ["a"]}], "sft",
     "{path}, row 1, field 'text': must be a string, got list"),
    ("completion_blank", "blank.jsonl", [OK, {"prompt": "a", "completion": "  "}], "sft",
     "{path}, row 2, field 'completion': is empty"),
    ("text_empty", "text_empty.jsonl", [{"text": ""}], "sft",
     "{path}, row 1, field 'text': is empty"),
    ("completion_no_messages", "nomsg.jsonl", [{"prompt": Q, "completion": []}], "sft",
     "{path}, row 1, field 'completion': is empty"),
    ("assistant_content_blank", "blank_reply.jsonl",
     [{"prompt": Q, "completion": [_msg("assistant", " ")]}], "sft",
     "{path}, row 1, field 'completion[0].content': is empty"),
    ("chosen_empty", "chosen.jsonl", [PAIR, dict(PAIR, chosen="")], "dpo",
     "{path}, row 2, field 'chosen': is empty"),
    ("group_an_int", "group.jsonl", [dict(PAIR, group=3)], "dpo",
     "{path}, row 1, field 'group': must be a string, got int"),
    ("label_not_a_bool", "label_str.jsonl", [{"prompt": "a", "completion": "b", "label": "yes"}],
     "kto", "{path}, row 1, field 'label': must be true or false, got 'yes'"),
    ("margin_not_a_number", "margin.jsonl", [dict(PAIR, margin="big")], "rm_margin",
     "{path}, row 1, field 'margin': must be a finite number (rm.margin_key), got 'big'"),
    # --- messages -------------------------------------------------------------------------------
    ("unknown_role", "role.jsonl", [{"prompt": [_msg("robot", "hi")], "completion": A}], "sft",
     "{path}, row 1, field 'prompt[0].role': must be one of system, user, assistant, tool, got "
     "'robot'"),
    ("message_without_content", "nocontent.jsonl", [{"messages": [{"role": "user"}]}], "sft",
     "{path}, row 1, field 'messages[0].content': must be a string, got null"),
    ("content_an_int", "content.jsonl", [{"messages": [_msg("user", 3)]}], "sft",
     "{path}, row 1, field 'messages[0].content': must be a string, got int"),
    ("message_a_string", "msgstr.jsonl", [{"messages": ["hi"]}], "sft",
     "{path}, row 1, field 'messages[0]': must be an object with 'role' and 'content'"),
    ("no_assistant_message", "noreply.jsonl", [{"messages": [_msg("user", "hi")]}], "sft",
     "{path}, row 1, field 'messages': has no assistant message to learn from"),
    ("messages_a_string", "messages.jsonl", [{"messages": "hi"}], "sft",
     "{path}, row 1, field 'messages': must be a list of messages, got string"),
    ("completion_string_prompt_messages", "style1.jsonl", [{"prompt": Q, "completion": "4"}],
     "sft", "{path}, row 1, field 'completion': is a plain string but 'prompt' is a list of "
     "messages; use one style per row"),
    ("completion_messages_prompt_string", "style2.jsonl", [{"prompt": "q", "completion": A}],
     "sft", "{path}, row 1, field 'completion': is a list of messages but 'prompt' is a plain "
     "string; use one style per row"),
    # --- rows of another recipe's format --------------------------------------------------------
    ("preference_row_to_sft", "pref.jsonl", [OK, PAIR], "sft",
     "{path}, row 2: is a preference row, which `tether dpo` and `tether rm` take"),
    ("unpaired_row_to_sft", "unpaired.jsonl", [{"prompt": "a", "completion": "b", "label": False}],
     "sft", "{path}, row 1: is an unpaired preference row, which `tether dpo` with dpo.loss=kto "
     "take"),
    ("prompt_only_row_to_sft", "prompt.jsonl", [{"prompt": "a"}], "sft",
     "{path}, row 1: is a prompt only row, which the RL recipes (`tether grpo`, `tether ppo`) "
     "take"),
    ("sft_row_to_dpo", "sft.jsonl", [PAIR, OK], "dpo",
     "{path}, row 2: is a prompt completion row; `tether dpo` takes preference rows"),
    ("unpaired_row_to_dpo", "unpaired_dpo.jsonl", [dict(OK, label=True)], "dpo",
     "{path}, row 1, field 'label': is an unpaired row ('label'); only dpo.loss=kto takes "
     "unpaired rows"),
    ("sft_row_to_rm", "sft_rm.jsonl", [PAIR, OK], "rm",
     "{path}, row 2: is a prompt completion row; `tether rm` takes preference rows"),
    ("preference_row_to_rl", "pref_rl.jsonl", [PAIR], "rl",
     "{path}, row 1: is a preference row; the RL recipes take prompt rows"),
    # --- pairs with nothing to prefer -----------------------------------------------------------
    ("every_pair_identical_dpo", "same.jsonl", [SAME, dict(SAME, prompt="Sea?")], "dpo",
     "{path}: chosen and rejected are identical in every one of its 2 pairs: there is nothing "
     "to prefer"),
    ("every_pair_identical_rm", "same_rm.jsonl", [SAME], "rm",
     "{path}: chosen and rejected are identical in every one of its 1 pairs"),
    ("every_pair_identical_kto", "same_kto.jsonl", [SAME], "kto",
     "{path}: chosen and rejected are identical in every one of its 1 pairs"),
    ("every_chat_pair_identical", "same_chat.jsonl", [{"chosen": Q + A, "rejected": Q + A}],
     "dpo", "{path}: chosen and rejected are identical in every one of its 1 pairs"),
    # --- length ---------------------------------------------------------------------------------
    ("too_long_without_truncation", "long.jsonl",
     [{"prompt": "Q:", "completion": " and".join(["x"] * 10)}], "sft_no_truncation",
     "{path}, row 1, field 'completion': is too long: prompt + completion is 22 tokens (prompt "
     "2) but data.max_length is 8 (raise it, or set data.truncation=true to cut the "
     "completion)"),
    # --- config files and overrides -------------------------------------------------------------
    ("config_not_found", "nope.yaml", MISSING, "config", "config file not found: {path}"),
    ("config_unknown_key", "unknown.yaml", "train:\n  lr2: 0.1\n", "config",
     "unknown config key 'train.lr2'"),
    ("config_unknown_section", "section.yaml", "trian:\n  lr: 0.1\n", "config",
     "unknown config key 'trian'"),
    ("config_wrong_type", "type.yaml", "train:\n  lr: fast\n", "config",
     "config key 'train.lr' must be a number, got 'fast'"),
    ("config_bool_not_bool", "bool.yaml", "data:\n  truncation: maybe\n", "config",
     "config key 'data.truncation' must be true or false, got 'maybe'"),
    ("config_not_yaml", "bad.yaml", "train: [\n", "config",
     "{path}: not valid YAML (expected the node content, but found '<stream end>' at line 2, "
     "column 1)"),
    ("config_not_a_mapping", "list.yaml", "- train\n", "config",
     "{path}: the top level must be a mapping of sections"),
    ("override_without_value", "args.txt", "--train.lr", "overrides",
     "override '--train.lr' must look like --section.key=value"),
    ("override_unknown_key", "args2.txt", "--train.learning_rate=1", "overrides",
     "unknown config key 'train.learning_rate'"),
]


def _write(path, contents):
    if contents is MISSING:
        return
    if contents is DIRECTORY:
        path.mkdir()
    elif isinstance(contents, bytes):
        path.write_bytes(contents)
    elif isinstance(contents, str):
        path.write_text(contents)
    elif path.suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_list(contents).to_parquet(str(path))
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                for r in contents))


def test_the_table_has_the_cases_the_hardening_issue_asks_for():
    assert len(CASES) >= 25
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, filename, contents, loader, message", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path, default_tokenizer, name, filename, contents,
                                     loader, message):
    path = tmp_path / filename
    _write(path, contents)
    with pytest.raises(TetherError) as err:
        LOADERS[loader](path, default_tokenizer)
    text = str(err.value)
    assert message.replace("{path}", str(path)) in text, text
    # what the CLI prints: one line, no traceback, no exception chain
    assert "\n" not in text and "Traceback" not in text
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__
    if isinstance(err.value, DataError) and err.value.source is not None:
        assert err.value.source == str(path)


# ------------------------------------------------------------------ inputs that now load


def test_a_byte_order_mark_is_skipped(tmp_path):
    rows = [OK, {"prompt": "c", "completion": "d"}]
    plain = [(1, rows[0]), (2, rows[1])]
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + "".join(
        json.dumps(r) + "\r\n" for r in rows).encode())  # as PowerShell writes it
    (tmp_path / "bom.json").write_bytes(codecs.BOM_UTF8 + json.dumps(rows).encode())
    assert read_rows(tmp_path / "bom.jsonl") == plain
    assert read_rows(tmp_path / "bom.json") == plain


@pytest.mark.parametrize("loader", ["dpo", "rm"])
def test_identical_pairs_are_dropped_with_a_count(tmp_path, default_tokenizer, capsys, loader):
    chat_same = {"prompt": Q, "chosen": A, "rejected": [_msg("assistant", "4")]}
    rows = [PAIR, SAME, dict(PAIR, prompt="Sea?"), chat_same]
    path = tmp_path / "prefs.jsonl"
    _write(path, rows)
    train = LOADERS[loader](path, default_tokenizer)[0]
    assert len(train) == 2
    assert capsys.readouterr().out == (f"dropped 2 pairs whose chosen and rejected are identical "
                                       f"(file {path}, rows 2, 4)\n")
    assert all(p.chosen != p.rejected for p in train)


def test_truncated_rows_and_tokens_are_counted(tmp_path, default_tokenizer):
    tok = default_tokenizer
    long = " and".join(["x"] * 10)  # 19 tokens
    path = tmp_path / "long.jsonl"
    _write(path, [OK, {"prompt": "Q:", "completion": long}, {"text": long}])
    examples = load_sft_examples(_data(path, max_length=8), tok)[0]
    assert [e.truncated for e in examples] == [0, 2 + 19 + 1 - 8, 19 + 1 - 8]
    assert truncation_counts([(e,) for e in examples]) == {"data/truncated_rows": 2,
                                                          "data/truncated_tokens": 26}
    path = tmp_path / "long_pairs.jsonl"
    _write(path, [PAIR, dict(PAIR, rejected=long)])
    pairs = load_preference_data(_data(path, max_length=8), tok)[0]
    assert [(p.chosen.truncated, p.rejected.truncated) for p in pairs] == [(0, 0), (0, 14)]
    assert truncation_counts([p.sequences for p in pairs]) == {"data/truncated_rows": 1,
                                                               "data/truncated_tokens": 14}
