"""The maths of reward-model over-optimisation (Gao, Schulman & Hilton 2022), pure: numpy and
scipy in, floats out. `tether goodhart` (tether/recipes/goodhart.py) measures the points.

    bon_kl(n)        KL(best-of-n || policy) = log n - (n - 1) / n  (nats; the paper's formula)
    best_of_n        unbiased best-of-n estimate of E[gold] and E[proxy] from N >= n samples
    bon_points       one point per n: n, its KL, d = sqrt(KL), best_of_n's gold/mean and
                     proxy/mean (goodhart's curve and compare's best-of-n rows)
    fit_bon, fit_rl  least-squares fits of R_bon(d) = d (a - b d), R_RL(d) = d (a - b log d),
                     d = sqrt(KL), R measured relative to the initial policy's mean (R(0) = 0)
    peak_bon, peak_rl  the d at which a fitted curve peaks (None when it only rises)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def bon_kl(n: int) -> float:
    """log n - (n - 1) / n: the KL of best-of-n sampling to the sampling policy (nats). It is
    exact for a continuous reward with no ties and an upper bound otherwise (Beirami et al.
    2024); bon_kl(1) = 0."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def bon_weights(N: int, n: int) -> np.ndarray:
    """(N,) probability that the sample of proxy rank i (1-based, ascending) is the largest of a
    uniformly random n-subset of the N samples: C(i - 1, n - 1) / C(N, n). Sums to 1."""
    if not 1 <= n <= N:
        raise ValueError(f"best-of-n from N samples needs 1 <= n <= N, got n={n}, N={N}")
    total = math.comb(N, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, N + 1)])


def best_of_n(proxy, gold, n: int) -> tuple[float, float]:
    """(E[gold], E[proxy]) of the proxy-argmax of n samples drawn without replacement from each
    prompt's N samples, averaged over the P prompts: the unbiased estimate over all C(N, n)
    subsets at once. proxy, gold: (P, N) scores; ties in the proxy are broken by sample order."""
    proxy, gold = np.asarray(proxy, dtype=float), np.asarray(gold, dtype=float)
    if proxy.shape != gold.shape or proxy.ndim != 2:
        raise ValueError(f"proxy and gold must both be (P, N), got {proxy.shape}, {gold.shape}")
    w = bon_weights(proxy.shape[1], n)  # (N,)
    order = np.argsort(proxy, axis=1, kind="stable")  # (P, N) ascending proxy
    g = np.take_along_axis(gold, order, axis=1) @ w  # (P,)
    p = np.take_along_axis(proxy, order, axis=1) @ w  # (P,)
    return float(g.mean()), float(p.mean())


def bon_points(proxy, gold, ns) -> list[dict]:
    """For each n of `ns`: {"n", "kl": bon_kl(n), "d": sqrt(kl), "gold/mean", "proxy/mean"} of
    best-of-n from each prompt's N samples (`best_of_n`). proxy, gold: (P, N) scores."""
    points = []
    for n in ns:
        g, p = best_of_n(proxy, gold, n)
        kl = bon_kl(n)
        points.append({"n": n, "kl": kl, "d": math.sqrt(kl), "gold/mean": g, "proxy/mean": p})
    return points


# --- the paper's functional forms ---------------------------------------------------------------


def r_bon(d, a: float, b: float):
    """R_bon(d) = d (a - b d)."""
    d = np.asarray(d, dtype=float)
    return d * (a - b * d)


def r_rl(d, a: float, b: float):
    """R_RL(d) = d (a - b log d), with d log d = 0 at d = 0."""
    d = np.asarray(d, dtype=float)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return a * d - b * dlogd


@dataclass
class Fit:
    a: float
    b: float
    a_stderr: float  # from curve_fit's covariance (nan with as many points as parameters)
    b_stderr: float
    points: int


def _fit(form, d, r) -> Fit:
    from scipy.optimize import curve_fit

    d, r = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    if len(np.unique(d[d > 0])) < 2:
        raise ValueError(f"a fit of two coefficients needs points at >= 2 distinct d > 0, got "
                         f"d = {d.tolist()}")
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():  # OptimizeWarning when the covariance is not defined
            warnings.simplefilter("ignore")
            (a, b), cov = curve_fit(form, d, r, p0=(0.0, 0.0))
    err = np.sqrt(np.diag(cov)) if np.all(np.isfinite(cov)) else (math.nan, math.nan)
    return Fit(float(a), float(b), float(err[0]), float(err[1]), len(d))


def fit_bon(d, r) -> Fit:
    """Least squares of R_bon(d) = d (a - b d) through (d, r); R(0) = 0 by the form."""
    return _fit(r_bon, d, r)


def fit_rl(d, r) -> Fit:
    """Least squares of R_RL(d) = d (a - b log d) through (d, r); R(0) = 0 by the form."""
    return _fit(r_rl, d, r)


def peak_bon(a: float, b: float) -> float | None:
    """argmax over d >= 0 of d (a - b d): R' = a - 2 b d = 0 at d = a / (2 b), a maximum when
    b > 0 (R'' = -2 b); 0 when also a <= 0 (the reward falls from the start). None when b <= 0:
    the fitted curve never turns down (still rising)."""
    if b <= 0:
        return None
    return max(a / (2 * b), 0.0)


def peak_rl(a: float, b: float) -> float | None:
    """argmax_d d (a - b log d): R' = a - b log d - b = 0 at d = exp(a / b - 1), a maximum when
    b > 0 (R'' = -b / d). None when b <= 0 (the curve only rises)."""
    if b <= 0:
        return None
    x = a / b - 1
    return math.exp(x) if x < 700 else math.inf
