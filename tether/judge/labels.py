"""Judged pairs -> preference rows (TRL format plus the judge's soft label).

Pure: a judge's P(A better) in, rows out. `tether label` and `tether cai` both write these rows,
and `tether dpo --dpo.soft_label_key=p` reads them back (per-pair cDPO smoothing 1 - p).
"""

from __future__ import annotations

import torch


def label_row(prompt, response_a, response_b, p_a: float, *, position_disagree: bool = False,
              **extra) -> dict:
    """One preference row from one judged pair. The judge's preferred response becomes `chosen`,
    so `p` = P(chosen is better) = max(p_a, 1 - p_a) is always in [0.5, 1], and
    `confidence` = |2 p_a - 1| = 2 p - 1.

    Worked example: p_a = 0.3 -> B is chosen, p = 0.7, confidence 0.4; p_a = 0.5 (a tie) keeps
    A as chosen with p 0.5 and confidence 0. `extra` fields are copied into the row (e.g. a
    `group`, or the index of the source row).

    >>> r = label_row("q", "a", "b", 0.3)
    >>> (r["chosen"], r["rejected"], round(r["p"], 6), round(r["confidence"], 6))
    ('b', 'a', 0.7, 0.4)
    """
    a_wins = p_a >= 0.5
    p = p_a if a_wins else 1.0 - p_a
    return {"prompt": prompt, "chosen": response_a if a_wins else response_b,
            "rejected": response_b if a_wins else response_a, "p": float(p),
            "confidence": float(2 * p - 1), "position_disagree": bool(position_disagree), **extra}


def label_rows(prompts: list, responses_a: list, responses_b: list, p_a: torch.Tensor,
               position_disagree: torch.Tensor | None = None) -> list[dict]:
    """`label_row` for each pair; p_a (N,) and position_disagree (N,) bool from `Judge.compare`."""
    flags = position_disagree.tolist() if position_disagree is not None else [False] * len(prompts)
    return [label_row(q, a, b, float(p), position_disagree=bool(f))
            for q, a, b, p, f in zip(prompts, responses_a, responses_b, p_a.tolist(), flags)]


def keep_confident(rows: list[dict], min_confidence: float) -> list[dict]:
    """Rows whose confidence is at least `min_confidence` (0 keeps every row)."""
    return [r for r in rows if r["confidence"] >= min_confidence]
