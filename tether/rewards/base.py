"""The reward-function interface, its checks, user functions by name, and weighted sums (one for
all rows, or one per user group)."""

from __future__ import annotations

import importlib
import os
import sys
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from tether.errors import ConfigError, RewardError, TetherError
from tether.rewards.verifiers import (ArithmeticVerifier, FormatReward, SentimentReward,
                                     TerseReward, WorkedFormatReward)


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        """One finite score per completion, in order."""
        ...


def _as_float(value: Any) -> float | None:
    """A plain float from a Python / numpy number or a one-element tensor; None otherwise."""
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None


def check_scores(name: str, scores: Any, n: int) -> list[float]:
    """`scores` as n finite floats, or a RewardError naming reward function `name` and what is
    wrong (not a list, wrong count, a non-number, NaN/inf) with the first offending index."""
    if hasattr(scores, "tolist") and not isinstance(scores, (list, tuple)):  # tensor / ndarray
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise RewardError(f"reward function '{name}' must return a list of {n} numbers, got "
                          f"{type(scores).__name__}")
    if len(scores) != n:
        raise RewardError(f"reward function '{name}' returned {len(scores)} scores for {n} "
                          "completions (it must return one per completion)")
    out = []
    for i, value in enumerate(scores):
        x = _as_float(value)
        if x is None:
            raise RewardError(f"reward function '{name}' returned a non-number at index {i}: "
                              f"{value!r} ({type(value).__name__})")
        if not math.isfinite(x):
            raise RewardError(f"reward function '{name}' returned {x} at index {i} (scores must "
                              "be finite)")
        out.append(x)
    return out


def call_reward(name: str, fn: RewardFn, prompts: list, completions: list[str],
                **columns: Any) -> list[float]:
    """fn(prompts, completions, **columns), checked; an exception inside fn becomes a
    RewardError naming it (the original stays chained as __cause__)."""
    try:
        scores = fn(prompts, completions, **columns)
    except TetherError:
        raise
    except Exception as err:  # noqa: BLE001 - user code may raise anything
        raise RewardError(f"reward function '{name}' raised {type(err).__name__}: {err}") \
            from err
    return check_scores(name, scores, len(completions))


def import_user_module(spec: str, module_name: str):
    """The user's module: looked up on sys.path (installed packages, PYTHONPATH), then in the
    current folder, so `tether` finds a my_rewards.py beside the config as `python -m tether`
    does. Any failure of the import (missing, a SyntaxError, an exception the module raises
    on import) is one RewardError naming the spec."""
    def attempt():
        try:
            return importlib.import_module(module_name), None
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):  # the module itself is missing
                return None, err
            raise
    try:
        module, missing = attempt()
        if module is None and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # after everything installed: never shadows a package
            module, missing = attempt()
    except Exception as err:  # noqa: BLE001 - user code may raise anything on import
        where = f" ({err.filename}, line {err.lineno})" if isinstance(err, SyntaxError) else ""
        raise RewardError(f"reward function '{spec}': importing module '{module_name}' raised "
                          f"{type(err).__name__}: {getattr(err, 'msg', None) or err}{where}") \
            from None
    if module is None:
        raise RewardError(f"reward function '{spec}': cannot import module '{module_name}' "
                          f"({missing}; looked on sys.path and in {os.getcwd()})")
    return module


def load_python_reward(spec: str) -> RewardFn:
    """The function named by "package.module:function" (imported now, only when named)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward function '{spec}': expected 'module:function', e.g. "
                          "'my_rewards:length_penalty'")
    module = import_user_module(spec, module_name)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise RewardError(f"reward function '{spec}': module '{module_name}' has no "
                              f"attribute '{attr}'")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(f"reward function '{spec}': '{attr}' is not callable")
    return fn


def builtin_rewards() -> dict[str, type]:
    """Reward functions known by a plain name in config (classes; call one to get the function)."""
    return {"arithmetic": ArithmeticVerifier, "format": FormatReward, "sentiment": SentimentReward,
            "terse": TerseReward, "worked": WorkedFormatReward}


def load_reward(name: str, *, judge: Callable[[], RewardFn] | None = None) -> RewardFn:
    """A reward function named in config: a built-in name (`builtin_rewards()`: "arithmetic",
    "format", "sentiment", "terse", "worked"), "judge" (`judge()`: the AI judge a recipe that
    offers it passes, e.g. `partial(tether.judge.JudgeReward, params, device=device)`), a
    reward-model directory (one with
    config.json, e.g. the RUN_DIR/reward_model that `tether rm` writes: a `RewardModelScorer`),
    or "module:function" (imported now, only because it is named)."""
    builtin = builtin_rewards()
    if name in builtin:
        return builtin[name]()
    if name == "judge":
        if judge is None:
            raise RewardError("the reward 'judge' (the AI judge) is offered by grpo.rewards and "
                              "ppo.rewards only (docs/rlaif.md)")
        return judge()
    if Path(name).is_dir():  # a directory that is not a model is an error naming it
        from tether.rewards.model import RewardModelScorer

        return RewardModelScorer(name)
    if ":" not in name:
        import difflib

        near = difflib.get_close_matches(name, [*builtin, "judge"], n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise RewardError(f"unknown reward function '{name}'{hint} (built-in: "
                          f"{', '.join(builtin)}, judge; or your own as 'module:function')")
    return load_python_reward(name)


def load_rewards(names: list[str], weights: list[float] | None, *, section: str,
                 judge: Callable[[], RewardFn] | None = None) -> list[tuple[str, RewardFn, float]]:
    """[(logged name, function, weight)] of a recipe's `<section>.rewards` and
    `<section>.reward_weights` (None: all 1); a weight count that does not match is an error
    naming both keys."""
    weights = [1.0] * len(names) if weights is None else weights
    if len(weights) != len(names):
        raise ConfigError(f"{section}.reward_weights has {len(weights)} entries for "
                          f"{len(names)} {section}.rewards")
    return [(reward_name(name), load_reward(name, judge=judge), w)
            for name, w in zip(names, weights)]


def reward_name(spec: str) -> str:
    """The name a configured reward is logged under (`reward/<name>/mean`): "reward_model" for
    a reward-model directory, the function's name for "module:function", else the name itself."""
    if Path(spec).is_dir():
        return "reward_model"
    return spec.rsplit(":", 1)[-1]


@dataclass
class RewardScores:
    total: list[float]  # sum of weight * component score, per completion
    components: dict[str, list[float]]  # unweighted scores of each component, by name


class WeightedSum:
    """total_i = sum_k w_k * f_k(prompts, completions, **columns)_i over named components.

    Calling it returns the totals (so it is a RewardFn itself); `score` also returns every
    component's unweighted scores so that each can be logged on its own (`reward/<name>`)."""

    def __init__(self, components: list[tuple[str, RewardFn, float]]):
        if not components:
            raise RewardError("WeightedSum needs at least one (name, function, weight)")
        names = [name for name, _, _ in components]
        if len(set(names)) != len(names):
            raise RewardError(f"WeightedSum: component names must be unique, got {names}")
        for name, fn, weight in components:
            if not callable(fn):
                raise RewardError(f"reward function '{name}' is not callable")
            if _as_float(weight) is None or not math.isfinite(float(weight)):
                raise RewardError(f"reward function '{name}': weight must be a finite number, "
                                  f"got {weight!r}")
        self.components = [(name, fn, float(weight)) for name, fn, weight in components]

    def score(self, prompts: list, completions: list[str], **columns: Any) -> RewardScores:
        parts = {name: call_reward(name, fn, prompts, completions, **columns)
                 for name, fn, _ in self.components}
        total = [sum(w * parts[name][i] for name, _, w in self.components)
                 for i in range(len(completions))]
        return RewardScores(total, parts)

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        return self.score(prompts, completions, **columns).total


class GroupedRewards:
    """Each user group's own weighted sum of one set of named functions (multi-group GRPO):

        total_i = sum_k w_{g_i, k} f_k(prompts, completions, **columns)_i

    g_i is row i's `group` column; `weights[g]` maps function names to weights (a function a
    group does not name has weight 0 for its rows), and a group without an entry uses
    `default`. Every function scores every row, as TRL calls every reward function on every
    completion, so each is still logged over the whole step (`score` returns the unweighted
    scores by name); a function meant for one group gets the other groups' rows too (their
    missing columns are None) and should score them 0 rather than fail."""

    def __init__(self, components: list[tuple[str, RewardFn]], weights: dict[str, dict[str, float]],
                 default: dict[str, float]):
        names = [name for name, _ in components]
        unknown = {n for w in [default, *weights.values()] for n in w} - set(names)
        if len(set(names)) != len(names) or unknown:
            raise RewardError(f"GroupedRewards: component names must be unique and cover "
                              f"every weighted name, got {names} (weighted but absent: "
                              f"{sorted(unknown)})")
        self.components = [(name, fn, float(default.get(name, 0.0))) for name, fn in components]
        self.weights, self.default = weights, default

    def score(self, prompts: list, completions: list[str], **columns: Any) -> RewardScores:
        groups = columns.get("group") or [None] * len(completions)
        parts = {name: call_reward(name, fn, prompts, completions, **columns)
                 for name, fn, _ in self.components}
        total = [sum(w * parts[name][i] for name, w in self.weights.get(g, self.default).items())
                 for i, g in enumerate(groups)]
        return RewardScores(total, parts)

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        return self.score(prompts, completions, **columns).total
