"""The documentation site's structure, read with MkDocs' own config and file loaders.

`make docs` (part of `make test`) builds the site strictly, which also fails on a page missing from
the nav; these tests say the same under plain pytest, naming the page and where to add it, so a
merge that adds a page to docs/ without a nav entry is noticed wherever the tests run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mkdocs.config import load_config
from mkdocs.structure.files import get_files

ROOT = Path(__file__).resolve().parents[1]
# Wording that belongs to our internal process, never to user-facing pages.
INTERNAL = re.compile(r"issue #\d|seed article", re.IGNORECASE)


def nav_pages(nav: Any) -> Iterator[str]:
    """Every page path in an mkdocs nav (nested sections of `title: page` entries)."""
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from nav_pages(value)


@pytest.fixture(scope="module")
def site() -> tuple[set[str], list[str]]:
    """(the site's pages as MkDocs sees them, exclude_docs applied; the nav's page paths)."""
    config = load_config(str(ROOT / "mkdocs.yml"))
    pages = {file.src_uri for file in get_files(config).documentation_pages()}
    return pages, list(nav_pages(config["nav"]))


def test_every_page_in_docs_is_in_the_nav(site: tuple[set[str], list[str]]) -> None:
    pages, nav = site
    missing = sorted(pages - set(nav))
    assert not missing, (
        f"pages in docs/ that mkdocs.yml's nav does not list: {missing}; add each under its section "
        "(the comments in mkdocs.yml say where the planned pages go)"
    )


def test_every_nav_entry_is_a_page_once(site: tuple[set[str], list[str]]) -> None:
    pages, nav = site
    assert not sorted(set(nav) - pages), "nav entries without a page in docs/ (the strict build fails on them)"
    assert len(nav) == len(set(nav)), f"a page is listed twice in the nav: {nav}"


def test_pages_carry_no_internal_notes() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "docs").rglob("*.md"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert not found, "user-facing pages mention our internal process:\n" + "\n".join(found)
