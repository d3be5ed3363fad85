"""The package's import graph, read from the source: no import circle, nothing on the serving path
imports a policy tool (or the dev issuer, or the native compiler), and the policy tools speak the
serving core's own HttpRequest: no protobuf, no front door.

Every import statement counts, wherever it is (top level, inside a function, under TYPE_CHECKING):
a circle kept open by a function-level import is a circle all the same.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

import authz_service

PACKAGE = Path(authz_service.__file__).parent
SERVING = ("authz_service.server", "authz_service.workers")  # what `authz-service serve` runs
NOT_SERVING = ("authz_service.tools", "authz_service.dev_issuer", "authz_service.native")
# Native mode (serve --native-xds-dir) compiles each policy it loads: the serving path reaches the
# compiler through its control plane alone (imported only when native mode is on), and the
# compiler's options (addresses) through the settings. The compiler signs its probe tokens with
# the simulator; no other tool is reached.
NATIVE_MODE = "authz_service.native.control"
SERVING_NATIVE = (NATIVE_MODE, "authz_service.native.options")
NATIVE_MODE_TOOLS = ("authz_service.tools.simulate",)
TOOLS_WITHOUT_DOORS = ("authz_service.tools.simulate", "authz_service.tools.explain")
PROTOCOL_MODULES = ("authz_service._proto", "authz_service.doors", "google.protobuf", "grpc_health")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py") if "_proto" not in path.parts}


def _is_module(name: str) -> bool:
    return name in MODULES or (PACKAGE.parent / Path(*name.split("."))).with_suffix(".py").exists()


@cache
def imports(name: str) -> frozenset[str]:
    """The modules ``name`` imports: ours by full name, anyone else's by its imported name."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            found.add(base)
            # `from . import ports`: the submodule, when the name is one
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
    return frozenset(found)


def ours(names: frozenset[str]) -> list[str]:
    return sorted(n for n in names if n in MODULES)


def closure(start: str, stop: tuple[str, ...] = ()) -> set[str]:
    """Every module ``start`` imports, directly or through our modules (theirs included, by name);
    the modules in ``stop`` are reached but not followed."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in MODULES and name not in stop:
            todo.extend(imports(name))
    return seen


def circles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for other in ours(imports(name)):
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in on_stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == name:
                    break
            if len(component) > 1 or name in imports(name):
                found.append(sorted(component))

    for name in sorted(MODULES):
        if name not in index:
            visit(name)
    return found


def test_the_graph_is_read_from_every_kind_of_import() -> None:
    # The reader itself: a function-level import (cli -> tools) and a TYPE_CHECKING one count.
    assert "authz_service.tools.explain" in imports("authz_service.cli")
    assert "authz_service.metrics" in imports("authz_service.check")
    assert "authz_service.ports" in imports("authz_service.admin")  # `from . import ports`
    assert len(MODULES) > 25


def test_no_import_circle_in_the_package() -> None:
    assert circles() == []


@pytest.mark.parametrize("entry", SERVING)
def test_the_serving_path_imports_no_tool(entry: str) -> None:
    reached = closure(entry, stop=(NATIVE_MODE,))
    assert not [m for m in reached if m.startswith(NOT_SERVING) and m not in SERVING_NATIVE]


def test_native_mode_imports_no_tool_but_the_simulator() -> None:
    reached = closure(NATIVE_MODE)
    assert not [m for m in reached if m.startswith(NOT_SERVING[:2]) and m not in NATIVE_MODE_TOOLS]


@pytest.mark.parametrize("tool", TOOLS_WITHOUT_DOORS)
def test_the_tools_speak_http_request_not_a_protocol(tool: str) -> None:
    reached = closure(tool)
    assert not [m for m in reached if m.startswith(PROTOCOL_MODULES)]


def test_explain_and_test_run_without_loading_protobuf(tmp_path: Path) -> None:
    """At run time too (third-party imports included): a simulated explain and a policy test case."""
    code = """
import asyncio, sys
from authz_service.policy import load_policy_file
from authz_service.tools.explain import explain
policy = load_policy_file("authz_service/examples/policy.yaml")
info = asyncio.run(explain(policy, "POST", "/transactions", scopes=["transactions/post"]))
assert info.outcome.decision.allowed
loaded = sorted(m for m in sys.modules if m.startswith(("google.protobuf", "authz_service._proto",
                                                         "authz_service.doors")))
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
