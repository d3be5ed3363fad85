"""Strict YAML for our two config files (policy, dev issuer).

Why not plain ``yaml.safe_load``: YAML silently keeps the last of two equal keys, so a pasted
duplicate (``scopes:`` twice) would quietly change a policy. We refuse duplicates, and every
syntax error names the file, line and column.
"""

from __future__ import annotations

from typing import Any

import yaml


class YamlError(ValueError):
    """Text that is not valid YAML; the message names the source and the place."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_strict_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the safe loader, refusing duplicate keys."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        raise YamlError(f"{source}: {where}: not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise YamlError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise YamlError(f"{source}: nested too deeply to be a configuration file") from None
