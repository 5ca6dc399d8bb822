"""Advantage estimators: GAE, whitening, group-relative (GRPO / Dr. GRPO), RLOO, REINFORCE++,
and the fairness weights of user groups (group DRO over the segments of a GRPO run).

Pure tensor maths: imports torch only, no gradients (inputs are detached). Token tensors are
(B, T) and right-padded; `mask` (B, T) bool is True on valid (completion) tokens.
"""

import torch

from .losses.preference import group_robust_weights
from .losses.reduce import masked_mean


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per token:

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last valid token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}   (A after the last valid token is 0)
        R_t     = A_t + V_t                          (value-function targets)

    Worked example (one sequence, T = 3, gamma = 0.9, lam = 0.8, gamma * lam = 0.72):
        r = [0, 0, 1], V = [0.5, 0.6, 0.7]
        delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3
        delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03
        delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04
        A_2 = 0.3
        A_1 = 0.03 + 0.72 * 0.3   = 0.246
        A_0 = 0.04 + 0.72 * 0.246 = 0.21712
        R   = [0.71712, 0.846, 1.0]

    rewards, values: (B, T); mask: (B, T) bool. Returns (advantages, returns), both (B, T) and 0
    outside the mask.
    """
    zeros = torch.zeros_like(values)
    rewards = torch.where(mask, rewards.detach(), zeros)
    values = torch.where(mask, values.detach(), zeros)
    advantages = torch.zeros_like(values)
    next_value = zeros[:, 0]  # (B,)
    next_adv = zeros[:, 0]  # (B,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = torch.where(mask[:, t], delta + gamma * lam * next_adv, zeros[:, t])
        advantages[:, t] = adv_t
        next_value, next_adv = values[:, t], adv_t
    returns = torch.where(mask, advantages + values, zeros)
    return advantages, returns


def whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Masked whitening: (x - mean) / sqrt(var + eps) over the True entries of `mask`, with the
    unbiased variance (Bessel's n - 1, as TRL's `masked_whiten`). shift_mean=False adds the
    mean back (rescale only). values, mask: (B, T). Returns (B, T), 0 outside the mask.
    """
    values = values.detach()
    mean = masked_mean(values, mask)
    n = mask.sum()
    var = masked_mean((values - mean).square(), mask) * n / (n - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def _group_divisor(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """Unbiased std within each group (torch.std default, as TRL's GRPO) + eps. (n_groups, 1)"""
    if grouped.shape[1] < 2:
        raise ValueError("scale='group' needs group_size >= 2 (the std of one sample is undefined)")
    return grouped.std(dim=1, keepdim=True) + eps


def _batch_divisor(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """Unbiased std over the whole batch (TRL's scale_rewards="batch") + eps. 0-dim"""
    return grouped.std() + eps


def _unit_divisor(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): no std division (and no eps). 0-dim"""
    return grouped.new_ones(())


GROUP_SCALES = {"group": _group_divisor, "batch": _batch_divisor, "none": _unit_divisor}


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (n_groups, group_size); groups are contiguous runs of group_size samples."""
    if rewards.dim() != 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"rewards must be (B,) with B a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    return rewards.detach().view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024), one per sample:

        group: A_i = (r_i - mean_g) / (std_g + eps)     std_g unbiased (n - 1), like torch.std / TRL
        batch: A_i = (r_i - mean_g) / (std_batch + eps)  std over all B rewards, unbiased
        none:  A_i =  r_i - mean_g                        Dr. GRPO (Liu et al. 2025)

    rewards: (B,) with B = n_groups * group_size, groups contiguous. Returns (B,).
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(GROUP_SCALES)}")
    grouped = _grouped(rewards, group_size)  # (n_groups, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / GROUP_SCALES[scale](grouped, eps)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024):

        A_i = r_i - (sum_g - r_i) / (G - 1)     (mean of the other G - 1 samples of its group)

    rewards: (B,) with B = n_groups * group_size, groups contiguous, group_size >= 2. Returns (B,).
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    grouped = _grouped(rewards, group_size)  # (n_groups, G)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def group_centered_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): A_i = r_i - mean_g, no std division. (B,) -> (B,)"""
    return group_advantages(rewards, group_size, scale="none")


# The estimators the GRPO variants name (`tether.losses.GRPO_VARIANTS[...].advantages`):
# rewards (B,), group size G -> advantages (B,). Keyed by name because losses/ sits below this
# module and cannot import these functions itself.
GROUP_ADVANTAGES = {
    "group": group_advantages,  # (r_i - mean_g) / (std_g + eps): GRPO
    "group_centered": group_centered_advantages,  # r_i - mean_g: Dr. GRPO
    "rloo": rloo_advantages,  # r_i - mean of the other G - 1: RLOO
}


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025), token-level:

        r_t = -kl_coef * kl_t + [t is the last valid token] * reward      (per-token reward)
        G_t = r_t + gamma * G_{t+1}                                        (return-to-go)
        A   = whiten(G, mask)                    (mean and unbiased std over the whole batch)

    rewards: (B,) sequence rewards; mask: (B, T) bool, right-padded; kl: (B, T) per-token KL
    estimate (e.g. `kl_penalty(..., kind="k1")`) or None. Returns advantages (B, T), 0 outside
    the mask.
    """
    mask_next = torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False)
    is_last = mask & ~mask_next  # (B, T)
    token_rewards = torch.where(is_last, rewards.detach()[:, None], torch.zeros_like(mask, dtype=rewards.dtype))
    if kl is not None:
        token_rewards = token_rewards - kl_coef * kl.detach()
    token_rewards = torch.where(mask, token_rewards, torch.zeros_like(token_rewards))
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])  # (B,)
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
    return whiten(returns, mask)


def kl_shaped_rewards(
    rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO (Ziegler et al. 2019; Stiennon et al. 2020), the KL penalty
    folded into the reward:

        r_t = -kl_coef * kl_t + [t is the last valid token] * reward

    Worked example (kl_coef = 0.1): mask = [T, T, T, F], kl = [0.5, -0.2, 1.0, 7.0], reward = 2
        r = [-0.05, 0.02, -0.1 + 2, 0] = [-0.05, 0.02, 1.9, 0]     (padding ignored)

    rewards: (B,) sequence scores (reward model / reward functions); kl: (B, T) per-token KL
    estimate (k1 = logps - ref_logps); mask: (B, T) bool, right-padded. Returns (B, T), 0
    outside the mask.
    """
    mask_next = torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False)
    is_last = mask & ~mask_next  # (B, T)
    kl = kl.detach()
    token_rewards = -kl_coef * kl + torch.where(is_last, rewards.detach()[:, None].to(kl.dtype),
                                                torch.zeros_like(kl))
    return torch.where(mask, token_rewards, torch.zeros_like(token_rewards))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much of the variance of the returns the value function explains:

        EV = 1 - Var[R - V] / Var[R]       (population variances over the True entries of mask)

    1 = perfect prediction, 0 = no better than a constant, < 0 = worse. nan when Var[R] = 0.

    Worked example: R = [1, 2, 3], V = [1, 2, 2] (a fourth, masked entry is ignored)
        R - V = [0, 0, 1]: mean 1/3, Var = 1/3 - 1/9 = 2/9
        Var[R] = (1 + 0 + 1) / 3 = 2/3
        EV = 1 - (2/9) / (2/3) = 1 - 1/3 = 2/3

    values, returns: (B, T); mask: (B, T) bool. Returns a 0-dim tensor.
    """
    values, returns = values.detach(), returns.detach()

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = masked_mean(x, mask)
        return masked_mean((x - mean).square(), mask)

    var_returns = var(returns)
    if var_returns == 0:
        return torch.tensor(float("nan"), dtype=returns.dtype)
    return 1 - var(returns - values) / var_returns


def group_dro_weights(
    group_rewards: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor, *, step_size: float
) -> tuple[torch.Tensor, dict]:
    """Group-DRO weights of user groups (segments) from their mean rewards: a group whose mean
    reward lags the average of the groups gains weight (exponentiated gradient on the reward
    deficit, `group_robust_weights`, as group-robust DPO does on its losses):

        deficit_g = (1/|S|) sum_{k in S} r_k - r_g     S = groups present (counts > 0); 0 if absent
        w_g      <- w_g exp(step_size * deficit_g) / Z   (softmax of log w + step_size * deficit)

    Worked example (two groups, step_size = 1): w = [0.5, 0.5], r = [0, ln 3]
        mean = ln 3 / 2, deficit = [ln 3 / 2, -ln 3 / 2]
        w * exp(deficit) = [0.5 sqrt 3, 0.5 / sqrt 3] -> (times 2 sqrt 3) [3, 1] -> [0.75, 0.25]

    group_rewards: (K,) mean reward of each group this step (any value where counts is 0);
    counts: (K,) rows of each group; weights: (K,) on the simplex. Returns (new weights (K,),
    metrics of `group_robust_weights`).
    """
    present = counts > 0
    rewards = group_rewards.detach().to(weights.dtype)
    average = rewards[present].mean() if present.any() else rewards.new_zeros(())
    deficit = torch.where(present, average - rewards, torch.zeros_like(rewards))  # (K,)
    return group_robust_weights(deficit, weights, step_size=step_size)


def group_reward_gains(
    group_rewards: torch.Tensor, counts: torch.Tensor, baseline: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user group's gain over its own start, the signal of `group_fairness: dro_gain`
    ("every group improves relative to the average"): a group's baseline is its mean reward the
    first step it has rows (NaN until then), and its gain is its mean reward minus that:

        b_g <- r_g   the first step with counts_g > 0;   gain_g = r_g - b_g

    Worked example: b = [0.2, NaN], r = [0.5, 0.9], counts = [4, 4] -> b = [0.2, 0.9],
    gains = [0.3, 0.0] (group 1's first step: gain 0). Fed to `group_dro_weights` in place of
    the rewards, the group with the smaller gain gains weight, whatever its reward level.

    group_rewards, counts, baseline: (K,). Returns (gains (K,), new baseline (K,)); a group
    without rows keeps its baseline and its gain is not used (counts 0)."""
    first = (counts > 0) & baseline.isnan()
    baseline = torch.where(first, group_rewards.to(baseline.dtype), baseline)
    return group_rewards.to(baseline.dtype) - baseline, baseline


def sequence_group_weights(
    weights: torch.Tensor, group_ids: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Per-sequence factors from group weights, normalised to average 1 over the step's N
    sequences (all ranks: `counts` are the step's rows per group, summed over ranks):

        c_i = w_{g_i} * N / sum_k n_k w_k

    Uniform weights give c = 1. Worked example: w = [0.75, 0.25], rows of groups [0, 0, 0, 1]
    (n = [3, 1], N = 4): sum_k n_k w_k = 2.25 + 0.25 = 2.5, so
    c = 4 * [0.75, 0.75, 0.75, 0.25] / 2.5 = [1.2, 1.2, 1.2, 0.4] (mean 1).

    weights: (K,); group_ids: (B,) long in [0, K); counts: (K,). Returns (B,) in weights' dtype.
    """
    total = (counts.to(weights.dtype) * weights).sum()
    return weights[group_ids] * counts.sum().to(weights.dtype) / total
