"""House rule 3 on the source: no function in tether/recipes/ longer than about 80 lines (the
step body calls named stages). Counted with ast, decorators excluded, docstring included."""

import ast
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "tether" / "recipes"
LIMIT = 80


def function_lengths(source: str) -> dict[str, int]:
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_no_long_function_in_recipes():
    long = {f"{path.stem}.{name}": n for path in sorted(RECIPES.glob("*.py"))
            for name, n in function_lengths(path.read_text()).items() if n > LIMIT}
    assert not long, f"functions in tether/recipes/ over {LIMIT} lines: {long}"


def test_counts_a_long_function():
    """The check fires on a planted violation."""
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    assert function_lengths(f"def f():\n{body}")["f"] == LIMIT + 1
