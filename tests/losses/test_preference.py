"""Hand-derived tests for the preference losses (maths in each docstring)."""

import math

import pytest
import torch
from torch.testing import assert_close

from tether.losses import (
    PREFERENCE_LOSSES,
    dpo_loss,
    group_robust_weights,
    hinge_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# One pair used throughout: pc = -1, pr = -3, rc = -2, rr = -2.5
#   chosen log-ratio   = -1 - -2   = 1.0
#   rejected log-ratio = -3 - -2.5 = -0.5
#   h = 1.0 - (-0.5) = 1.5
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.5))


def test_dpo_hand_value_and_metrics():
    """h = (-1 - -2) - (-3 - -2.5) = 1.5; beta h = 0.15;
    loss = -log sigmoid(0.15) = log(1 + e^-0.15) = 0.620957.
    rewards: chosen = 0.1 * 1.0 = 0.1, rejected = 0.1 * -0.5 = -0.05, margin 0.15, accuracy 1."""
    loss, m = dpo_loss(*PAIR, beta=0.1)
    assert_close(loss, t(0.620957), atol=1e-6, rtol=0)
    assert m["rewards/chosen"] == pytest.approx(0.1)
    assert m["rewards/rejected"] == pytest.approx(-0.05)
    assert m["rewards/margin"] == pytest.approx(0.15)
    assert m["rewards/accuracy"] == 1.0


def test_dpo_gradient_hand_value():
    """d loss / d pc = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.15) = -0.1 * 0.462570 = -0.0462570;
    d loss / d pr = +0.0462570 (h has -pr)."""
    pc, pr, rc, rr = (x.clone().requires_grad_() for x in PAIR)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.sum().backward()
    assert_close(pc.grad, t(-0.0462570), atol=1e-7, rtol=0)
    assert_close(pr.grad, t(0.0462570), atol=1e-7, rtol=0)


def test_cdpo_label_smoothing_hand_value():
    """ls = 0.1: loss = 0.9 * softplus(-0.15) + 0.1 * softplus(0.15).
    softplus(0.15) - softplus(-0.15) = 0.15, so loss = softplus(-0.15) + 0.1 * 0.15
    = 0.620957 + 0.015 = 0.635957. ls = 0.5 makes the loss symmetric in h."""
    loss, _ = dpo_loss(*PAIR, beta=0.1, label_smoothing=0.1)
    assert_close(loss, t(0.635957), atol=1e-6, rtol=0)
    pc, pr, rc, rr = PAIR
    half, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.5)
    flipped, _ = dpo_loss(pr, pc, rr, rc, beta=0.1, label_smoothing=0.5)
    assert_close(half, flipped)


def test_dpo_per_pair_soft_labels_hand_value():
    """Soft labels: ls_i = 1 - p_i per pair. Two copies of PAIR (beta h = 0.15), p = (1, 0.9):
    pair 1, ls 0: softplus(-0.15) = 0.620957 (plain DPO);
    pair 2, ls 0.1: softplus(-0.15) + 0.1 * 0.15 = 0.635957 (the cDPO value above).
    Gradient of pair 2 in pc: -beta (sigmoid(-0.15) - ls) = -0.1 (0.462570 - 0.1) = -0.0362570."""
    pc, pr, rc, rr = (torch.cat([x, x]) for x in PAIR)
    pc.requires_grad_()
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=1 - t(1.0, 0.9))
    assert_close(loss.detach(), t(0.620957, 0.635957), atol=1e-6, rtol=0)
    loss.sum().backward()
    assert_close(pc.grad, t(-0.0462570, -0.0362570), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=t(0.1, 0.6))


@pytest.mark.parametrize("ls", [-0.01, 0.51])
def test_dpo_label_smoothing_bounds(ls):
    """ls outside [0, 0.5] is not a flip probability: ValueError."""
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, label_smoothing=ls)


def test_robust_dpo_hand_value():
    """eps = 0.1: loss = (0.9 * softplus(-0.15) - 0.1 * softplus(0.15)) / (1 - 0.2)
    = (0.9 * 0.620957 - 0.1 * 0.770957) / 0.8 = (0.558862 - 0.077096) / 0.8 = 0.602207.
    eps = 0 is plain DPO (0.620957)."""
    loss, m = robust_dpo_loss(*PAIR, beta=0.1, label_smoothing=0.1)
    assert_close(loss, t(0.602207), atol=1e-6, rtol=0)
    assert m["rewards/margin"] == pytest.approx(0.15)
    plain, _ = robust_dpo_loss(*PAIR, beta=0.1)
    assert_close(plain, t(0.620957), atol=1e-6, rtol=0)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_dpo_rejects_eps_at_or_above_half(eps):
    """1 / (1 - 2 eps) blows up at eps = 0.5: require 0 <= eps < 0.5."""
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_dpo_loss(*PAIR, label_smoothing=eps)


def test_ipo_hand_value():
    """h = 1.5, beta = 0.1: 1 / (2 beta) = 5; loss = (1.5 - 5)^2 = 12.25.
    At h = 5 the loss is 0 (pc = -1, pr = -6, rc = rr = 0)."""
    loss, _ = ipo_loss(*PAIR, beta=0.1)
    assert_close(loss, t(12.25))
    at_target, _ = ipo_loss(t(-1.0), t(-6.0), t(0.0), t(0.0), beta=0.1)
    assert_close(at_target, t(0.0))


def test_hinge_hand_value():
    """beta h = 0.15: relu(1 - 0.15) = 0.85. Second pair h = 20: relu(1 - 2) = 0."""
    pc, pr, rc, rr = t(-1.0, 0.0), t(-3.0, -20.0), t(-2.0, 0.0), t(-2.5, 0.0)
    loss, _ = hinge_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(loss, t(0.85, 0.0))


def test_simpo_hand_value():
    """c = -0.5, r = -1.5, beta = 2, gamma = 0.5: beta (c - r) - gamma = 2 * 1 - 0.5 = 1.5;
    loss = log(1 + e^-1.5) = 0.201413. rewards: chosen 2 * -0.5 = -1, rejected 2 * -1.5 = -3."""
    loss, m = simpo_loss(t(-0.5), t(-1.5), beta=2.0, gamma=0.5)
    assert_close(loss, t(0.201413), atol=1e-6, rtol=0)
    assert m["rewards/chosen"] == pytest.approx(-1.0)
    assert m["rewards/rejected"] == pytest.approx(-3.0)
    assert m["rewards/margin"] == pytest.approx(2.0)


def test_log1mexp_hand_values():
    """log(1 - e^-1) = log(0.632121) = -0.458675 (log1p branch: -1 < -ln 2);
    log(1 - e^-1e-6) = log(1e-6 - 5e-13) = -13.815511 (expm1 branch);
    at x = -ln 2 both branches give log(1/2) = -0.693147."""
    out = log1mexp(t(-1.0, -1e-6, -math.log(2)))
    assert_close(out, t(-0.458675, -13.815511, -0.693147), atol=1e-6, rtol=0)


def test_orpo_hand_value():
    """c = log 0.5: odds = 0.5 / 0.5 = 1, log odds 0.  r = log 0.2: odds = 0.2 / 0.8 = 0.25,
    log odds = -log 4 = -1.386294.  log-odds ratio = 1.386294 = log 4;
    -log sigmoid(log 4) = log(1 + 1/4) = 0.223144; times lam = 0.1: 0.0223144.
    Plus the chosen NLL -c = log 2 = 0.693147: loss 0.7154616."""
    loss, m = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), lam=0.1)
    assert_close(loss, t(0.7154616), atol=1e-7, rtol=0)
    assert m["nll/chosen"] == pytest.approx(math.log(2))
    assert m["log_odds_ratio"] == pytest.approx(math.log(4))
    assert m["log_odds_chosen"] == pytest.approx(0.0, abs=1e-12)


def test_orpo_finite_near_zero_logp():
    """c = -1e-6 (float32): log odds(c) ~ -log(1e-6) = 13.8155; r = log 0.5 has log odds 0;
    odds-ratio term = 0.1 * softplus(-13.8155) ~ 0.1 * 1e-6 = 1e-7; plus the NLL -c = 1e-6:
    1.1e-6. Value and gradient must be finite."""
    c = torch.tensor([-1e-6], requires_grad=True)
    loss, _ = orpo_loss(c, torch.tensor([math.log(0.5)]), lam=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(c.grad).all()
    assert loss.item() == pytest.approx(1.1e-6, rel=1e-3)


def test_kto_hand_value():
    """beta = 0.1, kl = 0.5.
    desirable, r = 2.5:    1 * (1 - sigmoid(0.1 * (2.5 - 0.5))) = 1 - sigmoid(0.2) = 0.450166
    undesirable, r = -1.5: 2 * (1 - sigmoid(0.1 * (0.5 + 1.5))) = 2 * 0.450166 = 0.900332
    rewards: chosen 0.1 * 2.5 = 0.25, rejected 0.1 * -1.5 = -0.15, margin 0.4."""
    loss, m = kto_loss(t(-1.5, -4.5), t(-4.0, -3.0), torch.tensor([True, False]), t(0.5).squeeze(),
                       beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert_close(loss, t(0.450166, 0.900332), atol=1e-6, rtol=0)
    assert m["rewards/chosen"] == pytest.approx(0.25)
    assert m["rewards/rejected"] == pytest.approx(-0.15)
    assert m["rewards/margin"] == pytest.approx(0.4)
    assert m["kl"] == pytest.approx(0.5)


def test_kto_negative_kl_clamped_and_detached():
    """kl = -3 is clamped to 0: desirable r = 2 gives 1 - sigmoid(0.2) = 0.450166.
    kl carries no gradient."""
    kl = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    loss, m = kto_loss(t(0.0), t(-2.0), torch.tensor([True]), kl, beta=0.1)
    assert_close(loss, t(0.450166), atol=1e-6, rtol=0)
    assert m["kl"] == 0.0
    assert not loss.requires_grad


def test_group_robust_weights_hand_value():
    """w = [0.5, 0.5], losses = [0, ln 3], step 1: w * exp(loss) = [0.5, 1.5], sum 2 -> [0.25, 0.75]."""
    w, m = group_robust_weights(t(0.0, math.log(3)), t(0.5, 0.5), step_size=1.0)
    assert_close(w, t(0.25, 0.75))
    assert m["worst_group"] == 1.0
    assert m["weights/max"] == pytest.approx(0.75)


def test_group_robust_weights_no_overflow():
    """losses = [1000, 1001], step 1: exp(1000) overflows, log space does not;
    w = [e^0, e^1] / (1 + e) = [0.268941, 0.731059]."""
    w, _ = group_robust_weights(t(1000.0, 1001.0), t(0.5, 0.5), step_size=1.0)
    assert_close(w, t(0.268941, 0.731059), atol=1e-6, rtol=0)


def test_preference_registry():
    """Every reference-based paired row takes (pc, pr, rc, rr, *, beta): on PAIR, beta h = 0.15
    gives margin 0.15 for all; 'cdpo' is DPO with label smoothing; SimPO's beta defaults to its
    paper's 2.0, every other beta to 0.1; an explicit value wins."""
    from tether.losses import preference_coefficients

    paired = {n for n, r in PREFERENCE_LOSSES.items() if r.reference and r.paired}
    assert paired == {"dpo", "cdpo", "robust", "ipo", "hinge", "kto"} - {"kto"}
    assert PREFERENCE_LOSSES["cdpo"].fn is dpo_loss
    for name in paired:
        loss, m = PREFERENCE_LOSSES[name].fn(*PAIR, beta=0.1)
        assert loss.shape == (1,) and m["rewards/margin"] == pytest.approx(0.15)
    assert {n for n, r in PREFERENCE_LOSSES.items() if not r.reference} == {"simpo", "orpo"}
    assert preference_coefficients("simpo", {}) == {"beta": 2.0, "gamma": 0.5}
    assert preference_coefficients("dpo", {"beta": None}) == {"beta": 0.1}
    assert preference_coefficients("simpo", {"beta": 2.5}) == {"beta": 2.5, "gamma": 0.5}
    assert preference_coefficients("orpo", {"beta": 0.3}) == {"lam": 0.1}  # beta not orpo's
