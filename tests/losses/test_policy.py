"""Hand-derived tests for the clipped surrogate (PPO / GSPO) and the clipped value loss."""

import math

import pytest
import torch
from torch.testing import assert_close

from tether.losses import aggregate, clipped_surrogate, truncated_is_weight, value_loss


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def _ppo_case():
    """One sequence, 4 valid tokens + 1 padding token with garbage log-probs and advantage.
    Ratios r = [1.5, 0.5, 1.1, 1.5], advantages A = [+1, -1, -1, -1]."""
    old = t([-1.0, -1.0, -1.0, -1.0, 0.0])
    log_r = t([math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.5), 0.0])
    logps = (old + log_r)
    logps[0, 4] = 50.0  # padding: must not matter
    logps.requires_grad_()
    adv = t([1.0, -1.0, -1.0, -1.0, 7.0])
    mask = torch.tensor([[True, True, True, True, False]])
    return logps, old, adv, mask


def test_ppo_clipped_surrogate_hand_values():
    """eps = 0.2, loss_t = -min(r A, clip(r, 0.8, 1.2) A):
      t0: r 1.5, A +1: -min(1.5, 1.2)   = -1.2   upper clip active (no gradient)
      t1: r 0.5, A -1: -min(-0.5, -0.8) =  0.8   lower clip active (no gradient)
      t2: r 1.1, A -1: -min(-1.1, -1.1) =  1.1   inside the clip range
      t3: r 1.5, A -1: -min(-1.5, -1.2) =  1.5   unclipped (pessimistic branch)
      t4: padding -> 0
    d loss_t / d logps_t = -A r where unclipped: t2: 1.1, t3: 1.5; t0, t1, t4: 0.
    clipfrac_high = 1/4, clipfrac_low = 1/4.
    approx_kl = mean((r - 1) - log r) = mean(0.0945349, 0.1931472, 0.0046898, 0.0945349) = 0.0967267."""
    logps, old, adv, mask = _ppo_case()
    loss, m = clipped_surrogate(logps, old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert_close(loss.detach(), t([-1.2, 0.8, 1.1, 1.5, 0.0]))
    loss.sum().backward()
    assert_close(logps.grad, t([0.0, 0.0, 1.1, 1.5, 0.0]))
    assert m["clipfrac_high"] == pytest.approx(0.25)
    assert m["clipfrac_low"] == pytest.approx(0.25)
    assert m["approx_kl"] == pytest.approx(0.0967267, abs=1e-7)


def test_dual_clip_hand_values():
    """dual_clip c = 1.3 caps the loss at -c A = 1.3 where A < 0:
      t1: min(0.8, 1.3) = 0.8;  t2: min(1.1, 1.3) = 1.1;  t3: min(1.5, 1.3) = 1.3 (no gradient);
      t0 has A > 0: unchanged -1.2. dual_clipfrac = 1/4; gradient left only at t2 (1.1)."""
    logps, old, adv, mask = _ppo_case()
    loss, m = clipped_surrogate(logps, old, adv, mask, dual_clip=1.3)
    assert_close(loss.detach(), t([-1.2, 0.8, 1.1, 1.3, 0.0]))
    loss.sum().backward()
    assert_close(logps.grad, t([0.0, 0.0, 1.1, 0.0, 0.0]))
    assert m["dual_clipfrac"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(logps, old, adv, mask, dual_clip=1.0)


def test_clip_higher_asymmetric():
    """DAPO clip-higher, eps_low 0.2, eps_high 0.6: t0 (r 1.5, A +1) is now inside [0.8, 1.6]:
    loss -1.5 and clipfrac_high 0; the lower side is unchanged (t1: 0.8)."""
    logps, old, adv, mask = _ppo_case()
    loss, m = clipped_surrogate(logps, old, adv, mask, eps_low=0.2, eps_high=0.6)
    assert_close(loss.detach(), t([-1.5, 0.8, 1.1, 1.5, 0.0]))
    assert m["clipfrac_high"] == 0.0 and m["clipfrac_low"] == pytest.approx(0.25)


def test_sequence_advantages_broadcast():
    """Advantages of shape (B,) equal the same value repeated over T."""
    logps, old, _, mask = _ppo_case()
    per_seq, _ = clipped_surrogate(logps, old, t(-1.0), mask)  # (B,) = (1,)
    per_tok, _ = clipped_surrogate(logps, old, torch.full((1, 5), -1.0, dtype=torch.float64), mask)
    assert_close(per_seq, per_tok)
    # A = -1 everywhere: t0 r 1.5 -> 1.5, t1 r 0.5 -> max(0.5, 0.8) = 0.8, t2 1.1, t3 1.5
    assert_close(per_seq.detach(), t([1.5, 0.8, 1.1, 1.5, 0.0]))


def test_gspo_sequence_ratio_hand_values():
    """GSPO, eps_low = eps_high = 0.3 (range [0.7, 1.3]).
    Row 0: log-ratios [0.1, 0.3] (+ padding), A = +1: s = exp(0.2) = 1.221403, unclipped;
      loss_t = -1.221403 at both tokens; token-wise gradient d/d logps_t = -A s = -1.221403.
    Row 1: log-ratios [-0.6, -0.4, -0.2], A = -1: s = exp(-0.4) = 0.670320 < 0.7 -> clipped:
      loss_t = max(0.670320, 0.7) = 0.7, no gradient.
    clipfrac_low = 3 of 5 masked tokens = 0.6; clipfrac_high = 0.
    approx_kl stays token-level: mean of (e^x - 1 - x) over x in {0.1, 0.3, -0.6, -0.4, -0.2}
      = (0.0051709 + 0.0498588 + 0.1488116 + 0.0703200 + 0.0187308) / 5 = 0.0585784."""
    old = torch.zeros(2, 3, dtype=torch.float64)
    logps = t([0.1, 0.3, -9.0], [-0.6, -0.4, -0.2]).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, m = clipped_surrogate(logps, old, t(1.0, -1.0), mask, eps_low=0.3, eps_high=0.3, level="sequence")
    s = math.exp(0.2)
    assert_close(loss.detach(), t([-s, -s, 0.0], [0.7, 0.7, 0.7]))
    loss.sum().backward()
    assert_close(logps.grad, t([-s, -s, 0.0], [0.0, 0.0, 0.0]))
    assert m["clipfrac_low"] == pytest.approx(0.6) and m["clipfrac_high"] == 0.0
    assert m["approx_kl"] == pytest.approx(0.0585784, abs=1e-7)


def test_gspo_token_form_matches_sequence_objective_gradient():
    """The token-wise GSPO loss with sequence_mean aggregation has the gradient of the sequence
    objective -A * exp(mean_t (logps_t - old_t)): d/d logps_t = -A s / |y|.
    Row 0 above: -1.221403 / 2 = -0.610701 per token (one sequence, so the mean over sequences is it)."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    logps = t([0.1, 0.3, -9.0]).requires_grad_()
    mask = torch.tensor([[True, True, False]])
    loss, _ = clipped_surrogate(logps, old, t(1.0), mask, eps_low=0.3, eps_high=0.3, level="sequence")
    aggregate(loss, mask, mode="sequence_mean").backward()
    assert_close(logps.grad, t([-0.610701, -0.610701, 0.0]), atol=1e-6, rtol=0)


def test_value_loss_hand_values():
    """clip c = 0.2, v_clip = old + clip(v - old, -0.2, 0.2):
      t0: v 1, old 0.5, R 0: unclipped (1 - 0)^2 = 1; v_clip 0.7: 0.49; 0.5 * max = 0.5   (not clipped)
      t1: v 1, old 0.5, R 2: unclipped (1 - 2)^2 = 1; v_clip 0.7: (0.7 - 2)^2 = 1.69; 0.5 * 1.69 = 0.845
      t2: padding -> 0
    vf_clipfrac = 1/2. Gradient: t0 d/dv 0.5 (v - R)^2 = v - R = 1; t1 clipped term has no gradient: 0."""
    values = t([1.0, 1.0, 5.0]).requires_grad_()
    old, returns = t([0.5, 0.5, 0.0]), t([0.0, 2.0, 0.0])
    mask = torch.tensor([[True, True, False]])
    loss, m = value_loss(values, old, returns, mask, clip=0.2)
    assert_close(loss.detach(), t([0.5, 0.845, 0.0]))
    loss.sum().backward()
    assert_close(values.grad, t([1.0, 0.0, 0.0]))
    assert m["vf_clipfrac"] == pytest.approx(0.5)
    unclipped, _ = value_loss(values, old, returns, mask, clip=None)
    assert_close(unclipped.detach(), t([0.5, 0.5, 0.0]))


def test_truncated_is_weight_hand_values():
    """Trainer (old) log-probs vs the sampler's (vLLM's) for 4 tokens + 1 padding token, cap 2:
      t0: trainer -1.0, sampler -1.0          -> ratio 1            w = 1,   |diff| 0
      t1: trainer -1.0, sampler -1.0 - ln 3   -> ratio 3 > 2        w = 2,   |diff| ln 3 = 1.0986123
      t2: trainer -2.0, sampler -2.0 + ln 2   -> ratio 1/2          w = 0.5, |diff| ln 2 = 0.6931472
      t3: trainer -0.5, sampler -0.5 - ln 1.5 -> ratio 1.5          w = 1.5, |diff| ln 1.5 = 0.4054651
      t4: padding (sampler 40: must not matter)                     w = 1
    logp_diff = (0 + 1.0986123 + 0.6931472 + 0.4054651) / 4 = 0.5493061
    tis_weight_mean = (1 + 2 + 0.5 + 1.5) / 4 = 1.25, tis_clipfrac = 1/4.
    A per-token loss [1, 1, 1, 1, 0] times w: [1, 2, 0.5, 1.5, 0]; the weight has no gradient."""
    trainer = t([-1.0, -1.0, -2.0, -0.5, 0.0]).requires_grad_()
    sampler = t([-1.0, -1.0 - math.log(3), -2.0 + math.log(2), -0.5 - math.log(1.5), 40.0])
    mask = torch.tensor([[True, True, True, True, False]])
    w, m = truncated_is_weight(trainer, sampler, mask, cap=2.0)
    assert_close(w, t([1.0, 2.0, 0.5, 1.5, 1.0]))
    assert not w.requires_grad
    assert_close(w * t([1.0, 1.0, 1.0, 1.0, 0.0]), t([1.0, 2.0, 0.5, 1.5, 0.0]))
    assert m["logp_diff"] == pytest.approx(0.5493061, abs=1e-7)
    assert m["tis_weight_mean"] == pytest.approx(1.25)
    assert m["tis_clipfrac"] == pytest.approx(0.25)
    # the same log-probs (the trainer samples itself): weight 1 everywhere, no mismatch
    w, m = truncated_is_weight(trainer, trainer.detach(), mask, cap=2.0)
    assert_close(w, torch.ones_like(w)) and m["logp_diff"] == 0.0
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weight(trainer, sampler, mask, cap=0.0)
