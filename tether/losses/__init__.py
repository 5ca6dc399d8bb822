"""Pure loss functions: tensors and keyword floats in, (loss, metrics) out. Imports torch only."""

from .reduce import masked_mean, masked_sum
from .sft import nll_loss

__all__ = ["masked_mean", "masked_sum", "nll_loss"]
