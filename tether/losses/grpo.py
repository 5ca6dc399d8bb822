"""The GRPO family: one registry row per variant, and the loss of a micro-batch of rollout rows.

Pure: imports torch only. A variant is one row of `GRPO_VARIANTS` with every fact about it: its
per-token surrogate, its advantage estimator, how per-token losses are aggregated, whether the
importance ratio is per token or per sequence, its paper's clip range and whether it drops
groups whose rewards are all equal (dynamic sampling). The recipe picks the row once by name
(`grpo.loss_type`); config validation, the CLI summary, `tether keys` and the docs table
(docs/grpo.md, checked by tests/losses/test_registry.py) list these names.

Advantage estimators live above this room (`tether.advantages`, which may import losses but not
the other way round), so a row names its estimator by a key of
`tether.advantages.GROUP_ADVANTAGES` (a test checks every key resolves). A new variant that
changes the surrogate, the aggregation, the ratio level or the defaults is one function and one
row here; only a new *advantage estimator* also adds a row to that table.

Every variant needs a reference model only for the KL term (`grpo.beta > 0`), the same for all,
so the row has no such field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .kl import kl_penalty
from .policy import RATIO_LEVELS, clipped_surrogate, truncated_is_weight
from .reduce import aggregate_sum, masked_mean, masked_sum

__all__ = ["GRPOVariant", "GRPO_VARIANTS", "cispo_surrogate", "grpo_loss"]


@dataclass(frozen=True)
class GRPOVariant:
    # (logps, old_logps, advantages, mask, *, eps_low, eps_high, level) -> (per-token loss (B, T),
    # metrics with clipfrac_low, clipfrac_high, approx_kl): `clipped_surrogate`'s signature
    surrogate: Callable[..., tuple[torch.Tensor, dict]]
    advantages: str  # key of tether.advantages.GROUP_ADVANTAGES: rewards (B,), G -> (B,)
    aggregation: str  # token_mean | sequence_mean | constant_normalizer (losses.reduce)
    ratio_level: str  # token | sequence (losses.policy.RATIO_LEVELS)
    eps_low: float  # clip range [1 - eps_low, 1 + eps_high], its paper's values
    eps_high: float
    dynamic_sampling: bool  # drop groups whose G rewards are all equal


def cispo_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 1.0,
    eps_high: float = 0.28,
    level: str = "token",
) -> tuple[torch.Tensor, dict]:
    """CISPO, clipped IS-weight policy optimisation (MiniMax-M1, Chen et al. 2025,
    arXiv 2506.13585, eqs. 4-5), per token:

        w_t    = sg(clip(r_t, 1 - eps_low, 1 + eps_high)),   r_t = pi(y_t) / pi_old(y_t)
        loss_t = -w_t * A * log pi(y_t)

    Unlike PPO's clip, a token whose ratio leaves the range keeps its gradient (weighted by the
    truncated, stop-gradient IS weight): d loss_t / d logps_t = -w_t A. The paper sets no lower
    bound in practice ("setting eps_low to a large value") and tunes only eps_high; it states no
    number, so the defaults are eps_low 1.0 (a floor of 0: none) and eps_high 0.28, those of
    Trinity-RFT's CISPO. The paper aggregates by the token mean over the batch (1 / sum |o_i|)
    with group-normalised advantages and no KL term: the row below.

    Worked example (one sequence of 3 tokens + 1 padding token, A = 2, eps 1.0 / 0.28):
        old = [-1, -1, -2],  r = [1.5, 0.5, 1.0]  ->  logps = old + log r
            = [-1 + 0.4054651, -1 - 0.6931472, -2] = [-0.5945349, -1.6931472, -2]
        w   = [min(1.5, 1.28), 0.5, 1.0] = [1.28, 0.5, 1.0]   (no lower clip)
        loss_t = -w * 2 * logps = [1.5220093, 1.6931472, 4.0];  padding 0
        token mean = 7.2151565 / 3 = 2.4050522;  gradient of the mean: -w * 2 / 3
            = [-0.8533333, -0.3333333, -0.6666667]
        clipfrac_high = 1/3 (r > 1.28), clipfrac_low = 0

    Shapes and metrics as `clipped_surrogate` (level picks the ratio inside w; the paper's is
    per token); clipfrac_low / clipfrac_high count masked tokens whose weight was truncated
    below / above whatever the sign of A (the gradient is never dropped).
    """
    old_logps = old_logps.detach()
    adv = advantages.detach()
    adv = adv[:, None].expand_as(logps) if adv.dim() == 1 else adv  # (B, T)
    r = torch.exp(RATIO_LEVELS[level](logps.detach(), old_logps, mask))  # (B, T) no grad
    weight = r.clamp(1.0 - eps_low, 1.0 + eps_high)  # (B, T)
    loss = torch.where(mask, -weight * adv * logps, torch.zeros_like(logps))  # (B, T)
    log_r = torch.where(mask, logps.detach() - old_logps, torch.zeros_like(logps))  # (B, T)
    metrics = {
        "clipfrac_low": masked_mean((r < 1.0 - eps_low).float(), mask).item(),
        "clipfrac_high": masked_mean((r > 1.0 + eps_high).float(), mask).item(),
        "approx_kl": masked_mean(torch.expm1(log_r) - log_r, mask).item(),
        "ratio_mean": masked_mean(r, mask).item(),
    }
    return loss, metrics


GRPO_VARIANTS: dict[str, GRPOVariant] = {
    # Shao et al. 2024 (DeepSeekMath): (r - mean) / std per group, each sequence's token mean
    "grpo": GRPOVariant(clipped_surrogate, "group", "sequence_mean", "token", 0.2, 0.2, False),
    # Liu et al. 2025 ("Understanding R1-Zero-Like Training"): no std division, no per-sequence
    # length division (a constant normaliser, max_new_tokens)
    "dr_grpo": GRPOVariant(clipped_surrogate, "group_centered", "constant_normalizer", "token",
                           0.2, 0.2, False),
    # Yu et al. 2025 (DAPO): token-level mean, clip-higher 0.2 / 0.28, dynamic sampling
    "dapo": GRPOVariant(clipped_surrogate, "group", "token_mean", "token", 0.2, 0.28, True),
    # Zheng et al. 2025 (GSPO): one length-normalised ratio per sequence, clip 3e-4 / 4e-4
    "gspo": GRPOVariant(clipped_surrogate, "group", "sequence_mean", "sequence", 3e-4, 4e-4,
                        False),
    # Ahmadian et al. 2024 ("Back to Basics"): leave-one-out baseline, no std division
    "rloo": GRPOVariant(clipped_surrogate, "rloo", "sequence_mean", "token", 0.2, 0.2, False),
    # Chen et al. 2025 (MiniMax-M1, CISPO): clipped stop-gradient IS weight, token mean, no floor
    "cispo": GRPOVariant(cispo_surrogate, "group", "token_mean", "token", 1.0, 0.28, False),
}


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    variant: str = "grpo",
    eps_low: float | None = None,
    eps_high: float | None = None,
    beta: float = 0.0,
    normalizer: float | None = None,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Numerator of the variant's aggregated loss over these rows, in sum form (divide by the
    step's total `aggregate_sum` denominator: exact under micro-batching), per token

        loss_t = w_t * surrogate_t + beta * k3_t

    surrogate_t is the variant's (`clipped_surrogate`, or its row's own) with clip range
    eps_low / eps_high (None: the variant's own); k3_t = KL estimate to the reference,
    added only when `ref_logps` is given; w_t = min(pi_old / mu, tis_cap) the truncated IS weight
    against another engine's sampler when `sampler_logps` and `tis_cap` are both given (else 1).

    logps: (b, C) with grad; old_logps: (b, C), or None when the rows were sampled by the policy
    being trained (on-policy: the ratio is 1); advantages: (b,); mask: (b, C) bool; ref_logps,
    sampler_logps: (b, C) or None. normalizer: constant_normalizer's constant (max_new_tokens).
    Returns (numerator 0-dim, metrics summed over the masked tokens so micro-batches add up):
    _tokens, clipfrac_low, clipfrac_high, approx_kl (times _tokens); logp_diff (times _tokens)
    with sampler_logps; with ref_logps kl (summed k3), kl_k1 (summed log-ratio) and _seqs.
    """
    row = GRPO_VARIANTS[variant]
    old = logps.detach() if old_logps is None else old_logps  # (b, C)
    per_token, m = row.surrogate(
        logps, old, advantages, mask, level=row.ratio_level,
        eps_low=row.eps_low if eps_low is None else eps_low,
        eps_high=row.eps_high if eps_high is None else eps_high)  # (b, C)
    n = mask.sum().item()
    out = {"_tokens": n, **{k: m[k] * n for k in ("clipfrac_low", "clipfrac_high", "approx_kl")}}
    if sampler_logps is not None:  # another engine sampled: the mismatch, and TIS when on
        weight, tm = truncated_is_weight(old, sampler_logps, mask, cap=tis_cap or 1.0)  # (b, C)
        if tis_cap is not None:
            per_token = per_token * weight
        out["logp_diff"] = tm["logp_diff"] * n
    if ref_logps is not None:
        kl = kl_penalty(logps, ref_logps, kind="k3")  # (b, C)
        per_token = per_token + beta * torch.where(mask, kl, torch.zeros_like(kl))
        out["kl"] = masked_sum(kl.detach(), mask).item()  # summed k3; per sequence in the log
        out["kl_k1"] = masked_sum(logps.detach() - ref_logps, mask).item()
        out["_seqs"] = mask.any(dim=1).sum().item()
    numerator, _ = aggregate_sum(per_token, mask, mode=row.aggregation, normalizer=normalizer)
    return numerator, out
