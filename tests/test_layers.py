"""The layering of DESIGN.md, checked on the source: data/ and rewards/ sit below the engine
(they import nothing from tether.engine or tether.recipes), losses/ import torch only, and no
module of rewards/ imports another that imports it back."""

import ast
from pathlib import Path

import tether

ROOT = Path(tether.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement in `path` (top level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_data_and_rewards_do_not_import_the_engine_or_recipes():
    bad = []
    for room in ("data", "rewards"):
        for path in (ROOT / room).rglob("*.py"):
            if path.name == "build_sentiment_prefs.py":  # a maintainer's script, run by hand
                continue
            bad += [f"{path.relative_to(ROOT)} imports {m}" for m in _imports(path)
                    if m.startswith(("tether.engine", "tether.recipes"))]
    assert not bad, bad


def test_losses_import_torch_only():
    for path in (ROOT / "losses").glob("*.py"):
        outside = {m for m in _imports(path) if not m.startswith(("torch", "tether.losses"))}
        assert outside <= {"__future__", "math", "dataclasses", "typing"}, (path.name, outside)


def test_no_import_circle_inside_rewards():
    modules = {p.stem: _imports(p) for p in (ROOT / "rewards").glob("*.py")}
    for name, imports in modules.items():
        for other in modules:
            if other != name and f"tether.rewards.{other}" in imports:
                assert f"tether.rewards.{name}" not in modules[other], (name, other)
