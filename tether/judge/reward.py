"""The AI judge as an online reward (`rewards: [judge]` in grpo / ppo; docs/rlaif.md): each
completion's P(Yes) that it follows a principle, read from a local causal LM by
`tether.judge.Judge.score` (the Yes / No next-token log-probs, renormalised over the two).

The reward loader sits below the judge and does not import it: a recipe that offers "judge"
hands `tether.rewards.load_reward` a factory, `partial(JudgeReward, params, device=device)`."""

from __future__ import annotations

from typing import Any

from tether.judge.judge import Judge
from tether.judge.prompts import DEFAULT_POINTWISE_PRINCIPLE


class JudgeReward:
    """score_i = P(Yes | prompt_i, completion_i, principle) in (0, 1), one judge forward per
    completion, `batch_size` sequences per forward, no gradients.

    `params` is a `tether.config.JudgeParams` (grpo.judge / ppo.judge; null = its defaults):
    the model is loaded once, when the recipe builds its rewards. `principle` null means
    `DEFAULT_POINTWISE_PRINCIPLE`. A loaded `judge` may be passed instead of a model to load.
    `calls` / `seconds` are the judge's running totals, read by `judge_cost`."""

    def __init__(self, params=None, *, device=None, judge: Judge | None = None):
        from tether.config import JudgeParams

        p = params if params is not None else JudgeParams()
        self.principle = p.principle or DEFAULT_POINTWISE_PRINCIPLE
        self.judge = judge if judge is not None else Judge.load(
            p.model, batch_size=p.batch_size, dtype=p.dtype, device=device,
            max_text_tokens=p.max_text_tokens)

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        return self.judge.score(prompts, completions, self.principle).tolist()  # (N,)

    @property
    def calls(self) -> int:
        return self.judge.calls

    @property
    def seconds(self) -> float:
        return self.judge.seconds


def judge_cost(fn) -> tuple[int, float] | None:
    """(sequences forwarded, seconds spent) so far by the `JudgeReward`s inside a reward
    function (a WeightedSum / GroupedRewards, whose `components` are (name, fn, weight)) or
    the function itself; None when it holds no judge."""
    parts = [c[1] for c in getattr(fn, "components", [])] or [fn]
    judges = [f for f in parts if isinstance(f, JudgeReward)]
    if not judges:
        return None
    return sum(j.calls for j in judges), sum(j.seconds for j in judges)


def judge_metrics(before: tuple[int, float] | None,
                  after: tuple[int, float] | None) -> dict[str, float]:
    """The judge's cost between two `judge_cost` readings, as the logged metrics:
    judge/calls = calls_after - calls_before, judge/seconds = seconds_after - seconds_before
    ({} without a judge)."""
    if before is None or after is None:
        return {}
    return {"judge/calls": float(after[0] - before[0]), "judge/seconds": after[1] - before[1]}
