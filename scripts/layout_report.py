"""Measure the code layout: import cycles, imports inside functions, longest function, SQL sites.

Reads the source only (no imports of the project), so it also runs on an old
checkout: ``python scripts/layout_report.py [REPO]``. Prints one JSON line last.
A module's name is its path from the repository root; the role folders linked
into ``fabloop/`` (blocks, tasks, flows, deployments, infra) are counted once.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# Calls that build SQL (SQLAlchemy Core/ORM) or hand text to the database.
SQL_CALL = re.compile(r"(?<![.\w])(select|insert|update|delete|text)\(|exec_driver_sql\(|\.execute\(")
# Where an engine is made and later disposed by the same caller (``make_engine`` was the
# old code's own factory, called from flows and tasks; now the store's, called by the block).
ENGINE_CALL = re.compile(r"\b(create_async_engine|create_engine)\(|(?<![.\w])make_engine\(")
SKIP = {".venv", "tests", "benchmarks", "scripts", "build", ".git"}


def sources(repo: Path) -> dict[str, Path]:
    """Module name -> file, for every project module (each file once, following the layout)."""
    out: dict[str, Path] = {}
    for path in sorted(repo.rglob("*.py")):
        rel = path.relative_to(repo)
        if rel.parts[0] in SKIP or any(p.startswith(".") for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[0] != "fabloop":
            parts = ["fabloop", *parts] if (repo / "fabloop" / parts[0]).is_symlink() else parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.setdefault(".".join(parts), path.resolve())
    return out


def package_of(module: str, packages: set[str]) -> str:
    parts = module.split(".")
    while parts and ".".join(parts) not in packages:
        parts.pop()
    return ".".join(parts) or module


def imported(tree: ast.AST, module: str, known: set[str]) -> list[tuple[str, bool]]:
    """(target module, inside a function?) for every import statement of a project module."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_func or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, in_func) for a in child.names[:1])
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                full = f"{child.module}.{child.names[0].name}"
                found.append((full if full in known else child.module, in_func))
            visit(child, inner)

    visit(tree, False)
    return [(t, f) for t, f in found if t in known or t.split(".")[0] in {m.split(".")[0] for m in known}]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in list(graph):
        if v not in index:
            strong(v)
    return out


def main(repo: Path) -> dict[str, object]:
    mods = sources(repo)
    known = set(mods)
    packages = {m for m, p in mods.items() if p.name == "__init__.py"} | {m.split(".")[0] for m in known}
    module_graph: dict[str, set[str]] = defaultdict(set)
    package_graph: dict[str, set[str]] = defaultdict(set)
    in_function = 0
    all_in_function = 0
    longest = (0, "")
    sql_sites: list[str] = []
    engine_sites: list[str] = []
    store = "fabloop.adapters.store"
    for name, path in mods.items():
        text = path.read_text()
        tree = ast.parse(text)
        for target, in_func in imported(tree, name, known):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target not in known or target == name:
                continue
            in_function += in_func
            module_graph[name].add(target)
            a, b = package_of(name, packages), package_of(target, packages)
            if a != b and not b.startswith(a + ".") and not a.startswith(b + "."):
                package_graph[a].add(b)
        all_in_function += sum(
            isinstance(n, ast.Import | ast.ImportFrom)
            for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            for n in ast.walk(f)
        )
        for node in ast.walk(tree):
            if ".migrations." in name:
                break  # generated schema steps, not code anybody reads as a function
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > longest[0]:
                    longest = (length, f"{name}.{node.name}")
        if not name.startswith(store):
            for i, line in enumerate(text.splitlines(), 1):
                code = line.split("#", 1)[0]
                if SQL_CALL.search(code) and "sqlalchemy" in text:
                    sql_sites.append(name)
                if ENGINE_CALL.search(code) and "def make_engine" not in code and not name.startswith("fabloop.blocks"):
                    engine_sites.append(f"{name}:{i}")
    module_cycles = cycles(module_graph)
    package_cycles = cycles(package_graph)
    report = {
        "modules": len(mods),
        "package_cycles": len(package_cycles),
        "module_cycles": len(module_cycles),
        "project_imports_inside_functions": in_function,
        "all_imports_inside_functions": all_in_function,
        "longest_function_lines": longest[0],
        "longest_function": longest[1],
        "sql_lines_outside_store": len(sql_sites),
        "modules_with_sql_outside_store": sorted(set(sql_sites)),
        "engine_sites_outside_store": len(engine_sites),
    }
    for label, items in (("package cycle", package_cycles), ("module cycle", module_cycles)):
        for c in items:
            print(f"{label}: {' <-> '.join(c)}")
    for site in engine_sites:
        print(f"engine outside the store: {site}")
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())))
