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
from tether.errors import DataError

PROMPT_FORMATS = ("prompt_only", "prompt_completion")  # a `completion` field is just a column


@dataclass
class PromptExample:
    prompt: str | list  # the row's prompt, as the reward functions receive it
    ids: list[int]  # its tokens (messages: chat template + assistant header)
    columns: dict = field(default_factory=dict)  # the row's other fields, for reward functions


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A prompt's token ids: chat messages through the chat template with the generation prompt
    (the assistant header), a plain string as it is. No special tokens are added."""
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


SHOTS = (("23 + 45", 68), ("17 - 52", -35))  # worked examples shown before a problem


def shot_messages(shots: int) -> list[dict]:
    """The first `shots` worked examples as user / assistant turns, in the task's own format."""
    if not 0 <= shots <= len(SHOTS):
        raise ValueError(f"shots must be between 0 and {len(SHOTS)}, got {shots}")
    turns = []
    for expr, answer in SHOTS[:shots]:
        turns += [{"role": "user", "content": f"What is {expr}? {arithmetic.INSTRUCTION}"},
                  {"role": "assistant", "content": f"{expr} = {answer}\nAnswer: {answer}"}]
    return turns


def builtin_prompt_rows(n: int, *, seed: int = 0, difficulty: str = "easy", shots: int = 0,
                        system_prompt: str | None = None) -> list[dict]:
    """Arithmetic prompts with their exact `answer` and `expression` (the verifiers' columns),
    each after an optional system message and `shots` worked examples."""
    prefix = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    prefix += shot_messages(shots)
    return [{"prompt": prefix + p["prompt"], "answer": p["answer"], "expression": p["expression"]}
            for p in arithmetic.arithmetic_problems(n, seed=seed, difficulty=difficulty)]


def split_task_rows(task_size: int, n_eval: int, *, difficulty: str = "easy", shots: int = 0,
                    system_prompt: str | None = None) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) of the built-in arithmetic task: n_eval distinct problems
    (seed 10000) and task_size problems (seed 0) minus any whose prompt is held out, so that no
    held-out problem is ever trained on (the 1-digit task has only 162 distinct problems)."""
    task = {"difficulty": difficulty, "shots": shots, "system_prompt": system_prompt}
    held, seen = [], set()
    for row in builtin_prompt_rows(4 * n_eval + 20, seed=10_000, **task):
        if len(held) < n_eval and repr(row["prompt"]) not in seen:
            held.append(row)
            seen.add(repr(row["prompt"]))
    train = [r for r in builtin_prompt_rows(task_size, seed=0, **task)
             if repr(r["prompt"]) not in seen]
    return train, held


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
                    difficulty: str = "easy", shots: int = 0, system_prompt: str | None = None
                    ) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, held-out) prompts of an RL run: from data.path (held out as data.eval_path or
    data.eval_fraction says, at most n_eval of them), or without data.path the built-in
    arithmetic task: task_size problems and n_eval held-out problems that appear nowhere in
    training, each after `shots` worked examples."""
    if cfg.path is not None:
        train, held = load_prompt_examples(cfg, tokenizer)
        return train, held[:n_eval]
    rows, held = split_task_rows(task_size, n_eval, difficulty=difficulty, shots=shots,
                                 system_prompt=system_prompt)
    return (tokenize_prompt_rows(list(enumerate(rows, start=1)), tokenizer, cfg,
                                 "built-in arithmetic prompts"),
            tokenize_prompt_rows(list(enumerate(held, start=1)), tokenizer, cfg,
                                 "built-in held-out arithmetic prompts"))
