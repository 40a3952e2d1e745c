"""The strict JSON codec of the peer messages (DESIGN §4): dataclass <-> JSON-able dict, driven by the type hints.

Peers are authenticated, but a bug, an old version or a compromised host must still never crash an agent or slip
a wrongly typed value into the core, so decoding accepts exactly what the dataclass declares and nothing else:

* unknown fields and missing required fields are errors (a field with a default may be omitted);
* types are exact: a bool is not an int, an int is accepted where a float is declared (JSON has one number type),
  NaN and ±Infinity are refused, integers must fit in int64 (what every JSON implementation can carry exactly);
* `X | None`, `tuple[T, ...]`, fixed-arity `tuple[A, B]`, `Literal[...]` and nested message dataclasses are
  supported; anything else in a message class is a programming error (TypeError, not WireError);
* limits, so that a valid-looking body cannot make an agent do unbounded work:
  strings at most `MAX_STRING` characters, unless a per-field rule says otherwise: a dataclass field's metadata
  `{"wire_max_length": N}` wins, then `NAMED_STRING_LIMITS` by field name (e.g. PEM certificates); sequences at
  most `MAX_ITEMS` items; `MAX_DEPTH` levels of nesting. Strings must be valid Unicode (no lone surrogates,
  which could not be written out as UTF-8 later, e.g. when an ack payload is signed).

Every error is a `WireError` naming the path and the problem, e.g.
`report.node.commit: expected an integer or null, got "7"`. Encoding applies the same checks, so an agent can
never send what its peers would refuse. The module is pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_LENGTH_KEY",
    "MAX_STRING",
    "NAMED_STRING_LIMITS",
    "WireError",
    "decode",
    "dumps",
    "encode",
    "loads",
    "parse_json",
    "string_limit",
]

MAX_STRING = 4096
"""Default longest string, in characters: names, reasons, ids and hosts are far shorter."""
NAMED_STRING_LIMITS: dict[str, int] = {"certificate": 16 * 1024}
"""Per-name rules: a field of this name (in any message) holds strings up to this length. A PEM certificate
with a few extensions is 1 to 3 KiB; 16 KiB leaves room for large RSA keys without admitting megabytes."""
MAX_LENGTH_KEY = "wire_max_length"
"""Dataclass field metadata key for a per-field string limit: `field(metadata={MAX_LENGTH_KEY: 65536})`."""
MAX_ITEMS = 256
"""Longest sequence: more than any cluster's membership, acks or parameters."""
MAX_DEPTH = 32
"""Deepest nesting of objects and arrays, in the message types and in any JSON body accepted."""
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

M = TypeVar("M")


class WireError(ValueError):
    """A message that does not match its schema; `path` locates the problem ("report.node.commit")."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class _Mismatch(WireError):
    """The value is not of the declared kind at all (as opposed to breaking a limit): a union tries the next
    member on this, and reports a limit error (e.g. a string too long in a `str | None`) as it is."""


# --------------------------------------------------------------------------------------------------------------
# Public API


def encode(msg: object) -> dict[str, Any]:
    """A message dataclass as a JSON-able dict (tuples become lists); WireError if a value breaks the schema."""
    cls = type(msg)
    _check_message_class(cls)
    result = _encode(cls, msg, _root(cls), 0, MAX_STRING)
    assert isinstance(result, dict)
    return result


def decode(cls: type[M], data: object) -> M:
    """The message of class `cls` that `data` (parsed JSON) describes; WireError naming the path otherwise."""
    _check_message_class(cls)
    result: M = _decode(cls, data, _root(cls), 0, MAX_STRING)
    return result


def dumps(msg: object) -> bytes:
    """The UTF-8 JSON body of a message (compact; keys in field order)."""
    return json.dumps(encode(msg), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def loads(cls: type[M], body: bytes) -> M:
    """parse_json then decode: a request or reply body straight to its message."""
    return decode(cls, parse_json(body))


def parse_json(body: bytes) -> object:
    """Strict JSON: valid UTF-8, no duplicate keys, no NaN/Infinity, nested at most MAX_DEPTH levels."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("", f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise WireError("", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise WireError("", f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if _depth(data) > MAX_DEPTH:
        raise WireError("", f"JSON nested deeper than {MAX_DEPTH} levels")
    return data


def string_limit(f: dataclasses.Field[Any]) -> int:
    """The longest string field `f` may hold: its metadata rule, else its name's rule, else MAX_STRING."""
    limit = f.metadata.get(MAX_LENGTH_KEY)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        return limit
    return NAMED_STRING_LIMITS.get(f.name, MAX_STRING)


# --------------------------------------------------------------------------------------------------------------
# Schema: the fields of a message class, resolved once


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    type: Any
    required: bool
    max_string: int


_SCHEMAS: dict[type, tuple[_Field, ...]] = {}


def _schema(cls: type) -> tuple[_Field, ...]:
    """The fields of a message class with their resolved types (cached: classes do not change at run time)."""
    cached = _SCHEMAS.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    fields = tuple(
        _Field(
            name=f.name,
            type=hints[f.name],
            required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            max_string=string_limit(f),
        )
        for f in dataclasses.fields(cls)
        if f.init
    )
    _SCHEMAS[cls] = fields
    return fields


def _check_message_class(cls: object) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a message dataclass")


def _root(cls: type) -> str:
    """The path root of a message: its class name in snake case (AckRequest -> ack_request)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def _is_message(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_args(tp: object) -> tuple[Any, ...] | None:
    """The members of a union (`X | None`, `Optional[X]`, `Union[...]`), or None when `tp` is not a union."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _expected(tp: Any) -> str:
    """What a type looks like in JSON, for messages."""
    if tp is type(None):
        return "null"
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if _is_message(tp):
        return "an object"
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return "an array"
        return f"an array of {len(args)} items"
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    members = _optional_args(tp)
    if members is not None:
        # None last reads better: "an integer or null"
        ordered = sorted(members, key=lambda m: m is type(None))
        return " or ".join(_expected(m) for m in ordered)
    return repr(tp)


def _show(value: object) -> str:
    """A received value, briefly: never echo a whole hostile body back into a log or an error."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if len(value) > 40:
            return json.dumps(value[:37])[:-1] + f'..." ({len(value)} characters)'
        return json.dumps(value)
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
        return text
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} items"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------------------------------------------
# The checks shared by both directions


def _scalar(tp: Any, value: object, path: str, max_string: int) -> object:
    """Check one scalar against its declared type; returns the value as the other side should hold it."""
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64_MIN <= value <= INT64_MAX:
                raise WireError(path, f"integer out of range (int64), got {_show(value)}")
            return int(value)
    elif tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64_MIN <= value <= INT64_MAX:
                raise WireError(path, f"number out of range (int64), got {_show(value)}")
            return float(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise WireError(path, f"expected a finite number, got {_show(value)}")
            return value
    elif tp is str:
        if isinstance(value, str):
            if len(value) > max_string:
                raise WireError(path, f"string longer than {max_string} characters ({len(value)})")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise WireError(path, f"string is not valid Unicode (character {exc.start})") from None
            return str(value)
    else:
        raise TypeError(f"{path}: type {tp!r} is not supported by agent.core.wire")
    raise _Mismatch(path, f"expected {_expected(tp)}, got {_show(value)}")


def _convert(
    tp: Any,
    value: object,
    path: str,
    depth: int,
    max_string: int,
    message: Callable[[type, object, str, int], object],
    sequence: Callable[[list[object]], object],
    sequence_types: tuple[type, ...],
) -> object:
    """The part of encoding and decoding that is the same both ways: unions, literals, tuples, scalars.

    `message` converts a nested message; `sequence` builds the result of an array (list out, tuple in) and
    `sequence_types` are the values accepted as arrays on this side.
    """
    if depth > MAX_DEPTH:
        raise WireError(path, f"nested deeper than {MAX_DEPTH} levels")
    if _is_message(tp):
        return message(tp, value, path, depth + 1)
    members = _optional_args(tp)
    if members is not None:
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(member, value, path, depth, max_string, message, sequence, sequence_types)
            except _Mismatch as exc:
                if exc.path != path:
                    raise  # of this member's kind, but wrong inside: that is the precise error
                continue  # not of this member's kind: try the next
        raise _Mismatch(path, f"expected {_expected(tp)}, got {_show(value)}")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        for allowed in typing.get_args(tp):
            if type(value) is type(allowed) and value == allowed:
                return value
        raise _Mismatch(path, f"expected {_expected(tp)}, got {_show(value)}")
    if origin is tuple:
        if not (isinstance(value, (list, tuple)) and isinstance(value, sequence_types)):
            raise _Mismatch(path, f"expected {_expected(tp)}, got {_show(value)}")
        items = list(value)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if len(items) > MAX_ITEMS:
                raise WireError(path, f"more than {MAX_ITEMS} items ({len(items)})")
            item_types = [args[0]] * len(items)
        else:
            if len(items) != len(args):
                raise WireError(path, f"expected an array of {len(args)} items, got {len(items)}")
            item_types = list(args)
        return sequence(
            [
                _convert(
                    item_type,
                    item,
                    f"{path}[{i}]",
                    depth + 1,
                    max_string,
                    message,
                    sequence,
                    sequence_types,
                )
                for i, (item_type, item) in enumerate(zip(item_types, items, strict=True))
            ]
        )
    return _scalar(tp, value, path, max_string)


# --------------------------------------------------------------------------------------------------------------
# The two directions


def _encode(tp: Any, value: object, path: str, depth: int, max_string: int) -> object:
    return _convert(tp, value, path, depth, max_string, _encode_message, list, (tuple, list))


def _encode_message(cls: type, msg: object, path: str, depth: int) -> dict[str, Any]:
    if type(msg) is not cls:
        raise _Mismatch(path, f"expected a message of type {cls.__name__}, got {_show(msg)}")
    return {
        f.name: _encode(f.type, getattr(msg, f.name), f"{path}.{f.name}", depth, f.max_string)
        for f in _schema(cls)
    }


def _decode(tp: Any, value: object, path: str, depth: int, max_string: int) -> Any:
    return _convert(tp, value, path, depth, max_string, _decode_message, tuple, (list,))


def _decode_message(cls: type, data: object, path: str, depth: int) -> object:
    if not isinstance(data, dict):
        raise _Mismatch(path, f"expected an object, got {_show(data)}")
    fields = _schema(cls)
    known = {f.name for f in fields}
    unknown = [key for key in data if key not in known]
    if unknown:
        shown = ", ".join(_show(key) for key in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise WireError(path, f"unknown field{'s' if len(unknown) > 1 else ''} {shown}")
    values: dict[str, Any] = {}
    for f in fields:
        if f.name not in data:
            if f.required:
                raise WireError(f"{path}.{f.name}", "required field missing")
            continue
        values[f.name] = _decode(f.type, data[f.name], f"{path}.{f.name}", depth, f.max_string)
    return cls(**values)


# --------------------------------------------------------------------------------------------------------------
# JSON parsing helpers


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise WireError("", f"duplicate key {_show(key)} in a JSON object")
        result[key] = value
    return result


def _no_constant(name: str) -> object:
    raise WireError("", f"{name} is not a valid JSON number")


def _depth(data: object) -> int:
    """Nesting depth of parsed JSON, without recursion (a deep body must not exhaust the stack here)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest
