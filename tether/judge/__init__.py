"""A local AI judge (RLAIF, Constitutional AI): a causal LM that compares two responses under a
principle, reading the answer options' log-probabilities in both orders (docs/rlaif.md).

    judge = Judge.load()            # default model; or a model dir, a .gguf, a package name
    result = judge.compare(prompts, responses_a, responses_b, "Which response is more positive?")
    result.p_a, result.confidence, result.position_disagree      # each (N,)

    reward = JudgeReward(params)    # the judge as an online reward (`rewards: [judge]`)

tether.judge imports no recipe; it uses tether.engine.models only to find and convert models.
"""

from tether.judge.judge import Judge, JudgeResult, resolve_judge_dir
from tether.judge.labels import keep_confident, label_row, label_rows
from tether.judge.maths import confidence, order_average, position_disagree, two_option_prob
from tether.judge.prompts import (COMPARE_ANSWER, COMPARE_OPTIONS, COMPARE_TEMPLATE,
                                  DEFAULT_POINTWISE_PRINCIPLE, DEFAULT_PRINCIPLE,
                                  POINTWISE_ANSWER, POINTWISE_OPTIONS, POINTWISE_TEMPLATE,
                                  as_text)
from tether.judge.reward import JudgeReward, judge_cost, judge_metrics

__all__ = [
    "COMPARE_ANSWER", "COMPARE_OPTIONS", "COMPARE_TEMPLATE", "DEFAULT_POINTWISE_PRINCIPLE",
    "DEFAULT_PRINCIPLE", "POINTWISE_ANSWER", "POINTWISE_OPTIONS", "POINTWISE_TEMPLATE", "Judge",
    "JudgeResult", "JudgeReward", "as_text", "confidence", "judge_cost", "judge_metrics",
    "keep_confident", "label_row", "label_rows", "order_average", "position_disagree",
    "resolve_judge_dir", "two_option_prob",
]
