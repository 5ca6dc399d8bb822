"""Two user groups (segments) that ask the same arithmetic problems and want different replies:
a built-in multi-group task for GRPO (`grpo.task: segments`, docs/grpo.md).

    explain  "What is 7 + 6? Show your working, then end with 'Answer: N'."
             wants "7 + 6 = 13\nAnswer: 13": rewards `arithmetic` and `worked`, 0.5 each
    terse    "What is 7 + 6? Reply with the answer only, like 'Answer: N'."
             wants "Answer: 13" or "7 + 6 = 13": reward `terse` = 0 unless the reply's last
             integer is the answer, else len("Answer: 13") / len(reply), capped at 1

Both rewards lie in [0, 1], so their means can be compared across groups (the fairness mode
does). The problems, their worked examples (`grpo.task_shots`) and the held-out split are those
of the arithmetic task (`tether.data.prompts.split_task_rows`); a row carries `group` besides
`answer` and `expression`. Every held-out problem is asked by every group, so the groups'
held-out numbers are on the same problems.
"""

from __future__ import annotations

import re

from tether.config import DataConfig
from tether.data.prompts import PromptExample, split_task_rows, tokenize_prompt_rows

SEGMENTS = {  # group -> what its users add to the question
    "explain": "Show your working, then end with 'Answer: N'.",
    "terse": "Reply with the answer only, like 'Answer: N'.",
}
GROUP_REWARDS = {"explain": ["arithmetic", "worked"], "terse": ["terse"]}
GROUP_REWARD_WEIGHTS = {"explain": [0.5, 0.5], "terse": [1.0]}
_INTEGER = re.compile(r"-?\d+")


def terse_score(text: str, answer: int) -> float:
    """0 unless the reply's last integer is the answer; then len('Answer: N') / len(reply)
    (whitespace at the ends aside), capped at 1. 'Answer: 13', '13' and '7 + 6 = 13' score 1
    (a 1-digit problem's sum line is as long as 'Answer: N'); the worked form
    '7 + 6 = 13\nAnswer: 13' scores 10 / 21 = 0.476; a wrong last number 0."""
    numbers = _INTEGER.findall(text)
    if not numbers or int(numbers[-1]) != answer:
        return 0.0
    return min(1.0, len(f"Answer: {answer}") / max(1, len(text.strip())))


def _asked_by(row: dict, group: str) -> dict:
    *prefix, question = row["prompt"]
    content = f"What is {row['expression']}? {SEGMENTS[group]}"
    return {**row, "prompt": [*prefix, {**question, "content": content}], "group": group}


def split_segment_rows(task_size: int, n_eval: int, *, difficulty: str = "single",
                       shots: int = 1, system_prompt: str | None = None
                       ) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): the arithmetic task's rows, training row i asked by group
    i mod 2 (the problems repeat, so each is asked by both), and ceil(n_eval / 2) held-out
    problems each asked by both groups (n_eval rows), none of them ever trained on."""
    groups = sorted(SEGMENTS)
    train, held = split_task_rows(task_size, -(-n_eval // len(groups)), difficulty=difficulty,
                                  shots=shots, system_prompt=system_prompt)
    return ([_asked_by(r, groups[i % len(groups)]) for i, r in enumerate(train)],
            [_asked_by(r, g) for r in held for g in groups][:n_eval])


def load_segment_prompts(cfg: DataConfig, tokenizer, *, n_eval: int, task_size: int,
                         difficulty: str = "single", shots: int = 1,
                         system_prompt: str | None = None
                         ) -> tuple[list[PromptExample], list[PromptExample]]:
    """The task's (train, held-out) prompts, tokenised (as `load_rl_prompts` for arithmetic)."""
    train, held = split_segment_rows(task_size, n_eval, difficulty=difficulty, shots=shots,
                                     system_prompt=system_prompt)
    return (tokenize_prompt_rows(list(enumerate(train, start=1)), tokenizer, cfg,
                                 "built-in segment prompts"),
            tokenize_prompt_rows(list(enumerate(held, start=1)), tokenizer, cfg,
                                 "built-in held-out segment prompts"))
