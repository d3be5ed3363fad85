"""The dependency files derived from pyproject.toml: written and checked with uv, turned into an SBOM.

* ``requirements/image.txt``: what the image installs (the package's dependencies and its tracing
  extra), every version pinned with the sha256 of every file PyPI publishes for it, so the
  Dockerfile's ``pip install --require-hashes`` takes nothing else. Resolved for the image: Linux
  with Debian bookworm's glibc (2.36), CPython 3.11, wheels only (nothing is compiled); ``check``
  proves the same pins resolve for x86_64 and aarch64.
* ``requirements/build.txt``: the build backend ([build-system] requires), pinned and hashed the same
  way; the image's builder stage builds the project's wheel with it.
* the floors: a constraints file pinning every direct dependency (the package's and its extras') at
  the floor pyproject.toml declares, written once uv's lowest-direct resolution proves they install
  together at exactly those versions (``make floors`` installs it and runs the unit tests on it).
* the SBOM: CycloneDX JSON of the image's lock file, by CycloneDX's own cyclonedx-py.

uv keeps the pins of an existing output file when it still satisfies pyproject.toml, so ``check``
re-resolves against the checked-in files and differs only when pyproject.toml changed, never
because PyPI has a newer release.

Usage (``make lock``, ``make lock-upgrade``, ``make lock-check``, ``make floors``, ``make sbom``):
    python tools/deps.py lock [--upgrade]
    python tools/deps.py check
    python tools/deps.py floors OUT            (the constraints file)
    python tools/deps.py installed CONSTRAINTS (run by the floors venv's python)
    python tools/deps.py sbom OUT
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
IMAGE_LOCK = ROOT / "requirements" / "image.txt"
BUILD_LOCK = ROOT / "requirements" / "build.txt"
IMAGE_EXTRAS = ("tracing",)
PYTHON_VERSION = "3.11"  # the image's Python (the Dockerfile's base)
PLATFORM = "x86_64-manylinux_2_36"  # Debian bookworm: glibc 2.36
OTHER_PLATFORMS = ("aarch64-manylinux_2_36",)
REFRESH = "make lock"


def uv() -> str:
    """The uv next to this interpreter (the venv's, pinned in pyproject.toml), else the one on PATH."""
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise SystemExit("deps: no uv; run `make venv` (the test dependency group installs it)")
    return found


def run(args: list[str], *, stdin: str | None = None) -> None:
    result = subprocess.run(args, cwd=ROOT, input=stdin, text=True, capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"deps: {' '.join(args)} failed:\n{result.stdout}{result.stderr}")


def compile_lock(lock: Path, out: Path, platform: str = PLATFORM, *, upgrade: bool = False) -> None:
    """Resolve ``lock``'s inputs into ``out`` (an existing ``out`` lends its pins as preferences)."""
    args = [uv(), "pip", "compile", "--quiet", "--python-version", PYTHON_VERSION, "--python-platform", platform,
            "--only-binary", ":all:", "--generate-hashes", "--custom-compile-command", REFRESH, "-o", str(out)]
    if upgrade:
        args.append("--upgrade")
    if lock == IMAGE_LOCK:
        run([*args, *(f"--extra={extra}" for extra in IMAGE_EXTRAS), "pyproject.toml"])
    else:
        build_requires = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
        run([*args, "-"], stdin="\n".join(build_requires) + "\n")


def pins(text: str) -> list[str]:
    """The ``name==version`` lines of a lock file, without hashes and comments."""
    return [line.rstrip(" \\") for line in text.splitlines()
            if line and not line[0].isspace() and not line.startswith("#")]


def pin_versions(text: str) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in (pin.split("==", 1) for pin in pins(text))}


def lock(upgrade: bool) -> int:
    IMAGE_LOCK.parent.mkdir(exist_ok=True)
    for path in (IMAGE_LOCK, BUILD_LOCK):
        compile_lock(path, path, upgrade=upgrade)
        print(f"deps: wrote {path.relative_to(ROOT)} ({len(pins(path.read_text()))} pins)")
    return check()


def check() -> int:
    """0 when both lock files are what ``make lock`` writes now, for every platform; 1 with a diff."""
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in (IMAGE_LOCK, BUILD_LOCK):
            name = path.relative_to(ROOT)
            if not path.exists():
                print(f"deps: {name} is missing; run `{REFRESH}`")
                failed.append(name)
                continue
            current = path.read_text()
            for platform in (PLATFORM, *OTHER_PLATFORMS):
                fresh = Path(tmp) / f"{path.name}.{platform}"
                fresh.write_text(current)
                compile_lock(path, fresh, platform)
                if pins(fresh.read_text()) != pins(current):
                    failed.append(name)
                    diff = difflib.unified_diff(pins(current), pins(fresh.read_text()), str(name),
                                                f"resolved now for {platform}", lineterm="")
                    print(f"deps: {name} does not match pyproject.toml for {platform}; run `{REFRESH}` and "
                          "commit it:\n" + "\n".join(diff))
                elif platform == PLATFORM and fresh.read_text() != current:
                    print(f"deps: note: PyPI lists files for {name}'s pins that it does not hash (new uploads "
                          f"of the same versions); `{REFRESH}` adds them")
            if name not in failed:
                print(f"deps: {name} matches pyproject.toml ({PLATFORM}, {', '.join(OTHER_PLATFORMS)})")
    return 1 if failed else 0


def declared_floors() -> dict[str, Requirement]:
    """Every direct dependency (the package's and its extras') that applies on this machine."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    applicable = (Requirement(text) for text in declared)
    return {canonicalize_name(r.name): r for r in applicable if r.marker is None or r.marker.evaluate()}


def floor_of(requirement: Requirement) -> Version | None:
    lower = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return max(lower) if lower else None


def floors(out: Path) -> int:
    """Write ``out``: a constraints file pinning every direct dependency at its declared floor, once
    uv's lowest-direct resolution proves the floors install together (as wheels) at exactly those
    versions; 1 (and no file) when one lands above its floor."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        resolution = Path(tmp) / "lowest-direct.txt"
        run([uv(), "pip", "compile", "--quiet", "--python", sys.executable, "--all-extras", "--resolution",
             "lowest-direct", "--only-binary", ":all:", "--no-header", "--no-annotate", "-o", str(resolution),
             "pyproject.toml"])
        resolved = pin_versions(resolution.read_text())
    problems = []
    for name, requirement in sorted(declared_floors().items()):
        floor = floor_of(requirement)
        if floor is None:
            problems.append(f"{requirement}: no floor (declare the lowest version that works, e.g. >=X.Y)")
        elif Version(resolved[name]) != floor:
            problems.append(f"{requirement}: the lowest version installable (as a wheel, together with the "
                            f"other floors) is {resolved[name]}; raise the floor in pyproject.toml")
    for problem in problems:
        print(f"deps: floor not true: {problem}")
    if problems:
        return 1
    pinned = [f"{name}=={floor_of(requirement)}" for name, requirement in sorted(declared_floors().items())]
    out.write_text("# Every direct dependency at its declared floor (tools/deps.py floors, from pyproject.toml).\n"
                   + "\n".join(pinned) + "\n")
    print(f"deps: every direct dependency resolves at its declared floor; constraints in {out}")
    return 0


def installed(constraints: Path) -> int:
    """0 when this interpreter's environment holds every direct dependency at its floor (as pinned in
    ``constraints``): the floors job runs the tests on what it claims to."""
    from importlib import metadata

    wanted = pin_versions(constraints.read_text())
    have = {name: metadata.version(name) for name in declared_floors()}
    wrong = [f"{name} {have[name]} (floor {wanted[name]})" for name in sorted(have)
             if Version(have[name]) != Version(wanted[name])]
    if wrong:
        print(f"deps: not at the floors: {', '.join(wrong)}")
        return 1
    print("deps: installed at the floors: " + ", ".join(f"{name} {have[name]}" for name in sorted(have)))
    return 0


def package_version() -> str:
    """authz_service.__version__, read as setuptools reads it (the source, not an installed copy)."""
    found = re.search(r'^__version__ = "([^"]+)"', (ROOT / "authz_service" / "__init__.py").read_text(), re.MULTILINE)
    assert found, "authz_service/__init__.py has no __version__"
    return found[1]


def sbom(out: Path) -> int:
    """CycloneDX 1.6 JSON of the image's lock (components with versions, purls and hashes), validated."""
    cyclonedx = shutil.which("cyclonedx-py", path=str(Path(sys.executable).parent)) or shutil.which("cyclonedx-py")
    if cyclonedx is None:
        raise SystemExit("deps: no cyclonedx-py; run `make venv` (the test dependency group installs it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    run([cyclonedx, "requirements", "--pyproject", "pyproject.toml", "--mc-type", "application", "--sv", "1.6",
         "--of", "JSON", "--output-reproducible", "--validate", "-o", str(out), str(IMAGE_LOCK.relative_to(ROOT))])
    # The version is dynamic in pyproject.toml (authz_service.__version__), which cyclonedx-py cannot read.
    bom = json.loads(out.read_text())
    bom["metadata"]["component"]["version"] = package_version()
    out.write_text(json.dumps(bom, indent=2) + "\n")
    print(f"deps: wrote {out} from {IMAGE_LOCK.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    lock_parser = commands.add_parser("lock", help="write requirements/image.txt and requirements/build.txt")
    lock_parser.add_argument("--upgrade", action="store_true", help="the newest versions pyproject.toml allows")
    commands.add_parser("check", help="exit 1 when a lock file does not match pyproject.toml")
    commands.add_parser("floors", help="constraints at the declared floors, checked").add_argument("out", type=Path)
    commands.add_parser("installed", help="exit 1 unless this environment is at the floors").add_argument(
        "constraints", type=Path)
    commands.add_parser("sbom", help="CycloneDX JSON from requirements/image.txt").add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "lock":
        return lock(args.upgrade)
    if args.command == "check":
        return check()
    if args.command == "floors":
        return floors(args.out.resolve())
    if args.command == "installed":
        return installed(args.constraints)
    return sbom(args.out.resolve())


if __name__ == "__main__":
    sys.exit(main())
