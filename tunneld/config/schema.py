# -*- test-case-name: tests.test_config -*-
"""
Typed configuration tables from TOML.

A configuration section is a frozen dataclass whose fields carry their
documentation in C{metadata["doc"]}; L{parse_table} turns a TOML table into
one, refusing unknown keys and wrong types with the file, the dotted key and
the reason.  Transport plugins use it for their own sections, and the
configuration reference in C{docs/} is generated from the same dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from tunneld.errors import ConfigError

T = TypeVar("T")


def setting(default: Any, doc: str, **kwargs: Any) -> Any:
    """
    A dataclass field with a default and the documentation for it; C{...}
    as the default makes the key required.  C{check=} validates the value,
    C{each=} every item of a list value (the error then names the item's
    index); both return what is wrong, or None.
    """
    if default is ...:
        return dataclasses.field(metadata={"doc": doc, **kwargs})
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata={"doc": doc, **kwargs}
        )
    return dataclasses.field(default=default, metadata={"doc": doc, **kwargs})


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner, *_rest) = typing.get_args(tp)
        return f"a list of {_describe(inner)}"
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, where, key)
    if tp is typing.Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, key, f"expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(where, key, f"expected {_describe(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(where, key, f"expected {_describe(tp)}, got {value!r}")
        (inner, *_rest) = typing.get_args(tp)
        items = [_convert(inner, item, where, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(where, key, f"expected a table, got {value!r}")
        _k, inner = typing.get_args(tp)
        return {str(k): _convert(inner, v, where, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse_table(typing.cast(type[Any], tp), value, where, key)
    raise TypeError(f"unsupported setting type {tp!r}")


def parse_table(cls: type[T], table: Any, where: str, prefix: str = "") -> T:
    """
    Build the dataclass C{cls} from a TOML table; every error names C{where}
    (the file), the dotted key and what was wrong.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(where, prefix or "(top level)", f"expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for name, raw in table.items():
        key = f"{prefix}.{name}" if prefix else name
        field = fields.get(name)
        if field is None:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(where, key, f"unknown key (known keys here: {known})")
        value = _convert(hints[name], raw, where, key)
        check = field.metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(where, key, problem)
        each = field.metadata.get("each")
        if each is not None:
            for i, item in enumerate(value):
                problem = each(item)
                if problem:
                    raise ConfigError(where, f"{key}[{i}]", problem)
        values[name] = value
    for name, field in fields.items():
        if (
            name not in values
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        ):
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(where, key, "required key is missing")
    return cls(**values)


def positive(value: float) -> str | None:
    """A check for settings that must be greater than zero."""
    return None if value > 0 else f"must be greater than 0, got {value}"


def non_negative(value: float) -> str | None:
    """A check for settings that may be zero (meaning off) but not negative."""
    return None if value >= 0 else f"must not be negative, got {value}"


def documented_fields(cls: type[Any]) -> list[tuple[str, Any, str, str]]:
    """(name, default, type description, doc) for each field: the reference docs' source."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append((f.name, default, _describe(hints[f.name]), f.metadata.get("doc", "")))
    return out
