"""User groups' fairness weights step by step (`tether.recipes.grpo_groups.UserGroups`)."""

import math

import pytest
import torch

from tether.config import GRPOParams
from tether.data.prompts import PromptExample
from tether.errors import ConfigError
from tether.recipes.grpo_groups import UserGroups
from tether.rewards import WeightedSum


def _groups(mode: str, step_size: float = 1.0) -> UserGroups:
    prompts = [PromptExample("p", [1], {"group": g}) for g in ("a", "b")]
    return UserGroups(GRPOParams(group_fairness=mode, group_step_size=step_size), prompts,
                      WeightedSum([("zero", lambda prompts, completions, **_: [0.0] * len(prompts),
                                   1.0)]))


def test_dro_gain_weighs_the_group_that_improves_less_and_resumes():
    """Groups a, b; step 1 rewards a = [0.2, 0.2], b = [0.8, 0.8]: the baselines are
    b = [0.2, 0.8], both gains 0, so the weights stay uniform (plain `dro` would move them:
    a's reward lags). Step 2: a = [0.6, 0.6] (gain 0.4), b = [0.9, 0.9] (gain 0.1): average
    gain 0.25, deficit = [-0.15, 0.15] -> w = [1 / (1 + e^0.3), e^0.3 / (1 + e^0.3)]
    = [0.425557, 0.574443]: b, the higher reward but the smaller gain, gains weight. Its rows'
    factor is w_b N / sum_k n_k w_k = 0.574443 * 4 / 2 = 1.148886. A second object loaded from
    the first one's state continues with the same weights and baselines."""
    ids = torch.tensor([0, 0, 1, 1])
    gain = _groups("dro_gain")
    assert gain.update(torch.tensor([0.2, 0.2, 0.8, 0.8]), ids).tolist() == [1.0] * 4
    plain = _groups("dro")
    assert plain.update(torch.tensor([0.2, 0.2, 0.8, 0.8]), ids)[0] > 1.0  # level, not gain
    factors = gain.update(torch.tensor([0.6, 0.6, 0.9, 0.9]), ids)
    torch.testing.assert_close(gain.weights, torch.tensor([0.425557, 0.574443],
                                                          dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(factors[2:], torch.full((2,), 1.148886), atol=1e-6, rtol=0)
    state = gain.state()
    assert state["group_baselines"] == pytest.approx({"a": 0.2, "b": 0.8})
    resumed = _groups("dro_gain")
    resumed.load_state(state)
    torch.testing.assert_close(resumed.weights, gain.weights)
    torch.testing.assert_close(resumed.baseline, gain.baseline)


def test_dro_gain_group_without_rows_keeps_no_baseline():
    """Only group a has rows: b's baseline stays NaN (saved as None) and its weight is moved
    only by the renormalisation (a's deficit is 0: the average of one group is itself)."""
    gain = _groups("dro_gain")
    gain.update(torch.tensor([0.5, 0.5]), torch.tensor([0, 0]))
    assert gain.state()["group_baselines"] == {"a": 0.5, "b": None}
    assert math.isnan(gain.baseline[1].item())
    resumed = _groups("dro_gain")
    resumed.load_state(gain.state())
    assert math.isnan(resumed.baseline[1].item())
    with pytest.raises(ConfigError, match="grpo.group_fairness must be one of none, dro, "
                                          "dro_gain"):
        _groups("fair")
