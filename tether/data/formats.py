"""Rows in TRL's formats -> validated, tokenised examples.

Formats (standard = strings, conversational = lists of {"role", "content"} messages):
    language_modeling     {"text"} | {"messages"}
    prompt_completion     {"prompt", "completion"}
    prompt_only           {"prompt"}
    preference            {"prompt"?, "chosen", "rejected"}
    unpaired_preference   {"prompt", "completion", "label": bool}
A malformed row raises DataError naming the file, the row (1-based; the line of a JSONL file) and
the field. Prompt and completion are tokenised separately and joined, so no token ever spans the
boundary, and the loss mask selects exactly the completion's tokens.
"""

from __future__ import annotations

import codecs
import json
import math
import random
from pathlib import Path
from typing import Any

from tether.config import DataConfig
from tether.data.collate import Example
from tether.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("language_modeling", "prompt_completion", "prompt_only", "preference",
           "unpaired_preference")
SFT_FORMATS = ("language_modeling", "prompt_completion")
# Which recipe takes a row of each format that `tether sft` does not.
TAKEN_BY = {
    "prompt_only": "the RL recipes (`tether grpo`, `tether ppo`)",
    "preference": "`tether dpo` and `tether rm`",
    "unpaired_preference": "`tether dpo` with dpo.loss=kto",
}

Rows = list[tuple[int, dict]]  # (row number, row): the number is 1-based, a JSONL line number


# ------------------------------------------------------------------------------ reading files


def read_rows(path: str | Path, *, split: str = "train") -> Rows:
    """(row number, row) pairs of a .jsonl, .json or .parquet file or a `datasets.save_to_disk`
    directory. Row numbers are 1-based; in a JSONL file they are line numbers (blank lines are
    skipped but still counted), so an error points at the line to fix."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _objects(_jsonl_rows(path), path)
    if suffix == ".json":
        raw = path.read_bytes()
        start = _bom_length(raw)
        try:
            data = json.loads(_decode(raw[start:], path, start))
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({_json_problem(err, line=True)})",
                            source=str(path)) from None
        if isinstance(data, dict):
            for key in (split, "data"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list):
            found = f"an object with keys {sorted(data)}" if isinstance(data, dict) \
                else type_name(data)
            raise DataError(f"a .json data file must hold a list of rows, or {{\"{split}\": "
                            f"[...]}} or {{\"data\": [...]}}; found {found}", source=str(path))
        return _objects(list(enumerate(data, start=1)), path)
    if suffix == ".parquet":
        from datasets import Dataset

        try:
            ds = Dataset.from_parquet(str(path))
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"cannot read parquet file ({type(err).__name__}: {err})",
                            source=str(path)) from None
        return _objects(_columnar(ds.to_list()), path)
    raise DataError(f"unsupported data file type '{suffix}': use .jsonl, .json, .parquet or a "
                    "directory saved with datasets' save_to_disk", source=str(path))


def _jsonl_rows(path: Path) -> Rows:
    """(line number, parsed line) of each non-blank line. Lines split as text mode splits them
    (\n, \r\n, \r)."""
    data = path.read_bytes()
    offset = _bom_length(data)
    rows = []
    for number, raw in enumerate(data[offset:].splitlines(keepends=True), start=1):
        line = _decode(raw, path, offset, row=number)
        offset += len(raw)
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line.rstrip("\r\n"))))
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({_json_problem(err)})", source=str(path),
                            row=number) from None
    return rows


def _bom_length(data: bytes) -> int:
    """3 if `data` starts with the UTF-8 byte-order mark (files saved by Excel or PowerShell
    have one), else 0."""
    return len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0


def _decode(raw: bytes, path: Path, start: int, row: int | None = None) -> str:
    """`raw`, the file's bytes from offset `start` (row `row` of a JSONL file, or the rest of
    the file), as UTF-8; an undecodable byte is a DataError naming its offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.start
        line = raw.count(b"\n", 0, bad) + 1
        within = f"{bad} into the line" if row is not None else f"line {line}"
        raise DataError(f"not valid UTF-8: byte 0x{raw[bad]:02x} at byte offset {start + bad} "
                        f"({within}); save the file as UTF-8", source=str(path),
                        row=row) from None


def _json_problem(err: json.JSONDecodeError, *, line: bool = False) -> str:
    """json's message and where: "Expecting value at column 3", "Unterminated string starting
    at line 2, column 9" (json's message for the latter already ends in "at")."""
    where = f"line {err.lineno}, column {err.colno}" if line else f"column {err.colno}"
    return f"{err.msg.removesuffix(' at')} at {where}"


def _read_saved_dataset(path: Path, split: str) -> Rows:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError("is a directory but not one saved with datasets' save_to_disk",
                        source=str(path)) from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"no split '{split}' (splits: {', '.join(ds)}); set data.split",
                            source=str(path))
        ds = ds[split]
    return _objects(_columnar(ds.to_list()), path)


class ColumnarRow(dict):
    """A row of a columnar source; `nulls` names its top-level fields that were null (and so
    dropped), for the errors that would otherwise call the row one of another format."""
    nulls: tuple[str, ...] = ()


def _columnar(rows: list[dict]) -> Rows:
    """Rows of a columnar source (parquet, Arrow). A column a row does not use reads back as
    None (rows of several formats, or messages with and without an optional key, share one
    schema), so None there means "absent" and is dropped."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    def columnar_row(row: dict) -> ColumnarRow:
        out = ColumnarRow(clean(row))
        out.nulls = tuple(k for k, v in row.items() if v is None)
        return out

    return [(number, columnar_row(row)) for number, row in enumerate(rows, start=1)]


def _objects(rows: Rows, path: Path) -> Rows:
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"a row must be a JSON object, got {type_name(row)}",
                            source=str(path), row=number)
    return rows


def _a(fmt: str) -> str:
    """"a preference", "an unpaired preference": a format name for messages."""
    name = fmt.replace("_", " ")
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for messages ("got null", "got list")."""
    if value is None:
        return "null"
    return {dict: "object", str: "string"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------ validation


def detect_format(row: dict, source: str, row_number: int) -> str:
    """The row's TRL format, read from which fields it has (not their types)."""
    keys = set(row)
    if "messages" in keys or "text" in keys:
        return "language_modeling"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "label" in keys:
        return "unpaired_preference"
    if "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt_only"
    null = f" (null: {', '.join(nulls(row))})" if nulls(row) else ""
    raise DataError("no recognised fields: expected 'text', 'messages', 'prompt' + 'completion', "
                    "'prompt' + 'chosen' + 'rejected' or 'prompt' + 'completion' + 'label'; "
                    f"found {sorted(keys)}{null}", source=source, row=row_number)


REQUIRED = {
    "language_modeling": (),
    "prompt_completion": ("prompt", "completion"),
    "prompt_only": ("prompt",),
    "preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
}


def nulls(row: dict) -> tuple[str, ...]:
    """The fields a columnar row holds as null (absent from the dict); none for JSON rows."""
    return getattr(row, "nulls", ())


def check_not_null(row: dict, formats: tuple[str, ...], where: dict) -> None:
    """For a row of none of `formats`: if it lacks a field one of them requires only because
    that field's cell is null, say so (rather than name the format the other fields make)."""
    for fmt in formats:
        missing = [name for name in REQUIRED[fmt] if name not in row]
        if missing and set(missing) <= set(nulls(row)):
            raise DataError(f"is null ({_a(fmt)} row needs {', '.join(REQUIRED[fmt])})",
                            field=missing[0], **where)


def is_conversational(row: dict) -> bool:
    """Conversational rows hold lists of messages; standard rows hold strings."""
    if "messages" in row:
        return True
    return any(isinstance(row.get(f), list) for f in ("prompt", "completion", "chosen",
                                                       "rejected"))


def validate_row(row: dict, source: str, row_number: int) -> str:
    """Check the row's fields and types; return its format name (one of FORMATS).

    Shared by every recipe: SFT takes language_modeling and prompt_completion rows, the DPO family
    preference and unpaired_preference rows, the RL recipes prompt_only rows."""
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object, got {type_name(row)}", source=source,
                        row=row_number)
    fmt = detect_format(row, source, row_number)
    where = {"source": source, "row": row_number}
    for name in REQUIRED[fmt]:
        if name not in row:
            raise DataError(f"{'is null' if name in nulls(row) else 'missing'} ({_a(fmt)} row "
                            f"needs {', '.join(REQUIRED[fmt])})", field=name, **where)
    if fmt == "language_modeling":
        if "messages" in row:
            check_messages(row["messages"], "messages", where, need_assistant=True)
        else:
            _check_text(row["text"], "text", where)
        return fmt
    if fmt == "unpaired_preference" and not isinstance(row["label"], bool):
        raise DataError(f"must be true or false, got {row['label']!r}", field="label", **where)
    first = next(f for f in ("prompt", "chosen", "completion") if f in row)
    conversational = isinstance(row[first], list)
    for name in ("prompt", "completion", "chosen", "rejected"):
        if name not in row:
            continue
        if conversational:
            check_messages(row[name], name, where, need_assistant=False, style_of=first)
        else:
            _check_text(row[name], name, where, style_of=first)
    return fmt


def _check_text(value: Any, name: str, where: dict, style_of: str | None = None) -> None:
    if isinstance(value, list) and style_of not in (None, name):
        raise DataError(f"is a list of messages but '{style_of}' is a plain string; use one "
                        "style per row", field=name, **where)
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type_name(value)}", field=name, **where)
    if name != "prompt" and not value.strip():
        raise DataError("is empty", field=name, **where)


def check_messages(value: Any, name: str, where: dict, *, need_assistant: bool,
                   style_of: str | None = None) -> None:
    if isinstance(value, str) and style_of not in (None, name):
        raise DataError(f"is a plain string but '{style_of}' is a list of messages; use one "
                        "style per row", field=name, **where)
    if not isinstance(value, list):
        raise DataError(f"must be a list of messages, got {type_name(value)}",
                        field=name, **where)
    if not value and name != "prompt":
        raise DataError("is empty", field=name, **where)
    for i, msg in enumerate(value):
        field = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"must be an object with 'role' and 'content', got {type_name(msg)}",
                            field=field, **where)
        if msg.get("role") not in ROLES:
            raise DataError(f"must be one of {', '.join(ROLES)}, got {msg.get('role')!r}",
                            field=f"{field}.role", **where)
        if not isinstance(msg.get("content"), str):
            raise DataError(f"must be a string, got {type_name(msg.get('content'))}",
                            field=f"{field}.content", **where)
        if name != "prompt" and msg["role"] == "assistant" and not msg["content"].strip():
            raise DataError("is empty", field=f"{field}.content", **where)
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise DataError("has no assistant message to learn from", field=name, **where)


# ------------------------------------------------------------------------------ tokenisation


def text_ids(tokenizer, text: str) -> list[int]:
    """The token ids of `text` alone (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_chat(tokenizer, messages: list, *, generation_prompt: bool = False,
                where: dict | None = None, field: str | None = None) -> str:
    """The chat template applied to `messages` as text; a template that rejects the
    conversation (roles must alternate, no system role, ...) is a DataError naming the row."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja's TemplateError, ValueError, ...
        if getattr(tokenizer, "chat_template", None) is None:
            message = ("is conversational but the tokenizer has no chat template; use a chat "
                       "model or plain-string rows")
        else:
            message = f"the chat template rejects these messages: {err}"
        raise DataError(message, field=field, **(where or {})) from None


def completion_suffix(full: str, prefix: str, where: dict, field: str) -> str:
    """`full` after its prefix `prefix` (the rendered prompt); a DataError if it is none."""
    if not full.startswith(prefix):
        raise DataError("the chat template does not render the prompt as a prefix of the whole "
                        "conversation, so prompt and completion cannot be split", field=field,
                        **where)
    return full[len(prefix):]


def sft_pieces(row: dict, tokenizer, where: dict) -> list[tuple[str, bool]]:
    """The row's text as consecutive (piece, is_completion) strings, each tokenised alone.

    `messages` rows are rendered incrementally: before each assistant message its header (the
    generation prompt) is a non-completion piece, the message itself (through its end-of-turn
    token) a completion piece, so every assistant reply is tokenised on its own."""
    if "messages" in row:
        msgs, pieces, done = row["messages"], [], ""
        for i, msg in enumerate(msgs):
            field = f"messages[{i}]"
            if msg["role"] == "assistant" and i:
                header = render_chat(tokenizer, msgs[:i], generation_prompt=True, where=where,
                                     field=field)
                pieces.append((completion_suffix(header, done, where, field), False))
                done = header
            full = render_chat(tokenizer, msgs[:i + 1], where=where, field=field)
            pieces.append((completion_suffix(full, done, where, field), msg["role"] == "assistant"))
            done = full
        return [(p, c) for p, c in pieces if p]
    if "text" in row:
        return [(row["text"], True)]
    if isinstance(row["prompt"], list):
        prompt = render_chat(tokenizer, row["prompt"], generation_prompt=True, where=where,
                             field="prompt") if row["prompt"] else ""
        full = render_chat(tokenizer, row["prompt"] + row["completion"], where=where,
                           field="completion")
        return [(prompt, False), (completion_suffix(full, prompt, where, "completion"), True)]
    return [(row["prompt"], False), (row["completion"], True)]


def tokenize_sft(row: dict, tokenizer, *, max_length: int, truncation: bool,
                 completion_only_loss: bool, source: str, row_index: int) -> Example:
    """Validate an SFT row and tokenise it: each piece (prompt, completion, chat turn) separately
    with add_special_tokens=False, then joined. Standard rows end with EOS (chat templates end
    each turn themselves). The loss mask is True on completion tokens (every assistant reply of a
    `messages` row; all of a `text` row); with completion_only_loss=False on every token. The first
    token is never a target. Over max_length: truncation keeps the prompt and cuts the
    completion from the right; without it, a DataError."""
    where = {"source": source, "row": row_index}
    fmt = validate_row(row, source, row_index)
    if fmt not in SFT_FORMATS:
        check_not_null(row, SFT_FORMATS, where)
        raise DataError(f"is {_a(fmt)} row, which {TAKEN_BY[fmt]} take; "
                        "`tether sft` takes 'text', 'messages' or 'prompt' + 'completion' rows",
                        **where)
    ids: list[int] = []
    mask: list[bool] = []
    n_prompt = None  # tokens before the first completion piece: truncation never cuts them
    for text, is_completion in sft_pieces(row, tokenizer, where):
        piece = text_ids(tokenizer, text)
        if is_completion and n_prompt is None:
            n_prompt = len(ids)
        ids += piece
        mask += [is_completion or not completion_only_loss] * len(piece)
    if not is_conversational(row) and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(True)
    mask[0] = False  # nothing predicts the first token
    cut = max(0, len(ids) - max_length)
    if cut:
        _check_fit(row, len(ids), n_prompt or 0, max_length, truncation, where)
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        raise DataError("has no completion tokens to learn from", field="completion", **where)
    return Example(ids, mask, truncated=cut)


def _check_fit(row: dict, n: int, n_prompt: int, max_length: int, truncation: bool,
               where: dict) -> None:
    """Raise the DataError for an example of n > max_length tokens, unless truncation can cut
    its completion (from the right) and keep the n_prompt tokens before it whole."""
    if "prompt" in row:
        if n_prompt >= max_length:
            raise DataError(f"prompt is {n_prompt} tokens but data.max_length is {max_length}: "
                            "no room for the completion (raise data.max_length or shorten the "
                            "prompt)", field="prompt", **where)
        if not truncation:
            raise DataError(f"is too long: prompt + completion is {n} tokens (prompt {n_prompt}) "
                            f"but data.max_length is {max_length} (raise it, or set "
                            "data.truncation=true to cut the completion)", field="completion",
                            **where)
        return
    field = "messages" if "messages" in row else "text"
    if n_prompt >= max_length:
        raise DataError(f"the first assistant reply starts after {n_prompt} tokens but "
                        f"data.max_length is {max_length}: nothing would be left to learn from",
                        field=field, **where)
    if not truncation:
        raise DataError(f"is too long: {n} tokens but data.max_length is {max_length} (raise it, "
                        "or set data.truncation=true)", field=field, **where)


# ------------------------------------------------------------------------------ data sets


def tokenize_rows(rows: Rows, tokenizer, cfg: DataConfig, source: str) -> list[Example]:
    return [tokenize_sft(row, tokenizer, max_length=cfg.max_length, truncation=cfg.truncation,
                         completion_only_loss=cfg.completion_only_loss, source=source,
                         row_index=number)
            for number, row in rows]


def truncation_counts(rows: list[tuple[Example, ...]]) -> dict[str, int]:
    """How many rows (each given as its sequences: an SFT example, a pair's chosen and rejected)
    data.truncation cut to data.max_length, and how many tokens it cut (docs/metrics.md)."""
    cut = [sum(e.truncated for e in sequences) for sequences in rows]
    return {"data/truncated_rows": sum(1 for c in cut if c), "data/truncated_tokens": sum(cut)}


def truncation_message(counts: dict[str, int], n_rows: int, max_length: int) -> str | None:
    """The line a run prints about truncation; None when nothing was cut."""
    if not counts["data/truncated_rows"]:
        return None
    return (f"data.truncation cut {counts['data/truncated_rows']} of {n_rows} rows to "
            f"data.max_length={max_length} ({counts['data/truncated_tokens']} tokens dropped "
            "from their completions)")


def split_indices(n: int, eval_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: eval = the last ceil(eval_fraction * n) of a seeded shuffle
    (at most n - 1, so training keeps a row); both lists in the original row order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(math.ceil(eval_fraction * n), n - 1) if eval_fraction > 0 else 0
    held = set(order[n - n_eval:]) if n_eval else set()
    return [i for i in range(n) if i not in held], sorted(held)


def load_sft_examples(cfg: DataConfig, tokenizer, *, rows: list[dict] | None = None,
                      source: str | None = None) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples from cfg.path (or the given rows); eval from cfg.eval_path or a
    seeded `eval_fraction` hold-out. Every row is validated and tokenised before training starts,
    so a bad row stops the run at once with an error naming it."""
    if rows is None:
        if cfg.path is None:
            raise DataError("no data: set data.path")
        numbered = read_rows(cfg.path, split=cfg.split)
        source = source or str(cfg.path)
    else:
        numbered = list(enumerate(rows, start=1))
        source = source or "rows"
    if not numbered:
        raise DataError("holds no rows", source=source)
    examples = tokenize_rows(numbered, tokenizer, cfg, source)
    if cfg.eval_path is not None:
        held_rows = read_rows(cfg.eval_path, split=cfg.split)
        return examples, tokenize_rows(held_rows, tokenizer, cfg, str(cfg.eval_path))
    train_idx, eval_idx = split_indices(len(examples), cfg.eval_fraction)
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]
