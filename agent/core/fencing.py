"""Fencing of the anchor's destructive minkms commands (`edit --rm`, `add`, `restore`).

minkms has no term fencing: it runs whatever a holder of the root API key sends, whoever sent it and however late.
So every command carries the facts it was certified for and is refused when they no longer hold, checked by the
issuer immediately before the command leaves (after every await, never before a blocking call):

* the issuer still holds its anchor lease, with time to spare, when the command starts, and still while it runs:
  a command is killed before its issuer's lease ends (renewals extend the lease while it runs), so that it never
  runs past the lease it was checked under;
* `remove` removes only the minkms node id named in the signed action (recorded at proposal from the reference
  membership), and only while that id is still a member at the action's host. Never an id read later from the
  target's host: the target may have been removed and re-added under a new id by a later anchor in the meantime.

Pure: the shell (agent.actions) and the simulator (tests/sim) both call these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.core.messages import Action

__all__ = [
    "LEASE_MARGIN",
    "MIN_COMMAND_SECONDS",
    "RemovePlan",
    "certified_node_id",
    "lease_refusal",
    "remove_plan",
]

LEASE_MARGIN = 1.0
"""Seconds of lease beyond a command's timeout that the issuer must still hold to start it (clock drift, the
time the command takes to leave)."""
MIN_COMMAND_SECONDS = 1.0
"""A destructive command is not started with less time than this to run: it would only time out (in doubt)."""


def certified_node_id(action: Action) -> int | None:
    """The minkms node id the action's certificate names (`node_id` param), None when it names none."""
    raw = dict(action.params).get("node_id")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 and str(value) == raw else None


def lease_refusal(is_anchor: bool, lease_remaining: float, needed: float) -> str | None:
    """Why a destructive command must not start (or go on) now, None when it may: the issuer's lease must outlast
    `needed` seconds (MIN_COMMAND_SECONDS to start, 0 to go on running) by LEASE_MARGIN. The shell checks it right
    before the command starts and while it runs; a running command is killed when this refuses, so that it never
    runs past its issuer's lease (renewals extend the lease while it runs)."""
    if not is_anchor:
        return "this agent no longer holds the anchor lease"
    if lease_remaining < needed + LEASE_MARGIN:
        return (
            f"the anchor lease has {lease_remaining:.1f}s left, less than {needed + LEASE_MARGIN:g}s: "
            "the command could outlive the lease"
        )
    return None


@dataclass(frozen=True)
class RemovePlan:
    """What the anchor's `remove` step does: remove `ids` (empty: nothing), and why, for the journal."""

    ids: tuple[int, ...]
    detail: str


def remove_plan(action: Action, host: str, membership: Mapping[int, str]) -> RemovePlan:
    """The ids `minkms edit --rm` may take for `action` against the current `membership` (id -> host).

    Only the certified id, and only while it is a member at `host`. An id that is no longer a member was removed
    (by this action before a crash, or by a later anchor that also re-added the host under a new id): there is
    nothing to remove, whatever id the host has now. An action certified without an id (the host was not a member
    at proposal) removes nothing."""
    certified = certified_node_id(action)
    if certified is None:
        return RemovePlan((), f"{action.id} names no minkms node id: {host} was not a member when proposed")
    current = membership.get(certified)
    if current is None:
        others = sorted(nid for nid, h in membership.items() if h == host)
        now = f" ({host} is a member as node {others[0]} now, re-added: left alone)" if others else ""
        return RemovePlan((), f"node {certified} is not a member: nothing to remove{now}")
    if current != host:
        return RemovePlan((), f"node {certified} is {current} now, not {host}: nothing removed")
    return RemovePlan((certified,), f"remove node {certified} ({host})")
