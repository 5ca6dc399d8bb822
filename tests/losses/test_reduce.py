"""Masked reductions and loss aggregation: hand values, empty rows, micro-batch invariance."""

import pytest
import torch
from torch.testing import assert_close

from tether.losses import aggregate, aggregate_sum, masked_mean, masked_sum

# per_token [[1, 2, pad], [3, pad, pad]]; the padding holds NaN / inf that must never leak.
PER_TOKEN = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 100.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_sum_and_mean_hand_values():
    """masked_sum = 1 + 2 + 3 = 6; masked_mean = 6 / 3 = 2; per row: [3 / 2, 3 / 1] = [1.5, 3]."""
    assert masked_sum(PER_TOKEN, MASK).item() == 6.0
    assert masked_mean(PER_TOKEN, MASK).item() == 2.0
    assert_close(masked_mean(PER_TOKEN, MASK, dim=1), torch.tensor([1.5, 3.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "mode, normalizer, expected",
    [
        ("token_mean", None, 2.0),  # (1 + 2 + 3) / 3 tokens
        ("sequence_mean", None, 2.25),  # ((1 + 2) / 2 + 3 / 1) / 2 sequences = (1.5 + 3) / 2
        ("constant_normalizer", 4.0, 0.75),  # 6 / (B * 4) = 6 / 8
    ],
)
def test_aggregate_hand_values(mode, normalizer, expected):
    """See the parametrisation: token_mean 6/3 = 2; sequence_mean (1.5 + 3)/2 = 2.25;
    constant_normalizer with normalizer 4: 6 / (2 * 4) = 0.75."""
    assert aggregate(PER_TOKEN, MASK, mode=mode, normalizer=normalizer).item() == pytest.approx(expected)


def test_aggregate_empty_rows_and_empty_mask():
    """An empty third row: token_mean stays 6/3 = 2; sequence_mean skips it: (1.5 + 3)/2 = 2.25;
    constant_normalizer counts it (it is a row of the batch): 6 / (3 * 4) = 0.5.
    An all-False mask gives 0 (not NaN) in every mode."""
    per_token = torch.cat([PER_TOKEN, torch.full((1, 3), 7.0, dtype=torch.float64)])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    assert aggregate(per_token, mask, mode="token_mean").item() == pytest.approx(2.0)
    assert aggregate(per_token, mask, mode="sequence_mean").item() == pytest.approx(2.25)
    assert aggregate(per_token, mask, mode="constant_normalizer", normalizer=4).item() == pytest.approx(0.5)
    empty = torch.zeros_like(mask)
    for mode in ("token_mean", "sequence_mean"):
        assert aggregate(per_token, empty, mode=mode).item() == 0.0
    assert aggregate(per_token, empty, mode="constant_normalizer", normalizer=4).item() == 0.0


def test_aggregate_errors():
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(PER_TOKEN, MASK, mode="constant_normalizer")
    with pytest.raises(ValueError, match="seq_mean"):
        aggregate(PER_TOKEN, MASK, mode="seq_mean")


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "constant_normalizer"])
@pytest.mark.parametrize("split", [(1, 3), (2, 2)])
def test_micro_batch_invariance(mode, split):
    """Batch of 4 with lengths [3, 5, 1, 0] split into micro-batches: the optimizer sums the
    denominators first, then back-propagates num_k / total per micro-batch. The value and the
    gradient w.r.t. the per-token input must equal the full-batch aggregate's."""
    gen = torch.Generator().manual_seed(0)
    per_token = torch.randn(4, 5, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.arange(5)[None, :] < torch.tensor([3, 5, 1, 0])[:, None]  # (4, 5)
    kw = dict(mode=mode, normalizer=5.0)

    full = aggregate(per_token, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, per_token)

    bounds = [(0, split[0]), (split[0], 4)]
    parts = [aggregate_sum(per_token[a:b], mask[a:b], **kw) for a, b in bounds]
    total = sum(den for _, den in parts)
    value, grad = 0.0, torch.zeros_like(per_token)
    for num, _ in parts:  # one backward per micro-batch, gradients accumulate
        value = value + (num / total).item()
        grad += torch.autograd.grad(num / total, per_token)[0]
    assert value == pytest.approx(full.item(), abs=1e-12)
    assert_close(grad, full_grad)
    assert grad[3].abs().sum() == 0 and grad[0, 3:].abs().sum() == 0  # padding gets no gradient


def test_naive_mean_of_micro_batch_means_differs():
    """Why the sum form exists: averaging micro-batch token means is not the batch token mean.
    Rows [1, 2] and [3]: mean(mean(1, 2), mean(3)) = (1.5 + 3) / 2 = 2.25, but the token mean is 2."""
    first = aggregate(PER_TOKEN[:1], MASK[:1], mode="token_mean")
    second = aggregate(PER_TOKEN[1:], MASK[1:], mode="token_mean")
    assert ((first + second) / 2).item() == pytest.approx(2.25)
    assert aggregate(PER_TOKEN, MASK, mode="token_mean").item() == pytest.approx(2.0)
