"""No test reads the clock at import or collection time.

Why: a time computed when pytest collects (a ``parametrize`` argument, a module constant, a default
argument) is stale by the time the test runs, and on a busy machine the suite runs for longer than
any offset a test adds ("now + 600" was already in the past when the test ran). Tests read the
clock inside the test (or a fixture), where it is current.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# time.time(), time.monotonic(), datetime.now(), date.today() ... however the module was imported.
CLOCKS = {"time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "now", "utcnow", "today"}


def import_time_clock_reads(source: str) -> list[int]:
    """Lines where ``source`` calls a clock in code that runs when the module is imported: module and
    class bodies, decorators (``parametrize``), default argument values; not function or lambda bodies."""
    found: list[int] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in CLOCKS:
                found.append(node.lineno)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for part in (*node.decorator_list, *node.args.defaults, *node.args.kw_defaults):
                if part is not None:
                    visit(part)
            return  # the body runs when the test runs
        if isinstance(node, ast.Lambda):
            for part in (*node.args.defaults, *node.args.kw_defaults):
                if part is not None:
                    visit(part)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


@pytest.mark.parametrize("path", sorted(TESTS.rglob("*.py")), ids=lambda p: str(p.relative_to(TESTS)))
def test_no_clock_read_at_import(path: Path) -> None:
    assert import_time_clock_reads(path.read_text()) == [], f"{path}: read the clock inside the test"


def test_the_check_finds_collection_time_clocks() -> None:
    caught = '''
import time, datetime, pytest
LATER = time.time() + 600
@pytest.mark.parametrize("exp", [int(time.time()) - 120])
def test_a(exp, when=datetime.datetime.now()):
    assert time.time()
class Case:
    stamp = time.monotonic()
f = lambda x=time.time(): time.time()
'''
    assert import_time_clock_reads(caught) == [3, 4, 5, 8, 9]
