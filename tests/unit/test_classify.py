"""Table-driven tests of agent.core.classify: every rule of DESIGN §3, every precedence, every boundary."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Mapping

import pytest

from agent.core.classify import (
    PeerEvidence,
    Thresholds,
    Tracked,
    Verdict,
    classify_local,
    classify_peer,
    held_for,
    prune_samples,
    restarts_within,
    track,
)
from agent.core.model import (
    HealthObs,
    MarkerState,
    MinkmsView,
    NodeClass,
    NodeStatus,
    Observation,
    ServiceObs,
    ServiceState,
    StorageObs,
)

A, B, ME = "127.47.198.1:7373", "127.47.198.2:7373", "127.47.198.3:7373"
OTHER = "127.47.198.4:7373"
REF3: dict[int, str] = {0: A, 1: B, 2: ME}
REF3_ME_AS_0: dict[int, str] = {0: ME, 1: A, 2: B}
REF2: dict[int, str] = {0: A, 1: ME}
REF1_ME: dict[int, str] = {0: ME}
REF_WITHOUT_ME: dict[int, str] = {0: A, 1: B}
MIB = 1024 * 1024

C = NodeClass
S = ServiceState
M = MarkerState


# --- factories -------------------------------------------------------------------------------------------------


def node(node_id: int, host: str, members: Mapping[int, str]) -> NodeStatus:
    return NodeStatus(node_id=node_id, host=host, role="Follower", members=tuple(sorted(members.items())))


def view(node_id: int = 2, members: Mapping[int, str] = REF3, error: str | None = None) -> MinkmsView:
    """The local minkms's view: this host as `node_id` with `members`, plus the other members as up."""
    others = tuple(node(i, h, members) for i, h in members.items() if h != ME)
    return MinkmsView(error=error, nodes_up=(node(node_id, ME, members), *others))


FRESH = MinkmsView(nodes_up=(node(0, ME, {0: ME}),))  # minkms started on an empty dir: node 0 of 1
ALONE_AS_2 = MinkmsView(nodes_up=(node(2, ME, {2: ME}),))  # a survivor that kept its id
NO_VIEW = MinkmsView()  # stat answered nothing about this host
ERR_VIEW = MinkmsView(error="stat: connection refused")
LOCAL_WITHOUT_ME = view(members=REF_WITHOUT_ME)  # own member list no longer lists this host
LOCAL_NO_MEMBERS = MinkmsView(nodes_up=(NodeStatus(node_id=2, host=ME),))  # members field missing


def obs(
    *,
    state: ServiceState = S.ACTIVE,
    restarts: int = 0,
    counter: int = 0,
    live: bool | None = True,
    ready: bool | None = True,
    write: bool | None = True,
    probe_ok: bool = True,
    read_only: bool = False,
    empty: bool = False,
    low_space: bool = False,
    free_bytes: int | None = 50 * 1024 * MIB,
    marker: MarkerState = M.OK,
    storage_error: str | None = None,
    minkms: MinkmsView | None = None,
) -> Observation:
    return Observation(
        at=100.0,
        service=ServiceObs(state=state, restarts=counter, main_pid=4242, restarts_in_window=restarts),
        health=HealthObs(live=live, ready=ready, write=write, latency=0.002),
        storage=StorageObs(
            probe_ok=probe_ok,
            read_only=read_only,
            empty=empty,
            free_bytes=free_bytes,
            low_space=low_space,
            marker=marker,
            error=storage_error,
        ),
        minkms=view() if minkms is None else minkms,
    )


def local(o: Observation, reference: Mapping[int, str] | None = REF3, k: int = 3) -> Verdict:
    return classify_local(o, ME, reference, Thresholds(crash_loop_restarts=k))


# --- classify_local: rules and precedence ----------------------------------------------------------------------

LOCAL_CASES: list[tuple[str, Observation, Mapping[int, str] | None, NodeClass, str]] = [
    # 6. HEALTHY
    ("healthy", obs(), REF3, C.HEALTHY, "live, ready, a member, storage ok"),
    ("healthy-no-anchor", obs(), None, C.HEALTHY, "live, ready, a member"),
    ("healthy-empty-reference-falls-back", obs(), {}, C.HEALTHY, "a member"),
    ("healthy-marker-absent-first-start", obs(marker=M.ABSENT), REF3, C.HEALTHY, "storage ok"),
    ("healthy-write-not-ready-is-cluster-wide", obs(write=False), REF3, C.HEALTHY, "storage ok"),
    ("healthy-old-restarts-outside-window", obs(counter=40, restarts=0), REF3, C.HEALTHY, "storage ok"),
    ("healthy-reference-wins-over-local-view", obs(minkms=LOCAL_WITHOUT_ME), REF3, C.HEALTHY, "a member"),
    ("healthy-1-node-cluster-consistent", obs(minkms=FRESH), REF1_ME, C.HEALTHY, "a member"),
    ("healthy-alone-no-anchor-no-evidence", obs(minkms=FRESH), None, C.HEALTHY, "a member"),
    ("healthy-fresh-view-ignored-empty-ref", obs(minkms=FRESH), {}, C.HEALTHY, "a member"),
    (
        "healthy-local-error-anchor-confirms",
        obs(minkms=ERR_VIEW),
        REF3,
        C.HEALTHY,
        "cluster status unavailable",
    ),
    # 1. STATE_LOST
    ("lost-empty", obs(empty=True), REF3, C.STATE_LOST, "storage path is empty"),
    ("lost-marker-missing", obs(marker=M.MISSING), REF3, C.STATE_LOST, "identity marker is missing"),
    ("lost-marker-mismatch", obs(marker=M.MISMATCH), REF3, C.STATE_LOST, "another cluster or host"),
    ("lost-empty-no-anchor", obs(empty=True), None, C.STATE_LOST, "storage path is empty"),
    (
        "lost-fresh-cluster-other-id",
        obs(minkms=FRESH),
        REF3,
        C.STATE_LOST,
        "minkms is node 0 of a 1-node cluster, but the cluster knows this host as node 2 of 3",
    ),
    (
        "lost-fresh-cluster-same-id",
        obs(minkms=FRESH),
        REF3_ME_AS_0,
        C.STATE_LOST,
        "knows this host as node 0",
    ),
    ("lost-fresh-cluster-2-members", obs(minkms=FRESH), REF2, C.STATE_LOST, "as node 1 of 2"),
    ("lost-alone-same-id-listed", obs(minkms=ALONE_AS_2), REF3, C.STATE_LOST, "node 2 of a 1-node cluster"),
    # 1 beats 2
    ("lost-empty-beats-crash-loop", obs(empty=True, restarts=9), REF3, C.STATE_LOST, "empty"),
    ("lost-marker-beats-crash-loop", obs(marker=M.MISSING, restarts=9), REF3, C.STATE_LOST, "marker"),
    ("lost-fresh-beats-crash-loop", obs(minkms=FRESH, restarts=9), REF3, C.STATE_LOST, "1-node cluster"),
    # 1 beats 3
    ("lost-empty-beats-down", obs(empty=True, state=S.FAILED, live=None), REF3, C.STATE_LOST, "empty"),
    ("lost-mismatch-beats-down", obs(marker=M.MISMATCH, state=S.INACTIVE), REF3, C.STATE_LOST, "marker"),
    ("lost-fresh-beats-not-live", obs(minkms=FRESH, live=False), REF3, C.STATE_LOST, "1-node cluster"),
    # 1 beats 4 and 5
    ("lost-empty-beats-evicted", obs(empty=True), REF_WITHOUT_ME, C.STATE_LOST, "empty"),
    ("lost-empty-beats-degraded", obs(empty=True, ready=False, low_space=True), REF3, C.STATE_LOST, "empty"),
    # fresh single node the cluster does not list: no STATE_LOST, it is EVICTED (REJOIN either way)
    ("fresh-but-unlisted-is-evicted", obs(minkms=FRESH), REF_WITHOUT_ME, C.EVICTED, "cluster's membership"),
    # the fresh-cluster check needs the local view
    ("fresh-undetectable-on-error", obs(minkms=ERR_VIEW), REF3, C.HEALTHY, "cluster status unavailable"),
    # 2. CORRUPT
    (
        "corrupt-at-threshold",
        obs(live=None, restarts=3),
        REF3,
        C.CORRUPT,
        "3 restarts within the crash-loop window",
    ),
    ("corrupt-above-threshold", obs(live=None, restarts=4), REF3, C.CORRUPT, "4 restarts within"),
    ("corrupt-below-threshold-is-healthy", obs(restarts=2), REF3, C.HEALTHY, "storage ok"),
    ("corrupt-beats-down-failed", obs(restarts=3, state=S.FAILED, live=None), REF3, C.CORRUPT, "with state"),
    (
        "corrupt-beats-down-activating",
        obs(live=None, restarts=5, state=S.ACTIVATING),
        REF3,
        C.CORRUPT,
        "5 restarts",
    ),
    ("corrupt-beats-not-live", obs(restarts=3, live=False), REF3, C.CORRUPT, "3 restarts"),
    ("corrupt-beats-evicted", obs(live=None, restarts=3), REF_WITHOUT_ME, C.CORRUPT, "3 restarts"),
    (
        "corrupt-beats-degraded",
        obs(live=None, restarts=3, ready=False, low_space=True),
        REF3,
        C.CORRUPT,
        "3 restarts",
    ),
    # 2'. a crash loop on a broken volume is not corruption: no REJOIN can fix the volume (DOWN, for an operator)
    (
        "crash-loop-read-only-is-down",
        obs(restarts=3, state=S.ACTIVATING, live=None, read_only=True, probe_ok=False),
        REF3,
        C.DOWN,
        "3 restarts within the crash-loop window on broken storage",
    ),
    (
        "crash-loop-read-only-names-it",
        obs(
            restarts=4,
            live=None,
            read_only=True,
            probe_ok=False,
            storage_error="write probe failed: Read-only file system",
        ),
        REF3,
        C.DOWN,
        "storage probe failed: write probe failed: Read-only file system; storage is read-only",
    ),
    (
        "crash-loop-read-only-flag-only",
        obs(live=None, restarts=3, read_only=True),
        REF3,
        C.DOWN,
        "storage is read-only",
    ),
    (
        "crash-loop-probe-failed",
        obs(live=None, restarts=5, state=S.FAILED, probe_ok=False, storage_error="fsync: EIO"),
        REF3,
        C.DOWN,
        "on broken storage (storage probe failed: fsync: EIO)",
    ),
    (
        "crash-loop-broken-needs-operator",
        obs(live=None, restarts=3, probe_ok=False),
        REF3,
        C.DOWN,
        "needs an operator",
    ),
    (
        "crash-loop-broken-not-corrupt",
        obs(live=None, restarts=3, read_only=True),
        None,
        C.DOWN,
        "not treated as",
    ),
    # the loop is over when minkms answers live and ready: restarts still in the window carry nothing
    ("crash-loop-over-live-ready", obs(restarts=3), REF3, C.HEALTHY, "storage ok"),
    ("crash-loop-over-live-ready-read-only", obs(restarts=3, read_only=True), REF3, C.DEGRADED, "read-only"),
    ("crash-loop-live-not-ready-is-corrupt", obs(restarts=3, ready=False), REF3, C.CORRUPT, "3 restarts"),
    (
        "crash-loop-broken-evicted-too",
        obs(live=None, restarts=3, probe_ok=False),
        REF_WITHOUT_ME,
        C.DOWN,
        "broken",
    ),
    (
        "crash-loop-low-space-only-is-corrupt",
        obs(live=None, restarts=3, low_space=True),
        REF3,
        C.CORRUPT,
        "3 restarts",
    ),
    (
        "crash-loop-broken-but-empty-is-lost",
        obs(live=None, restarts=3, empty=True, read_only=True),
        REF3,
        C.STATE_LOST,
        "empty",
    ),
    ("corrupt-no-anchor", obs(live=None, restarts=3, minkms=ERR_VIEW), None, C.CORRUPT, "3 restarts"),
    # 3. DOWN
    ("down-failed", obs(state=S.FAILED), REF3, C.DOWN, "service is failed"),
    ("down-inactive", obs(state=S.INACTIVE), REF3, C.DOWN, "service is inactive"),
    ("down-activating", obs(state=S.ACTIVATING), REF3, C.DOWN, "service is activating"),
    ("down-deactivating", obs(state=S.DEACTIVATING), REF3, C.DOWN, "service is deactivating"),
    ("down-service-unknown", obs(state=S.UNKNOWN), REF3, C.DOWN, "service is unknown"),
    ("down-live-no-answer", obs(live=None), REF3, C.DOWN, "does not answer the live probe"),
    ("down-live-false", obs(live=False), REF3, C.DOWN, "reports not live"),
    ("down-both", obs(state=S.FAILED, live=None), REF3, C.DOWN, "service is failed; minkms does not answer"),
    ("down-below-threshold", obs(restarts=2, state=S.ACTIVATING, live=None), REF3, C.DOWN, "activating"),
    ("down-beats-evicted", obs(live=None), REF_WITHOUT_ME, C.DOWN, "live probe"),
    ("down-beats-evicted-no-anchor", obs(live=False, minkms=LOCAL_WITHOUT_ME), None, C.DOWN, "not live"),
    ("down-beats-degraded", obs(live=False, ready=False, low_space=True), REF3, C.DOWN, "not live"),
    ("down-no-anchor-no-view", obs(state=S.FAILED, live=None, minkms=ERR_VIEW), None, C.DOWN, "failed"),
    (
        "down-names-read-only-storage",
        obs(state=S.ACTIVATING, live=None, read_only=True),
        REF3,
        C.DOWN,
        "service is activating; minkms does not answer the live probe; storage is read-only",
    ),
    ("down-below-threshold-read-only", obs(restarts=2, live=None, read_only=True), REF3, C.DOWN, "read-only"),
    # 4. EVICTED
    ("evicted-not-in-reference", obs(), REF_WITHOUT_ME, C.EVICTED, "not in the cluster's membership"),
    (
        "evicted-no-anchor-own-list",
        obs(minkms=LOCAL_WITHOUT_ME),
        None,
        C.EVICTED,
        "not in its own membership",
    ),
    ("evicted-beats-not-ready", obs(ready=False), REF_WITHOUT_ME, C.EVICTED, "cluster's membership"),
    ("evicted-beats-low-space", obs(low_space=True), REF_WITHOUT_ME, C.EVICTED, "cluster's membership"),
    ("evicted-beats-local-error", obs(minkms=ERR_VIEW), REF_WITHOUT_ME, C.EVICTED, "cluster's membership"),
    ("evicted-other-host-in-ref", obs(), {0: A, 1: B, 2: OTHER}, C.EVICTED, "cluster's membership"),
    # 5. DEGRADED
    ("degraded-not-ready", obs(ready=False), REF3, C.DEGRADED, "live but not ready"),
    ("degraded-ready-no-answer", obs(ready=None), REF3, C.DEGRADED, "ready probe got no answer"),
    (
        "degraded-low-space",
        obs(low_space=True, free_bytes=512 * MIB),
        REF3,
        C.DEGRADED,
        "low free space: 512 MiB",
    ),
    ("degraded-low-space-gib", obs(low_space=True, free_bytes=1536 * MIB), REF3, C.DEGRADED, "1.5 GiB"),
    ("degraded-low-space-unknown", obs(low_space=True, free_bytes=None), REF3, C.DEGRADED, "low free space"),
    ("degraded-read-only", obs(read_only=True), REF3, C.DEGRADED, "storage is read-only"),
    ("degraded-probe-failed", obs(probe_ok=False), REF3, C.DEGRADED, "storage probe failed"),
    (
        "degraded-probe-failed-why",
        obs(probe_ok=False, storage_error="fsync: EIO"),
        REF3,
        C.DEGRADED,
        "storage probe failed: fsync: EIO",
    ),
    (
        "degraded-low-space-and-not-ready",
        obs(ready=False, low_space=True, free_bytes=512 * MIB),
        REF3,
        C.DEGRADED,
        "live but not ready; low free space: 512 MiB",
    ),
    (
        "degraded-no-anchor-local-error",
        obs(minkms=ERR_VIEW),
        None,
        C.DEGRADED,
        "cluster status unavailable: stat",
    ),
    ("degraded-no-anchor-no-view", obs(minkms=NO_VIEW), None, C.DEGRADED, "membership unknown"),
    ("degraded-no-anchor-no-members", obs(minkms=LOCAL_NO_MEMBERS), None, C.DEGRADED, "membership unknown"),
    (
        "degraded-not-ready-notes-local-error",
        obs(ready=False, minkms=ERR_VIEW),
        REF3,
        C.DEGRADED,
        "live but not ready; cluster status unavailable",
    ),
    ("degraded-below-crash-threshold", obs(restarts=2, ready=False), REF3, C.DEGRADED, "not ready"),
]


@pytest.mark.parametrize(
    ("o", "reference", "expected", "needle"), [c[1:] for c in LOCAL_CASES], ids=[c[0] for c in LOCAL_CASES]
)
def test_classify_local(
    o: Observation, reference: Mapping[int, str] | None, expected: NodeClass, needle: str
) -> None:
    v = local(o, reference)
    assert v.cls is expected, v.reason
    assert needle in v.reason
    assert v.reason and "\n" not in v.reason


def committed(members: Mapping[int, str], commit: int, node_id: int = 2, leader: int = 0) -> MinkmsView:
    """The local view: this host as `node_id` with `members` under `leader`, at `commit`."""
    pairs = tuple(sorted(members.items()))
    return MinkmsView(nodes_up=(NodeStatus(node_id, ME, "Follower", commit, leader, pairs),))


@pytest.mark.parametrize(
    ("local_view", "ref_commit", "expected", "needle"),
    [
        # just added: minkms lists this host at a later commit than the anchor's lagging report
        (committed(REF3, 12), 10, C.HEALTHY, "a member"),
        (committed(REF3, 10), 10, C.EVICTED, "the cluster's membership"),  # a tie goes to the reference
        (committed(REF3, 9), 10, C.EVICTED, "the cluster's membership"),  # missed its own removal
        (committed(REF3, 12), None, C.EVICTED, "the cluster's membership"),  # nothing to order by
        (
            committed(REF1_ME, 12, node_id=0),
            10,
            C.EVICTED,
            "the cluster's membership",
        ),  # alone proves nothing
        (committed(REF_WITHOUT_ME, 12), 10, C.EVICTED, "membership"),  # its own list leaves it out
        (
            committed(REF3, 12, leader=-1),
            10,
            C.EVICTED,
            "membership",
        ),  # no leader: cut off, or an old cluster
        (
            committed(REF3, 12, leader=2),
            10,
            C.EVICTED,
            "membership",
        ),  # led by itself, which the cluster dropped
        (committed({0: A, 5: B, 2: ME}, 12), 10, C.EVICTED, "membership"),  # not the cluster plus this node
    ],
)
def test_a_later_local_membership_beats_a_lagging_reference(
    local_view: MinkmsView, ref_commit: int | None, expected: NodeClass, needle: str
) -> None:
    v = classify_local(obs(minkms=local_view), ME, REF_WITHOUT_ME, Thresholds(), ref_commit)
    assert v.cls is expected and needle in v.reason


@pytest.mark.parametrize(
    ("local_view", "awaiting", "expected"),
    [
        (view(), True, C.HEALTHY),  # joined by its own REJOIN, not marked yet: the state is the cluster's
        (view(), False, C.STATE_LOST),  # no REJOIN of its own: a replaced volume
        (FRESH, True, C.STATE_LOST),  # started fresh, not added yet: a 1-node cluster proves nothing
        (NO_VIEW, True, C.STATE_LOST),  # minkms says nothing of it
    ],
)
def test_a_missing_marker_is_expected_between_start_and_mark(
    local_view: MinkmsView, awaiting: bool, expected: NodeClass
) -> None:
    """Seed 1731: a crash between add and mark, then every other node lost; called lost, the only node holding
    the cluster's state would have been quarantined for a restore from an older backup."""
    o = obs(marker=M.MISSING, minkms=local_view)
    assert classify_local(o, ME, REF3, Thresholds(), awaiting_mark=awaiting).cls is expected


def test_healthy_reason_is_exact() -> None:
    assert local(obs()) == Verdict(C.HEALTHY, "live, ready, a member, storage ok")


def test_fresh_cluster_reason_is_exact() -> None:
    v = local(obs(minkms=FRESH), REF3)
    assert v == Verdict(
        C.STATE_LOST, "minkms is node 0 of a 1-node cluster, but the cluster knows this host as node 2 of 3"
    )


@pytest.mark.parametrize(
    ("k", "restarts", "expected"),
    [
        (1, 0, C.DOWN),
        (1, 1, C.CORRUPT),
        (3, 2, C.DOWN),
        (3, 3, C.CORRUPT),
        (5, 4, C.DOWN),
        (5, 5, C.CORRUPT),
        (5, 6, C.CORRUPT),
    ],
    ids=["k1-0", "k1-1", "k3-2", "k3-3", "k5-4", "k5-5", "k5-6"],
)
def test_crash_loop_threshold_boundary(k: int, restarts: int, expected: NodeClass) -> None:
    assert local(obs(restarts=restarts, live=None), k=k).cls is expected


def test_default_threshold_is_three() -> None:
    assert Thresholds().crash_loop_restarts == 3


@pytest.mark.parametrize("bad", [0, -1], ids=["zero", "negative"])
def test_threshold_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="crash_loop_restarts"):
        Thresholds(crash_loop_restarts=bad)


def test_verdict_str() -> None:
    assert str(Verdict(C.DOWN, "service is failed")) == "DOWN: service is failed"


# --- classify_local: exhaustive combinations (hypothesis is not installed: a full product instead) --------------

_VIEWS = [
    view(),
    FRESH,
    ALONE_AS_2,
    NO_VIEW,
    ERR_VIEW,
    LOCAL_WITHOUT_ME,
    LOCAL_NO_MEMBERS,
    view(error="partial"),
]
_REFS: list[Mapping[int, str] | None] = [None, {}, REF3, REF3_ME_AS_0, REF1_ME, REF_WITHOUT_ME]
_NEVER_LOCAL = {C.UNREACHABLE, C.AGENT_DOWN, C.UNKNOWN}


def test_classify_local_total_over_all_field_combinations() -> None:
    """Never raises, always a local class with a one-line reason, and the rules' invariants hold everywhere."""
    n = 0
    tri: tuple[bool | None, ...] = (True, False, None)
    two = (True, False)
    for (state, live, ready), (probe_ok, read_only, empty, low_space), (marker, restarts), (
        minkms,
        ref,
    ) in itertools.product(
        itertools.product(list(S), tri, tri),
        itertools.product(two, two, two, two),
        itertools.product(list(M), (2, 3)),
        itertools.product(_VIEWS, _REFS),
    ):
        o = obs(
            state=state,
            live=live,
            ready=ready,
            probe_ok=probe_ok,
            read_only=read_only,
            empty=empty,
            low_space=low_space,
            free_bytes=None if low_space and restarts == 2 else 1,
            marker=marker,
            restarts=restarts,
            minkms=minkms,
        )
        v = local(o, ref)
        n += 1
        assert isinstance(v.cls, NodeClass) and v.cls not in _NEVER_LOCAL
        assert v.reason and "\n" not in v.reason
        if empty or marker in (M.MISSING, M.MISMATCH):
            assert v.cls is C.STATE_LOST
        recovered = live is True and ready is True
        if v.cls is C.CORRUPT:
            assert restarts >= 3 and not empty and probe_ok and not read_only and not recovered
        if restarts >= 3 and (read_only or not probe_ok) and not recovered and v.cls is not C.STATE_LOST:
            assert v.cls is C.DOWN and "needs an operator" in v.reason
        if v.cls in (C.EVICTED, C.DEGRADED, C.HEALTHY):
            assert state is S.ACTIVE and live is True and (restarts < 3 or ready is True)
        if v.cls is C.HEALTHY:
            assert ready is True and probe_ok and not read_only and not low_space
    assert n == 6 * 3 * 3 * 2 * 2 * 2 * 2 * 4 * 2 * len(_VIEWS) * len(_REFS)


# --- classify_peer ---------------------------------------------------------------------------------------------

TIMEOUT = 3.0
OK = Verdict(C.HEALTHY, "live, ready, a member, storage ok")
DEG = Verdict(C.DEGRADED, "low free space: 512 MiB")
EVI = Verdict(C.EVICTED, "not in the cluster's membership")
LOST = Verdict(C.STATE_LOST, "storage path is empty")
COR = Verdict(C.CORRUPT, "4 restarts within the crash-loop window with state present")
DWN = Verdict(C.DOWN, "service is failed")


def pe(age: float | None, reported: Verdict | None, live: bool | None, member: bool) -> PeerEvidence:
    return PeerEvidence(report_age=age, reported=reported, minkms_live=live, in_reference=member)


PEER_CASES: list[tuple[str, PeerEvidence, NodeClass, str]] = [
    # fresh report: trusted
    ("fresh-healthy", pe(1.0, OK, True, True), C.HEALTHY, OK.reason),
    ("fresh-degraded", pe(1.0, DEG, True, True), C.DEGRADED, DEG.reason),
    ("fresh-age-zero", pe(0.0, OK, None, True), C.HEALTHY, OK.reason),
    ("fresh-at-timeout-boundary", pe(TIMEOUT, OK, False, True), C.HEALTHY, OK.reason),
    ("fresh-beats-dead-probe", pe(1.0, OK, False, True), C.HEALTHY, OK.reason),
    ("fresh-state-lost", pe(1.0, LOST, True, True), C.STATE_LOST, LOST.reason),
    ("fresh-corrupt", pe(1.0, COR, False, True), C.CORRUPT, COR.reason),
    ("fresh-down", pe(1.0, DWN, False, True), C.DOWN, DWN.reason),
    # fresh report of fine health, but not a member: EVICTED
    (
        "fresh-healthy-not-member",
        pe(1.0, OK, True, False),
        C.EVICTED,
        "reports HEALTHY, but not in the cluster",
    ),
    ("fresh-degraded-not-member", pe(1.0, DEG, True, False), C.EVICTED, "reports DEGRADED, but not in"),
    ("fresh-evicted-member", pe(1.0, EVI, True, True), C.EVICTED, EVI.reason),
    ("fresh-evicted-not-member", pe(1.0, EVI, True, False), C.EVICTED, EVI.reason),
    ("fresh-lost-not-member-stays", pe(1.0, LOST, True, False), C.STATE_LOST, LOST.reason),
    ("fresh-corrupt-not-member-stays", pe(1.0, COR, None, False), C.CORRUPT, COR.reason),
    ("fresh-without-class", pe(1.0, None, True, True), C.UNKNOWN, "without a class"),
    # stale report: ignored, our probe decides
    (
        "stale-live-member",
        pe(10.0, OK, True, True),
        C.AGENT_DOWN,
        "no report for 10s, but its minkms answers",
    ),
    ("stale-just-past-timeout", pe(TIMEOUT + 1e-6, OK, True, True), C.AGENT_DOWN, "no report for 3s"),
    ("stale-live-not-member", pe(10.0, OK, True, False), C.UNREACHABLE, "answers but is not in the cluster"),
    (
        "stale-dead-member",
        pe(10.0, OK, False, True),
        C.UNREACHABLE,
        "no report for 10s; its minkms does not answer",
    ),
    ("stale-dead-not-member", pe(10.0, OK, False, False), C.UNREACHABLE, "does not answer"),
    ("stale-unprobed-member", pe(10.0, OK, None, True), C.UNREACHABLE, "was not probed"),
    ("stale-long", pe(185.0, OK, False, True), C.UNREACHABLE, "no report for 3m05s"),
    ("stale-very-long", pe(7630.0, OK, False, True), C.UNREACHABLE, "no report for 2h07m"),
    ("stale-evicted-report-ignored", pe(10.0, EVI, True, True), C.AGENT_DOWN, "answers and is a member"),
    # never reported
    ("never-live-member", pe(None, None, True, True), C.AGENT_DOWN, "never reported, but its minkms answers"),
    (
        "never-live-not-member",
        pe(None, None, True, False),
        C.UNREACHABLE,
        "never reported; its minkms answers but",
    ),
    (
        "never-dead-member",
        pe(None, None, False, True),
        C.UNREACHABLE,
        "never reported; its minkms does not answer",
    ),
    ("never-dead-not-member", pe(None, None, False, False), C.UNREACHABLE, "never reported"),
    (
        "never-unprobed",
        pe(None, None, None, True),
        C.UNREACHABLE,
        "never reported; its minkms was not probed",
    ),
    ("never-but-class-given", pe(None, OK, False, True), C.UNREACHABLE, "never reported"),
]


@pytest.mark.parametrize(
    ("e", "expected", "needle"), [c[1:] for c in PEER_CASES], ids=[c[0] for c in PEER_CASES]
)
def test_classify_peer(e: PeerEvidence, expected: NodeClass, needle: str) -> None:
    v = classify_peer(e, TIMEOUT)
    assert v.cls is expected, v.reason
    assert needle in v.reason
    assert "\n" not in v.reason


def test_fresh_report_passes_the_peers_own_verdict_through() -> None:
    assert classify_peer(pe(1.0, DEG, True, True), TIMEOUT) is DEG


def test_peer_short_durations() -> None:
    assert "no report for 3.5s" in classify_peer(pe(3.5, None, False, True), TIMEOUT).reason


# --- track / held_for ------------------------------------------------------------------------------------------


def test_track_first_verdict_starts_now() -> None:
    assert track(None, OK, 5.0) == Tracked(OK, 5.0)


def test_track_same_class_keeps_since_and_updates_reason() -> None:
    t1 = track(None, Verdict(C.DEGRADED, "live but not ready"), 10.0)
    t2 = track(t1, Verdict(C.DEGRADED, "low free space: 512 MiB"), 20.0)
    assert t2.since == 10.0
    assert t2.verdict.reason == "low free space: 512 MiB"
    assert held_for(t2, 25.0) == 15.0


def test_track_class_change_resets() -> None:
    t1 = track(None, OK, 10.0)
    t2 = track(t1, DWN, 20.0)
    t3 = track(t2, DWN, 30.0)
    t4 = track(t3, OK, 40.0)
    assert (t2.since, t3.since, t4.since) == (20.0, 20.0, 40.0)
    assert t4.verdict is OK
    assert held_for(t3, 30.0) == 10.0


@pytest.mark.parametrize(
    ("since", "now", "expected"),
    [(10.0, 10.0, 0.0), (10.0, 70.5, 60.5), (10.0, 9.0, 0.0)],
    ids=["zero", "elapsed", "clock-before-since-clamped"],
)
def test_held_for(since: float, now: float, expected: float) -> None:
    assert held_for(Tracked(OK, since), now) == expected


# --- restarts_within / prune_samples ---------------------------------------------------------------------------

Samples = list[tuple[float, int]]

RESTART_CASES: list[tuple[str, Samples, float, float, int]] = [
    ("empty", [], 60.0, 30.0, 0),
    ("single", [(50.0, 7)], 60.0, 30.0, 0),
    ("steady", [(0.0, 4), (40.0, 4), (50.0, 4)], 60.0, 30.0, 0),
    ("increments", [(0.0, 0), (45.0, 1), (50.0, 3)], 60.0, 30.0, 3),
    ("before-window-excluded", [(0.0, 0), (10.0, 2), (50.0, 3)], 60.0, 30.0, 1),
    ("baseline-before-window", [(0.0, 5), (40.0, 7)], 60.0, 30.0, 2),
    ("edge-start-excluded", [(0.0, 0), (30.0, 1)], 60.0, 30.0, 0),
    ("edge-just-inside", [(0.0, 0), (30.001, 1)], 60.0, 30.0, 1),
    ("edge-now-included", [(0.0, 0), (60.0, 1)], 60.0, 30.0, 1),
    ("future-excluded", [(0.0, 0), (61.0, 1)], 60.0, 30.0, 0),
    ("reset-to-zero", [(40.0, 5), (45.0, 0)], 60.0, 30.0, 0),
    ("reset-then-increment", [(40.0, 5), (45.0, 0), (50.0, 1)], 60.0, 30.0, 1),
    ("reset-to-lower", [(40.0, 5), (45.0, 2), (50.0, 4)], 60.0, 30.0, 2),
    ("up-reset-up", [(31.0, 0), (40.0, 3), (45.0, 0), (50.0, 2)], 60.0, 30.0, 5),
    ("zero-window", [(0.0, 0), (60.0, 1)], 60.0, 0.0, 0),
]


@pytest.mark.parametrize(
    ("samples", "now", "window", "expected"),
    [c[1:] for c in RESTART_CASES],
    ids=[c[0] for c in RESTART_CASES],
)
def test_restarts_within(samples: Samples, now: float, window: float, expected: int) -> None:
    assert restarts_within(samples, now, window) == expected
    assert restarts_within(tuple(samples), now, window) == expected


PRUNE_CASES: list[tuple[str, Samples, float, float, Samples]] = [
    ("empty", [], 60.0, 30.0, []),
    ("all-newer", [(40.0, 1), (50.0, 2)], 60.0, 30.0, [(40.0, 1), (50.0, 2)]),
    ("keeps-last-older", [(0.0, 0), (10.0, 1), (20.0, 2), (40.0, 3)], 60.0, 30.0, [(20.0, 2), (40.0, 3)]),
    ("at-edge-is-baseline", [(10.0, 0), (30.0, 1), (45.0, 2)], 60.0, 30.0, [(30.0, 1), (45.0, 2)]),
    ("all-older", [(0.0, 0), (10.0, 1)], 60.0, 30.0, [(10.0, 1)]),
    ("single-older", [(0.0, 3)], 60.0, 30.0, [(0.0, 3)]),
]


@pytest.mark.parametrize(
    ("samples", "now", "window", "expected"), [c[1:] for c in PRUNE_CASES], ids=[c[0] for c in PRUNE_CASES]
)
def test_prune_samples(samples: Samples, now: float, window: float, expected: Samples) -> None:
    assert prune_samples(samples, now, window) == tuple(expected)


def test_prune_preserves_the_count_and_restarts_are_never_negative() -> None:
    """Seeded random histories: pruning loses nothing `restarts_within` needs, at this or any later time."""
    rng = random.Random(20250101)
    for _ in range(500):
        t, counter, samples = 0.0, rng.randint(0, 5), []
        for _ in range(rng.randint(0, 30)):
            t += rng.choice([0.5, 1.0, 3.0, 10.0])
            counter = 0 if rng.random() < 0.1 else counter + rng.choice([0, 0, 1, 2])
            samples.append((t, counter))
        window = rng.choice([5.0, 15.0, 60.0])
        now = t + rng.choice([0.0, 1.0, 7.0])
        pruned = prune_samples(samples, now, window)
        for later in (now, now + 1.0, now + window / 2):
            assert restarts_within(pruned, later, window) == restarts_within(samples, later, window) >= 0


# --- VOLUME_MISSING (DESIGN §6 rail 11): an unmounted volume is never lost state --------------------------------

GONE = (
    "volume missing: storage path /mnt/minio-kms was a mount point of xfs /dev/sdb1 (dev 8:17) when marked, "
    "and is a plain directory now, on ext4 /dev/vda (dev 254:0): the volume is probably not mounted"
)


def unmounted(o: Observation, error: str | None = GONE) -> Observation:
    """`o` seen on a storage path whose volume is missing (the probe's verdict, with its reason)."""
    storage = dataclasses.replace(o.storage, volume_missing=True, error=error)
    return dataclasses.replace(o, storage=storage)


def test_an_empty_storage_path_off_its_volume_is_volume_missing_not_state_lost() -> None:
    empty = obs(empty=True, marker=M.MISSING, state=S.FAILED, live=None, ready=None, minkms=NO_VIEW)
    assert local(empty).cls is C.STATE_LOST  # without the volume check: what the agent said before
    v = local(unmounted(empty))
    assert v.cls is C.VOLUME_MISSING and v.reason == GONE  # the reason names both filesystems
    assert "xfs /dev/sdb1 (dev 8:17)" in v.reason and "ext4 /dev/vda (dev 254:0)" in v.reason


@pytest.mark.parametrize(
    "o",
    [
        obs(empty=True, marker=M.MISSING),
        obs(empty=True, marker=M.ABSENT, state=S.FAILED, live=None, ready=None),
        obs(marker=M.MISMATCH),
        obs(empty=True, marker=M.OK),
        obs(restarts=9, counter=9, state=S.ACTIVATING, live=None, ready=None),  # crash loop: never CORRUPT
        obs(restarts=9, counter=9, probe_ok=False, read_only=True, live=None, ready=None),
        obs(minkms=FRESH),  # a fresh 1-node minkms started on the root filesystem
        obs(),  # live and serving from files still open on the moved volume: still not on its volume
    ],
    ids=["empty", "empty-down", "foreign-marker", "only-marker", "crash-loop", "broken", "fresh", "serving"],
)
def test_volume_missing_comes_before_state_lost_and_corrupt(o: Observation) -> None:
    for ref in (REF3, None):
        v = local(unmounted(o), ref)
        assert v.cls is C.VOLUME_MISSING, v
        assert v.reason == GONE


def test_volume_missing_without_a_reason_still_says_what() -> None:
    v = local(unmounted(obs(empty=True), error=None))
    assert v.cls is C.VOLUME_MISSING and "not on the volume this node was marked on" in v.reason


def test_a_hung_probe_stays_stalled_even_off_its_volume() -> None:
    o = unmounted(obs(empty=True))
    o = dataclasses.replace(o, storage=dataclasses.replace(o.storage, stalled=True))
    assert local(o).cls is C.STALLED


def test_a_stale_identity_alone_changes_nothing() -> None:
    """identity_stale only asks the daemon to re-mark the node: the class is the one the rest says."""
    o = obs()
    stale = dataclasses.replace(o, storage=dataclasses.replace(o.storage, identity_stale=True))
    assert local(stale).cls is C.HEALTHY
