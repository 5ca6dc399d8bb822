"""Hand-derived values of the evaluation statistics (tether/eval/stats.py)."""

import math

import pytest
import torch

from tether.eval.stats import mean_and_stderr, self_bleu, sequence_kl


def test_sequence_kl_two_tokens_by_hand():
    """Token 1: pi = 1/2, ref = 1/4, so r_1 = log(ref/pi) = -ln 2; token 2: pi = 1/4, ref = 1/2,
    r_2 = +ln 2; token 3 is padding (ignored whatever its values).
    k1 = -(r_1 + r_2) = 0.
    k3 = (e^-ln2 - 1 + ln2) + (e^ln2 - 1 - ln2) = (1/2 - 1 + ln2) + (2 - 1 - ln2) = 1/2."""
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    mask = torch.tensor([[True, True, False]])
    k1, k3 = sequence_kl(logps, ref, mask)
    assert k1.item() == pytest.approx(0.0, abs=1e-7)
    assert k3.item() == pytest.approx(0.5, abs=1e-6)


def test_k1_and_k3_are_unbiased_for_kl_of_policy_samples():
    """One token, pi = (0.8, 0.2), ref = (0.5, 0.5). KL(pi||ref) = 0.8 ln 1.6 + 0.2 ln 0.4
    = 0.8 * 0.470004 - 0.2 * 0.916291 = 0.192745. The expectation of each estimator under pi
    (weight each outcome's value by its probability) must equal it: for k1 by definition, for k3
    because sum_y pi(y) (ref/pi - 1) = 1 - 1 = 0."""
    pi, ref = torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5])
    logps, ref_logps = pi.log()[:, None], ref.log()[:, None]  # each outcome a one-token sequence
    k1, k3 = sequence_kl(logps, ref_logps, torch.ones(2, 1, dtype=torch.bool))
    kl = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert kl == pytest.approx(0.192745, abs=1e-6)
    assert (pi * k1).sum().item() == pytest.approx(kl, abs=1e-6)
    assert (pi * k3).sum().item() == pytest.approx(kl, abs=1e-6)
    assert (k3 >= 0).all() and (k1 < 0).any()  # k3 never negative; k1 can be on one sample


def test_mean_and_stderr_by_hand():
    """[1, 2, 3, 4]: mean 2.5; sample variance (2.25 + .25 + .25 + 2.25) / 3 = 5/3;
    stderr = sqrt(5/3 / 4) = 0.645497."""
    mean, err = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and err == pytest.approx(0.645497, abs=1e-6)
    assert mean_and_stderr([3.0]) == (3.0, 0.0)


def test_self_bleu_by_hand():
    """'a b c d' against 'a b c e' (and back): n-gram precisions 3/4, 2/3, 1/2 and 0/1, the last
    smoothed by sacrebleu's default 'exp' method to 1/(2 * 1); brevity penalty 1.
    BLEU = (3/4 * 2/3 * 1/2 * 1/2)^(1/4) = 0.125^(1/4) = 0.594604 -> 59.4604 for both texts."""
    assert self_bleu(["a b c d", "a b c e"]) == pytest.approx(59.4604, abs=1e-3)
    assert self_bleu(["same words here"] * 3) == pytest.approx(100.0)
    assert math.isnan(self_bleu(["only one"]))
