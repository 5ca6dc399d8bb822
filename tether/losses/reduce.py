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


# ---------------------------------------------------------------------------------------------
# Aggregation of per-token losses into one scalar (the choice differs between GRPO variants).
#
# Each mode is written in *sum form*: (numerator, denominator) with
#     aggregate = sum(numerators) / sum(denominators)
# summed over micro-batches (and ranks). The optimizer sums the denominators of the whole step
# first, then back-propagates numerator / total_denominator per micro-batch, so the result and
# its gradient equal those of the full batch however it is split.
# ---------------------------------------------------------------------------------------------


def _count_dtype(per_token: torch.Tensor) -> torch.dtype:
    """At least fp32 for token counts: bf16 cannot count past 256 exactly."""
    return torch.promote_types(per_token.dtype, torch.float32)


def _token_mean_sum(per_token: torch.Tensor, mask: torch.Tensor, normalizer: float | None):
    """token_mean (DAPO, Yu et al. 2025): sum over masked tokens / number of masked tokens."""
    return masked_sum(per_token, mask), mask.sum().to(_count_dtype(per_token))


def _sequence_mean_sum(per_token: torch.Tensor, mask: torch.Tensor, normalizer: float | None):
    """sequence_mean (GRPO, Shao et al. 2024): mean over sequences of each sequence's token mean.

    Rows with no masked token are left out of both numerator and denominator.
    """
    per_seq = masked_mean(per_token, mask, dim=-1)  # (B,)
    return per_seq.sum(), mask.any(dim=-1).sum().to(_count_dtype(per_token))


def _constant_normalizer_sum(per_token: torch.Tensor, mask: torch.Tensor, normalizer: float | None):
    """constant_normalizer (Dr. GRPO, Liu et al. 2025): sum / (B * normalizer), normalizer a
    constant such as the maximum completion length; no division by each sequence's length."""
    if normalizer is None or normalizer <= 0:
        raise ValueError(f"mode='constant_normalizer' needs a positive normalizer, got {normalizer!r}")
    rows = per_token.shape[0]
    return masked_sum(per_token, mask), per_token.new_tensor(float(rows * normalizer), dtype=_count_dtype(per_token))


AGGREGATIONS = {
    "token_mean": _token_mean_sum,
    "sequence_mean": _sequence_mean_sum,
    "constant_normalizer": _constant_normalizer_sum,
}


def aggregate_sum(
    per_token: torch.Tensor, mask: torch.Tensor, *, mode: str = "token_mean", normalizer: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum form of `aggregate`: returns (numerator, denominator), both 0-dim tensors.

    token_mean:          (sum of masked values,             number of masked tokens)
    sequence_mean:       (sum of per-sequence token means,  number of non-empty sequences)
    constant_normalizer: (sum of masked values,             B * normalizer)

    Over micro-batches k: sum_k num_k / sum_k den_k equals `aggregate` on the whole batch.
    The denominator carries no gradient. per_token: (B, T); mask: (B, T) bool.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {sorted(AGGREGATIONS)}")
    numerator, denominator = AGGREGATIONS[mode](per_token, mask, normalizer)
    return numerator, denominator.detach()


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, *, mode: str = "token_mean", normalizer: float | None = None
) -> torch.Tensor:
    """Reduce per-token losses (B, T) to a scalar: numerator / denominator of `aggregate_sum`
    (0 when the mask selects nothing: the numerator is then 0 too)."""
    numerator, denominator = aggregate_sum(per_token, mask, mode=mode, normalizer=normalizer)
    return numerator / denominator.clamp(min=torch.finfo(denominator.dtype).tiny)
