"""Reward-model losses: pairwise Bradley-Terry and per-step process reward. Pure: imports torch only."""

import torch
import torch.nn.functional as F

from .reduce import masked_mean


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Pairwise Bradley-Terry reward-model loss (Ouyang et al. 2022; margin: Touvron et al. 2023,
    Llama 2; centring: Eisenstein et al. 2023, TRL's `center_rewards_coefficient`).

        loss_i = -log sigmoid(rc_i - rr_i - m_i) + center_coef * (rc_i + rr_i)^2

    chosen_scores, rejected_scores: (B,) scalar rewards; margin: (B,) or None (m = 0).
    Returns (loss (B,), metrics): accuracy = mean(rc > rr), margin = mean(rc - rr),
    scores/chosen, scores/rejected = mean scores.
    """
    diff = chosen_scores - rejected_scores  # (B,)
    shifted = diff if margin is None else diff - margin
    loss = -F.logsigmoid(shifted) + center_coef * (chosen_scores + rejected_scores).square()
    metrics = {
        "accuracy": (diff > 0).float().mean().item(),
        "margin": diff.detach().mean().item(),
        "scores/chosen": chosen_scores.detach().mean().item(),
        "scores/rejected": rejected_scores.detach().mean().item(),
    }
    return loss, metrics


def process_reward_loss(
    step_logits: torch.Tensor, step_labels: torch.Tensor, step_mask: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Process (step-level) reward-model loss (Lightman et al. 2023, "Let's Verify Step by Step").

    Binary cross-entropy of each step's logit x against its label y (True = step is correct):
        bce = -[y log sigmoid(x) + (1 - y) log sigmoid(-x)]
    averaged over the valid steps of each example (0 for an example with no valid step).

    step_logits: (B, S); step_labels: (B, S) bool; step_mask: (B, S) bool, True on real steps.
    Returns (loss (B,), metrics): step_accuracy (sigmoid(x) > 0.5 matches y, over valid steps),
    steps = number of valid steps.
    """
    targets = step_labels.to(step_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(step_logits, targets, reduction="none")  # (B, S)
    loss = masked_mean(bce, step_mask, dim=-1)  # (B,)
    correct = ((step_logits > 0) == step_labels).float()  # (B, S)
    metrics = {
        "step_accuracy": masked_mean(correct, step_mask).item(),
        "steps": float(step_mask.sum()),
    }
    return loss, metrics
