"""The import graph of ``optuna_ctpe``: no circle, and no wing importing a higher wing.

The package is a house of wings, highest to lowest (``docs``' layout page draws it):
``cli`` > the face (``optuna_ctpe/__init__``, ``search_space``, ``optunahub``) > ``tasks`` >
``deploy`` > ``nn`` > ``space`` > ``sampler`` > the base (``_attrs``, ``_validation``,
``_optuna_compat``). A module may import its own wing and the wings below it, never one above,
and no chain of imports may lead back to where it started.

Every ``import`` statement counts: at module level, inside functions (a lazy import is still an
arrow), and under ``if TYPE_CHECKING:`` (a type annotation that points up is a design that
points up). The graph is read from the source with :mod:`ast`, so it sees imports that a test
run never executes. An edge goes to the module an import names (``from optuna_ctpe.nn import
width`` -> ``optuna_ctpe.nn.width``; ``from optuna_ctpe.nn.width import prune_widths`` ->
``optuna_ctpe.nn.width``), not to the packages Python executes on the way.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest


PACKAGE = "optuna_ctpe"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: The wings, highest first. A module's wing is the first entry that is a prefix of its name
#: (the face is named module by module; the package itself is the face).
WINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli", ("optuna_ctpe.cli",)),
    ("face", ("optuna_ctpe.search_space", "optuna_ctpe.optunahub", "optuna_ctpe")),
    ("tasks", ("optuna_ctpe.tasks",)),
    ("deploy", ("optuna_ctpe.deploy",)),
    ("nn", ("optuna_ctpe.nn",)),
    ("space", ("optuna_ctpe.space",)),
    ("sampler", ("optuna_ctpe.sampler",)),
    ("base", ("optuna_ctpe._attrs", "optuna_ctpe._validation", "optuna_ctpe._optuna_compat")),
)


def wing_of(module: str) -> tuple[int, str]:
    """(rank, name) of ``module``'s wing; rank 0 is the highest wing.

    The face's package entry ``optuna_ctpe`` matches only the package itself, so that an
    unlisted top-level module is an error rather than silently part of the face.
    """
    for rank, (name, prefixes) in enumerate(WINGS):
        for prefix in prefixes:
            if module == prefix or (prefix != PACKAGE and module.startswith(prefix + ".")):
                return rank, name
    raise AssertionError(f"module {module} belongs to no wing: add it to WINGS")


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(module: str, source: str, modules: Mapping[str, object]) -> set[str]:
    """The package modules that ``source`` (the text of ``module``) imports, anywhere in it.

    Relative imports are resolved against ``module``; ``from package import name`` goes to the
    submodule ``package.name`` when there is one, else to ``package``.
    """
    is_package = module not in modules or str(modules[module]).endswith("__init__.py")
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                # ``from . import x`` in a package's __init__ is relative to the package itself.
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # ``import optuna_ctpe.nn.width`` names the module; a dotted name past a module
            # (``import a.b`` where ``a.b`` is an attribute) falls back to the longest module.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module and target.split(".")[0] == PACKAGE:
                out.add(target)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports, for the package at ``root``."""
    modules = module_names(root)
    return {
        name: imports_of(name, path.read_text(encoding="utf-8"), modules)
        for name, path in modules.items()
    }


def upward_edges(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import from a lower wing to a higher one, as ``"a (wing) -> b (wing)"``."""
    out = []
    for source, targets in sorted(graph.items()):
        rank, wing = wing_of(source)
        for target in sorted(targets):
            target_rank, target_wing = wing_of(target)
            if target_rank < rank:
                out.append(f"{source} ({wing}) -> {target} ({target_wing})")
    return out


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path ``[a, b, ..., a]``, or None if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_points_up() -> None:
    edges = upward_edges(import_graph())
    assert not edges, "imports from a lower wing to a higher one:\n  " + "\n  ".join(edges)


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or ())


def test_graph_sees_the_package() -> None:
    # The checker would pass vacuously on an empty or unparsed graph.
    graph = import_graph()
    assert "optuna_ctpe.sampler._sampler" in graph
    assert "optuna_ctpe.sampler._sampler" in graph["optuna_ctpe.sampler"]
    assert "optuna_ctpe.space.records" in graph["optuna_ctpe.search_space"]


def _write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / PACKAGE


def test_checker_flags_a_lazy_upward_import(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "nn/__init__.py": "",
            "nn/measure.py": "def f():\n    from optuna_ctpe.search_space import X\n",
            "search_space.py": "from optuna_ctpe.nn import measure\n",
        },
    )
    graph = import_graph(root)
    assert upward_edges(graph) == [
        "optuna_ctpe.nn.measure (nn) -> optuna_ctpe.search_space (face)"
    ]
    assert find_cycle(graph) == [
        "optuna_ctpe.nn.measure",
        "optuna_ctpe.search_space",
        "optuna_ctpe.nn.measure",
    ]


def test_checker_flags_a_type_checking_circle_within_a_wing(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "deploy/__init__.py": "",
            "deploy/a.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .b import B\n",
            "deploy/b.py": "from optuna_ctpe.deploy.a import A\n",
        },
    )
    graph = import_graph(root)
    assert upward_edges(graph) == []
    assert find_cycle(graph) == [
        "optuna_ctpe.deploy.a",
        "optuna_ctpe.deploy.b",
        "optuna_ctpe.deploy.a",
    ]


def test_checker_accepts_downward_imports(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "__init__.py": "from optuna_ctpe.sampler import S\n",
            "sampler/__init__.py": "from ._s import S\n",
            "sampler/_s.py": "import optuna_ctpe._attrs\n",
            "_attrs.py": "",
        },
    )
    graph = import_graph(root)
    assert graph["optuna_ctpe.sampler"] == {"optuna_ctpe.sampler._s"}
    assert graph["optuna_ctpe.sampler._s"] == {"optuna_ctpe._attrs"}
    assert upward_edges(graph) == [] and find_cycle(graph) is None


def test_unknown_top_level_module_has_no_wing() -> None:
    with pytest.raises(AssertionError, match="belongs to no wing"):
        wing_of("optuna_ctpe.new_module")
