"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020). Pure: imports torch only.

With samples y ~ pi (the policy) and lr = log pi(y) - log ref(y):

    k1 = lr                       unbiased for KL(pi || ref), high variance, can be negative
    k2 = lr^2 / 2                 biased (low bias when pi ~ ref), always >= 0
    k3 = exp(-lr) - 1 + lr        unbiased for KL(pi || ref), always >= 0, low variance
                                  ((r - 1) - log r with r = ref/pi; GRPO's per-token KL term)
"""

import torch


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, *, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    lr = logps - ref_logps;  k1 = lr,  k2 = lr^2 / 2,  k3 = exp(-lr) - 1 + lr.

    logps, ref_logps: (B, T) (any equal shape). Returns the per-token estimates, same shape and
    unreduced (an estimator, not a loss: reward shaping and losses reduce it with their own mask).
    Gradients flow through `logps`; no clamping is applied.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logps - ref_logps)  # (B, T)


def adaptive_kl_coef(coef: float, kl: float, *, target: float, horizon: float, n_steps: int,
                     clip: float = 0.2) -> float:
    """One update of the adaptive KL controller of Ziegler et al. 2019 (eq. 2; their code and
    TRL's `AdaptiveKLController`), called once per rollout batch:

        e     = clip(kl / target - 1, -clip, clip)      proportional error, clipped
        coef' = coef * (1 + e * n_steps / horizon)

    kl: the batch's mean per-sequence KL to the reference; n_steps: samples in the batch;
    horizon: samples over which a sustained error changes coef by a factor ~ e^(+-clip).

    Worked examples (coef = 0.1, target = 6, horizon = 10000, n_steps = 64, 64/10000 = 0.0064):
        kl = 9:   9/6 - 1 = 0.5 -> clipped to 0.2;  coef' = 0.1 * (1 + 0.2 * 0.0064) = 0.100128
        kl = 5.4: 5.4/6 - 1 = -0.1 (inside the clip); coef' = 0.1 * (1 - 0.1 * 0.0064) = 0.099936
        kl = 6:   e = 0;  coef' = 0.1
    Pure: floats in, a float out.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
    error = min(max(kl / target - 1.0, -clip), clip)
    return coef * (1.0 + error * n_steps / horizon)
