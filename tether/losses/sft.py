"""Supervised fine-tuning loss. Pure: imports torch only."""

import torch

from .reduce import masked_sum


def nll_loss(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Summed negative log-likelihood of the target tokens.

    loss = -sum_{b,t: loss_mask[b,t]} token_logps[b,t]

    The sum (not the mean) is returned so that the optimizer can divide by the *global* number of
    loss tokens across micro-batches and ranks: the mean over a whole batch is then exact however
    it is split (see `tether.engine.optimize`).

    token_logps: (B, T) log p(token_t | tokens_<t); loss_mask: (B, T) bool, True on target tokens.
    Returns (loss_sum 0-dim, metrics) with metrics["loss_tokens"] = number of target tokens.
    """
    loss_sum = -masked_sum(token_logps, loss_mask)
    return loss_sum, {"loss_tokens": float(loss_mask.sum())}
