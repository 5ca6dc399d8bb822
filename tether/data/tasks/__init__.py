"""Built-in tasks and data sets that need no download."""

from tether.data.tasks import arithmetic

TASKS = {"arithmetic": arithmetic}


def builtin_sft_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """Easy arithmetic demonstrations (conversational prompt-completion rows)."""
    return [{"prompt": r["prompt"], "completion": r["completion"]}
            for r in arithmetic.arithmetic_problems(n, seed=seed, difficulty="easy")]
