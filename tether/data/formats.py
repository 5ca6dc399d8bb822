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

import json
import math
import random
from pathlib import Path
from typing import Any

from tether.config import DataConfig
from tether.data.collate import Example
from tether.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SFT_FORMATS = ("language_modeling", "prompt_completion")

Rows = list[tuple[int, dict]]  # (row number, row)


# ------------------------------------------------------------------------------ reading files


def read_rows(path: str | Path, *, split: str = "train") -> Rows:
    """Rows of a .jsonl, .json or .parquet file or a `datasets.save_to_disk` directory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err.msg} at column {err.colno})",
                                source=str(path), row=number) from None
        return _objects(rows, path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({err.msg} at line {err.lineno})",
                            source=str(path)) from None
        if isinstance(data, dict) and isinstance(data.get(split, data.get("data")), list):
            data = data.get(split, data.get("data"))
        if not isinstance(data, list):
            raise DataError(f"a .json data file must hold a list of rows (or {{'{split}': [...]}})",
                            source=str(path))
        return _objects(list(enumerate(data, start=1)), path)
    if suffix == ".parquet":
        from datasets import Dataset

        return _objects(list(enumerate(Dataset.from_parquet(str(path)).to_list(), start=1)), path)
    raise DataError(f"unsupported data file type '{suffix}': use .jsonl, .json, .parquet or a "
                    "directory saved with datasets' save_to_disk", source=str(path))


def _read_saved_dataset(path: Path, split: str) -> Rows:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError("not a data file or a directory saved with datasets' save_to_disk",
                        source=str(path)) from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"no split '{split}' (splits: {', '.join(ds)}); set data.split",
                            source=str(path))
        ds = ds[split]
    return _objects(list(enumerate(ds.to_list(), start=1)), path)


def _objects(rows: Rows, path: Path) -> Rows:
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"a row must be a JSON object, got {type(row).__name__}",
                            source=str(path), row=number)
    return rows


# ------------------------------------------------------------------------------ validation


def detect_format(row: dict, source: str, row_number: int) -> str:
    keys = set(row)
    if "messages" in keys:
        return "language_modeling"
    if "text" in keys:
        return "language_modeling"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "label" in keys:
        return "unpaired_preference"
    if "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt_only"
    raise DataError("no recognised fields: expected 'text', 'messages', 'prompt' + 'completion', "
                    f"'prompt' + 'chosen' + 'rejected' or 'prompt' + 'completion' + 'label'; "
                    f"found {sorted(keys)}", source=source, row=row_number)


REQUIRED = {
    "language_modeling": (),
    "prompt_completion": ("prompt", "completion"),
    "prompt_only": ("prompt",),
    "preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
}


def validate_row(row: dict, source: str, row_number: int) -> str:
    """Check the row's fields and types; return its format name."""
    fmt = detect_format(row, source, row_number)
    where = {"source": source, "row": row_number}
    for name in REQUIRED[fmt]:
        if name not in row:
            raise DataError(f"missing (a {fmt.replace('_', ' ')} row needs "
                            f"{', '.join(REQUIRED[fmt])})", field=name, **where)
    if fmt == "language_modeling":
        if "messages" in row:
            _check_messages(row["messages"], "messages", where, need_assistant=True)
        else:
            _check_text(row["text"], "text", where)
        return fmt
    if fmt == "unpaired_preference" and not isinstance(row["label"], bool):
        raise DataError(f"must be true or false, got {row['label']!r}", field="label", **where)
    conversational = isinstance(row.get("prompt", row.get("chosen")), list)
    for name in ("prompt", "completion", "chosen", "rejected"):
        if name not in row:
            continue
        if conversational:
            _check_messages(row[name], name, where, need_assistant=False)
        else:
            _check_text(row[name], name, where)
    return fmt


def _check_text(value: Any, name: str, where: dict) -> None:
    if isinstance(value, list):
        raise DataError("is a list of messages but the other fields are plain strings; "
                        "use one style per row", field=name, **where)
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type(value).__name__}", field=name, **where)
    if name != "prompt" and not value.strip():
        raise DataError("is empty", field=name, **where)


def _check_messages(value: Any, name: str, where: dict, *, need_assistant: bool) -> None:
    if not isinstance(value, list):
        raise DataError(f"must be a list of messages, got {type(value).__name__}",
                        field=name, **where)
    if not value and name != "prompt":
        raise DataError("is empty", field=name, **where)
    for i, msg in enumerate(value):
        field = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise DataError("must be an object with 'role' and 'content'", field=field, **where)
        if msg.get("role") not in ROLES:
            raise DataError(f"role must be one of {', '.join(ROLES)}, got {msg.get('role')!r}",
                            field=f"{field}.role", **where)
        if not isinstance(msg.get("content"), str):
            raise DataError(f"content must be a string, got {type(msg.get('content')).__name__}",
                            field=f"{field}.content", **where)
        if name != "prompt" and msg["role"] == "assistant" and not msg["content"].strip():
            raise DataError("is empty", field=f"{field}.content", **where)
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise DataError("has no assistant message to learn from", field=name, **where)


# ------------------------------------------------------------------------------ tokenisation


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages: list, *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _suffix(full: str, prefix: str, where: dict, field: str) -> str:
    if not full.startswith(prefix):
        raise DataError("the chat template does not render the prompt as a prefix of the whole "
                        "conversation, so prompt and completion cannot be split", field=field,
                        **where)
    return full[len(prefix):]


def sft_pieces(row: dict, tokenizer, where: dict) -> list[tuple[str, bool]]:
    """The row's text as consecutive (piece, is_completion) strings, each tokenised alone."""
    if "messages" in row:
        msgs, pieces, done = row["messages"], [], ""
        for i, msg in enumerate(msgs):
            if msg["role"] == "assistant":
                header = _render(tokenizer, msgs[:i], generation_prompt=True) if i else ""
                pieces.append((_suffix(header, done, where, f"messages[{i}]"), False))
                done = header or done
            full = _render(tokenizer, msgs[:i + 1])
            pieces.append((_suffix(full, done, where, f"messages[{i}]"), msg["role"] == "assistant"))
            done = full
        return [(p, c) for p, c in pieces if p]
    if "text" in row:
        return [(row["text"], True)]
    if isinstance(row["prompt"], list):
        prompt = _render(tokenizer, row["prompt"], generation_prompt=True)
        full = _render(tokenizer, row["prompt"] + row["completion"])
        return [(prompt, False), (_suffix(full, prompt, where, "completion"), True)]
    return [(row["prompt"], False), (row["completion"], True)]


def tokenize_sft(row: dict, tokenizer, *, max_length: int, truncation: bool,
                 completion_only_loss: bool, source: str, row_index: int) -> Example:
    """Tokenise each piece separately and join; loss on completion tokens (or all but the first)."""
    where = {"source": source, "row": row_index}
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_completion in sft_pieces(row, tokenizer, where):
        piece = _ids(tokenizer, text)
        ids += piece
        mask += [is_completion or not completion_only_loss] * len(piece)
    chat = "messages" in row or isinstance(row.get("prompt"), list)
    if not chat and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # plain-text rows end with EOS; chat templates have one
        mask.append(True)
    mask[0] = False  # nothing predicts the first token
    n_prompt = mask.index(True) if True in mask else len(mask)
    if len(ids) > max_length:
        field = "messages" if "messages" in row else "text" if "text" in row else "completion"
        if not truncation:
            raise DataError(f"is too long: {len(ids)} tokens but data.max_length is {max_length} "
                            "(raise it, or set data.truncation=true)", field=field, **where)
        if n_prompt >= max_length:
            raise DataError(f"prompt is {n_prompt} tokens but data.max_length is {max_length}: no "
                            "room for the completion", field="prompt", **where)
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        raise DataError("has no completion tokens to learn from", field="completion", **where)
    return Example(ids, mask)


# ------------------------------------------------------------------------------ data sets


def tokenize_rows(rows: Rows, tokenizer, cfg: DataConfig, source: str) -> list[Example]:
    examples = []
    for number, row in rows:
        fmt = validate_row(row, source, number)
        if fmt not in SFT_FORMATS:
            raise DataError(f"is a {fmt.replace('_', ' ')} row; `tether sft` takes 'text', "
                            "'messages' or 'prompt' + 'completion' rows", source=source,
                            row=number)
        examples.append(tokenize_sft(row, tokenizer, max_length=cfg.max_length,
                                     truncation=cfg.truncation,
                                     completion_only_loss=cfg.completion_only_loss,
                                     source=source, row_index=number))
    return examples


def load_sft_examples(cfg: DataConfig, tokenizer, *, rows: list[dict] | None = None,
                      source: str | None = None) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples from cfg.path (or the given rows); eval from cfg.eval_path or a
    seeded `eval_fraction` hold-out."""
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
    if cfg.eval_path is not None:
        train = tokenize_rows(numbered, tokenizer, cfg, source)
        held = tokenize_rows(read_rows(cfg.eval_path, split=cfg.split), tokenizer, cfg,
                             str(cfg.eval_path))
        return train, held
    order = list(range(len(numbered)))
    random.Random(0).shuffle(order)
    n_eval = math.ceil(cfg.eval_fraction * len(numbered)) if cfg.eval_fraction > 0 else 0
    n_eval = min(n_eval, len(numbered) - 1)
    examples = tokenize_rows(numbered, tokenizer, cfg, source)
    eval_idx = set(order[len(order) - n_eval:])
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    held = [e for i, e in enumerate(examples) if i in eval_idx]
    return train, held
