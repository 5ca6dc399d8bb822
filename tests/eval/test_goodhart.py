"""The Goodhart maths (tether/eval/goodhart.py): values worked out by hand in each docstring."""

import itertools
import math

import numpy as np
import pytest

from tether.eval.goodhart import (best_of_n, bon_kl, bon_points, bon_weights, fit_bon, fit_rl,
                                  peak_bon, peak_rl, r_bon, r_rl)


def test_bon_kl_by_hand():
    """bon_kl(1) = log 1 - 0 = 0; bon_kl(2) = ln 2 - 1/2 = 0.19315;
    bon_kl(64) = ln 64 - 63/64 = 4.15888 - 0.98438 = 3.17451. It rises with n."""
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(64) == pytest.approx(3.17451, abs=1e-5)
    assert all(bon_kl(n + 1) > bon_kl(n) for n in range(1, 64))
    with pytest.raises(ValueError):
        bon_kl(0)


def test_bon_weights_by_hand():
    """N = 3, n = 2: C(3, 2) = 3 subsets {1,2}, {1,3}, {2,3} (ranks by proxy, ascending); the
    max is rank 1 in none, rank 2 in one, rank 3 in two: weights C(i-1, 1) / 3 = 0, 1/3, 2/3.
    n = 1: each sample alone, 1/N each. n = N: the top rank always."""
    np.testing.assert_allclose(bon_weights(3, 2), [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(bon_weights(4, 1), [0.25] * 4)
    np.testing.assert_allclose(bon_weights(5, 5), [0, 0, 0, 0, 1])
    assert bon_weights(64, 17).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bon_weights(3, 4)


def test_bon_points_by_hand():
    """Two prompts, N = 3: proxy (1, 3, 2), gold (10, 30, 20) and proxy (0, 0, 1), gold (5, 5, 8).
    n = 1: the plain means: gold (20 + 6) / 2 = 13, proxy (2 + 1/3) / 2 = 7/6; kl 0, d 0.
    n = 2 (weights 0, 1/3, 2/3 over proxy ranks; ties by sample order): prompt 1 ranked gold
    10, 20, 30 -> 20/3 + 60/3 = 80/3, proxy 2/3 + 6/3 = 8/3; prompt 2 ranked gold 5, 5, 8 ->
    5/3 + 16/3 = 7, proxy 0 + 2/3 = 2/3: gold (80/3 + 7) / 2 = 101/6, proxy (8/3 + 2/3) / 2 =
    5/3; kl = ln 2 - 1/2, d = sqrt(kl). n = 3: the argmax: gold (30 + 8) / 2 = 19, proxy 2."""
    proxy, gold = [[1, 3, 2], [0, 0, 1]], [[10, 30, 20], [5, 5, 8]]
    p1, p2, p3 = bon_points(proxy, gold, [1, 2, 3])
    assert p1 == {"n": 1, "kl": 0.0, "d": 0.0, "gold/mean": pytest.approx(13),
                  "proxy/mean": pytest.approx(7 / 6)}
    assert p2["n"] == 2 and p2["kl"] == pytest.approx(math.log(2) - 0.5)
    assert p2["d"] == pytest.approx(math.sqrt(math.log(2) - 0.5))
    assert (p2["gold/mean"], p2["proxy/mean"]) == pytest.approx((101 / 6, 5 / 3))
    assert (p3["gold/mean"], p3["proxy/mean"]) == pytest.approx((19, 2))
    assert bon_points(proxy, gold, []) == []


def test_best_of_n_by_hand():
    """One prompt, proxy (0.5, 0.1, 0.9) and gold (1, 2, 3). Ranked by proxy: the samples with
    proxy 0.1 (gold 2), 0.5 (gold 1), 0.9 (gold 3). n = 2 weights 0, 1/3, 2/3:
    E[gold] = 1/3 * 1 + 2/3 * 3 = 7/3, E[proxy] = 1/3 * 0.5 + 2/3 * 0.9 = 0.76667.
    n = 1 is the plain mean (gold 2, proxy 0.5); n = 3 the proxy argmax (gold 3, proxy 0.9).
    A second prompt averages in."""
    proxy, gold = [[0.5, 0.1, 0.9]], [[1.0, 2.0, 3.0]]
    assert best_of_n(proxy, gold, 2) == pytest.approx((7 / 3, 0.5 / 3 + 1.8 / 3))
    assert best_of_n(proxy, gold, 1) == pytest.approx((2.0, 0.5))
    assert best_of_n(proxy, gold, 3) == pytest.approx((3.0, 0.9))
    two = best_of_n([[0.5, 0.1, 0.9], [3.0, 2.0, 1.0]], [[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]], 3)
    assert two == pytest.approx(((3.0 + 0.0) / 2, (0.9 + 3.0) / 2))


def test_best_of_n_equals_enumerating_every_subset():
    """The weighted sum is the mean over all C(N, n) subsets of the gold of each subset's proxy
    argmax (N = 7 random scores, every n)."""
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(2, 7)), rng.normal(size=(2, 7))
    for n in range(1, 8):
        brute = np.mean([[gold[p, max(s, key=lambda i: proxy[p, i])]
                          for s in itertools.combinations(range(7), n)] for p in range(2)])
        assert best_of_n(proxy, gold, n)[0] == pytest.approx(brute)


def test_fits_recover_exact_coefficients():
    """Points exactly on d (a - b d) with a = 0.8, b = 0.3 (and on d (a - b log d) with a = 0.5,
    b = 0.2) give back a and b: both forms are linear in (a, b), so least squares is exact."""
    d = np.sqrt([bon_kl(n) for n in (1, 2, 4, 8, 16, 32, 64)])
    fit = fit_bon(d, r_bon(d, 0.8, 0.3))
    assert (fit.a, fit.b, fit.points) == (pytest.approx(0.8), pytest.approx(0.3), 7)
    d = np.array([0.3, 0.6, 1.0, 1.5, 2.5])
    fit = fit_rl(d, r_rl(d, 0.5, 0.2))
    assert (fit.a, fit.b) == (pytest.approx(0.5), pytest.approx(0.2))
    assert r_rl([0.0], 1.0, 1.0)[0] == 0.0  # d log d -> 0
    with pytest.raises(ValueError, match="distinct d"):
        fit_rl([0.0, 1.0], [0.0, 1.0])


def test_peaks_from_the_derivative():
    """R_bon' = a - 2 b d = 0 at d = a / (2b): a = 0.8, b = 0.3 -> 4/3, and R_bon there (0.5333)
    beats its neighbours. R_RL' = a - b log d - b = 0 at d = exp(a/b - 1): a = 0.5, b = 0.2 ->
    exp(1.5) = 4.4817. b <= 0: the curve only rises, no peak (None); a <= 0 < b: R_bon falls
    from the start, peak at 0."""
    assert peak_bon(0.8, 0.3) == pytest.approx(4 / 3)
    top = r_bon(4 / 3, 0.8, 0.3)
    assert top > r_bon(4 / 3 - 1e-3, 0.8, 0.3) and top > r_bon(4 / 3 + 1e-3, 0.8, 0.3)
    assert peak_rl(0.5, 0.2) == pytest.approx(math.exp(1.5))
    dp = math.exp(1.5)
    assert r_rl(dp, 0.5, 0.2) > max(r_rl(dp * 0.99, 0.5, 0.2), r_rl(dp * 1.01, 0.5, 0.2))
    assert peak_bon(0.8, 0.0) is None and peak_bon(0.8, -0.1) is None
    assert peak_rl(0.5, 0.0) is None and peak_rl(0.5, -0.2) is None
    assert peak_bon(-0.2, 0.3) == 0.0
