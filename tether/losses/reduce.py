"""Masked reductions. Pure: tensors in, tensors out; imports torch only."""

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` where `mask` is True. Uses `where`, so NaN/inf outside the mask never leaks.

    values: (...); mask: (...) bool, same shape. Returns a 0-dim tensor.
    """
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the True entries of `mask` (over `dim` if given; 0 where none)."""
    kept = torch.where(mask, values, torch.zeros_like(values))
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1)
    return kept.sum(dim) / mask.sum(dim).clamp(min=1)
