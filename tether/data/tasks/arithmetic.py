"""Arithmetic with exact answers: a verifiable task that needs no download.

A problem is a conversational prompt ("What is 23 + 45? End with 'Answer: N'."), its integer
answer, and a short demonstration ("23 + 45 = 68\nAnswer: 68") for SFT. The verifier reads the
last "Answer: <int>" in a completion and compares it exactly.
"""

from __future__ import annotations

import random
import re

DIFFICULTIES = ("single", "easy", "medium", "hard")
INSTRUCTION = "End your reply with 'Answer: N'."
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


def _expression(rng: random.Random, difficulty: str) -> str:
    if difficulty == "single":  # 1-digit sums and non-negative differences (the GRPO demo's task)
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+-")
        return f"{max(a, b)} - {min(a, b)}" if op == "-" else f"{a} + {b}"
    if difficulty == "easy":  # 1-2 digit sums and differences
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return f"{a} {rng.choice('+-')} {b}"
    if difficulty == "medium":  # 2-digit by 1-digit products
        return f"{rng.randint(10, 99)} * {rng.randint(2, 9)}"
    if difficulty == "hard":  # three terms
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 30)
        return f"{a} {rng.choice('+-*')} {b} {rng.choice('+-')} {c}"
    raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")


def _evaluate(expr: str) -> int:
    """Integer value of an expression of ints and + - * (the precedence Python uses)."""
    if not re.fullmatch(r"[\d+\-* ]+", expr):
        raise ValueError(f"not an arithmetic expression: {expr!r}")
    return int(eval(expr, {"__builtins__": {}}))  # safe: only digits, spaces and + - *


def arithmetic_problems(n: int, *, seed: int, difficulty: str = "easy") -> list[dict]:
    """n problems as rows: prompt (messages), completion (messages), answer (int), expression.

    Deterministic in (n, seed, difficulty); the first k of n problems are the k problems."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    rng = random.Random(f"arithmetic-{difficulty}-{seed}")
    rows = []
    for _ in range(n):
        expr = _expression(rng, difficulty)
        answer = _evaluate(expr)
        rows.append({
            "prompt": [{"role": "user", "content": f"What is {expr}? {INSTRUCTION}"}],
            "completion": [{"role": "assistant", "content": f"{expr} = {answer}\nAnswer: {answer}"}],
            "answer": answer,
            "expression": expr,
        })
    return rows


def extract_answer(text: str) -> int | None:
    """The integer after the last 'Answer:' in `text`, or None."""
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None


def verify(text: str, answer: int) -> bool:
    """The last 'Answer: N' in `text` is exactly `answer`."""
    return extract_answer(text) == answer


_WORKED = re.compile(r"(?:^|\n)([^\n]*?)=\s*(-?\d+)\s*\nAnswer:\s*(-?\d+)\s*$")


def shows_work(text: str, expression: str | None = None) -> bool:
    """The reply ends like the task's demonstrations: a line '<expression> = N', then
    'Answer: N' with the same N (so a bare 'Answer: N' does not count). With `expression` the
    line must restate that problem (whitespace aside), so copying a worked example does not
    count either."""
    found = _WORKED.search(text)
    if found is None or found.group(2) != found.group(3):
        return False
    return expression is None or found.group(1).split() == expression.split()


def format_ok(text: str) -> bool:
    """The reply ends with 'Answer: <int>' (trailing whitespace allowed)."""
    return re.search(r"Answer:\s*-?\d+\s*$", text) is not None
