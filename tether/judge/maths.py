"""The judge's pure maths: two-option probabilities, order averaging, confidence.

Imports torch only. A judge reads the log-probabilities its model gives the two answer options
(e.g. "A" and "B" after "... Answer: (") and renormalises them over those two; each pair is judged
in both orders and the two probabilities that A is better are averaged (Lee et al. 2023, RLAIF),
which cancels a judge's preference for the first (or second) slot.
"""

from __future__ import annotations

import torch


def two_option_prob(logp_first: torch.Tensor, logp_second: torch.Tensor) -> torch.Tensor:
    """P(first option) renormalised over the two options, from their log-probabilities:

        p = exp(a) / (exp(a) + exp(b)) = sigmoid(a - b)                        # (N,)

    The rest of the vocabulary's mass drops out, so a model that puts only 1% on the two
    letters still gives a usable ratio. Worked example: a = log 0.3, b = log 0.1 (0.6 of the mass
    elsewhere): p = 0.3 / 0.4 = 0.75; a = b gives 0.5.

    >>> import math
    >>> round(two_option_prob(torch.tensor([math.log(.3), 0.]), torch.tensor([math.log(.1), 0.])
    ...       ).tolist()[0], 6)
    0.75
    """
    return torch.sigmoid(logp_first.float() - logp_second.float())


def order_average(p_first_ab: torch.Tensor, p_first_ba: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p_a, p_a_first, p_a_second) from the two orders, each (N,).

    p_first_ab: P(first option) with A shown first  -> p_a_first  = p_first_ab
    p_first_ba: P(first option) with B shown first  -> p_a_second = 1 - p_first_ba
    p_a = (p_a_first + p_a_second) / 2

    Worked example: a judge that always says "first" with 0.8 gives p_a_first 0.8 and
    p_a_second 1 - 0.8 = 0.2, so p_a = 0.5: pure position bias averages out to no preference.
    A judge that prefers A in both orders, 0.9 and 0.7, gives p_a = 0.8.

    >>> p_a, _, _ = order_average(torch.tensor([.8, .9]), torch.tensor([.8, .3]))
    >>> [round(x, 6) for x in p_a.tolist()]
    [0.5, 0.8]
    """
    p_a_first = p_first_ab.float()
    p_a_second = 1.0 - p_first_ba.float()
    return (p_a_first + p_a_second) / 2, p_a_first, p_a_second


def confidence(p: torch.Tensor) -> torch.Tensor:
    """|2p - 1| in [0, 1]: 0 for a coin flip (p = 0.5), 1 for a certain label (p = 0 or 1).

    Worked example: p = 0.8 -> |1.6 - 1| = 0.6; p = 0.3 -> |0.6 - 1| = 0.4.

    >>> [round(x, 6) for x in confidence(torch.tensor([.8, .3, .5])).tolist()]
    [0.6, 0.4, 0.0]
    """
    return (2 * p.float() - 1).abs()


def position_disagree(p_a_first: torch.Tensor, p_a_second: torch.Tensor) -> torch.Tensor:
    """True where the two orders prefer different responses: one order above 0.5 for A, the
    other below (an exact 0.5 prefers neither, so it disagrees with nothing).

    Worked example: (0.8, 0.2) is a judge that picks the first slot both times -> True;
    (0.9, 0.7) prefers A twice -> False; (0.5, 0.1) -> False.

    >>> position_disagree(torch.tensor([.8, .9, .5]), torch.tensor([.2, .7, .1])).tolist()
    [True, False, False]
    """
    return (p_a_first.float() - 0.5) * (p_a_second.float() - 0.5) < 0
