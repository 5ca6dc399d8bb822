"""Held-out prompt sets for `tether eval`, each with its gold reward (docs/diagnostics.md).

    sentiment   the 48 held-out prompts of the built-in sentiment task (a seeded split of its 288
                prompts; no training pair of the shipped preference set uses them); gold = VADER
    arithmetic  problems of the held-out seed (10000) of the built-in arithmetic task, minus any
                problem whose prompt is in the built-in SFT rows (seed 0), the PPO prompts (seed 1)
                or the GRPO task (seed 0): the same held-out problems every recipe evaluates on;
                gold = the exact verifier (1 when the last 'Answer: N' is right, else 0)
    PATH.jsonl  your own held-out prompt rows (TRL prompt-only; other fields go to the reward
                functions as columns), all of them; gold = the function `gold` names
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tether.data.formats import read_rows, validate_row
from tether.data.prompts import builtin_prompt_rows, split_task_rows
from tether.data.tasks import arithmetic, builtin_sft_rows, sentiment
from tether.errors import ConfigError, DataError
from tether.eval.online import prompt_text
from tether.rewards import RewardFn, load_reward

BUILTIN_TASKS = ("sentiment", "arithmetic")
GRPO_TASK_SIZE = 1000  # grpo.task_size's default: its training problems are excluded too


@dataclass
class EvalTask:
    name: str  # sentiment | arithmetic | the file's path
    rows: list[dict]  # {"prompt": str | messages, <reward columns>...}, held out from training
    gold: RewardFn
    gold_name: str
    split: str  # how these prompts are kept out of training (written into eval.json)


def sentiment_rows(n: int) -> list[dict]:
    """The first n held-out sentiment prompts (all 48 at most)."""
    if n > sentiment.N_HELDOUT:
        raise ConfigError(f"num_prompts: the sentiment task holds out {sentiment.N_HELDOUT} "
                          f"prompts, asked for {n}")
    return [{"prompt": p["prompt"], "group": p["group"]} for p in sentiment.heldout_prompts(n)]


def arithmetic_rows(n: int, *, difficulty: str = "easy", shots: int = 0) -> list[dict]:
    """n held-out arithmetic problems (seed 10000) that no built-in training set holds."""
    if difficulty not in arithmetic.DIFFICULTIES:
        raise ConfigError(f"arithmetic_difficulty must be one of "
                          f"{', '.join(arithmetic.DIFFICULTIES)}, got '{difficulty}'")
    trained = {prompt_text(r["prompt"]) for r in builtin_sft_rows()}
    trained |= {prompt_text(r["prompt"]) for r in builtin_prompt_rows(200, seed=1)}
    grpo_train, _ = split_task_rows(GRPO_TASK_SIZE, n, difficulty=difficulty)
    trained |= {prompt_text(r["prompt"]) for r in grpo_train}
    fresh, seen = [], set()
    for row in builtin_prompt_rows(8 * n + 40, seed=10_000, difficulty=difficulty, shots=shots):
        key = prompt_text(row["prompt"])
        if key not in trained and key not in seen:
            fresh.append(row)
            seen.add(key)
    return fresh[:n]


def file_rows(path: str, n: int) -> list[dict]:
    """The first n prompt rows of a held-out file (every row checked)."""
    numbered = read_rows(path)
    if not numbered:
        raise DataError("holds no rows", source=path)
    rows = []
    for number, row in numbered[:n]:
        if validate_row(row, path, number) not in ("prompt_only", "prompt_completion"):
            raise DataError("is not a prompt row; `tether eval` takes {'prompt', ...} rows (the "
                            "other fields go to the gold function)", source=path, row=number)
        rows.append(row)
    return rows


def build_task(task: str, *, n: int, gold: str | None, difficulty: str = "easy",
               shots: int = 0) -> EvalTask:
    """The held-out prompts of `task` and its gold reward (`gold` overrides the built-in one)."""
    if task == "sentiment":
        rows = sentiment_rows(n)
        split = (f"the first {len(rows)} of the sentiment task's {sentiment.N_HELDOUT} held-out "
                 "prompts (seeded split; in no shipped preference pair)")
        default_gold = "sentiment"
    elif task == "arithmetic":
        rows = arithmetic_rows(n, difficulty=difficulty, shots=shots)
        split = (f"{len(rows)} {difficulty} problems of the held-out seed 10000, none in the "
                 "built-in SFT, PPO or GRPO training problems")
        default_gold = "arithmetic"
    elif Path(task).suffix in (".jsonl", ".json", ".parquet") or Path(task).is_dir():
        if gold is None:
            raise ConfigError(f"task {task}: a prompt file needs a gold reward function, e.g. "
                              "--gold=my_rewards:score (or a built-in: arithmetic, sentiment)")
        rows = file_rows(task, n)
        split = f"the first {len(rows)} rows of {task} (held out by you)"
        default_gold = gold
    else:
        raise ConfigError(f"task must be one of {', '.join(BUILTIN_TASKS)} or a .jsonl file of "
                          f"held-out prompts, got '{task}'")
    name = gold or default_gold
    return EvalTask(task, rows, load_reward(name), name, split)
