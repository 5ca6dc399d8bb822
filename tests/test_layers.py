"""The layering of DESIGN.md, checked on the source, function-level imports included:

    cli -> recipes -> eval, judge -> engine -> rewards -> data -> config, errors -> advantages -> losses

a room imports only rooms below it (or itself), no two rooms import each other, no module imports
another that imports it back (at any distance), a recipe takes nothing from another recipe but
its `run` (the helpers they share live in the non-recipe modules of `RECIPE_HELPERS`), no module
imports another's underscore-private name, and losses/ import torch only. Each checker is a pure
function of a source tree, shown to fire on a planted violation in a tiny tree under tmp_path."""

import ast
from pathlib import Path
from typing import NamedTuple

import tether

ROOT = Path(tether.__file__).parent

ROOMS = (("cli",), ("recipes",), ("eval", "judge"), ("engine",), ("rewards",), ("data",),
         ("config", "errors"), ("advantages",), ("losses",))
RANK = {room: rank for rank, rooms in enumerate(ROOMS) for room in rooms}
CLI_MODULES = ("", "__main__", "cli")  # tether/__init__.py, __main__.py and cli.py
# recipes/ modules that are no recipe: the helpers recipes share (or one recipe keeps beside it)
RECIPE_HELPERS = {"stages", "preference_set", "grpo_groups"}


class Import(NamedTuple):
    source: str  # the importing module, "tether.engine.score"
    target: str  # the imported module (the longest prefix that is a module of the tree)
    name: str | None  # the name taken from it (`from m import name`, `m.name`), None: the module
    line: int

    def __str__(self) -> str:
        what = f"{self.target}.{self.name}" if self.name else self.target
        return f"{self.source}:{self.line} imports {what}"


def module_files(root: Path) -> dict[str, Path]:
    """Each module of the package at `root`, by dotted name ("tether.engine" is its __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def known_module(dotted: str, modules) -> str | None:
    """The longest prefix of `dotted` that is a module of the tree."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports_of(module: str, path: Path, modules) -> list[Import]:
    """Every import of a module of the tree in `path`, at any depth, relative ones resolved; a
    module bound to a name (`from tether.engine import dist`) also yields each `dist.x` used."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = known_module(alias.name, modules)
                if target:
                    found.append(Import(module, target, None, node.lineno))
                    if alias.asname:
                        bound[alias.asname] = target
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level \
                else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    found.append(Import(module, f"{source}.{alias.name}", None, node.lineno))
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif known_module(source, modules):
                    found.append(Import(module, known_module(source, modules), alias.name,
                                        node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in bound:
            found.append(Import(module, bound[node.value.id], node.attr, node.lineno))
    return found


def all_imports(root: Path) -> list[Import]:
    modules = module_files(root)
    return [imp for module, path in modules.items() for imp in imports_of(module, path, modules)]


def room_of(module: str) -> str:
    inner = module.split(".", 1)[1] if "." in module else ""
    return "cli" if inner in CLI_MODULES else inner.split(".")[0]


def back_arrows(imports: list[Import]) -> list[Import]:
    """Imports from a room into a room above it."""
    return [i for i in imports if RANK[room_of(i.target)] < RANK[room_of(i.source)]]


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        if a != b:
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def module_cycles(imports: list[Import]) -> list[list[str]]:
    return cycles({(i.source, i.target) for i in imports})


def room_cycles(imports: list[Import]) -> list[list[str]]:
    return cycles({(room_of(i.source), room_of(i.target)) for i in imports})


def is_recipe(module: str) -> bool:
    parts = module.split(".")
    return len(parts) == 3 and parts[1] == "recipes" and parts[2] not in RECIPE_HELPERS


def borrowed_recipe_helpers(imports: list[Import]) -> list[Import]:
    """Names other than `run` that a recipes/ module takes from another recipe."""
    return [i for i in imports if room_of(i.source) == "recipes" and i.source != i.target
            and is_recipe(i.target) and i.name is not None and i.name != "run"]


def private_imports(imports: list[Import]) -> list[Import]:
    """Underscore-prefixed names taken from another module (dunders such as __name__ aside)."""
    return [i for i in imports if i.source != i.target and i.name is not None
            and i.name.startswith("_") and not i.name.startswith("__")]


# --------------------------------------------------------------------------------- on tether/


def test_every_import_runs_down_the_layers():
    assert [str(i) for i in back_arrows(all_imports(ROOT))] == []


def test_no_two_rooms_import_each_other():
    assert room_cycles(all_imports(ROOT)) == []


def test_no_import_circle_between_modules():
    assert module_cycles(all_imports(ROOT)) == []


def test_recipes_take_only_each_others_run():
    assert [str(i) for i in borrowed_recipe_helpers(all_imports(ROOT))] == []


def test_no_module_imports_another_modules_private_name():
    assert [str(i) for i in private_imports(all_imports(ROOT))] == []


def test_every_module_has_a_room():
    assert {room_of(m) for m in module_files(ROOT)} <= set(RANK)


def test_losses_import_torch_only():
    for path in (ROOT / "losses").glob("*.py"):
        outside = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                outside |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                outside.add(node.module)
        outside = {m for m in outside if not m.startswith(("torch", "tether.losses"))}
        assert outside <= {"__future__", "math", "dataclasses", "typing"}, (path.name, outside)


# ------------------------------------------------------------- negative controls: planted faults


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package `tether` under tmp_path with the given modules (relative path -> source)."""
    root = tmp_path / "tether"
    for rel, source in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source)
    return root


def test_checkers_find_planted_back_arrows_and_circles(tmp_path):
    root = plant(tmp_path, {
        "engine/__init__.py": "",
        "engine/a.py": "def f():\n    from tether.engine import b\n",  # function-level
        "engine/b.py": "from . import a\n",  # relative, closes a <-> b
        "rewards/__init__.py": "",
        "rewards/r.py": "def g():\n    from tether.engine.a import f\n",  # rewards -> engine
        "data/__init__.py": "",
        "data/d.py": "import tether.engine.a as engine_a\n",  # data -> engine
        "config.py": "from tether.errors import E\n",
        "errors.py": "from tether.config import C\nclass E(Exception): ...\n",  # siblings loop
    })
    imports = all_imports(root)
    assert {(i.source, i.target) for i in back_arrows(imports)} == {
        ("tether.rewards.r", "tether.engine.a"), ("tether.data.d", "tether.engine.a")}
    assert module_cycles(imports) == [["tether.config", "tether.errors"],
                                      ["tether.engine.a", "tether.engine.b"]]
    assert room_cycles(imports) == [["config", "errors"]]


def test_checkers_find_planted_recipe_helpers_and_private_names(tmp_path):
    root = plant(tmp_path, {
        "recipes/__init__.py": "",
        "recipes/sft.py": "def run(cfg): ...\ndef check_batch_sizes(tc): ...\n",
        "recipes/stages.py": "def finished(d): ...\n",
        "recipes/dpo.py": ("from tether.recipes.sft import check_batch_sizes\n"
                           "from tether.recipes.stages import finished\n"),
        "recipes/rlhf.py": "def run(cfg):\n    from tether.recipes import sft\n    sft.run(cfg)\n",
        "recipes/cai.py": "from tether.recipes import sft\nsft.check_batch_sizes(None)\n",
        "data/__init__.py": "",
        "data/formats.py": "def _ids(t, s): ...\n",
        "data/preference.py": ("from .formats import _ids\nfrom tether.data import formats\n"
                               "formats._ids(None, '')\nprint(__name__)\n"),
    })
    imports = all_imports(root)
    assert sorted(str(i) for i in borrowed_recipe_helpers(imports)) == [
        "tether.recipes.cai:2 imports tether.recipes.sft.check_batch_sizes",
        "tether.recipes.dpo:1 imports tether.recipes.sft.check_batch_sizes"]
    assert sorted(str(i) for i in private_imports(imports)) == [
        "tether.data.preference:1 imports tether.data.formats._ids",
        "tether.data.preference:3 imports tether.data.formats._ids"]
