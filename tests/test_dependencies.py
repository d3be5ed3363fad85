"""The dependency promises that need no network: floors that fit the generated code, a lock that
satisfies pyproject.toml, an SBOM of the lock, and no install instruction for a package that does
not exist. (`make lock-check` re-resolves the lock files and `make floors` installs the floors.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import authz_service

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROTO = ROOT / "authz_service" / "_proto"
IMAGE_LOCK = ROOT / "requirements" / "image.txt"
BUILD_LOCK = ROOT / "requirements" / "build.txt"


def requirements(texts: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, texts)}


def pins(lock: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock.read_text(), re.MULTILINE)
    return {canonicalize_name(name): version for name, version in found}


def generated_versions(pattern: str, glob: str) -> set[str]:
    return {m for path in PROTO.rglob(glob) for m in re.findall(pattern, path.read_text(), re.MULTILINE)}


def test_grpcio_and_protobuf_floors_are_the_generated_codes_own() -> None:
    """The generated modules refuse an older runtime than they were made for: the floors must be it."""
    grpc = generated_versions(r"^GRPC_GENERATED_VERSION = '([^']+)'", "*_pb2_grpc.py")
    protobuf = generated_versions(r"^# Protobuf Python Version: (\S+)", "*_pb2.py")
    assert len(grpc) == 1 and len(protobuf) == 1, f"authz_service/_proto mixes generators: {grpc} {protobuf}"
    runtime = requirements(PROJECT["project"]["dependencies"])
    assert str(runtime["grpcio"].specifier) == f">={grpc.pop()}"
    assert str(runtime["protobuf"].specifier) == f">={protobuf.pop()}"
    tools = requirements([r for r in PROJECT["dependency-groups"]["test"] if isinstance(r, str)])
    assert str(tools["grpcio-tools"].specifier) == str(runtime["grpcio"].specifier).replace(">=", "==")


def test_the_image_lock_satisfies_pyproject() -> None:
    locked = pins(IMAGE_LOCK)
    wanted = [*PROJECT["project"]["dependencies"], *PROJECT["project"]["optional-dependencies"]["tracing"]]
    for requirement in map(Requirement, wanted):
        if requirement.marker is not None and not requirement.marker.evaluate({"sys_platform": "linux"}):
            continue
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in {IMAGE_LOCK.name}: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{IMAGE_LOCK.name} pins {name}=={locked[name]}, outside {requirement}: run `make lock`")
    build = requirements(PROJECT["build-system"]["requires"])
    assert {name: r.specifier.contains(pins(BUILD_LOCK)[name]) for name, r in build.items()} == dict.fromkeys(build, True)


def test_every_pin_carries_hashes() -> None:
    for lock in (IMAGE_LOCK, BUILD_LOCK):
        blocks = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text().split("\n", 2)[2])
        for block in blocks:
            assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), f"{lock.name}: no hash for {block.split()[0]}"


def test_the_sbom_lists_every_locked_package_with_its_hashes(tmp_path: Path) -> None:
    out = tmp_path / "sbom.cdx.json"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "deps.py"), "sbom", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    bom = json.loads(out.read_text())
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    root = bom["metadata"]["component"]
    assert (root["name"], root["version"], root["type"]) == ("authz-service", authz_service.__version__, "application")
    components = {canonicalize_name(c["name"]): c for c in bom["components"]}
    assert set(components) == set(pins(IMAGE_LOCK))
    lock_text = IMAGE_LOCK.read_text()
    for name, version in pins(IMAGE_LOCK).items():
        component = components[name]
        assert component["version"] == version and component["purl"].lower().startswith(f"pkg:pypi/{name}@{version}")
        hashes = {h["content"] for ref in component["externalReferences"] for h in ref.get("hashes", ())
                  if h["alg"] == "SHA-256"}
        assert hashes and all(f"--hash=sha256:{h}" in lock_text for h in hashes), name


# Anything telling users to install the package from a package index: nothing is published there.
# (A built wheel's file name, authz_service-<version>-...whl, is a way that exists.)
INDEX_INSTALL = re.compile(r"pip install\s+['\"]?authz[-_]service(?![-\w.])", re.IGNORECASE)


def test_no_text_tells_users_to_install_a_package_that_is_not_published() -> None:
    places = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Dockerfile", *(ROOT / "docs").rglob("*.md"),
              *(ROOT / "deploy").rglob("*.*"), *(ROOT / "authz_service").rglob("*.py")]
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in places if path.suffix in {"", ".md", ".py", ".yaml", ".yml", ".json"}
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if INDEX_INSTALL.search(line)]
    assert not found, ("install instructions for a package no index publishes; say `pip install '.[extra]'` in "
                       "a clone, a built wheel, or the image:\n" + "\n".join(found))
