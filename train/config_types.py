"""Typed training configs: every field of a config dataclass is checked against its annotation when the
config is built, from a JSON/YAML file or from `section.key=value` overrides, so that
`loop.learning_rate=fast` fails at once, naming the key and the type it wants, instead of as a TypeError
deep in the optimizer or a string compared to a number at step 1.

    @dataclass
    class DataSection:
        max_seconds: float | None = 30.0
        def __post_init__(self):
            check_field_types(self, "data")     # ValueError: data.max_seconds must be a number or null, got 'abc'

Supported annotations: int, float, str, bool, None, `X | None` (and other unions), Literal[...],
tuple[X, ...], tuple[X, Y], list[X], Any and nested dataclasses (checked by their own __post_init__).
A JSON integer is accepted for a float field (and stored as float); a float with no fraction (1e3) for an
int field; a bool is never taken for a number, nor a number for a bool.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union

_MISSING = object()


class ConfigTypeError(ValueError):
    """A config value of the wrong type; the message names the key and the expected type."""


def check_field_types(instance: Any, section: str) -> None:
    """Check (and normalise: int -> float, list -> tuple) every init field of a dataclass instance in place."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        if not field.init:
            continue
        value = getattr(instance, field.name)
        converted = convert(value, hints[field.name])
        if converted is _MISSING:
            raise ConfigTypeError(f"{section}.{field.name} must be {describe(hints[field.name])}, "
                                  f"got {value!r} ({_json_kind(value)})")
        setattr(instance, field.name, converted)


def parse_override_value(raw: str, annotation: Any) -> Any:
    """The value of a `key=raw` override for a field of this type: JSON (numbers, true, null, lists) when
    that fits the field, else the raw text where the field takes a string (so `model.conv_kernel_sizes=5`
    stays the string "5"); anything else is returned as parsed and refused by check_field_types."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    if convert(value, annotation) is _MISSING and convert(raw, annotation) is not _MISSING:
        return raw
    return value


def field_annotation(cls: type, name: str) -> Any:
    """The resolved annotation of a dataclass field, or Any when the class has no such field."""
    return typing.get_type_hints(cls).get(name, Any)


def convert(value: Any, annotation: Any) -> Any:
    """`value` as the annotation's type, or _MISSING when it is not one."""
    if annotation is Any:
        return value
    if annotation is None or annotation is type(None):
        return None if value is None else _MISSING
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else _MISSING
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        for option in args:
            converted = convert(value, option)
            if converted is not _MISSING:
                return converted
        return _MISSING
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _MISSING
    if origin in (tuple, list):
        return _convert_sequence(value, origin, args)
    return _convert_scalar(value, annotation)


def _convert_scalar(value: Any, annotation: Any) -> Any:
    if annotation is bool:
        return value if isinstance(value, bool) else _MISSING
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if annotation is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISSING
    if annotation is str:
        return value if isinstance(value, str) else _MISSING
    raise TypeError(f"config_types cannot check fields annotated {annotation!r}")


def _convert_sequence(value: Any, origin: type, args: tuple) -> Any:
    if not isinstance(value, (list, tuple)):
        return _MISSING
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            return _MISSING
        items = [convert(v, a) for v, a in zip(value, args)]
    else:
        item_type = args[0] if args else Any
        items = [convert(v, item_type) for v in value]
    if any(item is _MISSING for item in items):
        return _MISSING
    return origin(items)


def describe(annotation: Any) -> str:
    """The expected type in words, for error messages."""
    if annotation is None or annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
        return f"a list of {_plural(describe(args[0]) if args else 'values')}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plural(description: str) -> str:
    for article in ("an ", "a "):
        if description.startswith(article):
            return description[len(article):] + "s"
    return description


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)
