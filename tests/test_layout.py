"""The layout's promises (README "Layout"), pinned on the imports of every library module.

Each rule is one sentence of the README's tree; a change that breaks one should move the code
or change the README, not this file's allow-lists, unless the README says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "facecaption"
STAGE_PACKAGES = ("fetch", "detect", "attribute", "caption")
SQL_DRIVERS = ("sqlalchemy", "psycopg2", "psycopg", "asyncpg")
# core/runner.py records a failed attempt and must tell a lost database from the stage's own
# fault: it catches sqlalchemy's DBAPIError, and writes no SQL itself.
SQL_OUTSIDE_STATE = {"core/runner.py"}
# What a stage package may take from another: the CelebA vocabulary the caption grammar and
# fidelity check speak, and the source reader fetch streams rows from.
SHARED_ACROSS_STAGES = {"facecaption.attribute.labels", "facecaption.plan.sources"}
# `models train-attributes` is a tool beside the attribute stage, not part of it: it cuts its
# training faces with detect's detector and five-point alignment, so that training crops are
# the crops the stage will see.
TRAINING_TOOL = {"attribute/celeba.py", "attribute/training.py"}


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


MODULES = {path.relative_to(LIBRARY).as_posix(): _imports(path) for path in LIBRARY.rglob("*.py")}


def _offending(rule) -> dict[str, list[str]]:
    found = {}
    for module, imported in MODULES.items():
        bad = [name for name in imported if rule(module, name)]
        if bad:
            found[module] = bad
    return found


def test_layout_rules_see_the_whole_library():
    assert len(MODULES) > 50
    assert any(name.startswith("sqlalchemy") for name in MODULES["state/shards.py"])


def test_library_imports_no_airflow():
    assert _offending(lambda module, name: name.split(".")[0] == "airflow") == {}


def test_library_imports_no_test_scaffolding():
    """Only `facecaption demo` reaches into tests/support, from a source checkout, at call time."""
    found = _offending(lambda module, name: name.split(".")[0] in ("support", "tests"))
    assert found == {"cli.py": ["support.demo"]}


def test_sql_lives_in_state_only():
    def writes_sql(module: str, name: str) -> bool:
        return (
            name.split(".")[0] in SQL_DRIVERS
            and not module.startswith("state/")
            and module not in SQL_OUTSIDE_STATE
        )

    assert _offending(writes_sql) == {}


@pytest.mark.parametrize("stage", STAGE_PACKAGES)
def test_stage_package_reads_no_other_stage(stage):
    def crosses(module: str, name: str) -> bool:
        parts = name.split(".")
        return (
            module.startswith(f"{stage}/")
            and len(parts) > 1
            and parts[0] == "facecaption"
            and parts[1] in STAGE_PACKAGES + ("plan", "release")
            and parts[1] != stage
            and not any(name.startswith(shared) for shared in SHARED_ACROSS_STAGES)
            and not (module in TRAINING_TOOL and parts[1] == "detect")
        )

    assert _offending(crosses) == {}


def test_core_and_state_import_no_stage_at_module_level():
    """core/ and state/ may name the stages only inside a function (the stage registry),
    so importing them never loads a model library."""
    offending = {}
    for path in [*LIBRARY.glob("core/*.py"), *LIBRARY.glob("state/*.py")]:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if (
                    len(parts) > 1
                    and parts[0] == "facecaption"
                    and parts[1] in STAGE_PACKAGES
                    and node.module not in SHARED_ACROSS_STAGES
                ):
                    offending.setdefault(path.name, []).append(node.module)
    assert offending == {}
