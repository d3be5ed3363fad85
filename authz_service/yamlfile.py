"""Strict YAML for our config files (policy, policy tests, dev issuer), how messages name places in
them, and ``YamlValidator``, the base of the policy's and the dev issuer's file validators.

Why not plain ``yaml.safe_load``: YAML silently keeps the last of two equal keys, so a pasted
duplicate (``scopes:`` twice) would quietly change a policy. We refuse duplicates, and every
syntax error names the file, line and column.

Why libyaml: PyYAML's own parser is pure Python, and a reload parses on a thread of the
service's process, holding the GIL against the Checks. libyaml's parser (C, in PyYAML's wheels)
reads the same text into the same nodes, with the same line and column marks, about four times
faster through this module's loader; a 1,000-route policy reloads in a third of the time, and a
Check's p99 during it drops accordingly (docs/performance.md). The mapping constructor that
refuses duplicate keys is ours on either parser. Where PyYAML was built without libyaml, its own
parser serves, with the same results.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any, ClassVar

import yaml

from .files import FileReadError, utf8_text

Where = tuple[str | int, ...]  # a place in a document, e.g. ("routes", 1, "methods", 0)


def where_text(where: Where) -> str:
    """("routes", 1, "methods", 0) -> "routes[1].methods[0]"; () -> "top level"."""
    out = ""
    for part in where:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "top level"


class YamlError(ValueError):
    """Text that is not valid YAML; the message names the source and the place."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None, problem: str = "") -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.problem = problem  # the bare parser message, for callers that format their own prefix


def _refuse_duplicate_keys(loader: yaml.constructor.SafeConstructor, node: yaml.MappingNode, deep: bool) -> None:
    """ConstructorError at the second of two equal keys, or at a key that is a list or mapping."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)


class _PythonLoader(yaml.SafeLoader):
    """PyYAML's own parser (pure Python), the safe constructor, duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _refuse_duplicate_keys(self, node, deep)
        return super().construct_mapping(node, deep=deep)


# Every parser this PyYAML has, by name: "python" always, "libyaml" when PyYAML was built with it
# (yaml.CSafeLoader exists only then). ``Loader`` is the one used: libyaml where present.
LOADERS: dict[str, type[yaml.SafeLoader] | type[yaml.CSafeLoader]] = {"python": _PythonLoader}
if getattr(yaml, "__with_libyaml__", False):

    class _LibyamlLoader(yaml.CSafeLoader):
        """libyaml's parser (C), the safe constructor, duplicate keys refused."""

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            _refuse_duplicate_keys(self, node, deep)
            return super().construct_mapping(node, deep=deep)

    LOADERS["libyaml"] = _LibyamlLoader
Loader = LOADERS.get("libyaml", _PythonLoader)


# Deeper than any configuration file nests (a policy: 5 levels; a claim value a few more). Why a
# limit: libyaml reads up to 1,000 levels (PyYAML's own parser runs out of stack near 500), and a
# value that deep makes the validators' repr() and json.dumps() run out of stack instead.
MAX_DEPTH = 64


def load_strict_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the safe loader, refusing duplicate keys and nesting deeper
    than MAX_DEPTH (an alias that contains itself counts as infinitely deep)."""
    try:
        document = yaml.load(text, Loader=Loader)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        if mark is None:
            raise YamlError(f"{source}: unknown place: not valid YAML: {exc.problem}") from None
        line, column = mark.line + 1, mark.column + 1
        raise YamlError(
            f"{place(source, line, column)}: not valid YAML: {exc.problem}", line, column, str(exc.problem)
        ) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        document = _TOO_DEEP
    if document is _TOO_DEEP or _deeper_than(document, MAX_DEPTH):
        raise YamlError(f"{source}: nested more than {MAX_DEPTH} levels deep: not a configuration file")
    return document


_TOO_DEEP = object()


def _deeper_than(document: Any, limit: int) -> bool:
    """Whether lists and mappings nest in ``document`` more than ``limit`` levels, or contain
    themselves (a YAML alias inside its own anchor: every level has it). One level at a time, each
    container once per level: an alias shared many times (a "billion laughs" file) costs nothing
    more. (Keys are never containers: ``_refuse_duplicate_keys`` refuses them.)"""
    level = [document] if isinstance(document, (list, dict)) else []
    for _ in range(limit):
        below: dict[int, list[Any] | dict[Any, Any]] = {}
        for container in level:
            for child in container.values() if isinstance(container, dict) else container:
                if isinstance(child, (list, dict)):
                    below[id(child)] = child
        if not below:
            return False
        level = list(below.values())
    return True


def compose_yaml(text: str) -> yaml.Node | None:
    """The node tree (with line/column marks) of text that ``load_strict_yaml`` already accepted."""
    try:
        return yaml.compose(text, Loader=Loader)
    except (yaml.YAMLError, RecursionError):
        return None


def locate(node: yaml.Node | None, where: tuple[str | int, ...], at_key: bool = False) -> yaml.Mark | None:
    """The start mark of the node at ``where`` (mapping keys and sequence indexes), or of the deepest
    node that exists on the way; ``at_key`` points at the last mapping key instead of its value."""
    if node is None:
        return None
    path = list(_walk(node, where, at_key))
    return path[-1].start_mark


def scalar_text(node: yaml.Node | None, where: tuple[str | int, ...]) -> str | None:
    """The text of the plain (unquoted) scalar at ``where`` as written, else None. Why: YAML 1.1
    reads ``yes``, ``on`` and ``010`` as true, true and 8, which a lint can point out."""
    if node is None:
        return None
    path = list(_walk(node, where, False))
    found = path[-1]
    # A plain scalar's style is None from PyYAML's parser, "" from libyaml's.
    if len(path) != len(where) + 1 or not isinstance(found, yaml.ScalarNode) or found.style:
        return None
    return found.value


def _walk(node: yaml.Node, where: tuple[str | int, ...], at_key: bool) -> Iterator[yaml.Node]:
    """The nodes from ``node`` down ``where``, as far as they exist."""
    yield node
    for k, part in enumerate(where):
        last = k == len(where) - 1
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            found = next(
                ((kn, vn) for kn, vn in node.value if isinstance(kn, yaml.ScalarNode) and kn.value == part), None
            )
            if found is None:
                return
            node = found[0] if (last and at_key) else found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            return
        yield node


def position(
    node: yaml.Node | None, where: tuple[str | int, ...], at_key: bool = False
) -> tuple[int | None, int | None]:
    """1-based (line, column) of the node at ``where`` (see ``locate``); (None, None) when unknown."""
    mark = locate(node, where, at_key)
    return (mark.line + 1, mark.column + 1) if mark is not None else (None, None)


def place(source: str, line: int | None, column: int | None) -> str:
    """``source:line:column`` for messages, or just ``source`` when the place is unknown."""
    return f"{source}:{line}:{column}" if line is not None else source


class Places:
    """Where things are in one YAML file, for error messages. The node tree (with line and column
    marks) is composed on the first message that needs a place: a valid file never pays for it."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.text = text

    @cached_property
    def _tree(self) -> yaml.Node | None:
        return compose_yaml(self.text)

    def position(self, where: Where, at_key: bool = False) -> tuple[int | None, int | None]:
        """1-based (line, column) of ``where`` (of its last key with ``at_key``); (None, None) when unknown."""
        if not self.text:
            return None, None
        return position(self._tree, where, at_key)

    def prefix(self, where: Where, at_key: bool = False) -> str:
        """``file:line:column: routes[1].methods`` (just ``file: ...`` when the line is unknown)."""
        line, column = self.position(where, at_key)
        return f"{place(self.source, line, column)}: {where_text(where)}"


def kind(value: object) -> str:
    """How an error message names the type of a YAML value: "got a list", "got nothing (null)"."""
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing (null)"}
    return names.get(type(value), type(value).__name__)


class YamlValidator:
    """Validation of one YAML file that knows the file (its name and text), so every error names
    ``file:line:column: place: problem``. A subclass says which error it raises (``error``) and
    checks the document's contents; decoding, YAML syntax and places are done here, once."""

    yaml_fix: ClassVar[str] = ""  # appended to a YAML syntax error's message (e.g. "; fix: ...")

    def __init__(self, source: str, text: str = "") -> None:
        self.source = source
        self.text = text
        self.places = Places(source, text)

    @classmethod
    def error(cls, message: str, where: Where = (), line: int | None = None, column: int | None = None) -> Exception:
        """The file's own error type, for ``message`` at that place."""
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, raw: bytes, source: str) -> YamlValidator:
        """A validator of ``raw``, which must be UTF-8 text (else the file's error, naming the byte)."""
        try:
            return cls(source, utf8_text(raw, source))
        except FileReadError as exc:
            raise cls.error(str(exc)) from None

    def document(self) -> Any:
        """The file's YAML document, strictly loaded (``load_strict_yaml``); the file's error, naming
        the line and column, when it is not valid YAML."""
        try:
            return load_strict_yaml(self.text, self.source)
        except YamlError as exc:
            if exc.line is None:
                raise self.error(f"{exc}{self.yaml_fix}") from None
            message = f"{place(self.source, exc.line, exc.column)}: not valid YAML: {exc.problem}{self.yaml_fix}"
            raise self.error(message, (), exc.line, exc.column) from None

    def fail(
        self, where: Where, problem: str, fix: str | None = None, *, at: Where | None = None, at_key: bool = False
    ) -> Exception:
        """The error at ``where``: ``file:line:column: place: problem[; fix: fix]``. The line is
        that of ``at`` when given (e.g. an unknown key below ``where``), of ``where``'s last
        mapping key with ``at_key``."""
        line, column = self.places.position(where if at is None else at, at_key)
        message = f"{place(self.source, line, column)}: {where_text(where)}: {problem}"
        return self.error(message if fix is None else f"{message}; fix: {fix}", where, line, column)
