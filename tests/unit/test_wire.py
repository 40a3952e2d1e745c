"""Tests of agent/core/wire.py: strict decoding with precise errors, limits, and round trips of every message."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import messages
from agent.core.messages import (
    Ack,
    AckReply,
    AckRequest,
    Action,
    Certificate,
    NodeReport,
    Report,
    VoteRequest,
)
from agent.core.wire import (
    INT64_MAX,
    INT64_MIN,
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_LENGTH_KEY,
    MAX_STRING,
    NAMED_STRING_LIMITS,
    WireError,
    decode,
    dumps,
    encode,
    loads,
    parse_json,
)

MESSAGE_CLASSES = [
    cls
    for _, cls in inspect.getmembers(messages, inspect.isclass)
    if dataclasses.is_dataclass(cls) and cls.__module__ == messages.__name__
]


def report(**node_changes: Any) -> Report:
    node = dataclasses.replace(
        NodeReport(
            "HEALTHY",
            "",
            12.5,
            "10.0.0.1:7373",
            node_id=1,
            role="leader",
            commit=42,
            members=((1, "10.0.0.1:7373"), (2, "10.0.0.2:7373")),
        ),
        **node_changes,
    )
    return Report(
        "prod", "km1", 7, "boot-1", 3, "km1", 8.0, node, in_flight=None, paused_until=0.0, version="1"
    )


def error_of(cls: type, data: object) -> str:
    with pytest.raises(WireError) as info:
        decode(cls, data)
    return str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Round trips and the encoded form


def test_encode_gives_plain_json_with_lists_for_tuples() -> None:
    data = encode(report())
    assert data["node"]["members"] == [[1, "10.0.0.1:7373"], [2, "10.0.0.2:7373"]]
    assert json.loads(json.dumps(data)) == data
    assert decode(Report, data) == report()


def test_round_trip_through_bytes() -> None:
    request = AckRequest("prod", 4, "km1", Action("a-1", "REJOIN", "km2", (("reason", "disk lost"),)))
    assert loads(AckRequest, dumps(request)) == request
    assert isinstance(loads(AckRequest, dumps(request)).action.params[0], tuple)


def test_optional_nested_message_may_be_null() -> None:
    witness = dataclasses.replace(report(), node=None)
    assert decode(Report, encode(witness)).node is None
    assert decode(AckReply, {"granted": False, "reason": "no"}) == AckReply(False, "no")


def test_fields_with_defaults_may_be_omitted() -> None:
    data = encode(report())
    for name in ("in_flight", "paused_until", "version"):
        del data[name]
    decoded = decode(Report, data)
    assert (decoded.in_flight, decoded.paused_until, decoded.version) == (None, 0.0, "")


def test_int_is_accepted_for_a_float_and_becomes_a_float() -> None:
    data = encode(report())
    data["node"]["held_seconds"] = 3
    held = decode(Report, data).node
    assert held is not None and held.held_seconds == 3.0 and isinstance(held.held_seconds, float)


# --------------------------------------------------------------------------------------------------------------
# Precise errors


def test_wrong_type_in_a_nested_optional_names_the_path() -> None:
    data = encode(report())
    data["node"]["commit"] = "7"
    assert error_of(Report, data) == 'report.node.commit: expected an integer or null, got "7"'


def test_a_bool_is_not_an_int() -> None:
    data = encode(report())
    data["seq"] = True
    assert error_of(Report, data) == "report.seq: expected an integer, got true"


def test_an_int_is_not_a_bool() -> None:
    data = encode(report())
    data["restarting"] = 1
    assert error_of(Report, data) == "report.restarting: expected a boolean, got 1"


def test_a_float_is_not_an_int() -> None:
    data = encode(report())
    data["term"] = 3.0
    assert error_of(Report, data) == "report.term: expected an integer, got 3.0"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(bad: float) -> None:
    data = encode(report())
    data["anchor_lease_seconds"] = bad
    assert error_of(Report, data) == f"report.anchor_lease_seconds: expected a finite number, got {bad!r}"


@pytest.mark.parametrize("value", [INT64_MIN, INT64_MAX])
def test_int64_bounds_are_accepted(value: int) -> None:
    data = encode(report())
    data["seq"] = value
    assert decode(Report, data).seq == value


@pytest.mark.parametrize("value", [INT64_MIN - 1, INT64_MAX + 1, 10**400])
def test_integers_beyond_int64_are_refused(value: int) -> None:
    data = encode(report())
    data["seq"] = value
    assert error_of(Report, data).startswith("report.seq: integer out of range (int64), got ")
    data = encode(report())
    data["node"]["held_seconds"] = value
    assert error_of(Report, data).startswith("report.node.held_seconds: number out of range (int64)")


def test_unknown_fields_are_refused() -> None:
    data = encode(report())
    data["extra"] = 1
    assert error_of(Report, data) == 'report: unknown field "extra"'
    data = encode(report())
    data["node"]["a"] = data["node"]["b"] = None
    assert error_of(Report, data) == 'report.node: unknown fields "a", "b"'


def test_missing_required_field_is_refused() -> None:
    data = encode(report())
    del data["node"]["host"]
    assert error_of(Report, data) == "report.node.host: required field missing"


def test_root_must_be_an_object() -> None:
    assert error_of(VoteRequest, [1, 2]) == "vote_request: expected an object, got an array of 2 items"
    assert error_of(AckRequest, None) == "ack_request: expected an object, got null"


def test_fixed_arity_tuples_are_checked() -> None:
    data = encode(report())
    data["node"]["members"] = [[1, "a"], [2, "b", "c"]]
    assert error_of(Report, data) == "report.node.members[1]: expected an array of 2 items, got 3"
    data["node"]["members"] = [[1, "a"], ["2", "b"]]
    assert error_of(Report, data) == 'report.node.members[1][0]: expected an integer, got "2"'
    data["node"]["members"] = {"1": "a"}
    assert error_of(Report, data) == "report.node.members: expected an array, got an object"


def test_nested_message_inside_a_sequence_names_the_index() -> None:
    ack = Ack("km1", "PEM", "c2ln")
    cert = Certificate("prod", 2, Action("a", "EVICT", "km3"), (ack, ack))
    data = encode(cert)
    data["acks"][1]["signature"] = 5
    assert error_of(Certificate, data) == "certificate.acks[1].signature: expected a string, got 5"


def test_long_hostile_values_are_shown_briefly() -> None:
    data = encode(report())
    data["term"] = "x" * 100_000
    message = error_of(Report, data)
    assert message == 'report.term: expected an integer, got "' + "x" * 37 + '..." (100000 characters)'


# --------------------------------------------------------------------------------------------------------------
# Limits


def test_string_limit_default() -> None:
    data = encode(report())
    data["cluster"] = "c" * MAX_STRING
    assert decode(Report, data).cluster == "c" * MAX_STRING
    data["cluster"] = "c" * (MAX_STRING + 1)
    assert error_of(Report, data) == f"report.cluster: string longer than {MAX_STRING} characters (4097)"


def test_certificate_fields_have_their_own_larger_limit() -> None:
    pem_limit = NAMED_STRING_LIMITS["certificate"]
    assert pem_limit > MAX_STRING
    ok = Ack("km1", "P" * pem_limit, "sig")
    assert decode(Ack, encode(ok)) == ok
    data = encode(ok)
    data["certificate"] += "P"
    assert (
        error_of(Ack, data) == f"ack.certificate: string longer than {pem_limit} characters ({pem_limit + 1})"
    )
    data = encode(ok)
    data["signature"] = "s" * (MAX_STRING + 1)  # the rule is by name: other fields keep the default
    assert error_of(Ack, data).startswith("ack.signature: string longer than 4096")


@dataclass(frozen=True)
class Blob:
    """A test message with a per-field limit in metadata, a literal and an optional limited string."""

    data: str = field(default="", metadata={MAX_LENGTH_KEY: 10})
    mode: Literal["a", "b"] = "a"
    note: str | None = None


def test_field_metadata_limit_overrides_the_default() -> None:
    assert decode(Blob, {"data": "0123456789"}).data == "0123456789"
    assert error_of(Blob, {"data": "0123456789!"}) == "blob.data: string longer than 10 characters (11)"


def test_a_limit_error_inside_an_optional_is_reported_as_such() -> None:
    message = error_of(Blob, {"note": "n" * (MAX_STRING + 1)})
    assert message == f"blob.note: string longer than {MAX_STRING} characters ({MAX_STRING + 1})"


def test_literals_are_exact() -> None:
    assert decode(Blob, {"mode": "b"}).mode == "b"
    assert error_of(Blob, {"mode": "c"}) == 'blob.mode: expected one of "a", "b", got "c"'


def test_sequence_length_limit() -> None:
    ack = Ack("km1", "PEM", "sig")
    data = encode(Certificate("prod", 1, Action("a", "EVICT", "km3"), (ack,) * MAX_ITEMS))
    assert len(decode(Certificate, data).acks) == MAX_ITEMS
    data["acks"].append(data["acks"][0])
    assert error_of(Certificate, data) == f"certificate.acks: more than {MAX_ITEMS} items ({MAX_ITEMS + 1})"


def test_lone_surrogates_are_refused() -> None:
    data = encode(report())
    data["sender"] = "km\ud800"
    assert error_of(Report, data) == "report.sender: string is not valid Unicode (character 2)"


@dataclass(frozen=True)
class Chain:
    """A recursive message: only the depth limit stops it."""

    next: Chain | None = None


def test_depth_limit_on_recursive_types() -> None:
    data: dict[str, Any] = {}
    for _ in range(MAX_DEPTH + 5):
        data = {"next": data}
    message = error_of(Chain, data)
    assert message.startswith("chain.next.next.") and message.endswith(
        f"nested deeper than {MAX_DEPTH} levels"
    )
    shallow: dict[str, Any] = {}
    for _ in range(MAX_DEPTH - 2):
        shallow = {"next": shallow}
    assert decode(Chain, shallow) is not None


# --------------------------------------------------------------------------------------------------------------
# Encoding is as strict as decoding


def test_encode_refuses_what_a_peer_would_refuse() -> None:
    with pytest.raises(WireError, match=r"^vote_request.term: expected an integer, got \"3\"$"):
        encode(VoteRequest("prod", "3", "km1"))  # type: ignore[arg-type]
    with pytest.raises(WireError, match=r"^report.node.held_seconds: expected a finite number, got nan$"):
        encode(report(held_seconds=math.nan))
    with pytest.raises(WireError, match=r"string longer than 4096"):
        encode(VoteRequest("x" * 5000, 1, "km1"))
    with pytest.raises(
        WireError, match=r"^ack_request.action: expected a message of type Action, got an object$"
    ):
        encode(AckRequest("prod", 1, "km1", {"id": "a"}))  # type: ignore[arg-type]


def test_programming_errors_are_type_errors() -> None:
    with pytest.raises(TypeError, match="not a message dataclass"):
        encode({"a": 1})
    with pytest.raises(TypeError, match="not a message dataclass"):
        decode(dict, {})

    @dataclass
    class Odd:
        value: set[int]

    with pytest.raises(TypeError, match="not supported"):
        decode(Odd, {"value": []})


# --------------------------------------------------------------------------------------------------------------
# parse_json


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": 1, "a": 2}', 'duplicate key "a" in a JSON object'),
        (b'{"a": NaN}', "NaN is not a valid JSON number"),
        (b'{"a": -Infinity}', "-Infinity is not a valid JSON number"),
        (b'{"a": "\xff"}', "body is not valid UTF-8 (byte 7)"),
        (b'{"a": ', "invalid JSON: Expecting value (line 1, column 7)"),
        (b"", "invalid JSON: Expecting value (line 1, column 1)"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"JSON nested deeper than {MAX_DEPTH} levels"),
        (b"[" * 200_000, f"JSON nested deeper than {MAX_DEPTH} levels"),
    ],
)
def test_parse_json_is_strict(body: bytes, message: str) -> None:
    with pytest.raises(WireError) as info:
        parse_json(body)
    assert str(info.value) == message


def test_parse_json_accepts_the_depth_limit() -> None:
    body = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert parse_json(body) is not None


# --------------------------------------------------------------------------------------------------------------
# Properties


def _strategy(tp: Any, max_string: int = 20) -> st.SearchStrategy[Any]:
    """Valid values of a message field type, from the type hints like the codec itself."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        return st.builds(tp, **{f.name: _strategy(hints[f.name]) for f in dataclasses.fields(tp)})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_strategy(a) for a in args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(_strategy(args[0]), max_size=4).map(tuple)
        return st.tuples(*(_strategy(a) for a in args))
    if origin is Literal:
        return st.sampled_from(args)
    simple: dict[Any, st.SearchStrategy[Any]] = {
        type(None): st.none(),
        bool: st.booleans(),
        int: st.integers(INT64_MIN, INT64_MAX),
        float: st.floats(allow_nan=False, allow_infinity=False),
        str: st.text(max_size=max_string),
    }
    return simple[tp]


def test_every_message_class_is_covered() -> None:
    assert {c.__name__ for c in MESSAGE_CLASSES} >= {"Report", "VoteRequest", "AckRequest", "Certificate"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MESSAGE_CLASSES).flatmap(_strategy))
def test_round_trip_of_any_valid_message(msg: Any) -> None:
    body = dumps(msg)
    assert loads(type(msg), body) == msg
    assert decode(type(msg), json.loads(body)) == msg


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MESSAGE_CLASSES), JSON)
def test_arbitrary_json_raises_only_wire_errors(cls: type, data: object) -> None:
    try:
        decode(cls, data)
    except WireError:
        pass


def _paths(data: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _paths(value, (*prefix, i))
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MESSAGE_CLASSES).flatmap(_strategy), st.data())
def test_mutated_valid_messages_decode_exactly_or_raise_wire_error(msg: Any, draw: st.DataObject) -> None:
    """Replace one subtree of a valid message with arbitrary JSON: only WireError may come out, and when the
    result decodes, it is exactly what the data says (re-encoding gives the same data)."""
    data: Any = encode(msg)
    path = draw.draw(st.sampled_from(_paths(data)))
    replacement = draw.draw(JSON)
    if not path:
        data = replacement
    else:
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = replacement
    try:
        decoded = decode(type(msg), data)
    except WireError as exc:
        assert str(exc).startswith(exc.path) and exc.problem
        return
    assert encode(decoded) == data
