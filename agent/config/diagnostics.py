"""Turning pydantic errors into located, readable problems.

pydantic reports a location as a tuple of keys and a message written for programmers
(``Input should be a valid integer``). The user edited a YAML file: each problem must name
the file, the line and the dotted key, say what was expected and what was found, and suggest
the key they probably meant. Knows the schema only through the model class it is handed, so
the schema can use ``did_you_mean`` without an import cycle.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ValidationError

from agent.config.yaml_source import KeyPath, YamlDocument
from agent.errors import ConfigProblem


def problems_from_pydantic(
    exc: ValidationError, doc: YamlDocument, file: str, root: type[BaseModel]
) -> list[ConfigProblem]:
    """One located problem per error in ``exc``, raised validating ``doc`` against ``root``."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(part for part in error["loc"] if part != "[key]")
        path: KeyPath = tuple(part for part in loc if isinstance(part, str | int))
        kind = error["type"]
        if kind == "extra_forbidden":
            key = str(path[-1])
            known = _fields_at(root, path[:-1])
            message = f"unknown key {key!r}{did_you_mean(key, known)}"
            if key == "password" and "password_file" in known:
                message = (
                    "a password is not accepted in the config file: put it in a file "
                    "readable only by the agent and set 'password_file' to its path"
                )
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("tuple_type", "list_type"):
            message = f"expected a list, got {_describe(error.get('input'))}"
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            message = f"expected a mapping of keys to values, got {_describe(error.get('input'))}"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            value = error.get("input")
            if kind != "value_error" and not isinstance(value, dict | list):
                message += f" (got {_describe(value)})"
        if "[key]" in error["loc"]:
            message = f"invalid key: {message}"
        problems.append(ConfigProblem(file, doc.line_of(path), dotted(path), message))
    return problems


def did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    """``", did you mean 'X'?"`` for the closest of ``candidates``, or ``""`` if none is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f", did you mean {matches[0]!r}?" if matches else ""


def dotted(path: KeyPath) -> str:
    """A key path as the user reads it: ``pipelines.p.input`` or ``updates.trusted_keys[0]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _fields_at(root: type[BaseModel], path: KeyPath) -> list[str]:
    """Names of the keys allowed at ``path`` (for "did you mean"), following the schema."""
    current: Any = root
    for part in path:
        current = _child_type(current, part)
        if current is None:
            return []
    if _is_model(current):
        return list(current.model_fields)
    return []


def _is_model(tp: Any) -> bool:
    # On Python 3.10 isinstance(Mapping[str, X], type) is True; issubclass would then raise.
    return isinstance(tp, type) and typing.get_origin(tp) is None and issubclass(tp, BaseModel)


def _child_type(tp: Any, part: str | int) -> Any:
    if _is_model(tp):
        field = tp.model_fields.get(str(part))
        return _unwrap(field.annotation) if field is not None else None
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping, typing.Mapping):
        return _unwrap(typing.get_args(tp)[1])
    if origin in (tuple, list):
        return _unwrap(typing.get_args(tp)[0])
    return None


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional to reach the model or container type underneath."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            structured = [a for a in args if typing.get_origin(_unwrap(a)) is not Literal]
            tp = structured[0] if structured else args[0]
        else:
            return tp
