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
from .policy import clipped_surrogate, truncated_is_weight
from .reduce import aggregate_sum, masked_sum

__all__ = ["GRPOVariant", "GRPO_VARIANTS", "grpo_loss"]


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

    surrogate_t is the variant's (`clipped_surrogate` for grpo, dr_grpo, dapo, gspo, rloo) with
    clip range eps_low / eps_high (None: the variant's own); k3_t = KL estimate to the reference,
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
