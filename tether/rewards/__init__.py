"""Reward functions: anything that scores completions, behind one interface (`RewardFn`).

    fn(prompts: list, completions: list[str], **columns) -> list[float]   # one score per completion

`prompts` are strings or lists of chat messages; `columns` are the data set's other fields, one
value per completion (e.g. `answer=[...]` for the arithmetic verifier). RL recipes call reward
functions through `call_reward`, which checks what comes back (`check_scores`).
"""

from tether.rewards.base import (GroupedRewards, RewardError, RewardFn, RewardScores, WeightedSum,
                                 builtin_rewards, call_reward, check_scores, load_python_reward,
                                 load_reward, load_rewards, reward_name)
from tether.rewards.model import RewardModelScorer
from tether.rewards.process import ProcessRewardScorer, ProcessScores, aggregate_steps
from tether.rewards.verifiers import (ArithmeticVerifier, FormatReward, SentimentReward,
                                     TerseReward, WorkedFormatReward)

__all__ = [
    "ArithmeticVerifier",
    "FormatReward",
    "GroupedRewards",
    "ProcessRewardScorer",
    "ProcessScores",
    "RewardError",
    "RewardFn",
    "RewardModelScorer",
    "RewardScores",
    "SentimentReward",
    "TerseReward",
    "WeightedSum",
    "WorkedFormatReward",
    "aggregate_steps",
    "builtin_rewards",
    "call_reward",
    "check_scores",
    "load_python_reward",
    "load_reward",
    "load_rewards",
    "reward_name",
]
