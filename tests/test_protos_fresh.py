"""The generated code in authz_service/_proto is current, and protos/ keeps Envoy's names.

* Staleness: ``tools/gen_protos.py`` is run into a temporary directory and every file it writes is
  compared byte for byte with the checked-in ``authz_service/_proto`` (same set of files, same
  content). Fix on failure: ``make protos`` (i.e. ``python tools/gen_protos.py``), then commit.
* Names: gRPC routes by ``/<package>.<Service>/<Method>`` and ``Any``/reflection by full message
  names, so every .proto under protos/ must declare the package and names Envoy's API uses. The
  expected names are written down here and cross-checked against envoy-data-plane, an independent
  build of the full Envoy API.
"""

from __future__ import annotations

import difflib
import importlib
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import envoy_data_plane.envoy.config.core.v3  # noqa: F401  (registers messages in the pool)
import envoy_data_plane.envoy.service.auth.v3  # noqa: F401
import envoy_data_plane.envoy.type.v3  # noqa: F401
import envoy_data_plane.google.rpc  # noqa: F401
from envoy_data_plane.message_pool import default_message_pool

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "authz_service" / "_proto"
GEN_SCRIPT = ROOT / "tools" / "gen_protos.py"
FIX = "Regenerate with `make protos` (runs tools/gen_protos.py) and commit authz_service/_proto."

# What Envoy's API (and googleapis for google/rpc) declares in each file we carry a subset of.
# "messages"/"enums" are the names our service relies on; all must be present.
ENVOY_FILES: dict[str, dict] = {
    "envoy/service/auth/v3/external_auth.proto": {
        "package": "envoy.service.auth.v3",
        "messages": {"CheckRequest", "DeniedHttpResponse", "OkHttpResponse", "CheckResponse"},
        "enums": set(),
        "services": {"Authorization": {"Check": ("CheckRequest", "CheckResponse")}},
    },
    "envoy/service/auth/v3/attribute_context.proto": {
        "package": "envoy.service.auth.v3",
        "messages": {
            "AttributeContext",
            "AttributeContext.Peer",
            "AttributeContext.Request",
            "AttributeContext.HttpRequest",
            "AttributeContext.TLSSession",
        },
        "enums": set(),
        "services": {},
    },
    "envoy/config/core/v3/base.proto": {
        "package": "envoy.config.core.v3",
        "messages": {"Metadata", "HeaderValue", "HeaderValueOption", "HeaderMap", "QueryParameter"},
        "enums": {"HeaderValueOption.HeaderAppendAction"},
        "services": {},
    },
    "envoy/config/core/v3/address.proto": {
        "package": "envoy.config.core.v3",
        "messages": {"Pipe", "EnvoyInternalAddress", "SocketAddress", "Address"},
        "enums": {"SocketAddress.Protocol"},
        "services": {},
    },
    "envoy/type/v3/http_status.proto": {
        "package": "envoy.type.v3",
        "messages": {"HttpStatus"},
        "enums": {"StatusCode"},
        "services": {},
    },
    "google/rpc/status.proto": {
        "package": "google.rpc",
        "messages": {"Status"},
        "enums": set(),
        "services": {},
    },
}

PROTO_FILES = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (bytecode caches left out), keyed by its relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _module_for(proto: str):
    return importlib.import_module("authz_service._proto." + proto.removesuffix(".proto").replace("/", ".") + "_pb2")


def _walk(descriptors, prefix=""):
    """(dotted name relative to the package, descriptor) for messages and their nested messages."""
    for d in descriptors:
        if d.GetOptions().map_entry:
            continue
        name = prefix + d.name
        yield name, d
        yield from _walk(d.nested_types, name + ".")


# ---------------------------------------------------------------------------------------------
# Generated code is fresh
# ---------------------------------------------------------------------------------------------


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    run = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"tools/gen_protos.py failed:\n{run.stdout}\n{run.stderr}\n{FIX}"

    fresh, committed = _tree(out), _tree(GENERATED)
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    changed = sorted(name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name])
    if not (missing or extra or changed):
        return

    lines = ["authz_service/_proto is stale: it does not match what tools/gen_protos.py generates from protos/."]
    if missing:
        lines.append(f"  missing (would be generated): {missing}")
    if extra:
        lines.append(f"  extra (no longer generated): {extra}")
    if changed:
        lines.append(f"  content differs: {changed}")
        first = changed[0]
        diff = difflib.unified_diff(
            committed[first].decode(errors="replace").splitlines(),
            fresh[first].decode(errors="replace").splitlines(),
            f"committed/{first}",
            f"fresh/{first}",
            lineterm="",
        )
        lines.extend(list(diff)[:40])
    lines.append(f"  (grpcio-tools installed: {metadata.version('grpcio-tools')}; pyproject.toml pins the version)")
    lines.append(FIX)
    pytest.fail("\n".join(lines), pytrace=False)


def test_every_proto_has_a_generated_module() -> None:
    """Cheap guard that also names the fix if someone adds a .proto and forgets to regenerate."""
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (GENERATED / f"{stem}{suffix}").is_file(), f"authz_service/_proto/{stem}{suffix} missing. {FIX}"


# ---------------------------------------------------------------------------------------------
# protos/ declares Envoy's packages and names
# ---------------------------------------------------------------------------------------------


def test_proto_files_are_the_known_envoy_files() -> None:
    assert PROTO_FILES, "no .proto files found under protos/"
    unknown = sorted(set(PROTO_FILES) - ENVOY_FILES.keys())
    assert not unknown, (
        f"{unknown} are not in this test's table of Envoy API files; add the file's Envoy package and "
        "names to ENVOY_FILES (tests/test_protos_fresh.py) after checking them against Envoy's API"
    )
    assert set(PROTO_FILES) == ENVOY_FILES.keys(), f"missing from protos/: {sorted(ENVOY_FILES.keys() - set(PROTO_FILES))}"


@pytest.mark.parametrize("proto", PROTO_FILES)
def test_proto_declares_envoy_package_and_names(proto: str) -> None:
    expected = ENVOY_FILES.get(proto)
    if expected is None:
        pytest.fail(f"{proto} is not a known Envoy API file (see ENVOY_FILES)")
    source = (PROTOS / proto).read_text()

    # The package statement in the source and in the generated descriptor.
    declared = re.findall(r"^\s*package\s+([\w.]+)\s*;", source, re.MULTILINE)
    assert declared == [expected["package"]], f"{proto}: package {declared}, Envoy uses {expected['package']}"
    # Envoy (and googleapis) keep each file at the path of its package.
    assert proto.rsplit("/", 1)[0].replace("/", ".") == expected["package"]

    fd = _module_for(proto).DESCRIPTOR
    assert fd.name == proto, f"descriptor file name {fd.name!r} differs from Envoy's path {proto!r}"
    assert fd.package == expected["package"]
    # Envoy's files are proto3 (this decides presence and packed encoding of repeated scalars).
    assert re.search(r'^\s*syntax\s*=\s*"proto3"\s*;', source, re.MULTILINE), f"{proto}: not proto3 like Envoy's"

    # Messages: what the source declares == what was generated ⊇ what we need; all exist in Envoy.
    messages = dict(_walk(fd.message_types_by_name.values()))
    in_source = set(re.findall(r"^\s*message\s+(\w+)\s*\{", source, re.MULTILINE))
    assert in_source == {name.rsplit(".", 1)[-1] for name in messages}, f"{proto}: generated code is stale. {FIX}"
    missing = expected["messages"] - messages.keys()
    assert not missing, f"{proto}: Envoy messages missing or renamed: {sorted(missing)}"
    for name, d in messages.items():
        full = f"{expected['package']}.{name}"
        assert d.full_name == full
        assert f"type.googleapis.com/{full}" in default_message_pool.url_to_type, (
            f"{proto}: message {full} does not exist in Envoy's API (envoy-data-plane)"
        )

    # Enums (top-level and nested).
    enums = {e.full_name.removeprefix(expected["package"] + "."): e for e in fd.enum_types_by_name.values()}
    for _, d in messages.items():
        enums.update({e.full_name.removeprefix(expected["package"] + "."): e for e in d.enum_types})
    missing = expected["enums"] - enums.keys()
    assert not missing, f"{proto}: Envoy enums missing or renamed: {sorted(missing)}"
    envoy_module = importlib.import_module(f"envoy_data_plane.{expected['package']}")
    for name in enums:
        assert hasattr(envoy_module, name.replace(".", "")), f"{proto}: enum {name} is not in Envoy's API"

    # Services and their methods.
    services = {s.name: s for s in fd.services_by_name.values()}
    assert services.keys() == expected["services"].keys()
    for service_name, methods in expected["services"].items():
        service = services[service_name]
        assert service.full_name == f"{expected['package']}.{service_name}"
        assert set(service.methods_by_name) == set(methods)
        for method_name, (request, response) in methods.items():
            method = service.methods_by_name[method_name]
            assert method.full_name == f"{expected['package']}.{service_name}.{method_name}"
            assert method.input_type.full_name == f"{expected['package']}.{request}"
            assert method.output_type.full_name == f"{expected['package']}.{response}"
            assert not method.client_streaming and not method.server_streaming


def test_check_method_full_name() -> None:
    from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2

    method = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].methods_by_name["Check"]
    assert method.full_name == "envoy.service.auth.v3.Authorization.Check"
    assert method.input_type is external_auth_pb2.CheckRequest.DESCRIPTOR
    assert method.output_type is external_auth_pb2.CheckResponse.DESCRIPTOR
