"""Built-in tasks and data sets that need no download."""

from tether.data.tasks import arithmetic

TASKS = {"arithmetic": arithmetic}


def builtin_sft_rows(n: int = 200, seed: int = 0) -> list[dict]:
    """Easy arithmetic demonstrations (conversational prompt-completion rows)."""
    return [{"prompt": r["prompt"], "completion": r["completion"]}
            for r in arithmetic.arithmetic_problems(n, seed=seed, difficulty="easy")]


def heldout_problems(n: int, exclude: list[dict], seed: int = 10_000) -> list[dict]:
    """n easy arithmetic problems whose prompts appear nowhere in `exclude` (the training rows)."""
    seen = {r["prompt"][0]["content"] for r in exclude}
    fresh = [p for p in arithmetic.arithmetic_problems(2 * n + 10, seed=seed, difficulty="easy")
             if p["prompt"][0]["content"] not in seen]
    return fresh[:n]


def task_accuracy(completions: list[str], problems: list[dict]) -> float:
    """Fraction of completions whose final 'Answer: N' equals the problem's answer."""
    hits = [arithmetic.verify(c, p["answer"]) for c, p in zip(completions, problems)]
    return sum(hits) / max(1, len(hits))
