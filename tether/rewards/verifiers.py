"""Rule-based rewards for the built-in tasks (exact, no model): arithmetic answers and format,
and the positive-tone score of the sentiment task (VADER's lexicon, shipped with vaderSentiment)."""

from __future__ import annotations

from typing import Any

from tether.data.tasks import arithmetic
from tether.errors import RewardError


class ArithmeticVerifier:
    """1.0 when the completion's last 'Answer: N' equals the row's `answer` column, else 0.0."""

    def __call__(self, prompts: list, completions: list[str], *, answer: list | None = None,
                 **columns: Any) -> list[float]:
        if answer is None:
            raise RewardError("reward function 'arithmetic' needs an 'answer' column (the exact "
                              "integer answer of each prompt)")
        if len(answer) != len(completions):
            raise RewardError(f"reward function 'arithmetic': {len(answer)} answers for "
                              f"{len(completions)} completions")
        return [1.0 if arithmetic.verify(c, int(a)) else 0.0 for c, a in zip(completions, answer)]


class FormatReward:
    """1.0 when the completion ends with 'Answer: <integer>' (the format the task asks for)."""

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        return [1.0 if arithmetic.format_ok(c) else 0.0 for c in completions]


class WorkedFormatReward:
    """1.0 when the completion ends with a line '<expression> = N' then 'Answer: N' (the worked
    form of the arithmetic task's demonstrations), else 0.0; the row's `expression` column, when
    there is one, must be the problem restated. Unlike `FormatReward`, a bare 'Answer: N' earns
    nothing (rewarding it teaches a small model to skip the sum), nor does a copied example
    (docs/grpo.md)."""

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        expressions = columns.get("expression") or [None] * len(completions)
        if len(expressions) != len(completions):
            raise RewardError(f"reward function 'worked': {len(expressions)} expressions for "
                              f"{len(completions)} completions")
        return [1.0 if arithmetic.shows_work(c, e) else 0.0
                for c, e in zip(completions, expressions)]


class TerseReward:
    """The `terse` group of the built-in segments task: 0 unless the reply's last integer is the
    row's `answer`, then len('Answer: N') / len(reply) capped at 1, so 'Answer: N' or a one-line
    '7 + 6 = 13' scores 1 and any further working or chatter costs
    (tether/data/tasks/segments.py)."""

    def __call__(self, prompts: list, completions: list[str], *, answer: list | None = None,
                 **columns: Any) -> list[float]:
        from tether.data.tasks.segments import terse_score

        if answer is None or len(answer) != len(completions):
            raise RewardError("reward function 'terse' needs an 'answer' column (the exact "
                              "integer answer of each prompt), one per completion")
        return [terse_score(c, int(a)) for c, a in zip(completions, answer)]


class SentimentReward:
    """VADER compound sentiment of the completion in [-1, 1]: the ground truth of the built-in
    sentiment preference set (tether/data/tasks/sentiment.py); positive tone scores high."""

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        from tether.data.tasks.sentiment import sentiment_score

        return [sentiment_score(c) for c in completions]
