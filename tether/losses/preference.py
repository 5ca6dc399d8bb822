"""Direct preference losses (DPO family, SimPO, ORPO, KTO), their registry, and group-robust
weights.

Pure: imports torch and math only. Each loss is registered once in `PREFERENCE_LOSSES` with
every fact about it (its function, which log-probs it reads, whether it needs a reference model,
its coefficients and their paper defaults); the recipe, config validation, the CLI summary,
`tether keys` and the docs table (docs/dpo.md, checked by tests/losses/test_registry.py) all
read that one table, so a new loss is one function, one row and its test. Log-prob arguments are (B,) tensors: `*_logps` are sums over
completion tokens, `*_avg_logps` per-token means. For the paired losses with a reference model,

    h = (pc - rc) - (pr - rr)

where pc/pr are the policy's chosen/rejected log-probs and rc/rr the reference's. Every paired
loss reports the same metrics: rewards/chosen, rewards/rejected (mean implicit rewards),
rewards/accuracy (mean of chosen reward > rejected reward), rewards/margin (mean difference).
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .reduce import masked_mean


def _paired_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Metrics shared by every paired loss; rewards are (B,) implicit rewards."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracy": (chosen > rejected).float().mean().item(),
        "rewards/margin": (chosen - rejected).mean().item(),
    }


def _logratios(pc, pr, rc, rr) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, chosen log-ratio pc - rc, rejected log-ratio pr - rr), all (B,)."""
    chosen, rejected = pc - rc, pr - rr
    return chosen - rejected, chosen, rejected


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023); conservative DPO (cDPO, Mitchell 2023) when label_smoothing > 0.

        loss = -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h),   0 <= ls <= 0.5

    ls is the assumed probability that a preference label is flipped: a float for every pair, or
    a (B,) tensor, one per pair (soft labels: ls_i = 1 - p_i, p_i the probability that chosen is
    better, e.g. an AI judge's). Returns (loss (B,), metrics) with implicit rewards
    beta (pc - rc) and beta (pr - rr).
    """
    ls = torch.as_tensor(label_smoothing)
    if not bool(((ls >= 0.0) & (ls <= 0.5)).all()):
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    h, chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, _paired_metrics(beta * chosen, beta * rejected)


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): an unbiased estimate of the clean
    DPO loss when each label is flipped with probability eps = label_smoothing.

        loss = ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps)

    Requires 0 <= eps < 0.5; eps = 0 is plain DPO. Unlike cDPO the loss can be negative.
    """
    eps = label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    h, chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return loss, _paired_metrics(beta * chosen, beta * rejected)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm ..."):  loss = (h - 1 / (2 beta))^2.

    Uses the h it is given: pass sums or per-token averages (the paper and TRL use averages);
    the recipe decides. beta here is the paper's tau (regularisation strength).
    """
    h, chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = (h - 1.0 / (2.0 * beta)).square()
    return loss, _paired_metrics(beta * chosen, beta * rejected)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict]:
    """Hinge loss of SLiC (Zhao et al. 2023) on the DPO log-ratio:  loss = relu(1 - beta h)."""
    h, chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = torch.relu(1.0 - beta * h)
    return loss, _paired_metrics(beta * chosen, beta * rejected)


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, dict]:
    """SimPO (Meng et al. 2024), reference-free on length-normalised log-probs c, r:

        loss = -log sigmoid(beta (c - r) - gamma)

    gamma is the target reward margin itself (the paper's gamma). TRL's `simpo_gamma` /
    `gamma_beta_ratio` is gamma / beta: pass gamma = beta * gamma_beta_ratio to match it.
    Implicit rewards are beta * c and beta * r.
    """
    chosen = beta * policy_chosen_avg_logps
    rejected = beta * policy_rejected_avg_logps
    loss = -F.logsigmoid(chosen - rejected - gamma)
    return loss, _paired_metrics(chosen, rejected)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, computed stably (Maechler 2012):
    log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) otherwise. Each branch only sees inputs it
    handles, so neither values nor gradients of the unused branch can be NaN."""
    near_zero = x > -math.log(2.0)
    safe_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    safe_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def orpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    *,
    lam: float = 0.1,
) -> tuple[torch.Tensor, dict]:
    """ORPO (Hong et al. 2024): the chosen NLL per completion token plus the odds-ratio term.

        log_odds(p) = p - log(1 - exp(p))        (p an average log-prob)
        loss = -c + lam * -log sigmoid(log_odds(c) - log_odds(r))

    log(1 - exp(p)) uses `log1mexp`, so the loss stays finite for p close to 0 (e.g. -1e-6).
    Implicit rewards are lam * c and lam * r (as TRL reports them); also reports
    log_odds_ratio = mean(log_odds(c) - log_odds(r)), log_odds_chosen = mean log_odds(c) and
    nll/chosen = mean -c.
    """
    c, r = policy_chosen_avg_logps, policy_rejected_avg_logps
    log_odds = (c - log1mexp(c)) - (r - log1mexp(r))  # (B,)
    nll = -c  # (B,)
    loss = nll + -lam * F.logsigmoid(log_odds)
    metrics = _paired_metrics(lam * c, lam * r)
    metrics["log_odds_ratio"] = log_odds.detach().mean().item()
    metrics["log_odds_chosen"] = (c - log1mexp(c)).detach().mean().item()
    metrics["nll/chosen"] = nll.detach().mean().item()
    return loss, metrics


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al. 2024) on unpaired examples. With r = policy - ref and the reference
    point z = max(kl, 0) (a detached batch estimate of KL(policy || ref)):

        desirable:    loss = desirable_weight   * (1 - sigmoid(beta (r - z)))
        undesirable:  loss = undesirable_weight * (1 - sigmoid(beta (z - r)))

    policy_logps, ref_logps: (B,) summed log-probs; desirable: (B,) bool; kl: 0-dim tensor
    (detached and clamped here). Returns (loss (B,), metrics): rewards/chosen and rewards/rejected
    are mean beta * r over desirable / undesirable examples (0 where there are none),
    rewards/margin their difference, kl = z, desirable_fraction.
    """
    z = kl.detach().clamp(min=0)
    log_ratio = policy_logps - ref_logps  # (B,)
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (z - log_ratio)))
    loss = torch.where(desirable, desirable_loss, undesirable_loss)
    rewards = beta * log_ratio.detach()
    chosen = masked_mean(rewards, desirable).item()
    rejected = masked_mean(rewards, ~desirable).item()
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "kl": z.item(),
        "desirable_fraction": desirable.float().mean().item(),
    }
    return loss, metrics


def group_robust_weights(
    group_losses: torch.Tensor, weights: torch.Tensor, *, step_size: float
) -> tuple[torch.Tensor, dict]:
    """Exponentiated-gradient update of the group weights of Group Robust Preference Optimisation
    (Ramesh et al. 2024; not GRPO the RL method):

        w_g <- w_g * exp(step_size * loss_g),   then normalise to sum 1

    done in log space (softmax of log w + step_size * loss), so large losses cannot overflow.
    group_losses, weights: (G,). Returns (new_weights (G,) detached, metrics: weights/max,
    weights/min, worst_group = index of the largest weight).
    """
    logits = torch.log(weights.detach()) + step_size * group_losses.detach()  # (G,)
    new_weights = torch.softmax(logits, dim=0)
    metrics = {
        "weights/max": new_weights.max().item(),
        "weights/min": new_weights.min().item(),
        "worst_group": float(new_weights.argmax()),
    }
    return new_weights, metrics


@dataclass(frozen=True)
class PreferenceLoss:
    """One preference loss and every fact about it."""
    # paired with a reference: fn(pc, pr, rc, rr, **coefficients); reference-free:
    # fn(pc, pr, **coefficients); unpaired: fn(logps, ref_logps, desirable, kl, **coefficients).
    # Each returns (per-pair loss (B,), metrics).
    fn: Callable[..., tuple[torch.Tensor, dict]]
    logps: str  # "sum": summed completion log-probs; "mean": per-token means (length-normalised)
    reference: bool  # needs reference log-probs (a reference model)
    # `dpo.` config key -> (keyword of fn, its paper's default); a key left null takes the default
    coefficients: dict[str, tuple[str, float]] = field(default_factory=dict)
    paired: bool = True  # False: unpaired examples with a desirable label (KTO)
    soft_labels: bool = False  # takes a per-pair label smoothing (`dpo.soft_label_key`)


_BETA = {"beta": ("beta", 0.1)}  # Rafailov et al. 2023 (DPO) use 0.1; TRL's default
_SMOOTHING = {"label_smoothing": ("label_smoothing", 0.0)}  # a label-flip rate, no paper default

# Picked once by name at start-up (`dpo.loss`).
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_loss, "sum", True, _BETA, soft_labels=True),
    # Mitchell 2023 (cDPO): DPO with label_smoothing > 0
    "cdpo": PreferenceLoss(dpo_loss, "sum", True, {**_BETA, **_SMOOTHING}, soft_labels=True),
    # Chowdhury et al. 2024: beta 0.1 as DPO
    "robust": PreferenceLoss(robust_dpo_loss, "sum", True, {**_BETA, **_SMOOTHING}),
    # Azar et al. 2023: tau (`beta` here) 0.1 as TRL; h on per-token means (as TRL)
    "ipo": PreferenceLoss(ipo_loss, "mean", True, _BETA),
    # Zhao et al. 2023 (SLiC) on the DPO log-ratio, beta 0.1 as TRL's hinge
    "hinge": PreferenceLoss(hinge_loss, "sum", True, _BETA),
    # Meng et al. 2024 (SimPO): beta 2.0 (the paper's range 2.0-2.5); gamma 0.5
    "simpo": PreferenceLoss(simpo_loss, "mean", False,
                            {"beta": ("beta", 2.0), "simpo_gamma": ("gamma", 0.5)}),
    # Hong et al. 2024 (ORPO): lambda 0.1
    "orpo": PreferenceLoss(orpo_loss, "mean", False, {"orpo_lambda": ("lam", 0.1)}),
    # Ethayarajh et al. 2024 (KTO): beta 0.1, class weights 1 (lambda_D = lambda_U = 1)
    "kto": PreferenceLoss(kto_loss, "sum", True,
                          {**_BETA, "kto_desirable_weight": ("desirable_weight", 1.0),
                           "kto_undesirable_weight": ("undesirable_weight", 1.0)},
                          paired=False),
}


def preference_coefficients(loss: str, given: dict[str, float | None]) -> dict[str, float]:
    """The keyword arguments of `loss`'s function: each coefficient from `given` (config key ->
    value), or its paper's default where `given` has None or lacks it."""
    out = {}
    for key, (keyword, default) in PREFERENCE_LOSSES[loss].coefficients.items():
        value = given.get(key)
        out[keyword] = default if value is None else value
    return out
