"""The import structure the packages promise, checked on their source.

Every import statement counts: at module level, inside a function, and under ``if TYPE_CHECKING``
(a function-level import that dodges a cycle is still the cycle; a type-only import is still a
dependency). The rules:

(a) no import cycle among the modules of ``agent``, ``store``, ``policies`` and ``bench``;
(b) ``policies`` is pure decision logic: it imports neither the runtime (``agent``), the store, the
    benchmarks, nor a library that does I/O or runs a model;
(c) ``store`` depends on nothing else in the project and on no model library;
(d) no ``agent`` module imports ``bench`` outside a function body: importing the runtime never loads
    the benchmarks; the CLI reaches them from inside its functions.

The walker resolves each import to the most specific project module it names (``from agent.backends
import hf`` is an edge to ``agent.backends.hf``; ``from agent.backends import Backend`` one to
``agent.backends``), as import-linter and grimp do; the ``__init__`` of a parent package is not an edge.
Its own tests, at the end, run it on small packages written to a temporary folder.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "store", "policies", "bench")

IO_OR_MODEL_LIBRARIES = frozenset({
    "sqlalchemy", "sqlite3", "psycopg", "torch", "transformers", "peft", "vllm", "fastapi", "uvicorn",
    "httpx", "requests", "socket", "subprocess", "apscheduler",
})  # fmt: skip
POLICIES_MUST_NOT_IMPORT = frozenset({"agent", "store", "bench"}) | IO_OR_MODEL_LIBRARIES
STORE_MUST_NOT_IMPORT = frozenset({"agent", "policies", "bench", "torch", "transformers", "peft", "vllm"})


# --- the walker ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One imported module, as written in one import statement of a project module."""

    source: str
    """The importing module, e.g. ``agent.cli``."""
    target: str
    """A project module (the most specific one the statement names), or the external name as written."""
    line: int
    in_function: bool
    """Inside a function body: runs when the function is called, not when the module is imported."""
    type_checking: bool
    """Under ``if TYPE_CHECKING:``."""

    def __str__(self) -> str:
        where = " (in a function)" if self.in_function else " (TYPE_CHECKING)" if self.type_checking else ""
        return f"{self.source}:{self.line} imports {self.target}{where}"


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name (a package by its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: dict[str, Path]) -> None:
        self.module, self.known = module, known
        self.package = module if is_package else module.rpartition(".")[0]
        self.functions = self.type_checking = 0
        self.found: list[Import] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef  # type: ignore[assignment]

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_checking += 1
        for statement in node.body:
            self.visit(statement)
        self.type_checking -= 1
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(self._most_specific(alias.name), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node.module, node.level)
        if base == "__future__":
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.known else self._most_specific(base), node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        """``importlib.import_module("x")`` and ``__import__("x")`` with a literal name are imports too."""
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            if isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
                self._add(self._most_specific(node.args[0].value), node.lineno)
        self.generic_visit(node)

    def _absolute(self, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        parts = self.package.split(".")
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([module] if module else []))

    def _most_specific(self, dotted: str) -> str:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.known:
                return ".".join(parts[:end])
        return dotted

    def _add(self, target: str, line: int) -> None:
        self.found.append(Import(self.module, target, line, self.functions > 0, self.type_checking > 0))


def walk_imports(root: Path, packages: tuple[str, ...]) -> list[Import]:
    """Every import statement of every module of ``packages`` under ``root``."""
    known = find_modules(root, packages)
    found: list[Import] = []
    for module, path in known.items():
        visitor = _ImportVisitor(module, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found += visitor.found
    return found


# --- the rules -----------------------------------------------------------------------------------------


def import_cycles(imports: list[Import]) -> list[str]:
    """One named cycle per strongly connected group of modules, e.g. ``a -> b -> a (a:3, b:7)``."""
    sources = {i.source for i in imports}
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for i in imports:
        if i.target in sources and i.target != i.source:
            edges[i.source].setdefault(i.target, i)

    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in sorted(sources):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    named = []
    for group in groups:
        if len(group) < 2:
            continue
        # The shortest way back to the group's first module names one cycle of it.
        first = min(group)
        previous: dict[str, str] = {}
        queue = deque([first])
        while queue:
            node = queue.popleft()
            for child in sorted(edges[node]):
                if child in group and child not in previous:
                    previous[child] = node
                    queue.append(child)
        path = [first]
        while len(path) == 1 or path[-1] != first:
            path.append(previous[path[-1]])
        path.reverse()
        lines = ", ".join(f"{a}:{edges[a][b].line}" for a, b in zip(path, path[1:]))
        others = sorted(group - set(path))
        also = f"; the same group also holds {', '.join(others)}" if others else ""
        named.append(f"{' -> '.join(path)} ({lines}){also}")
    return sorted(named)


def forbidden_imports(imports: list[Import], package: str, forbidden: frozenset[str],
                      *, outside_functions_only: bool = False) -> list[str]:
    """Imports by modules of ``package`` of anything whose top-level name is in ``forbidden``."""
    return [
        str(i)
        for i in imports
        if i.source.split(".")[0] == package
        and i.target.split(".")[0] in forbidden
        and not (outside_functions_only and i.in_function)
    ]


# --- the project ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project_imports() -> list[Import]:
    found = walk_imports(REPO, PACKAGES)
    assert {i.source.split(".")[0] for i in found} == set(PACKAGES)  # the walker really read the packages
    return found


def test_no_import_cycles(project_imports: list[Import]) -> None:
    assert import_cycles(project_imports) == []


def test_policies_import_no_runtime_store_benchmarks_or_io(project_imports: list[Import]) -> None:
    assert forbidden_imports(project_imports, "policies", POLICIES_MUST_NOT_IMPORT) == []


def test_store_imports_nothing_else_of_the_project_and_no_model_library(project_imports: list[Import]) -> None:
    assert forbidden_imports(project_imports, "store", STORE_MUST_NOT_IMPORT) == []


def test_agent_imports_bench_only_inside_functions(project_imports: list[Import]) -> None:
    assert forbidden_imports(project_imports, "agent", frozenset({"bench"}), outside_functions_only=True) == []


@pytest.mark.parametrize(("package", "forbidden"), [("policies", POLICIES_MUST_NOT_IMPORT - {"subprocess", "socket"}),
                                                    ("store", STORE_MUST_NOT_IMPORT)])
def test_importing_a_package_loads_none_of_what_it_must_not_import(package: str, forbidden: frozenset[str]) -> None:
    """The same rules at run time, in a fresh interpreter: they also catch what a third-party import pulls in.

    (The standard library imports ``subprocess`` and ``socket`` for its own needs, so only the source rule
    checks those two.)"""
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        package = importlib.import_module({package!r})
        for info in pkgutil.walk_packages(package.__path__, {package!r} + "."):
            importlib.import_module(info.name)
        print(" ".join(sorted({{m.split(".")[0] for m in sys.modules}} & set({sorted(forbidden)!r}))))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


# --- the walker's own tests ----------------------------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_a_planted_cycle_is_named_even_through_function_and_type_checking_imports(tmp_path: Path) -> None:
    root = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import f\n",
        "pkg/b.py": "def f():\n    from . import c\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n",
        "pkg/d.py": "import pkg.a\n",  # imports into the cycle, is not part of it
    })  # fmt: skip
    assert import_cycles(walk_imports(root, ("pkg",))) == [
        "pkg.a -> pkg.b -> pkg.c -> pkg.a (pkg.a:1, pkg.b:2, pkg.c:3)"]

    (root / "pkg" / "c.py").write_text("X = 1\n")
    assert import_cycles(walk_imports(root, ("pkg",))) == []


def test_a_cycle_between_packages_and_through_an_init_is_found(tmp_path: Path) -> None:
    root = write_package(tmp_path, {
        "one/__init__.py": "from one.core import Thing\n",
        "one/core.py": "import importlib\nTwo = importlib.import_module('two')\n",
        "two/__init__.py": "from one import Thing\n",
    })  # fmt: skip
    assert import_cycles(walk_imports(root, ("one", "two"))) == [
        "one -> one.core -> two -> one (one:1, one.core:2, two:1)"]


def test_the_walker_resolves_imports_and_says_where_they_run(tmp_path: Path) -> None:
    root = write_package(tmp_path, {
        "pkg/__init__.py": "from .sub import thing\n",
        "pkg/sub/__init__.py": "thing = 1\n",
        "pkg/sub/leaf.py": textwrap.dedent("""\
            from __future__ import annotations
            import os.path
            from .. import sub
            from ..sub import leaf, thing
            from pkg.sub.leaf import x
            try:
                import torch
            except ImportError:
                torch = None
            class C:
                import json
            async def f():
                import bench
        """),
    })  # fmt: skip
    found = {(i.source, i.target, i.line, i.in_function, i.type_checking) for i in walk_imports(root, ("pkg",))}
    assert found == {
        ("pkg", "pkg.sub", 1, False, False),
        ("pkg.sub.leaf", "os.path", 2, False, False),
        ("pkg.sub.leaf", "pkg.sub", 3, False, False),
        ("pkg.sub.leaf", "pkg.sub.leaf", 4, False, False),
        ("pkg.sub.leaf", "pkg.sub", 4, False, False),
        ("pkg.sub.leaf", "pkg.sub.leaf", 5, False, False),
        ("pkg.sub.leaf", "torch", 7, False, False),
        ("pkg.sub.leaf", "json", 11, False, False),
        ("pkg.sub.leaf", "bench", 13, True, False),
    }


def test_the_rules_catch_planted_violations(tmp_path: Path) -> None:
    root = write_package(tmp_path, {
        "policies/__init__.py": "",
        "policies/route.py": "def score():\n    import torch\n",
        "store/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from agent import Agent\n",
        "agent/__init__.py": "",
        "agent/cli.py": "try:\n    from bench import cli\nexcept ImportError:\n    cli = None\n",
        "agent/lazy.py": "def run():\n    from bench import cli\n",
        "bench/__init__.py": "",
        "bench/cli.py": "import agent\nimport torch\n",
    })  # fmt: skip
    found = walk_imports(root, PACKAGES)
    assert forbidden_imports(found, "policies", POLICIES_MUST_NOT_IMPORT) == [
        "policies.route:2 imports torch (in a function)"]
    assert forbidden_imports(found, "store", STORE_MUST_NOT_IMPORT) == ["store:3 imports agent (TYPE_CHECKING)"]
    assert forbidden_imports(found, "agent", frozenset({"bench"}), outside_functions_only=True) == [
        "agent.cli:2 imports bench.cli"]
