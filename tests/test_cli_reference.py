"""docs/cli.md is what tools/cli_reference.py generates from the CLI's parser and option table."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

from authz_service.config import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "cli_reference.py"
REFERENCE = ROOT / "docs" / "cli.md"
FIX = "Regenerate it: .venv/bin/python tools/cli_reference.py (and commit docs/cli.md)."


def test_the_cli_reference_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "cli.md"
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    fresh, committed = out.read_text(), REFERENCE.read_text()
    diff = "".join(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True), "docs/cli.md (committed)",
                                        "docs/cli.md (generated)", n=1))
    assert fresh == committed, f"docs/cli.md is stale. {FIX}\n{diff[:4000]}"


def test_the_reference_lists_every_serve_setting_with_its_environment_variable() -> None:
    text = REFERENCE.read_text()
    for option in OPTIONS:
        assert f"| `{option.flag} " in text and f"`{option.env}`" in text, option.name
