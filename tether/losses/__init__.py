"""Pure loss functions: tensors and keyword floats in, (loss, metrics) out. Imports torch only."""

from .kl import KL_ESTIMATORS, adaptive_kl_coef, kl_penalty
from .policy import RATIO_LEVELS, clipped_surrogate, truncated_is_weight, value_loss
from .preference import (
    PAIRED_LOSSES,
    dpo_loss,
    group_robust_weights,
    hinge_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from .reduce import AGGREGATIONS, aggregate, aggregate_sum, masked_mean, masked_sum
from .reward import bradley_terry_loss, process_reward_loss
from .sft import nll_loss

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "PAIRED_LOSSES",
    "RATIO_LEVELS",
    "adaptive_kl_coef",
    "aggregate",
    "aggregate_sum",
    "bradley_terry_loss",
    "clipped_surrogate",
    "dpo_loss",
    "group_robust_weights",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty",
    "kto_loss",
    "log1mexp",
    "masked_mean",
    "masked_sum",
    "nll_loss",
    "orpo_loss",
    "process_reward_loss",
    "robust_dpo_loss",
    "simpo_loss",
    "truncated_is_weight",
    "value_loss",
]
