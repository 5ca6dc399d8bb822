"""Stepwise-supervision rows (TRL's format) -> token ids with one labelled score position per step.

    {"prompt": str | messages, "completions": [step, ...], "labels": [bool, ...]}

`labels[k]` is True when step k is correct. A conversational prompt (a list of messages) is
rendered with the chat template and its generation prompt; the steps are then the assistant's
reply. As everywhere in tether, pieces are tokenised separately and joined: the prompt, then each
step followed by the step separator's tokens (`prm.step_separator`, default a newline). Step k's
label belongs to the last token of the separator after it: that is where a process reward model
reads the step's score (TRL's PRMTrainer does the same), so no token spans a step boundary and a
step's score sees the prompt and every step up to and including it, nothing after.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tether.config import DataConfig
from tether.data.formats import (Rows, check_messages, read_rows, render_chat, split_indices,
                                 text_ids, type_name)
from tether.errors import DataError

STEPWISE_FIELDS = ("prompt", "completions", "labels")


@dataclass
class StepExample:
    input_ids: list[int]  # prompt + (step + separator) per step
    step_positions: list[int]  # index in input_ids of each step's score token (separator's last)
    step_labels: list[bool]  # True = the step is correct


def validate_stepwise_row(row: dict, source: str, row_number: int, separator: str) -> None:
    """Check a stepwise row's fields; a DataError names the file, the row and the field."""
    where = {"source": source, "row": row_number}
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object, got {type_name(row)}", **where)
    missing = [f for f in STEPWISE_FIELDS if f not in row]
    if missing:
        raise DataError(f"missing: a stepwise row needs 'prompt', 'completions' (a list of "
                        f"steps) and 'labels' (one true/false per step); found {sorted(row)}",
                        field=missing[0], **where)
    prompt, steps, labels = row["prompt"], row["completions"], row["labels"]
    if isinstance(prompt, list):
        check_messages(prompt, "prompt", where, need_assistant=False)
    elif not isinstance(prompt, str):
        raise DataError(f"must be a string or a list of messages, got {type_name(prompt)}",
                        field="prompt", **where)
    if not isinstance(steps, list) or not steps:
        raise DataError("must be a non-empty list of steps (strings), got "
                        f"{type_name(steps) if not isinstance(steps, list) else 'an empty list'}",
                        field="completions", **where)
    for k, step in enumerate(steps):
        if not isinstance(step, str):
            raise DataError(f"must be a string, got {type_name(step)}",
                            field=f"completions[{k}]", **where)
        if not step.strip():
            raise DataError("is an empty step", field=f"completions[{k}]", **where)
        if separator in step:
            raise DataError(f"contains the step separator {separator!r}; a step's score is read "
                            "at the separator after it, so no step may contain one (set "
                            "prm.step_separator to a string the steps do not use)",
                            field=f"completions[{k}]", **where)
    if not isinstance(labels, list):
        raise DataError(f"must be a list of true/false, one per step, got {type_name(labels)}",
                        field="labels", **where)
    if len(labels) != len(steps):
        raise DataError(f"has {len(labels)} labels for {len(steps)} steps in 'completions' "
                        "(one label per step)", field="labels", **where)
    for k, label in enumerate(labels):
        if not isinstance(label, bool):
            raise DataError(f"must be true or false, got {label!r}", field=f"labels[{k}]",
                            **where)


def prompt_ids(prompt, tokenizer, where: dict) -> list[int]:
    """Token ids of a stepwise prompt: the string as is, or messages under the chat template
    with the assistant's generation prompt (the steps are the assistant's reply)."""
    if isinstance(prompt, list):
        text = render_chat(tokenizer, prompt, generation_prompt=True, where=where,
                           field="prompt") if prompt else ""
    else:
        text = prompt
    return text_ids(tokenizer, text) if text else []


def join_steps(prompt: list[int], steps: list[list[int]], separator: list[int]
               ) -> tuple[list[int], list[int]]:
    """(ids, score positions): prompt, then each step followed by the separator; step k's score
    position is the index of the last separator token after it."""
    ids, positions = list(prompt), []
    for step in steps:
        ids += step + separator
        positions.append(len(ids) - 1)
    return ids, positions


def tokenize_stepwise(row: dict, tokenizer, *, separator: str, separator_ids: list[int],
                      max_length: int, truncation: bool, source: str,
                      row_index: int) -> StepExample:
    """Validate and tokenise one row. Over max_length: with truncation, the trailing steps that
    do not fit whole are dropped (with their labels); without it, a DataError."""
    where = {"source": source, "row": row_index}
    validate_stepwise_row(row, source, row_index, separator)
    ids, positions = join_steps(prompt_ids(row["prompt"], tokenizer, where),
                                [text_ids(tokenizer, s) for s in row["completions"]], separator_ids)
    labels = list(row["labels"])
    if len(ids) > max_length:
        if not truncation:
            raise DataError(f"is too long: {len(ids)} tokens with the prompt and step separators "
                            f"but data.max_length is {max_length} (raise it, or set "
                            "data.truncation=true to drop the steps that do not fit)",
                            field="completions", **where)
        keep = sum(p < max_length for p in positions)
        if keep == 0:
            raise DataError(f"the prompt and first step take {positions[0] + 1} tokens but "
                            f"data.max_length is {max_length}: no step fits",
                            field="completions", **where)
        ids, positions, labels = ids[:positions[keep - 1] + 1], positions[:keep], labels[:keep]
    return StepExample(ids, positions, labels)


def separator_token_ids(tokenizer, separator: str) -> list[int]:
    from tether.errors import ConfigError

    if not isinstance(separator, str) or not separator:
        raise ConfigError("prm.step_separator must be a non-empty string (default: a newline)")
    ids = text_ids(tokenizer, separator)
    if not ids:
        raise ConfigError(f"prm.step_separator {separator!r} tokenises to no tokens")
    return ids


def tokenize_stepwise_rows(rows: Rows, tokenizer, cfg: DataConfig, source: str,
                           separator: str) -> list[StepExample]:
    sep_ids = separator_token_ids(tokenizer, separator)
    return [tokenize_stepwise(row, tokenizer, separator=separator, separator_ids=sep_ids,
                              max_length=cfg.max_length, truncation=cfg.truncation,
                              source=source, row_index=number)
            for number, row in rows]


def load_stepwise_data(cfg: DataConfig, tokenizer, *, separator: str,
                       rows: list[dict] | None = None, source: str | None = None
                       ) -> tuple[list[StepExample], list[StepExample]]:
    """(train, eval) examples from cfg.path (or `rows`); eval from cfg.eval_path or a seeded
    `eval_fraction` hold-out of whole rows. Every row is checked before training starts."""
    if rows is None:
        if cfg.path is None:
            raise DataError("no data: set data.path")
        numbered, source = read_rows(cfg.path, split=cfg.split), source or str(cfg.path)
    else:
        numbered, source = list(enumerate(rows, start=1)), source or "rows"
    if not numbered:
        raise DataError("holds no rows", source=source)
    if cfg.eval_path is not None:
        held = read_rows(cfg.eval_path, split=cfg.split)
        return (tokenize_stepwise_rows(numbered, tokenizer, cfg, source, separator),
                tokenize_stepwise_rows(held, tokenizer, cfg, str(cfg.eval_path), separator))
    train_idx, eval_idx = split_indices(len(numbered), cfg.eval_fraction)
    return (tokenize_stepwise_rows([numbered[i] for i in train_idx], tokenizer, cfg, source,
                                   separator),
            tokenize_stepwise_rows([numbered[i] for i in eval_idx], tokenizer, cfg, source,
                                   separator))


# ------------------------------------------------------------------------------ built-in set


def running_sum_rows(n: int, *, seed: int = 0, terms: tuple[int, int] = (3, 5),
                     max_term: int = 9, error_rate: float = 0.6) -> list[dict]:
    """Stepwise rows of running sums with exact step labels (the built-in `tether prm` set).

    Prompt "Add 4, 7, 2, 5."; step k reads "s_k + x_{k+1} = s_{k+1}" where s is the running sum
    the solution has reached. With probability `error_rate` one step (chosen uniformly) gets a
    result off by 1-3; later steps carry on from that wrong partial result with correct local
    arithmetic. A step is correct iff its partial result equals the true partial sum, so the
    first wrong step and every step after it are labelled false (PRM800K's convention for a
    solution that has gone wrong). Deterministic in (n, seed, ...)."""
    rng = random.Random(f"running-sums-{seed}")
    rows = []
    for _ in range(n):
        xs = [rng.randint(1, max_term) for _ in range(rng.randint(*terms))]
        wrong_at = rng.randrange(len(xs) - 1) if rng.random() < error_rate else None
        shown, true = xs[0], xs[0]
        steps, labels = [], []
        for k, x in enumerate(xs[1:]):
            result, true = shown + x, true + x
            if k == wrong_at:
                result += rng.choice([-3, -2, -1, 1, 2, 3])
            steps.append(f"{shown} + {x} = {result}")
            labels.append(result == true)
            shown = result
        rows.append({"prompt": f"Add {', '.join(map(str, xs))}.", "completions": steps,
                     "labels": labels})
    return rows


def builtin_stepwise_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """The set `tether prm` trains on without data.path: 400 running-sum solutions."""
    return running_sum_rows(n, seed=seed)
