"""Policy-gradient losses: the clipped surrogate (PPO, GRPO, DAPO, Dr. GRPO, GSPO) and the
clipped value loss. Pure: imports torch only.

Both return per-token losses (B, T), 0 outside the mask; reduce them with
`tether.losses.reduce.aggregate` (token_mean, sequence_mean or constant_normalizer).
"""

import torch

from .reduce import masked_mean


def _token_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PPO ratio in log space: log r_t = logps_t - old_t (0 outside the mask). (B, T)"""
    return torch.where(mask, logps - old_logps, torch.zeros_like(logps))


def _sequence_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (Zheng et al. 2025) in its token-wise form: log s_i = mean_t (logps - old) over the
    masked tokens of sequence i, and log s_it = sg(log s_i) + logps_t - sg(logps_t).

    The value is s_i at every token; the gradient at token t is s_i * grad log pi_t, so a
    sequence_mean of the per-token losses reproduces GSPO's sequence-level gradient. (B, T)
    """
    token = _token_log_ratio(logps, old_logps, mask)
    seq = masked_mean(token, mask, dim=-1).detach()  # (B,)
    return torch.where(mask, seq[:, None] + logps - logps.detach(), torch.zeros_like(logps))


RATIO_LEVELS = {"token": _token_log_ratio, "sequence": _sequence_log_ratio}


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    level: str = "token",
) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient surrogate (PPO, Schulman et al. 2017), per token:

        loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
        dual_clip c > 1 (Ye et al. 2020), where A_t < 0:  loss_t = min(loss_t, -c A_t)

    level="token":    r_t = exp(logps_t - old_t)                                (PPO, GRPO, DAPO)
    level="sequence": r_t = s_i, GSPO's length-normalised sequence ratio (Zheng et al. 2025),
                      token-wise so gradients flow per token; use small eps (e.g. 3e-4 / 4e-4).
    Asymmetric eps_high > eps_low is DAPO's clip-higher (Yu et al. 2025).

    logps: (B, T) current log-probs (with grad); old_logps: (B, T) behaviour-policy log-probs;
    advantages: (B,) (broadcast over T) or (B, T); mask: (B, T) bool. old_logps and advantages
    are treated as constants (detached).

    Returns (per-token loss (B, T), 0 outside the mask; metrics), metrics over masked tokens:
      clipfrac_low   fraction with A < 0 and r < 1 - eps_low (lower clip active, no gradient)
      clipfrac_high  fraction with A > 0 and r > 1 + eps_high (upper clip active, no gradient)
      dual_clipfrac  fraction where the dual clip is active (only when dual_clip is set)
      approx_kl      mean of k3 for KL(old || new): (r - 1) - log r, with the token ratio r
      ratio_mean     mean ratio r_t at `level`
    """
    if level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio level {level!r}; expected one of {sorted(RATIO_LEVELS)}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    old_logps = old_logps.detach()
    adv = advantages.detach()
    adv = adv[:, None].expand_as(logps) if adv.dim() == 1 else adv  # (B, T)

    ratio = torch.exp(RATIO_LEVELS[level](logps, old_logps, mask))  # (B, T)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(-ratio * adv, -clipped * adv)  # (B, T)
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        dual_active = (adv < 0) & (loss > -dual_clip * adv)
        loss = torch.where(dual_active, -dual_clip * adv, loss)
    loss = torch.where(mask, loss, torch.zeros_like(loss))

    r = ratio.detach()
    token_log_ratio = _token_log_ratio(logps.detach(), old_logps, mask)  # log r, (B, T)
    k3 = torch.expm1(token_log_ratio) - token_log_ratio  # (r - 1) - log r >= 0, samples from old
    metrics = {
        "clipfrac_low": masked_mean(((adv < 0) & (r < 1.0 - eps_low)).float(), mask).item(),
        "clipfrac_high": masked_mean(((adv > 0) & (r > 1.0 + eps_high)).float(), mask).item(),
        "approx_kl": masked_mean(k3, mask).item(),
        "ratio_mean": masked_mean(r, mask).item(),
    }
    if dual_clip is not None:
        metrics["dual_clipfrac"] = masked_mean(dual_active.float(), mask).item()
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss of PPO (as in OpenAI baselines / TRL / OpenRLHF), per token:

        v_clip = old + clip(v - old, -c, c)
        loss_t = 0.5 * max((v - R)^2, (v_clip - R)^2)         (clip=None: 0.5 * (v - R)^2)

    values: (B, T) with grad; old_values, returns: (B, T) constants; mask: (B, T) bool.
    Returns (per-token loss (B, T), 0 outside the mask; metrics: vf_clipfrac = fraction of masked
    tokens where the clipped term is the larger one, value_error = masked mean of (v - R)^2).
    """
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns).square()  # (B, T)
    if clip is None:
        clipped = unclipped
    else:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (v_clip - returns).square()
    loss = 0.5 * torch.maximum(unclipped, clipped)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    metrics = {
        "vf_clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
        "value_error": masked_mean(unclipped.detach(), mask).item(),
    }
    return loss, metrics


def truncated_is_weight(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict]:
    """Truncated importance sampling (TIS) for rollouts drawn by another engine (vLLM), as in
    verl and TRL (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"). The sampler's distribution mu differs slightly from the trainer's pi_old
    (other kernels, bf16), so the policy gradient is reweighted per token by

        w_t = min(exp(logp_trainer_t - logp_sampler_t), cap) = min(pi_old(y_t) / mu(y_t), C)

    and the per-token policy-gradient loss becomes w_t * loss_t. w_t is a constant (no
    gradient). The mismatch itself is logged as

        logp_diff = mean over masked tokens of |logp_sampler_t - logp_trainer_t|

    trainer_logps, sampler_logps: (B, T) log-probs of the sampled tokens; mask: (B, T) bool.
    Returns (w (B, T), 1 outside the mask; metrics over the masked tokens: logp_diff,
    tis_weight_mean (mean w_t), tis_clipfrac (fraction with pi_old / mu > cap)).
    """
    if cap <= 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    log_ratio = trainer_logps.detach() - sampler_logps.detach()  # (B, T)
    ratio = torch.exp(torch.where(mask, log_ratio, torch.zeros_like(log_ratio)))
    weight = ratio.clamp(max=cap)  # (B, T)
    metrics = {
        "logp_diff": masked_mean(log_ratio.abs(), mask).item(),
        "tis_weight_mean": masked_mean(weight, mask).item(),
        "tis_clipfrac": masked_mean((ratio > cap).float(), mask).item(),
    }
    return weight, metrics
