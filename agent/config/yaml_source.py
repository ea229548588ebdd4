"""Read YAML into plain Python data while remembering the line of every key.

PyYAML's ``safe_load`` forgets where values came from and silently keeps the last of two
duplicate keys. Config errors must name the file and line, and a duplicate key is almost
always an editing mistake, so this module walks the composed node tree itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]


@dataclass
class YamlDocument:
    """Parsed YAML data plus the 1-based line of every key path and the duplicates found."""

    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)
    duplicates: list[tuple[KeyPath, int, int]] = field(default_factory=list)

    def line_of(self, path: KeyPath) -> int:
        """Line of ``path``, or of its deepest ancestor that exists in the file (1 if none)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return 1


class YamlSyntaxError(ValueError):
    """The text is not valid YAML; ``line`` and ``column`` are 1-based."""

    def __init__(self, message: str, line: int, column: int = 1) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


# An unquoted topic template such as vad/{1} or {device_id}/x: YAML reads the braces as a
# flow mapping, the most common way an edge-agent config stops parsing.
# A topic template such as machines/{1}/anomaly: placeholders may repeat, a lone "}" (the end
# of the flow mapping around it) is not part of it.
_UNQUOTED_TEMPLATE = re.compile(r"""(?<![\w"'/{])([\w./+#$-]*\{\w+\}(?:[\w./+#$-]|\{\w+\})*)""")
_KEY_WITH_VALUE = re.compile(r"^(?P<indent> *)(?:- )?(?P<key>[^\s:#][^:#]*?):[ \t]+[^\s#]")


def parse_yaml(text: str) -> YamlDocument:
    """Parse one YAML document, recording key lines and duplicate keys.

    Raises ``YamlSyntaxError`` for text that is not YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        doc = YamlDocument(data=None)
        if root is not None:
            doc.lines[()] = root.start_mark.line + 1
            doc.data = _construct(loader, root, (), doc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        column = mark.column + 1 if mark is not None else 1
        problem = exc.problem or str(exc)
        hint = _hint(text.splitlines(), line, problem)
        raise YamlSyntaxError(
            f"invalid YAML at column {column}: {problem}" + (f" ({hint})" if hint else ""),
            line,
            column,
        ) from exc
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"invalid YAML: {exc}", 1) from exc
    finally:
        loader.dispose()
    return doc


def _hint(lines: list[str], line: int, problem: str) -> str:
    """A fix for the mistakes that account for most broken configs, or "": ``line`` (from 1)
    is where PyYAML found ``problem``."""
    source_line = lines[line - 1] if 0 < line <= len(lines) else ""
    if source_line[: len(source_line) - len(source_line.lstrip())].count("\t"):
        return "YAML indents with spaces, not tabs"
    unquoted = _UNQUOTED_TEMPLATE.search(_without_quoted(source_line))
    if unquoted:
        return f'braces start a YAML mapping: quote the topic, "{unquoted.group(1)}"'
    if "mapping values are not allowed" in problem:
        return _indentation_hint(lines, line) or (
            "a value that holds ': ' must be quoted, e.g. name: \"a: b\""
        )
    if "expected <block end>" in problem:
        return (
            "this line's indentation matches no key above it: line it up with the other "
            "keys of its section; YAML nests by indentation, two spaces a level"
        )
    return ""


def _indentation_hint(lines: list[str], line: int) -> str:
    """When ``line`` is indented under a key that already has a value (``host: x`` then
    ``  port: 1``), say so with both lines."""
    current = lines[line - 1] if 0 < line <= len(lines) else ""
    indent = len(current) - len(current.lstrip(" "))
    for number in range(line - 1, 0, -1):
        above = lines[number - 1]
        if not above.strip() or above.lstrip().startswith("#"):
            continue
        found = _KEY_WITH_VALUE.match(_without_quoted(above))
        if found is not None and indent > len(found.group("indent")):
            return (
                f"this line is indented deeper than {found.group('key').strip()!r} on line "
                f"{number}, which already has a value: give it the same indentation as the "
                "keys beside it"
            )
        return ""
    return ""


def _without_quoted(source_line: str) -> str:
    """``source_line`` with quoted strings blanked out, so only unquoted text is searched."""
    return re.sub(r""""[^"]*"|'[^']*'""", lambda m: " " * len(m.group(0)), source_line)


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath, doc: YamlDocument) -> Any:
    if isinstance(node, yaml.MappingNode):
        explicit_keys = {id(key) for key, _ in node.value if key.value != "<<"}
        loader.flatten_mapping(node)  # resolves YAML merge keys ("<<: *defaults")
        result: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                key = str(key)
            line = key_node.start_mark.line + 1
            child: KeyPath = (*path, key if isinstance(key, str | int) else str(key))
            if key in result and id(key_node) in explicit_keys and first_line.get(key, 0) > 0:
                doc.duplicates.append((child, first_line[key], line))
            # Merged keys are recorded with a negative marker so a later explicit key may override
            # them (that is what merge keys are for) without being reported as a duplicate.
            first_line[key] = line if id(key_node) in explicit_keys else -line
            doc.lines[child] = line
            result[key] = _construct(loader, value_node, child, doc)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            child = (*path, index)
            doc.lines[child] = item.start_mark.line + 1
            items.append(_construct(loader, item, child, doc))
        return items
    return loader.construct_object(node, deep=True)
