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
