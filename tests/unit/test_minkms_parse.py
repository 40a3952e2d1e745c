"""Parsing of `minkms stat --json` against golden samples, and the pure helpers of the minkms adapter.

stat_3up, stat_nodes_down and stat_no_leader are real outputs of the emulator's `minkms stat --json` (3-node lab;
node3 stopped; node2 and node3 stopped). The other samples are derived from stat_3up (see golden/README.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agent.core.model import MinkmsView, NodeStatus
from agent.io.minkms import (
    CommandResult,
    MinkmsError,
    MinkmsSettings,
    endpoint,
    parse_cluster_status,
    parse_duration,
)

GOLDEN = Path(__file__).parent / "golden"
H1, H2, H3 = "127.47.198.1:7373", "127.47.198.2:7373", "127.47.198.3:7373"
MEMBERS = ((0, H1), (1, H2), (2, H3))


def golden(name: str) -> MinkmsView:
    """Decode as the adapter does (errors="replace"), then parse."""
    return parse_cluster_status((GOLDEN / name).read_bytes().decode("utf-8", errors="replace"))


def healthy(uptimes: tuple[float, float, float] = (2.451, 2.655, 2.567)) -> tuple[NodeStatus, ...]:
    return (
        NodeStatus(0, H1, "Leader", 2, 0, MEMBERS, uptimes[0]),
        NodeStatus(1, H2, "Follower", 2, 0, MEMBERS, uptimes[1]),
        NodeStatus(2, H3, "Follower", 2, 0, MEMBERS, uptimes[2]),
    )


# ---- golden samples ---------------------------------------------------------------------------------------
def test_real_three_nodes_up() -> None:
    view = golden("stat_3up.json")
    assert view == MinkmsView(error=None, nodes_up=healthy(), nodes_down=())
    assert view.node_by_host(H3) == NodeStatus(2, H3, "Follower", 2, 0, MEMBERS, 2.567)


def test_real_one_node_down() -> None:
    view = golden("stat_nodes_down.json")
    assert view == MinkmsView(
        nodes_up=(
            NodeStatus(0, H1, "Leader", 2, 0, MEMBERS, 8.875),
            NodeStatus(1, H2, "Follower", 2, 0, MEMBERS, 9.085),
        ),
        nodes_down=((2, H3),),
    )
    assert view.node_by_host(H3) is None


def test_real_no_leader_keeps_the_negative_id() -> None:
    view = golden("stat_no_leader.json")
    assert view == MinkmsView(
        nodes_up=(NodeStatus(0, H1, "Candidate", 2, -1, MEMBERS, 14.252),),
        nodes_down=((1, H2), (2, H3)),
    )


def test_numbers_instead_of_strings() -> None:
    # commit/leader_id as JSON numbers, node_id as a string, uptime as a number of seconds
    assert golden("stat_numbers.json") == MinkmsView(nodes_up=healthy())


def test_unknown_fields_at_every_level_are_ignored() -> None:
    # extra top-level fields, extra node fields, a non-node entry "7", bad member and nodes_down entries
    assert golden("stat_unknown_fields.json") == MinkmsView(
        nodes_up=healthy(), nodes_down=((5, "127.47.198.9:7373"),)
    )


def test_a_node_entry_that_is_a_string_is_skipped() -> None:
    view = golden("stat_entry_string.json")
    assert view.error is None
    assert view.nodes_up == (healthy()[0], healthy()[2])


def test_a_node_without_host() -> None:
    # node 1 has no host but lists itself in its `nodes`; node 2 has no host, members, commit, role, leader, uptime
    view = golden("stat_no_host.json")
    assert view == MinkmsView(
        nodes_up=(
            healthy()[0],
            NodeStatus(1, H2, "Follower", 2, 0, MEMBERS, 2.655),
            NodeStatus(2, "", "", None, None, (), None),
        )
    )


def test_truncated() -> None:
    assert golden("stat_truncated.json") == MinkmsView(
        error="stat --json output is not valid JSON: line 17 column 25: Unterminated string starting at"
    )


def test_empty() -> None:
    assert golden("stat_empty.json") == MinkmsView(error="stat --json output is empty")


def test_null() -> None:
    assert golden("stat_null.json") == MinkmsView(error="stat --json output is not a JSON object (got null)")


def test_list() -> None:
    assert golden("stat_list.json") == MinkmsView(
        error="stat --json output is not a JSON object (got an array)"
    )


def test_garbage_bytes() -> None:
    assert golden("stat_garbage.bin") == MinkmsView(
        error="stat --json output is not valid JSON: line 1 column 1: Expecting value"
    )


# ---- edge cases -------------------------------------------------------------------------------------------
NODE = {"host": H1, "role": "Leader", "commit": "3", "node_id": 0, "leader_id": "0", "nodes": {"0": H1}}


def view_of(document: object) -> MinkmsView:
    return parse_cluster_status(json.dumps(document))


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"nodes_up": [NODE]}, "stat --json output: nodes_up is not an object (got an array)"),
        ({"nodes_up": "x"}, "stat --json output: nodes_up is not an object (got a string)"),
        (
            {"nodes_up": {"0": NODE}, "nodes_down": 3},
            "stat --json output: nodes_down is not an object (got a number)",
        ),
        ({}, "stat --json output has no usable node in nodes_up"),
        ({"message": "access denied"}, "stat --json output has no usable node in nodes_up"),
        ({"nodes_up": {}}, "stat --json output has no usable node in nodes_up"),
        ({"nodes_up": {"x": {"host": H1}}}, "stat --json output has no usable node in nodes_up"),
        ("text", "stat --json output is not a JSON object (got a string)"),
        (12, "stat --json output is not a JSON object (got a number)"),
        (True, "stat --json output is not a JSON object (got a boolean)"),
    ],
)
def test_total_failures(document: object, error: str) -> None:
    assert view_of(document) == MinkmsView(error=error)


def test_omitted_nodes_down_means_none_down() -> None:
    # protojson leaves out empty maps
    view = view_of({"nodes_up": {"0": NODE}})
    assert view == MinkmsView(nodes_up=(NodeStatus(0, H1, "Leader", 3, 0, ((0, H1),), None),))


def test_node_id_from_the_key_when_missing_and_from_the_entry_when_they_disagree() -> None:
    missing = {k: v for k, v in NODE.items() if k != "node_id"}
    view = view_of({"nodes_up": {"4": missing, "1": {**NODE, "node_id": 6, "host": H2}}})
    assert [(n.node_id, n.host) for n in view.nodes_up] == [(4, H1), (6, H2)]
    # an unusable node_id falls back to the key; an unusable key and no node_id skips the entry
    view = view_of({"nodes_up": {"3": {**NODE, "node_id": "x"}, "y": missing, "z": {**NODE, "node_id": -2}}})
    assert [n.node_id for n in view.nodes_up] == [3]


@pytest.mark.parametrize(
    ("raw", "commit", "leader"),
    [
        (("12", "-1"), 12, -1),
        ((12, -1), 12, -1),
        ((12.0, "2"), 12, 2),
        (("18446744073709551615", "-9223372036854775808"), 18446744073709551615, -9223372036854775808),
        (("-3", 1.5), None, None),  # a negative uint64, a fraction
        (("1e3", True), None, None),
        ((None, ""), None, None),
        (("9" * 5000, {"a": 1}), None, None),  # never int() a 5000-digit string
    ],
)
def test_integers(raw: tuple[object, object], commit: int | None, leader: int | None) -> None:
    view = view_of({"nodes_up": {"0": {**NODE, "commit": raw[0], "leader_id": raw[1]}}})
    assert (view.nodes_up[0].commit, view.nodes_up[0].leader_id) == (commit, leader)


def test_members_sorted_by_id_and_bad_entries_skipped() -> None:
    nodes = {"10": "h10:7373", "2": "h2:7373", "-1": "neg:7373", "a": "x", "3": 3, "4": "", "0": H1}
    view = view_of({"nodes_up": {"0": {**NODE, "nodes": nodes}}})
    assert view.nodes_up[0].members == ((0, H1), (2, "h2:7373"), (10, "h10:7373"))
    view = view_of({"nodes_up": {"0": {**NODE, "nodes": ["h1"]}}})
    assert view.nodes_up[0].members == ()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.500s", 1.5),
        ("0s", 0.0),
        ("0", 0.0),
        ("-2.5s", -2.5),
        ("24m31s", 1471.0),
        ("1h2m3.5s", 3723.5),
        ("233ms", 0.233),
        ("7µs", 7e-6),
        (3, 3.0),
        (2.25, 2.25),
        ("", None),
        ("1.5", None),
        ("s", None),
        ("1.5sx", None),
        ("forever", None),
        (float("nan"), None),
        (True, None),
        (None, None),
        ({"seconds": 1}, None),
    ],
)
def test_durations(text: object, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_deep_nesting_does_not_crash() -> None:
    assert parse_cluster_status("[" * 100_000).error is not None
    assert parse_cluster_status('{"nodes_up": ' * 50_000).error is not None


def test_every_prefix_and_random_damage_never_raise() -> None:
    text = (GOLDEN / "stat_3up.json").read_text()
    for end in range(len(text)):
        assert isinstance(parse_cluster_status(text[:end]), MinkmsView)
    rng = random.Random(7)
    for _ in range(2000):
        chars = list(text)
        for _ in range(rng.randint(1, 5)):
            chars[rng.randrange(len(chars))] = rng.choice('{}[]",:0-1aé\x00 ')
        assert isinstance(parse_cluster_status("".join(chars)), MinkmsView)


# ---- pure helpers -----------------------------------------------------------------------------------------
def result(returncode: int = 1, stderr: str = "", timed_out_after: float | None = None) -> CommandResult:
    return CommandResult(("minkms", "stat", "--json"), returncode, "", stderr, 0.1, timed_out_after)


def test_command_result_error_is_one_line() -> None:
    assert result(0).ok and result(0).error is None
    assert (
        result(1, "warning: x\nminkms: error: access denied\n\n  \n").error == "minkms: error: access denied"
    )
    assert result(3).error == "exit code 3"
    assert result(-15).error == "killed by signal SIGTERM"
    assert result(-9, "partial\n", timed_out_after=0.5).error == "timed out after 0.5s"
    assert not result(0, timed_out_after=10.0).ok
    long = result(1, "x" * 10_000).error
    assert long is not None and len(long) == 500 and long.endswith("…")


def test_check_raises_with_the_result() -> None:
    failed = result(1, "minkms: error: cluster has no leader")
    with pytest.raises(MinkmsError, match="cluster has no leader") as info:
        failed.check()
    assert info.value.result is failed
    assert result(0).check() == result(0)


def test_settings_repr_has_no_key() -> None:
    key = "k1:" + "A" * 43
    settings = MinkmsSettings(cli=("minkms",), server="https://a:7373", api_key=lambda: key)
    assert key not in repr(settings) and "api_key" not in repr(settings)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("a:7373", "https://a:7373"),
        ("a", "https://a:7373"),
        ("https://a:9000/", "https://a:9000"),
        ("http://10.0.0.1:7373", "https://10.0.0.1:7373"),
        ("[::1]:7373", "https://[::1]:7373"),
        ("[::1]", "https://[::1]:7373"),
    ],
)
def test_endpoint(host: str, url: str) -> None:
    assert endpoint(host) == url


@pytest.mark.parametrize(
    "host", ["", "https://", "http:///", "a:notaport", "https://a:7373/path", "https://u@a:7373"]
)
def test_endpoint_rejects(host: str) -> None:
    with pytest.raises(ValueError, match="invalid minkms address"):
        endpoint(host)
