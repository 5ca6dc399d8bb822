"""Prompt rows for the RL recipes (TRL's prompt-only format) and the built-in arithmetic prompts.

A row is {"prompt": str | [messages], ...}; its other fields (e.g. `answer`) are passed to the
reward functions as columns, one value per completion. Conversational prompts go through the chat
template with the assistant header appended; plain strings are tokenised as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.config import DataConfig
from tether.data.formats import read_rows, split_indices, validate_row
from tether.data.tasks import arithmetic
from tether.engine.generate import encode_prompt
from tether.errors import DataError

PROMPT_FORMATS = ("prompt_only", "prompt_completion")  # a `completion` field is just a column


@dataclass
class PromptExample:
    prompt: str | list  # the row's prompt, as the reward functions receive it
    ids: list[int]  # its tokens (messages: chat template + assistant header)
    columns: dict = field(default_factory=dict)  # the row's other fields, for reward functions


def builtin_prompt_rows(n: int, *, seed: int = 0, difficulty: str = "easy",
                        system_prompt: str | None = None) -> list[dict]:
    """Arithmetic prompts with their exact `answer` (the verifier's column), after an optional
    system message."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [{"prompt": system + p["prompt"], "answer": p["answer"]}
            for p in arithmetic.arithmetic_problems(n, seed=seed, difficulty=difficulty)]


def heldout_prompt_rows(n: int, exclude: list[dict], *, difficulty: str = "easy",
                        system_prompt: str | None = None, seed: int = 10_000) -> list[dict]:
    """n arithmetic prompts whose text appears nowhere in `exclude` (the training rows)."""
    seen = {repr(r["prompt"]) for r in exclude}
    fresh = [r for r in builtin_prompt_rows(2 * n + 10, seed=seed, difficulty=difficulty,
                                            system_prompt=system_prompt)
             if repr(r["prompt"]) not in seen]
    return fresh[:n]


def tokenize_prompt_rows(numbered: list[tuple[int, dict]], tokenizer, cfg: DataConfig,
                         source: str) -> list[PromptExample]:
    """Validated, tokenised prompts. A prompt longer than data.max_length tokens keeps its last
    tokens (data.truncation) or is an error naming its row."""
    out = []
    for number, row in numbered:
        fmt = validate_row(row, source, number)
        if fmt not in PROMPT_FORMATS:
            raise DataError(f"is {'an' if fmt[0] in 'aeiou' else 'a'} {fmt.replace('_', ' ')} "
                            "row; the RL recipes take prompt rows ({'prompt', ...}; the other "
                            "fields go to the reward functions)", source=source, row=number)
        ids = encode_prompt(tokenizer, row["prompt"])
        if not ids:
            raise DataError("is empty", source=source, row=number, field="prompt")
        if len(ids) > cfg.max_length:
            if not cfg.truncation:
                raise DataError(f"has {len(ids)} tokens, more than data.max_length "
                                f"({cfg.max_length})", source=source, row=number, field="prompt")
            ids = ids[-cfg.max_length:]
        out.append(PromptExample(row["prompt"], ids,
                                 {k: v for k, v in row.items() if k != "prompt"}))
    return out


def load_prompt_examples(cfg: DataConfig, tokenizer, *, rows: list[dict] | None = None,
                         source: str | None = None
                         ) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, eval) prompts from data.path (or the given rows); eval from data.eval_path or a
    seeded data.eval_fraction hold-out. Every row is checked before training starts."""
    if rows is None:
        if cfg.path is None:
            raise DataError("no data: set data.path")
        numbered, source = read_rows(cfg.path, split=cfg.split), str(cfg.path)
    else:
        numbered, source = list(enumerate(rows, start=1)), source or "rows"
    if not numbered:
        raise DataError("holds no rows", source=source)
    examples = tokenize_prompt_rows(numbered, tokenizer, cfg, source)
    if cfg.eval_path is not None:
        held = read_rows(cfg.eval_path, split=cfg.split)
        return examples, tokenize_prompt_rows(held, tokenizer, cfg, str(cfg.eval_path))
    train_idx, eval_idx = split_indices(len(examples), cfg.eval_fraction)
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]


def load_rl_prompts(cfg: DataConfig, tokenizer, *, n_eval: int, task_size: int,
                    difficulty: str = "easy", system_prompt: str | None = None
                    ) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, held-out) prompts of an RL run: from data.path (held out as data.eval_path or
    data.eval_fraction says, at most n_eval of them), or without data.path the built-in
    arithmetic task: task_size problems and n_eval held-out problems that appear nowhere in
    training, each after an optional system message."""
    if cfg.path is not None:
        train, held = load_prompt_examples(cfg, tokenizer)
        return train, held[:n_eval]
    task = {"difficulty": difficulty, "system_prompt": system_prompt}
    rows = builtin_prompt_rows(task_size, **task)
    held = heldout_prompt_rows(n_eval, rows, **task)
    return (tokenize_prompt_rows(list(enumerate(rows, start=1)), tokenizer, cfg,
                                 "built-in arithmetic prompts"),
            tokenize_prompt_rows(list(enumerate(held, start=1)), tokenizer, cfg,
                                 "built-in held-out arithmetic prompts"))
