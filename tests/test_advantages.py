"""Hand-derived tests for the advantage estimators (maths in each docstring)."""

import math
import pytest
import torch
from torch.testing import assert_close

from tether.advantages import (gae, group_advantages, group_dro_weights, group_reward_gains,
                               reinforce_pp_advantages, rloo_advantages, sequence_group_weights,
                               whiten)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_hand_worked_example():
    """gamma = 0.9, lam = 0.8 (gamma lam = 0.72); value after the last valid token is 0.
    Row 0 (3 tokens): r = [0, 0, 1], V = [0.5, 0.6, 0.7]
      delta = [0 + 0.9*0.6 - 0.5, 0 + 0.9*0.7 - 0.6, 1 + 0 - 0.7] = [0.04, 0.03, 0.3]
      A_2 = 0.3;  A_1 = 0.03 + 0.72*0.3 = 0.246;  A_0 = 0.04 + 0.72*0.246 = 0.21712
      R = A + V = [0.71712, 0.846, 1.0]
    Row 1 (2 tokens, then padding with V = 9, r = 5 that must be ignored): r = [0, 1], V = [0.5, 0.6]
      delta_1 = 1 + 0 - 0.6 = 0.4 (V_2 is padding -> 0);  delta_0 = 0.9*0.6 - 0.5 = 0.04
      A_1 = 0.4;  A_0 = 0.04 + 0.72*0.4 = 0.328;  R = [0.828, 1.0, 0]"""
    rewards = t([0.0, 0.0, 1.0], [0.0, 1.0, 5.0])
    values = t([0.5, 0.6, 0.7], [0.5, 0.6, 9.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, t([0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]))
    assert_close(ret, t([0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]))


def test_gae_lambda_one_is_discounted_return_minus_value():
    """lam = 1, gamma = 1: A_t = sum_{k>=t} r_k - V_t. r = [1, 2, 3], V = [1, 1, 1]:
    A = [6 - 1, 5 - 1, 3 - 1] = [5, 4, 2]; R = [6, 5, 3]."""
    adv, ret = gae(t([1.0, 2.0, 3.0]), t([1.0, 1.0, 1.0]), torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    assert_close(adv, t([5.0, 4.0, 2.0]))
    assert_close(ret, t([6.0, 5.0, 3.0]))


def test_whiten_hand_values():
    """Valid entries [1, 3, 5] (padding 100 ignored): mean 3, unbiased var = (4 + 0 + 4) / 2 = 4, std 2
    -> [-1, 0, 1] (padding 0). shift_mean=False adds the mean back: [2, 3, 4]."""
    values = t([1.0, 3.0], [5.0, 100.0])
    mask = torch.tensor([[True, True], [True, False]])
    assert_close(whiten(values, mask), t([-1.0, 0.0], [1.0, 0.0]), atol=1e-6, rtol=0)
    assert_close(whiten(values, mask, shift_mean=False), t([2.0, 3.0], [4.0, 0.0]), atol=1e-6, rtol=0)


def test_group_advantages_hand_values():
    """Two groups of 4: [1, 0, 0, 1] and [1, 1, 1, 0]; eps = 1e-4.
    group: group 1 mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.577350 -> +-0.5 / 0.577450 = +-0.865875;
           group 2 mean 0.75, std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5 -> 0.25 / 0.5001 = 0.499900,
           -0.75 / 0.5001 = -1.499700.
    batch: std of all 8 (mean 0.625): sqrt((5 * 0.140625 + 3 * 0.390625) / 7) = 0.517549;
           0.5 / 0.517649 = 0.965905, 0.25 / 0.517649 = 0.482953, 0.75 / 0.517649 = 1.448858.
    none (Dr. GRPO): r - group mean = [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    a, b, c = 0.865875, 0.499900, 1.499700
    assert_close(group_advantages(r, 4), t(a, -a, -a, a, b, b, b, -c), atol=1e-6, rtol=0)
    a, b, c = 0.965905, 0.482953, 1.448858
    assert_close(group_advantages(r, 4, scale="batch"), t(a, -a, -a, a, b, b, b, -c), atol=1e-6, rtol=0)
    assert_close(group_advantages(r, 4, scale="none"), t(0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75))


def test_group_advantages_constant_group_is_zero_and_errors():
    """A group with equal rewards has std 0: (r - mean) / (0 + eps) = 0 / 1e-4 = 0, not NaN."""
    assert_close(group_advantages(t(1.0, 1.0, 1.0), 3), t(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(t(1.0, 1.0, 1.0), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(t(1.0, 1.0), 2, scale="std")


def test_rloo_hand_values():
    """Group [1, 0, 0, 1]: 1 - (0 + 0 + 1)/3 = 0.666667; 0 - (1 + 0 + 1)/3 = -0.666667.
    Group [1, 1, 1, 0]: 1 - (1 + 1 + 0)/3 = 0.333333; 0 - (1 + 1 + 1)/3 = -1."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    p, q = 2 / 3, 1 / 3
    assert_close(rloo_advantages(r, 4), t(p, -p, -p, p, q, q, q, -1.0))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(r, 1)


def test_reinforce_pp_hand_values():
    """rewards [1, 2], kl_coef 0.1, gamma 0.5, kl = [[0.5, 1, (pad) 9], [0, 2, 0]].
    Per-token rewards (sequence reward at the last valid token):
      row 0: [-0.05, -0.1 + 1] = [-0.05, 0.9]
      row 1: [0, -0.2, 0 + 2]  = [0, -0.2, 2]
    Returns G_t = r_t + 0.5 G_{t+1}:
      row 0: [-0.05 + 0.45, 0.9] = [0.4, 0.9];  row 1: [0 + 0.4, -0.2 + 1.0, 2] = [0.4, 0.8, 2]
    Whitened over the 5 valid tokens: mean 4.5 / 5 = 0.9; deviations [-0.5, 0, -0.5, -0.1, 1.1];
      unbiased var = (0.25 + 0 + 0.25 + 0.01 + 1.21) / 4 = 0.43, std 0.655744
      -> [-0.762493, 0, pad 0], [-0.762493, -0.152499, 1.677484]."""
    mask = torch.tensor([[True, True, False], [True, True, True]])
    kl = t([0.5, 1.0, 9.0], [0.0, 2.0, 0.0])
    adv = reinforce_pp_advantages(t(1.0, 2.0), mask, kl=kl, kl_coef=0.1, gamma=0.5)
    assert_close(adv, t([-0.762493, 0.0, 0.0], [-0.762493, -0.152499, 1.677484]), atol=1e-6, rtol=0)


def test_group_dro_weights_hand_value():
    """Two user groups, w = [0.5, 0.5], mean rewards r = [0, ln 3], step 1:
    average ln 3 / 2, deficit = [ln 3 / 2, -ln 3 / 2];
    w * exp(deficit) = [0.5 sqrt 3, 0.5 / sqrt 3], proportional to [3, 1] -> [0.75, 0.25]:
    the lagging group gains weight."""
    w, m = group_dro_weights(t(0.0, math.log(3)), torch.tensor([3, 1]), t(0.5, 0.5),
                             step_size=1.0)
    assert_close(w, t(0.75, 0.25))
    assert m["worst_group"] == 0.0


def test_group_dro_weights_absent_group_keeps_its_logit():
    """Three groups, w = [0.25, 0.25, 0.5]; group 2 has no rows this step (its reward 99 is
    ignored); r = [0, 2 ln 3], step 0.5. Average over present groups = ln 3, deficit =
    [ln 3, -ln 3, 0]; step * deficit = [ln 3 / 2, -ln 3 / 2, 0];
    w * exp(.) = [0.25 sqrt 3, 0.25 / sqrt 3, 0.5], times sqrt 3: [0.75, 0.25, 0.866025],
    sum 1.866025 -> [0.401924, 0.133975, 0.464102]. Equal rewards change nothing; step 0 neither."""
    w, _ = group_dro_weights(t(0.0, 2 * math.log(3), 99.0), torch.tensor([2, 2, 0]),
                             t(0.25, 0.25, 0.5), step_size=0.5)
    assert_close(w, t(0.401924, 0.133975, 0.464102), atol=1e-6, rtol=0)
    same, _ = group_dro_weights(t(0.3, 0.3, 0.3), torch.tensor([1, 2, 3]), t(0.2, 0.3, 0.5),
                                step_size=5.0)
    assert_close(same, t(0.2, 0.3, 0.5))
    still, _ = group_dro_weights(t(0.0, 1.0), torch.tensor([1, 1]), t(0.4, 0.6), step_size=0.0)
    assert_close(still, t(0.4, 0.6))


def test_group_reward_gains_hand_value():
    """b = [0.2, NaN, 0.5], r = [0.5, 0.9, 7.0], counts = [4, 4, 0]: group 0 gains
    0.5 - 0.2 = 0.3; group 1 has its first rows, so b_1 = 0.9 and its gain is 0; group 2 has no
    rows and keeps b_2 = 0.5. The gains of groups 0 and 1 into `group_dro_weights` (step 1,
    w = [0.5, 0.5]): average gain 0.15, deficit = [-0.15, 0.15], w ∝ [0.5 e^-0.15, 0.5 e^0.15] ->
    [1 / (1 + e^0.3), e^0.3 / (1 + e^0.3)] = [0.425557, 0.574443]: the group that has not
    improved gains weight although its reward (0.9) is the higher one."""
    gains, b = group_reward_gains(t(0.5, 0.9, 7.0), torch.tensor([4, 4, 0]),
                                  torch.tensor([0.2, math.nan, 0.5], dtype=torch.float64))
    assert_close(b, torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64))
    assert_close(gains[:2], torch.tensor([0.3, 0.0], dtype=torch.float64))
    w, _ = group_dro_weights(gains[:2], torch.tensor([4, 4]),
                             torch.tensor([0.5, 0.5], dtype=torch.float64), step_size=1.0)
    assert_close(w, torch.tensor([0.425557, 0.574443], dtype=torch.float64), atol=1e-6, rtol=0)


def test_sequence_group_weights_hand_value():
    """w = [0.75, 0.25], rows of groups [0, 0, 0, 1] (n = [3, 1], N = 4):
    sum_k n_k w_k = 3 * 0.75 + 0.25 = 2.5; c = 4 * [0.75, 0.75, 0.75, 0.25] / 2.5 =
    [1.2, 1.2, 1.2, 0.4], mean 1. Uniform weights give 1 for every row."""
    c = sequence_group_weights(t(0.75, 0.25), torch.tensor([0, 0, 0, 1]), torch.tensor([3, 1]))
    assert_close(c, t(1.2, 1.2, 1.2, 0.4))
    assert c.mean().item() == pytest.approx(1.0)
    ones = sequence_group_weights(t(0.5, 0.5), torch.tensor([1, 0, 1]), torch.tensor([1, 2]))
    assert_close(ones, t(1.0, 1.0, 1.0))
