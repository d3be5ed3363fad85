"""Release hygiene: the license, one version, the changelog's shape."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import authz_service

from .test_cli import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_license_is_the_full_apache_2_text_and_pyproject_names_it() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty or Additional Liability" in text
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert importlib.metadata.metadata("authz-service")["License-Expression"] == "Apache-2.0"


def test_the_version_has_one_source() -> None:
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "authz_service.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", authz_service.__version__)
    assert importlib.metadata.version("authz-service") == authz_service.__version__


def test_version_flag_prints_the_package_version() -> None:
    run = cli("--version")
    assert run.returncode == 0 and run.stdout == f"authz-service {authz_service.__version__}\n"


def test_the_changelog_keeps_a_changelog_and_speaks_to_users() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n") and "https://keepachangelog.com/en/1.1.0/" in text
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings[0] == "[Unreleased]"
    sections = set(re.findall(r"^### (.+)$", text, re.MULTILINE))
    assert sections <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    # No internal references: issue or ticket numbers, or our process.
    assert not re.search(r"(?<![\w&])#\d+\b|\b(issue|ticket)\s*#?\d+|\bhelpers?\b", text, re.IGNORECASE)
