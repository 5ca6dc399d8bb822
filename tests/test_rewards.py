"""Reward functions: verifiers and weighted sums by hand, bad functions named, load by name."""

import math
import sys

import pytest

from tether.errors import TetherError
from tether.rewards import (ArithmeticVerifier, FormatReward, GroupedRewards, RewardError, RewardFn,
                            TerseReward, WeightedSum, call_reward, check_scores,
                            load_python_reward)

PROMPTS = ["What is 2 + 3?", "What is 7 * 6?", "What is 10 - 4?", "What is 1 + 1?"]
COMPLETIONS = [
    "2 + 3 = 5\nAnswer: 5",          # right, well formatted
    "Answer: 41",                    # wrong, well formatted
    "Answer: 6 because 10 - 4 = 6",  # right (last 'Answer:' is 6), but does not end with it
    "it is two",                     # no answer at all
]
ANSWERS = [5, 42, 6, 2]


def test_arithmetic_verifier_by_hand():
    assert ArithmeticVerifier()(PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 1.0, 0.0]
    assert ArithmeticVerifier()(["q"], ["Answer: 3\nAnswer: -7  "], answer=[-7]) == [1.0]
    with pytest.raises(RewardError, match="'answer' column"):
        ArithmeticVerifier()(PROMPTS, COMPLETIONS)


def test_format_reward_by_hand():
    assert FormatReward()(PROMPTS, COMPLETIONS) == [1.0, 1.0, 0.0, 0.0]


def test_weighted_sum_by_hand():
    """total = 1.0 * correct + 0.5 * format - 0.1 * length/10:
    row 0: 1 + 0.5 - 0.1 * 1.9 = 1.31; row 1: 0 + 0.5 - 0.1 * 1.0 = 0.4;
    row 2: 1 + 0 - 0.1 * 2.8 = 0.72;   row 3: 0 + 0 - 0.1 * 0.9 = -0.09."""
    length = lambda prompts, completions, **_: [len(c) / 10 for c in completions]  # noqa: E731
    combo = WeightedSum([("correct", ArithmeticVerifier(), 1.0), ("format", FormatReward(), 0.5),
                         ("length", length, -0.1)])
    assert isinstance(combo, RewardFn)
    out = combo.score(PROMPTS, COMPLETIONS, answer=ANSWERS)
    assert [len(c) for c in COMPLETIONS] == [19, 10, 28, 9]
    assert out.total == pytest.approx([1.31, 0.4, 0.72, -0.09])
    assert out.components == {"correct": [1.0, 0.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 0.0],
                              "length": pytest.approx([1.9, 1.0, 2.8, 0.9])}
    assert combo(PROMPTS, COMPLETIONS, answer=ANSWERS) == pytest.approx(out.total)
    with pytest.raises(RewardError, match="unique"):
        WeightedSum([("a", length, 1.0), ("a", length, 2.0)])


def test_grouped_rewards_route_each_row_to_its_group():
    """Rows of groups [a, b, c, a]: a = 1.0 correct + 0.5 format, b = 2.0 format, c (no entry)
    the default 1.0 correct. correct = [1, 0, 1, 0], format = [1, 1, 0, 0]:
    row 0 (a): 1 + 0.5 = 1.5; row 1 (b): 2 * 1 = 2; row 2 (c): 1; row 3 (a): 0 + 0 = 0.
    Both functions score every row (their unweighted scores are the components)."""
    combo = GroupedRewards([("correct", ArithmeticVerifier()), ("format", FormatReward())],
                           {"a": {"correct": 1.0, "format": 0.5}, "b": {"format": 2.0}},
                           {"correct": 1.0})
    out = combo.score(PROMPTS, COMPLETIONS, answer=ANSWERS, group=["a", "b", "c", "a"])
    assert out.total == [1.5, 2.0, 1.0, 0.0]
    assert out.components == {"correct": [1.0, 0.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 0.0]}
    assert [w for _, _, w in combo.components] == [1.0, 0.0]  # the default's weights
    with pytest.raises(RewardError, match="absent"):
        GroupedRewards([("correct", ArithmeticVerifier())], {"a": {"format": 1.0}}, {})


def test_terse_reward_by_hand():
    """0 unless the last integer is right; then len('Answer: N') / len(reply), capped at 1:
    'Answer: 5' 9/9 = 1; '2 + 3 = 5' 9/9 = 1; '2 + 3 = 5\nAnswer: 5' 9/19; a wrong bare answer
    0; right but with chatter ('Answer: 6 because 10 - 4 = 6') 9/28; '  5 ' (stripped: '5') 1."""
    texts = ["Answer: 5", "2 + 3 = 5", COMPLETIONS[0], "Answer: 41", COMPLETIONS[2], "  5 "]
    out = TerseReward()(PROMPTS + PROMPTS[:2], texts, answer=[5, 5, 5, 42, 6, 5])
    assert out == pytest.approx([1.0, 1.0, 9 / 19, 0.0, 9 / 28, 1.0])


def _raises(prompts, completions, **_):
    raise KeyError("score")


@pytest.mark.parametrize("fn, message", [
    (_raises, r"reward function 'judge' raised KeyError: 'score'"),
    (lambda p, c, **_: [1.0] * (len(c) - 1), r"reward function 'judge' returned 3 scores for 4"),
    (lambda p, c, **_: [1.0, float("nan"), 0.0, 1.0], r"'judge' returned nan at index 1"),
    (lambda p, c, **_: [1.0, 2.0, "3", 1.0], r"'judge' returned a non-number at index 2: '3'"),
    (lambda p, c, **_: [1.0, 2.0, None, 1.0], r"'judge' returned a non-number at index 2: None"),
    (lambda p, c, **_: 1.0, r"'judge' must return a list of 4 numbers, got float"),
])
def test_bad_reward_function_is_named(fn, message):
    with pytest.raises(RewardError, match=message) as err:
        call_reward("judge", fn, PROMPTS, COMPLETIONS)
    assert isinstance(err.value, TetherError)
    combo = WeightedSum([("ok", FormatReward(), 1.0), ("judge", fn, 1.0)])
    with pytest.raises(RewardError, match="'judge'"):
        combo(PROMPTS, COMPLETIONS)


def test_check_scores_accepts_numbers_and_tensors():
    import torch

    assert check_scores("f", [1, True, 0.5], 3) == [1.0, 1.0, 0.5]
    assert check_scores("f", torch.tensor([1.0, -2.0]), 2) == [1.0, -2.0]
    with pytest.raises(RewardError, match="inf"):
        check_scores("f", [math.inf], 1)


def test_load_python_reward_from_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def shout(prompts, completions, **columns):\n"
        "    return [float(c.isupper()) for c in completions]\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "my_rewards_mod" not in sys.modules  # nothing imported until named
    fn = load_python_reward("my_rewards_mod:shout")
    assert call_reward("shout", fn, ["p", "p"], ["HEY", "hey"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="has no attribute 'nope'"):
        load_python_reward("my_rewards_mod:nope")
    with pytest.raises(RewardError, match="not callable"):
        load_python_reward("my_rewards_mod:NOT_CALLABLE")
    with pytest.raises(RewardError, match="cannot import module 'no_such_mod_xyz'"):
        load_python_reward("no_such_mod_xyz:f")
    with pytest.raises(RewardError, match="module:function"):
        load_python_reward("my_rewards_mod.shout")
    monkeypatch.delitem(sys.modules, "my_rewards_mod")


def test_load_reward_by_name(tmp_path, monkeypatch):
    from tether.rewards import load_reward

    assert isinstance(load_reward("arithmetic"), ArithmeticVerifier)
    assert isinstance(load_reward("format"), FormatReward)
    tone = load_reward("sentiment")
    scores = call_reward("sentiment", tone, ["p"] * 3, ["I love it, wonderful!", "It is a chair.",
                                                       "Awful. I hate it."])
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5  # VADER compound
    with pytest.raises(RewardError, match=r"unknown reward function 'arithmetik'; did you mean "
                                          r"'arithmetic'\?"):
        load_reward("arithmetik")
    (tmp_path / "my_rewards_mod2.py").write_text(
        "def one(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert call_reward("one", load_reward("my_rewards_mod2:one"), ["p"], ["c"]) == [1.0]
    monkeypatch.delitem(sys.modules, "my_rewards_mod2")


def test_process_reward_aggregates_by_hand():
    """Step probabilities .9 .5 .8 (a 4th step is padding): min = .5, prod = .9 * .5 * .8 = .36;
    one step .7: min = prod = .7; no step: 0 (nothing to reward)."""
    import torch

    from tether.rewards import aggregate_steps

    probs = torch.tensor([[0.9, 0.5, 0.8, 0.01], [0.7, 0.01, 0.01, 0.01], [0.3, 0.3, 0.3, 0.3]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    assert aggregate_steps(probs, mask, "min").tolist() == pytest.approx([0.5, 0.7, 0.0])
    assert aggregate_steps(probs, mask, "prod").tolist() == pytest.approx([0.36, 0.7, 0.0])
    with pytest.raises(TetherError, match="min, prod"):
        aggregate_steps(probs, mask, "mean")


def test_load_reward_takes_a_reward_model_directory(tiny_model_dir, default_tokenizer, tmp_path):
    """A name that is a directory with config.json is a reward model (as GRPO's `grpo.rewards`
    takes it): the same scores as RewardModelScorer; a directory without one is an error naming
    it."""
    from tether.config import ModelConfig
    from tether.engine.checkpoint import export
    from tether.engine.models import load_reward_model
    from tether.errors import ConfigError
    from tether.rewards import RewardModelScorer, load_reward

    model = load_reward_model(ModelConfig(name_or_path=str(tiny_model_dir)),
                              default_tokenizer.pad_token_id)
    out = export(model.eval(), default_tokenizer, tmp_path / "reward_model")
    fn = load_reward(str(out))
    assert isinstance(fn, RewardModelScorer)
    prompts, texts = ["Say hi."] * 2, ["Hi there!", "No."]
    assert call_reward(str(out), fn, prompts, texts) == RewardModelScorer(out)(prompts, texts)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_reward(str(tmp_path / "empty"))


def test_reward_name_is_what_metrics_are_logged_under(tmp_path):
    """reward/<name>/mean: a reward-model directory is 'reward_model' (not its path), a Python
    function its own name, a built-in its name."""
    from tether.rewards import reward_name

    assert reward_name(str(tmp_path)) == "reward_model"
    assert reward_name("my_rewards:length_penalty") == "length_penalty"
    assert reward_name("arithmetic") == "arithmetic"
