"""Type and bounds checks of single config values, with the words the error messages use."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union


def describe_value(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string",
             list: "list", dict: "object", type(None): "null"}
    return f"{json.dumps(value)} ({names.get(type(value), type(value).__name__)})"


def expected_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(expected_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {expected_type(typing.get_args(tp)[0])}" if typing.get_args(tp) else "a list"
    if origin is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null", dict: "an object", list: "a list"}.get(tp, str(tp))


def matches_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(matches_type(value, a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(matches_type(v, inner) for v in value)
    if origin is dict:
        _, inner = typing.get_args(tp) or (str, Any)
        return isinstance(value, dict) and all(matches_type(v, inner) for v in value.values())
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(value, tp)


def non_finite(value: Any) -> bool:
    """Whether `value` holds NaN or an infinity anywhere (JSON's NaN/Infinity, or --set ...=NaN)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    return False


def dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def bound_text(bound: float) -> str:
    """A bound as users write it: integers in full (2**32 as 4294967296), other numbers short."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def bounds_text(meta: Mapping[str, Any]) -> str:
    """A field's bounds as the error messages and the configuration reference word them (">= 0 and <= 1"), or ""."""
    parts = []
    if meta.get("lo") is not None:
        parts.append(f"{'>' if meta.get('lo_open') else '>='} {bound_text(meta['lo'])}")
    if meta.get("hi") is not None:
        parts.append(f"{'<' if meta.get('hi_open') else '<='} {bound_text(meta['hi'])}")
    return " and ".join(parts)


def bounds_error(key: str, value: Any, meta: Mapping[str, Any]) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    lo, hi = meta.get("lo"), meta.get("hi")
    too_low = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    too_high = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if not (too_low or too_high):
        return None
    return f"{key}: {json.dumps(value)} is out of range; allowed: {bounds_text(meta)}"


def did_you_mean(value: str, choices: list[str], prefix: str = "") -> str:
    """"; did you mean 'X'?" for the closest of `choices` (prefixed), or "" when none is close."""
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def literal_choices(tp: Any) -> list[str]:
    """The string choices of a Literal type (also inside an Optional), for "did you mean"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return [a for a in typing.get_args(tp) if isinstance(a, str)]
    if origin in (Union, types.UnionType):
        return [c for a in typing.get_args(tp) for c in literal_choices(a)]
    return []


def type_error(key: str, value: Any, tp: Any) -> str:
    """"key: expected ..., got ..." with a did-you-mean for a misspelt choice."""
    hint = did_you_mean(value, literal_choices(tp)) if isinstance(value, str) else ""
    return f"{key}: expected {expected_type(tp)}, got {describe_value(value)}{hint}"
