"""Hand-derived tests for the reward-model losses (maths in each docstring)."""

import math

import pytest
import torch
from torch.testing import assert_close

from tether.losses import bradley_terry_loss, process_reward_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_bradley_terry_hand_value():
    """Pair 1: rc = 2, rr = 1: -log sigmoid(1) = log(1 + e^-1) = 0.313262.
    Pair 2: rc = 0, rr = 0.5: -log sigmoid(-0.5) = log(1 + e^0.5) = 0.974077.
    accuracy = 1/2; margin = mean(1, -0.5) = 0.25."""
    loss, m = bradley_terry_loss(t(2.0, 0.0), t(1.0, 0.5))
    assert_close(loss, t(0.313262, 0.974077), atol=1e-6, rtol=0)
    assert m["accuracy"] == 0.5
    assert m["margin"] == pytest.approx(0.25)


def test_bradley_terry_margin_and_centering():
    """rc = 2, rr = 1, margin 1: -log sigmoid(2 - 1 - 1) = log 2 = 0.693147;
    center_coef 0.01: + 0.01 * (2 + 1)^2 = 0.09, total 0.783147.
    The reported margin stays rc - rr = 1 (the label margin only shifts the loss)."""
    loss, m = bradley_terry_loss(t(2.0), t(1.0), margin=t(1.0), center_coef=0.01)
    assert_close(loss, t(math.log(2) + 0.09))
    assert m["margin"] == pytest.approx(1.0)


def test_process_reward_hand_value_and_empty_row():
    """Example 0, two valid steps (third is padding with a huge logit that must not count):
      step 0: logit 0, label 1: -log sigmoid(0) = log 2 = 0.693147
      step 1: logit ln 3 (p = 0.75), label 0: -log(1 - 0.75) = log 4 = 1.386294
      mean = (0.693147 + 1.386294) / 2 = 1.039721
    Example 1 has no valid step: loss 0.
    step_accuracy over the 2 valid steps: step 0 predicts 0 (logit 0 is not > 0) vs label 1: wrong;
    step 1 predicts 1 vs label 0: wrong -> 0."""
    logits = t(0.0, math.log(3), 100.0).repeat(2, 1)
    labels = torch.tensor([[True, False, False], [True, True, True]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    loss, m = process_reward_loss(logits, labels, mask)
    assert_close(loss, t(1.039721, 0.0), atol=1e-6, rtol=0)
    assert m["steps"] == 2.0
    assert m["step_accuracy"] == 0.0
