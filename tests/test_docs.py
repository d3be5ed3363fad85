"""The documentation: the site's structure, read with MkDocs' own config and file loaders, and the
commands the pages show, run, with their output compared to what the pages show.

`make docs` (part of `make test`) builds the site strictly, which also fails on a page missing from
the nav; these tests say the same under plain pytest, naming the page and where to add it, so a
merge that adds a page to docs/ without a nav entry is noticed wherever the tests run. The
commands follow the conventions of tests/doccommands.py (docs/testing.md, "Commands in the
documentation"), so a page cannot show a command that no longer prints what it shows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mkdocs.config import load_config
from mkdocs.structure.files import get_files

from tests import doccommands

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


# --- the commands the pages show -------------------------------------------------------------------

HOW = ("make it a ```console block (`$ command`, then its output, which the test then compares) or put "
       "`<!-- not run: REASON -->` on the line before it (docs/testing.md, \"Commands in the documentation\")")
RUN_PAGES = [page for page in doccommands.pages() if any(b.lang == "console" for b in doccommands.blocks(page))]


@pytest.mark.parametrize("page", doccommands.pages())
def test_every_command_a_page_shows_is_run_or_says_why_not(page: str) -> None:
    found = doccommands.unmarked_commands(page)
    if found:
        pytest.fail(f"{HOW}:\n" + "\n".join(found), pytrace=False)


@pytest.mark.parametrize("page", RUN_PAGES)
def test_the_commands_a_page_shows_print_what_it_shows(page: str, tmp_path: Path) -> None:
    drifts = doccommands.run_page(page, tmp_path)
    if drifts:
        pytest.fail("\n\n".join(drift.report() for drift in drifts), pytrace=False)


def test_the_documentation_runs_commands_and_reads_every_page_but_the_generated_one() -> None:
    """Guards the two tests above: they see the pages, and the pages do run commands."""
    assert {"README.md", "docs/policy.md", "docs/troubleshooting.md"} <= set(RUN_PAGES)
    assert "docs/cli.md" not in doccommands.pages() and "docs/quickstart.md" in doccommands.pages()


def test_every_block_not_run_says_why() -> None:
    silent = [b.where for page in doccommands.pages() for b in doccommands.blocks(page)
              if b.marker is not None and not b.marker[1]]
    assert not silent, f"<!-- not run: --> without a reason: {silent}"


# The conventions themselves, on pages of the test's own.
PAGE = "docs/example.md"


def test_a_block_showing_a_command_must_be_run_or_marked() -> None:
    text = ("```sh\nauthz-service validate policy.yaml\n```\n\n"
            "<!-- not run: needs a cluster -->\n```sh\nkubectl get cm x | authz-service validate -\n```\n\n"
            "```console\n$ authz-service validate policy.yaml\n```\n\n"
            "```json\n{\"msg\":\"authz-service started\"}\n```\n\n"
            "```text\nauthz-service: error: cannot bind ...\n```\n\n"
            "- a list:\n\n  ```\n  OTEL_X=1 authz-service serve --policy p.yaml\n  ```\n")
    assert doccommands.unmarked_commands(PAGE, text) == [
        "docs/example.md:1: a sh block shows `authz-service validate policy.yaml`",
        "docs/example.md:24: a plain block shows `OTEL_X=1 authz-service serve --policy p.yaml`",
    ]


@pytest.mark.parametrize(("expected", "actual", "match"), [
    (["a", "b"], ["a", "b"], True),
    (["a", "b"], ["a", "c"], False),
    (["a"], ["a", "b"], False),
    (["a", "...", "z"], ["a", "b", "c", "z"], True),
    (["a", "...", "z"], ["a", "z"], True),
    (["a", "...", "z"], ["a", "b"], False),
    (["sha256 <HASH> of <NUMBER> routes"], ["sha256 9f86d081884c7d65 of 1000 routes"], True),
    (["sha256 <HASH>"], ["sha256 not-hex"], False),
    (["listening on 127.0.0.1:<PORT> at <TIME>"], ["listening on 127.0.0.1:9191 at 2026-01-02T03:04:05.678Z"], True),
    (["error: <TEXT> (exit 2)"], ["error: anything at all (exit 2)"], True),
    (["a.b (c) [d]*"], ["a.b (c) [d]*"], True),
    (["a.b"], ["axb"], False),
])
def test_placeholders_stand_for_what_varies_and_nothing_else(expected, actual, match) -> None:
    assert doccommands.matches(expected, actual) is match


def test_a_drifted_output_names_its_line_the_diff_and_how_to_update_it(tmp_path: Path) -> None:
    text = ("# A page\n\n<!-- file: hello.txt -->\n```text\nhello\n```\n\n"
            "```console\n$ cat hello.txt\nhello\n$ printf 'one\\n' && \\\n  echo two\none\nthree\n```\n")
    drifts = doccommands.run_page(PAGE, tmp_path, text)
    assert [d.command.line for d in drifts] == [11]
    assert drifts[0].report() == (
        f"{PAGE}:11: `$ printf 'one\\n' && \\\n  echo two` (the console block at line 8) printed something "
        f"else; rewrite it with `python -m tests.doccommands --update {PAGE}`.\n"
        "--- documented\n+++ actual\n@@ -1,2 +1,2 @@\n one\n-three\n+two")
    page = tmp_path / "page" / PAGE
    page.parent.mkdir(parents=True)
    page.write_text(text)
    assert doccommands.update(PAGE, drifts, root=tmp_path / "page") == 1
    assert doccommands.run_page(PAGE, tmp_path / "again", page.read_text()) == []
    assert page.read_text() == text.replace("one\nthree\n", "one\ntwo\n")


def test_an_output_with_placeholders_is_left_to_its_author(tmp_path: Path) -> None:
    text = "```console\n$ echo 12 apples\n<NUMBER> pears\n```\n"
    (drift,) = doccommands.run_page(PAGE, tmp_path, text)
    assert "edit it by hand, keeping them where values vary" in drift.report()
    page = tmp_path / "page" / PAGE
    page.parent.mkdir(parents=True)
    page.write_text(text)
    assert doccommands.update(PAGE, [drift], root=tmp_path / "page") == 0 and page.read_text() == text


def test_commands_run_in_the_pages_scratch_folder_with_the_checkouts_cli(tmp_path: Path) -> None:
    text = ("```console\n$ authz-service --version\nauthz-service <TEXT>\n"
            "$ test -f authz_service/examples/policy.yaml && echo example found\nexample found\n"
            "$ echo \"${AUTHZ_POLICY:-unset} ${OTEL_EXPORTER_OTLP_ENDPOINT:-unset}\"\nunset unset\n```\n")
    os.environ["AUTHZ_POLICY"] = "/leaked"
    try:
        assert doccommands.run_page(PAGE, tmp_path, text) == []
    finally:
        del os.environ["AUTHZ_POLICY"]
