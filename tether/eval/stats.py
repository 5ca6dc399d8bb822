"""Pure statistics of a set of sampled completions (tensors and strings in, floats out).

Notation: a completion y of prompt x has tokens y_1..y_T; `logps[t] = log pi(y_t | x, y_<t)` under
the evaluated policy, `ref_logps[t]` the same under the reference, `mask` selects real tokens.
"""

from __future__ import annotations

import math

import torch


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence KL estimates from samples of the policy: (k1 (B,), k3 (B,)), the per-token
    estimators of `tether.losses.kl_penalty` summed over each completion's tokens.

    With r_t = ref_logps[t] - logps[t] (log ref/pi of the sampled token):
        k1 = sum_t -r_t                  log pi(y|x) - log ref(y|x)
        k3 = sum_t (exp(r_t) - 1 - r_t)  Schulman's k3, summed over the completion
    On samples y ~ pi (temperature 1, no top-p/top-k), both have expectation KL(pi || ref) of the
    whole sequence: E[k1] by definition, and E[k3_t | y_<t] = KL of the next-token distributions
    (because E[exp r_t] = 1), which sum to the sequence KL. k3 >= 0 on every sample and varies
    less; k1 can be negative on a single sample. logps, ref_logps: (B, T) fp32; mask (B, T) bool."""
    from tether.losses import kl_penalty

    zero = torch.zeros((), dtype=logps.dtype)
    k1, k3 = (torch.where(mask, kl_penalty(logps, ref_logps, kind=kind), zero).sum(dim=1)
              for kind in ("k1", "k3"))
    return k1, k3


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean = sample std / sqrt(n)); stderr 0 for n < 2."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def self_bleu(texts: list[str]) -> float:
    """Self-BLEU (Zhu et al. 2018): the mean over completions of sacrebleu's sentence BLEU (0-100)
    of each against all the others as references. High = the completions repeat each other (100:
    all identical); low = diverse. nan with fewer than 2 non-empty texts."""
    import sacrebleu

    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        return float("nan")
    scores = [sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1:]).score
              for i, t in enumerate(texts)]
    return sum(scores) / len(scores)
