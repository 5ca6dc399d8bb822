"""The judge as an online reward: `JudgeReward` is `Judge.score` under the pointwise principle,
its cost is read per step, and a GRPO / PPO step with `rewards: [judge]` logs the judge's
reward and cost (tiny random judge)."""

import json
from functools import partial

import pytest
import torch

from tether.config import GRPOConfig, JudgeParams, PPOConfig, load_config
from tether.errors import RewardError
from tether.judge import DEFAULT_POINTWISE_PRINCIPLE, Judge, JudgeReward, judge_cost, judge_metrics
from tether.recipes import grpo, ppo
from tether.rewards import WeightedSum, load_reward, reward_name

PROMPTS = ["Write about your day.", "Describe the sea.", "Hi"]
TEXTS = ["I had a wonderful day!", "Grey, cold and angry water.", "Hello"]


@pytest.fixture(scope="module")
def judge(tiny_model_dir):
    return Judge.load(str(tiny_model_dir), batch_size=2)


def test_judge_reward_is_judge_score(tiny_model_dir, judge):
    params = JudgeParams(model=str(tiny_model_dir), batch_size=2)
    reward = load_reward("judge", judge=partial(JudgeReward, params))
    assert isinstance(reward, JudgeReward) and reward_name("judge") == "judge"
    assert reward.principle == DEFAULT_POINTWISE_PRINCIPLE
    scores = reward(PROMPTS, TEXTS)
    assert scores == pytest.approx(judge.score(PROMPTS, TEXTS).tolist(), abs=1e-6)
    assert all(0 < s < 1 for s in scores)
    kind = JudgeReward(JudgeParams(principle="The response is kind."), judge=judge)
    assert kind(PROMPTS, TEXTS) == pytest.approx(
        judge.score(PROMPTS, TEXTS, "The response is kind.").tolist(), abs=1e-6)


def test_judge_reward_needs_the_recipe_that_offers_it():
    """rewards/ sits below judge/: "judge" is only what a recipe passes (grpo, ppo)."""
    with pytest.raises(RewardError, match="grpo.rewards and ppo.rewards only"):
        load_reward("judge")


def test_cost_per_step_hand_values(judge):
    """Before: (c0, s0) = the judge's running totals. Scoring 3 completions forwards 3
    sequences, so judge/calls = c1 - c0 = 3 and judge/seconds = s1 - s0 > 0. A reward
    without a judge has no cost metrics at all."""
    total = WeightedSum([("judge", JudgeReward(judge=judge), 1.0),
                         ("length", lambda p, c, **k: [float(len(x)) for x in c], 0.5)])
    before = judge_cost(total)
    assert before == (judge.calls, judge.seconds)
    total(PROMPTS, TEXTS)
    m = judge_metrics(before, judge_cost(total))
    assert m["judge/calls"] == 3 and m["judge/seconds"] > 0
    plain = WeightedSum([("length", lambda p, c, **k: [1.0] * len(c), 1.0)])
    assert judge_cost(plain) is None and judge_metrics(None, None) == {}


class Recorded:
    """JudgeReward.__call__ wrapped: keeps (prompts, completions, scores) of every call."""

    def __init__(self, monkeypatch):
        self.calls, real = [], JudgeReward.__call__

        def call(fn, prompts, completions, **columns):
            scores = real(fn, prompts, completions, **columns)
            self.calls.append((list(prompts), list(completions), scores))
            return scores

        monkeypatch.setattr(JudgeReward, "__call__", call)


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def _check_step(step: dict, call, judge, n: int):
    """The step's judge reward is Judge.score on the same texts; its cost is one forward per
    completion."""
    prompts, completions, scores = call
    assert len(scores) == n
    want = judge.score(prompts, completions)  # (n,) P(Yes), the default pointwise principle
    assert scores == pytest.approx(want.tolist(), abs=1e-5)
    assert 0 < step["reward/judge/mean"] < 1
    assert step["reward/judge/mean"] == pytest.approx(want.mean().item(), abs=1e-5)
    assert step["judge/calls"] == n and step["judge/seconds"] > 0


def test_grpo_with_the_judge_reward(tiny_model_dir, judge, tmp_path, monkeypatch):
    rec = Recorded(monkeypatch)
    out = tmp_path / "grpo"
    grpo.run(load_config(GRPOConfig, None, [
        f"--model.name_or_path={tiny_model_dir}", f"--run.output_dir={out}", "--model.lora.r=0",
        "--train.max_steps=2", "--train.precision=fp32", "--train.micro_batch_size=4",
        "--grpo.group_size=2", "--grpo.prompts_per_step=2", "--grpo.max_new_tokens=6",
        "--grpo.task_size=8", "--run.eval_generations=0", "--grpo.rewards=[judge]",
        f"--grpo.judge.model={tiny_model_dir}", "--grpo.judge.batch_size=3",
        "--run.progress=false", "--run.tensorboard=false"]))
    steps = _metrics(out)
    assert len(steps) == 2 and len(rec.calls) == 2  # one judge call per step, no eval
    for step, call in zip(steps, rec.calls):
        _check_step(step, call, judge, 4)
        assert step["reward/mean"] == pytest.approx(step["reward/judge/mean"])


def test_ppo_with_the_judge_reward(tiny_model_dir, judge, tmp_path, monkeypatch):
    rec = Recorded(monkeypatch)
    out = tmp_path / "ppo"
    ppo.run(load_config(PPOConfig, None, [
        f"--model.name_or_path={tiny_model_dir}", f"--run.output_dir={out}",
        "--ppo.rewards=[judge]", f"--ppo.judge.model={tiny_model_dir}", "--train.max_steps=1",
        "--train.batch_size=2", "--train.micro_batch_size=2", "--train.precision=fp32",
        "--ppo.max_new_tokens=6", "--ppo.samples_per_prompt=2", "--ppo.update_epochs=1",
        "--run.eval_generations=0", "--run.progress=false", "--run.tensorboard=false"]))
    (step,) = _metrics(out)
    assert len(rec.calls) == 1
    _check_step(step, rec.calls[0], judge, 4)
    assert torch.isfinite(torch.tensor(step["loss/policy"]))
