"""Hand-derived tests for the GRPO family's pure loss (`tether.losses.grpo_loss`) and its
registry rows."""

import math

import pytest
import torch
from torch.testing import assert_close

from tether.losses import GRPO_VARIANTS, grpo_loss


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


LOGPS = t([-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0])  # (2, 3) any values: on-policy, ratio 1
FULL = torch.ones(2, 3, dtype=torch.bool)


def test_registry_defaults_are_the_papers():
    """The clip ranges, aggregations and ratio levels the variants had in the recipe."""
    facts = {n: (v.advantages, v.aggregation, v.ratio_level, v.eps_low, v.eps_high,
                 v.dynamic_sampling) for n, v in GRPO_VARIANTS.items()}
    assert facts["grpo"] == ("group", "sequence_mean", "token", 0.2, 0.2, False)
    assert facts["dr_grpo"] == ("group_centered", "constant_normalizer", "token", 0.2, 0.2, False)
    assert facts["dapo"] == ("group", "token_mean", "token", 0.2, 0.28, True)
    assert facts["gspo"] == ("group", "sequence_mean", "sequence", 3e-4, 4e-4, False)
    assert facts["rloo"] == ("rloo", "sequence_mean", "token", 0.2, 0.2, False)


def test_aggregation_follows_the_variant():
    """On-policy (ratio 1) every token's clipped-surrogate loss is -A. Two sequences, 3 and 1
    completion tokens, A = [1, -2]: per-token losses [-1, -1, -1] and [2].
      grpo (sequence_mean numerator, sum of sequence means): -1 + 2 = 1
      dapo (token_mean numerator, the sum):                  -3 + 2 = -1
      dr_grpo (constant_normalizer numerator, the sum):      -1
    _tokens = 4."""
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = t(1.0, -2.0)
    expected = {"grpo": 1.0, "dapo": -1.0, "dr_grpo": -1.0}
    for variant, value in expected.items():
        numerator, m = grpo_loss(LOGPS, None, adv, mask, variant=variant, normalizer=3.0)
        assert numerator.item() == pytest.approx(value, rel=1e-12), variant
        assert m["_tokens"] == 4


def test_truncated_is_weight_multiplies_each_token():
    """One prompt, G = 2, 3 tokens each, advantages A = [1, 0.5], on-policy (ratio 1, so each
    token's clipped-surrogate loss is -A). The sampler's log-probs are the trainer's minus
    log r with r = [[3, 0.5, 1.5], [1, 1, 4]]; cap 2 gives w = min(r, 2) =
    [[2, .5, 1.5], [1, 1, 2]].
    grpo aggregates per sequence (mean over its tokens, summed over sequences):
      TIS on:  -(2 + .5 + 1.5) / 3 * 1 - (1 + 1 + 2) / 3 * 0.5 = -4/3 - 2/3 = -2
      TIS off: -1 - 0.5 = -1.5
    logp_diff = mean |log r| = (ln 3 + ln 2 + ln 1.5 + 0 + 0 + ln 4) / 6
              = (1.0986123 + 0.6931472 + 0.4054651 + 1.3862944) / 6 = 0.5972532
    (times the 6 tokens in the summed metric)."""
    r = t([3.0, 0.5, 1.5], [1.0, 1.0, 4.0])
    sampler = LOGPS - r.log()
    adv = t(1.0, 0.5)
    on, m = grpo_loss(LOGPS, None, adv, FULL, sampler_logps=sampler, tis_cap=2.0)
    off, _ = grpo_loss(LOGPS, None, adv, FULL, sampler_logps=sampler)
    assert on.item() == pytest.approx(-2.0, rel=1e-12)
    assert off.item() == pytest.approx(-1.5, rel=1e-12)
    assert m["logp_diff"] / m["_tokens"] == pytest.approx(0.5972532, abs=1e-7)


def test_kl_term_adds_beta_k3():
    """One sequence of 2 tokens, A = 1, beta = 0.1; the reference is below the policy by ln 2 at
    token 0 (lr = ln 2) and equal at token 1: k3 = exp(-lr) - 1 + lr = 0.5 - 1 + 0.6931472 =
    0.1931472. Per token [-1 + 0.01931472, -1]; grpo's sequence mean: -0.99034264.
    kl = 0.1931472 (summed k3), kl_k1 = ln 2, _seqs = 1."""
    logps = t([-1.0, -2.0])
    ref = logps - t([math.log(2), 0.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    numerator, m = grpo_loss(logps, None, t(1.0), mask, beta=0.1, ref_logps=ref)
    assert numerator.item() == pytest.approx(-0.99034264, abs=1e-8)
    assert m["kl"] == pytest.approx(0.1931472, abs=1e-7)
    assert m["kl_k1"] == pytest.approx(math.log(2))
    assert m["_seqs"] == 1


def test_explicit_clip_range_overrides_the_variants():
    """old = logps - ln 1.5 (ratio 1.5 everywhere), A = 1: with dapo's eps_high 0.28 the clipped
    term is -1.28 per token; eps_high = 0.6 leaves the ratio inside: -1.5 (token_mean sum of
    one 1-token row)."""
    logps = t([-1.0])
    old = logps - math.log(1.5)
    mask = torch.ones(1, 1, dtype=torch.bool)
    default, m = grpo_loss(logps, old, t(1.0), mask, variant="dapo")
    wider, _ = grpo_loss(logps, old, t(1.0), mask, variant="dapo", eps_high=0.6)
    assert default.item() == pytest.approx(-1.28) and m["clipfrac_high"] == 1.0
    assert wider.item() == pytest.approx(-1.5)


def _cispo_case():
    """The worked example of `cispo_surrogate`'s docstring: r = [1.5, 0.5, 1.0], A = 2."""
    old = t([-1.0, -1.0, -2.0, 0.0])
    logps = old + t([math.log(1.5), math.log(0.5), 0.0, 0.0])
    logps[0, 3] = 30.0  # padding: must not matter
    mask = torch.tensor([[True, True, True, False]])
    return logps.requires_grad_(), old, t(2.0), mask


def test_cispo_hand_value():
    """cispo_surrogate's docstring: w = [1.28, 0.5, 1.0]; loss_t = -w * 2 * logps =
    [1.5220093, 1.6931472, 4.0]; token mean 7.2151565 / 3 = 2.4050522; clipfrac_high 1/3."""
    from tether.losses import cispo_surrogate

    logps, old, adv, mask = _cispo_case()
    per_token, m = cispo_surrogate(logps, old, adv, mask)
    assert_close(per_token, t([1.5220093, 1.6931472, 4.0, 0.0]), rtol=1e-7, atol=0)
    assert m["clipfrac_high"] == pytest.approx(1 / 3) and m["clipfrac_low"] == 0.0
    numerator, out = grpo_loss(logps, old, adv, mask, variant="cispo")
    assert numerator.item() / out["_tokens"] == pytest.approx(2.4050522, rel=1e-7)
    assert GRPO_VARIANTS["cispo"].aggregation == "token_mean"  # the paper's 1 / sum |o_i|


def test_cispo_weight_is_stop_gradient():
    """d(token mean) / d logps_t = -clip(r_t) * A / N: [-1.28, -0.5, -1.0] * 2 / 3 =
    [-0.8533333, -0.3333333, -0.6666667], 0 on padding. The clipped token (r = 1.5 > 1.28)
    keeps its gradient, unlike PPO's clip, and nothing flows through the weight (which would add
    -A * logps_t * d w_t / d logps_t = -2 * -1.6931472 * 0.5 / 3 at token 1)."""
    logps, old, adv, mask = _cispo_case()
    numerator, out = grpo_loss(logps, old, adv, mask, variant="cispo")
    (numerator / out["_tokens"]).backward()
    weight = t([1.28, 0.5, 1.0, 0.0])
    assert_close(logps.grad, -weight * 2.0 / 3, rtol=1e-12, atol=0)
    assert_close(logps.grad, t([-0.8533333, -0.3333333, -0.6666667, 0.0]), rtol=1e-6, atol=0)
