"""Tests for the per-token KL estimators (Schulman 2020): hand values, sign, unbiasedness."""

import math

import pytest
import torch
from torch.testing import assert_close

from tether.losses import kl_penalty


def test_kl_estimators_hand_values():
    """lr = logps - ref = log 2 (policy twice as likely as ref), and lr = 0:
    k1 = log 2 = 0.693147;  k2 = (log 2)^2 / 2 = 0.240227;  k3 = e^-log2 - 1 + log 2 = 0.5 - 1 + 0.693147 = 0.193147.
    All three are 0 where lr = 0."""
    logps = torch.tensor([[math.log(0.5), math.log(0.3)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]], dtype=torch.float64)
    assert_close(kl_penalty(logps, ref, kind="k1"), torch.tensor([[0.693147, 0.0]], dtype=torch.float64), atol=1e-6, rtol=0)
    assert_close(kl_penalty(logps, ref, kind="k2"), torch.tensor([[0.240227, 0.0]], dtype=torch.float64), atol=1e-6, rtol=0)
    assert_close(kl_penalty(logps, ref, kind="k3"), torch.tensor([[0.193147, 0.0]], dtype=torch.float64), atol=1e-6, rtol=0)


def test_k3_nonnegative_and_gradient():
    """k3 = e^-x - 1 + x >= 0 for all x (convexity; minimum 0 at x = 0).
    d k3 / d logps = 1 - e^-lr: at lr = log 2 that is 1 - 0.5 = 0.5."""
    lr = torch.linspace(-20, 20, 401, dtype=torch.float64)
    assert (kl_penalty(lr, torch.zeros_like(lr), kind="k3") >= 0).all()
    logps = torch.tensor([math.log(2)], dtype=torch.float64, requires_grad=True)
    kl_penalty(logps, torch.zeros(1, dtype=torch.float64), kind="k3").sum().backward()
    assert_close(logps.grad, torch.tensor([0.5], dtype=torch.float64))


def test_k1_k3_unbiased_k2_biased():
    """p = [0.1, 0.2, 0.3, 0.4] (policy), q = [0.4, 0.3, 0.2, 0.1] (reference).
    Exact KL(p||q) = sum p log(p/q) = 0.1 log .25 + 0.2 log(2/3) + 0.3 log 1.5 + 0.4 log 4 = 0.456435.
    With N = 100000 samples from p (seed 0), the standard errors are std/sqrt(N): k1 0.00289,
    k3 0.00147, so a tolerance of 0.012 is >= 4 standard errors for both.
    k2 has expectation 0.521554 (exact, sum p (log p/q)^2 / 2), 0.065 away: biased."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    assert exact == pytest.approx(0.456435, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 100_000, replacement=True, generator=gen)  # y ~ p
    logps, ref = p.log()[samples], q.log()[samples]
    assert kl_penalty(logps, ref, kind="k1").mean().item() == pytest.approx(exact, abs=0.012)
    assert kl_penalty(logps, ref, kind="k3").mean().item() == pytest.approx(exact, abs=0.012)
    assert kl_penalty(logps, ref, kind="k2").mean().item() - exact > 0.04


def test_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1), torch.zeros(1), kind="k4")
