"""Pure loss functions: tensors and keyword floats in, (loss, metrics) out. Imports torch only.

Each variant is registered once: `PREFERENCE_LOSSES` (preference.py) and `GRPO_VARIANTS`
(grpo.py, whose public names are re-exported from its `__all__`, so a new variant's function
needs no line here)."""

from . import grpo as _grpo
from .grpo import *  # noqa: F403
from .kl import KL_ESTIMATORS, adaptive_kl_coef, kl_penalty
from .policy import RATIO_LEVELS, clipped_surrogate, truncated_is_weight, value_loss
from .preference import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    dpo_loss,
    group_robust_weights,
    hinge_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    preference_coefficients,
    robust_dpo_loss,
    simpo_loss,
)
from .reduce import AGGREGATIONS, aggregate, aggregate_sum, masked_mean, masked_sum
from .reward import bradley_terry_loss, process_reward_loss
from .sft import nll_loss

__all__ = [
    *_grpo.__all__,
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "PREFERENCE_LOSSES",
    "PreferenceLoss",
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
    "preference_coefficients",
    "process_reward_loss",
    "robust_dpo_loss",
    "simpo_loss",
    "truncated_is_weight",
    "value_loss",
]
