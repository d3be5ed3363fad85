"""The commands the documentation shows, run, and their output compared with what it shows.

The conventions (docs/testing.md, "Commands in the documentation"):

* A fenced ``console`` block is run: each line starting with ``$ `` is a command (a line ending in
  ``\\`` continues it), the lines up to the next command are its documented output (standard
  output and standard error as a terminal shows them). Trailing spaces and trailing empty lines
  do not count. Placeholders stand for what differs between runs: a line ``...`` for any number
  of lines, and ``<HASH>``, ``<NUMBER>``, ``<PORT>``, ``<TIME>``, ``<TEXT>`` within a line.
* ``<!-- file: NAME -->`` on the line before a fenced block writes the block into NAME, for the
  commands of that page that follow it.
* ``<!-- not run: REASON -->`` on the line before a fenced block says why the commands it shows
  are not run (they need a running stack, AWS, a cluster, ...); the walkthrough's
  ``<!-- walkthrough:test STAGE -->`` blocks are run by tests/e2e/test_walkthrough_e2e.py. Every
  other block that shows an ``authz-service`` command must be a ``console`` block.

Each page's commands run in order, with ``bash``, in a scratch directory of the page's own in which
the repository's top-level files and folders appear (symbolic links), so ``authz_service/examples/
policy.yaml`` resolves and a file a command writes stays in the scratch directory; the
environment is the test run's without ``AUTHZ_*`` and ``OTEL_*`` variables, with ``authz-service``
the checkout's own.

    python -m tests.doccommands [--update] [PAGE ...]   # check (or rewrite) the pages' console blocks
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/**/*.md", "deploy/**/*.md")
# Pages the documentation test does not read, and why.
NOT_READ = {"docs/cli.md": "generated from the CLI's parser; tests/test_cli_reference.py keeps it in step"}
PLACEHOLDERS = {
    "<HASH>": r"[0-9a-f]{8,}",
    "<NUMBER>": r"-?\d+(?:\.\d+)?",
    "<PORT>": r"\d{1,5}",
    "<TIME>": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z?",
    "<TEXT>": r".*?",
}
ANY_LINES = "..."
SHELL_BLOCKS = ("", "sh", "bash", "shell", "text", "console")  # where a command may be shown
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
# The comment on the line before a block: "not run: REASON", "file: NAME", or the walkthrough's own
# "walkthrough:test STAGE" (tests/e2e/test_walkthrough_e2e.py runs those blocks against moto's Cognito).
MARKER = re.compile(r"<!--\s*(?P<kind>not run:|file:|walkthrough:test)\s*(?P<value>.*?)\s*-->\s*$")
TIMEOUT = 60  # seconds a documented command may take


@dataclass
class Command:
    text: str  # as shown, continuation lines joined
    line: int  # where the command starts in the page (1-based)
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    page: str  # relative to the repository
    line: int  # the opening fence's line (1-based)
    lang: str
    body: str
    marker: tuple[str, str] | None  # ("not run", reason) or ("file", name)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def commands(self) -> list[Command]:
        """A console block's commands with their documented output."""
        commands: list[Command] = []
        lines = self.body.splitlines()
        i = 0
        while i < len(lines):
            text = lines[i]
            if text.startswith("$ "):
                start = i
                command = text[2:]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command += "\n" + lines[i]  # bash reads the backslash-newline as one line
                commands.append(Command(command, self.line + 1 + start))
            elif commands:
                commands[-1].expected.append(text)
            else:
                raise ValueError(f"{self.where}: a console block starts with a command line ('$ ...')")
            i += 1
        return commands


def pages() -> list[str]:
    found = {str(p.relative_to(ROOT)) for pattern in PAGES for p in ROOT.glob(pattern)}
    return sorted(found - set(NOT_READ))


def blocks(page: str, text: str | None = None) -> Iterator[Block]:
    """The fenced blocks of ``page`` (its text read from the repository unless given)."""
    if text is None:
        text = (ROOT / page).read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found = MARKER.search(before)
        indent = match["indent"]
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line
                         for line in match["body"].split("\n"))
        yield Block(page, text.count("\n", 0, match.start()) + 1, match["lang"], body,
                    (found["kind"].rstrip(":"), found["value"]) if found else None)


def command_pattern() -> re.Pattern[str]:
    """``authz-service <command>`` for every command of the CLI, wherever it stands on a line."""
    from authz_service.cli import build_parser

    names = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return re.compile(rf"(?<![\w/.-])authz-service (?:{'|'.join(map(re.escape, names))})\b")


def unmarked_commands(page: str, text: str | None = None) -> list[str]:
    """Blocks that show an authz-service command but are neither run nor marked as not run."""
    command = command_pattern()
    found = []
    for block in blocks(page, text):
        if block.lang == "console" or block.marker is not None or block.lang not in SHELL_BLOCKS:
            continue
        shown = next((line.strip() for line in block.body.splitlines() if command.search(line)), None)
        if shown is not None:
            found.append(f"{block.where}: a {block.lang or 'plain'} block shows `{shown}`")
    return found


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` lines are ``expected`` with its placeholders filled in."""
    pattern = "".join(r"(?:.*\n)*?" if line == ANY_LINES else _line_pattern(line) + r"\n" for line in expected)
    return re.fullmatch(pattern, "".join(line + "\n" for line in actual)) is not None


def _line_pattern(line: str) -> str:
    parts = re.split("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")", line)
    return "".join(PLACEHOLDERS.get(part, re.escape(part)) for part in parts)


def _trimmed(lines: list[str]) -> list[str]:
    out = [line.rstrip() for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHZ_", "OTEL_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(PYTHONUNBUFFERED="1", COLUMNS="100", LC_ALL="C.UTF-8")
    return env


def scratch(directory: Path) -> Path:
    """``directory`` (made if need be) with the repository's top-level entries linked into it."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if not entry.name.startswith(".") and not (directory / entry.name).exists():
            (directory / entry.name).symlink_to(entry)
    return directory


@dataclass
class Drift:
    block: Block
    command: Command
    actual: list[str]

    def report(self) -> str:
        expected = _trimmed(self.command.expected)
        diff = "\n".join(difflib.unified_diff(expected, self.actual, "documented", "actual", lineterm=""))
        how = ("rewrite it with `python -m tests.doccommands --update " + self.block.page + "`"
               if not any(p in "\n".join(expected) for p in (*PLACEHOLDERS, ANY_LINES))
               else "its documented output has placeholders: edit it by hand, keeping them where values vary")
        return (f"{self.block.page}:{self.command.line}: `$ {self.command.text}` (the console block at line "
                f"{self.block.line}) printed something else; {how}.\n{diff}")


def run_page(page: str, directory: Path, text: str | None = None) -> list[Drift]:
    """Run every console block of ``page`` (or of ``text``, as that page) in ``directory``; the
    commands whose output drifted."""
    scratch(directory)
    env = environment()
    drifts = []
    for block in blocks(page, text):
        if block.marker is not None and block.marker[0] == "file":
            (directory / block.marker[1]).write_text(block.body)
        if block.lang != "console" or (block.marker is not None and block.marker[0] != "file"):
            continue
        for command in block.commands():
            try:
                done = subprocess.run(["bash", "-c", command.text], cwd=directory, env=env, text=True,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      timeout=TIMEOUT)
                output = done.stdout
            except subprocess.TimeoutExpired as exc:
                output = (exc.stdout or b"").decode(errors="replace") + f"\n(still running after {TIMEOUT} s)"
            actual = _trimmed(output.splitlines())
            if not matches(_trimmed(command.expected), actual):
                drifts.append(Drift(block, command, actual))
    return drifts


def update(page: str, drifts: list[Drift], root: Path = ROOT) -> int:
    """Write the actual output into ``page`` (under ``root``) for drifted commands without
    placeholders; how many were rewritten."""
    lines = (root / page).read_text(encoding="utf-8").split("\n")
    done = 0
    for drift in sorted(drifts, key=lambda d: d.command.line, reverse=True):
        expected = drift.command.expected
        if any(p in "\n".join(expected) for p in (*PLACEHOLDERS, ANY_LINES)):
            continue
        first = drift.command.line - 1 + drift.command.text.count("\n") + 1  # the output's first line
        indent = re.match(r"[ \t]*", lines[drift.block.line - 1])[0]
        kept_blank = len(expected) - len(_trimmed(expected))  # blank lines before the next command stay
        lines[first:first + len(expected)] = [indent + line if line else line for line in drift.actual] + [
            ""] * kept_blank
        done += 1
    (root / page).write_text("\n".join(lines), encoding="utf-8")
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the actual output into the pages")
    parser.add_argument("page", nargs="*", help="pages to check (default: every page)")
    args = parser.parse_args()
    failed = 0
    for page in args.page or pages():
        with tempfile.TemporaryDirectory() as directory:
            drifts = run_page(page, Path(directory))
        for drift in drifts:
            print(drift.report(), end="\n\n")
        if args.update and drifts:
            print(f"{page}: {update(page, drifts)} of {len(drifts)} outputs rewritten")
        failed += len(drifts)
    return 1 if failed and not args.update else 0


if __name__ == "__main__":
    sys.exit(main())
