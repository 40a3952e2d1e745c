"""The step tables of each action kind (DESIGN §5): who runs each step, how it fails, and why a retry is safe.

Pure data plus three questions the executor asks. Progress of an action is the list of its done step names, in
table order (journaled with fsync, one step at a time).

Failure policy. A step is tried `attempts` times (each within `timeout` seconds); then `on_failure` applies:
* "abort": nothing irreversible has happened yet, so the action ends as aborted and the node is left as it was
  (REJOIN's fence: minkms still runs with its state; EVICT's remove: the node is still a member);
* "escalate": the target's state has been moved aside or the membership changed, so neither going back nor
  going on is safe without a human: the action ends as escalated and the node is marked ESCALATED;
* "retry": keep the step pending and try it again next round (for waits that need only time); no table uses
  it today, as every wait here has an end after which an operator must look.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["TABLES", "Position", "Step", "is_behind", "next_step", "position", "steps"]

RunsOn = Literal["target", "anchor"]
OnFailure = Literal["retry", "abort", "escalate"]
Position = Literal["behind", "repeat", "next", "ahead"]


@dataclass(frozen=True)
class Step:
    name: str
    runs_on: RunsOn
    destructive: bool  # changes state or membership: needs the certificate (and, on the anchor, its lease)
    timeout: float  # seconds, per attempt
    attempts: int
    on_failure: OnFailure  # once every attempt failed (see the module docstring)
    precondition: str  # human text: what must hold before it runs (shown by explain and history)
    idempotency: str  # human text: why running it again is safe, and how "already done" is recognised


_REMOVE = Step(
    name="remove",
    runs_on="anchor",
    destructive=True,
    timeout=60.0,
    attempts=3,
    on_failure="escalate",
    precondition="the anchor holds its lease; the target's id is taken from the anchor's membership",
    idempotency=(
        "if the target's id is not a member there is nothing to do; otherwise "
        "`minkms edit https://ANCHOR --rm ID`, done once `minkms ls` on the anchor no longer lists it"
    ),
)

REJOIN: tuple[Step, ...] = (
    Step(
        name="fence",
        runs_on="target",
        destructive=True,
        timeout=60.0,
        attempts=3,
        on_failure="abort",  # minkms could not be stopped: its state is untouched, nothing to undo
        precondition="a valid certificate naming this node and action",
        idempotency="stopping a stopped service is a no-op; done when the unit is inactive and live gets no answer",
    ),
    Step(
        name="quarantine",
        runs_on="target",
        destructive=True,
        timeout=300.0,
        attempts=3,
        on_failure="escalate",  # the state may be partly moved aside: a human looks before anything else
        precondition=(
            "minkms is stopped (fence done); the storage path is the configured one, a mount point when "
            "require_mount is set, and carries no other cluster's marker"
        ),
        idempotency=(
            "moves whatever is left into the one quarantine directory named by the action id (never deletes); "
            "done when the storage directory is empty"
        ),
    ),
    _REMOVE,
    Step(
        name="start",
        runs_on="target",
        destructive=False,  # a fresh node holds nothing; preflight allows it only for this in-flight step
        timeout=120.0,
        attempts=3,
        on_failure="escalate",  # the state is already aside and the node out of the cluster
        precondition="the storage directory is empty and the target is not a member",
        idempotency="starting a running service is a no-op; done when minkms answers live as a fresh node",
    ),
    Step(
        name="add",
        runs_on="anchor",
        destructive=True,
        timeout=600.0,  # `minkms add` copies the whole state: its time grows with the data
        attempts=3,
        on_failure="escalate",  # the node is fresh and out: only a human can tell why it cannot be added
        precondition="the target answers live as a fresh 1-node cluster; every member accepts writes",
        idempotency="if the target's host is already a member there is nothing to do; done when the anchor's membership lists it",
    ),
    Step(
        name="mark",
        runs_on="target",
        destructive=False,
        timeout=60.0,
        attempts=3,
        on_failure="escalate",  # the node is a member again but carries no identity: a human looks
        precondition="the target is a member again (its own minkms lists it in a cluster of more than one)",
        idempotency=(
            "writes the identity marker with the node's new id beside the fresh state and revokes the fresh-start "
            "authorisation; writing the same marker again changes nothing"
        ),
    ),
    Step(
        name="verify",
        runs_on="anchor",
        destructive=False,
        timeout=300.0,
        attempts=3,
        on_failure="escalate",  # a member that never catches up needs a human, not another REJOIN
        precondition="the target is a member",
        idempotency="read-only: the target is HEALTHY, its commit caught up, and the anchor is ready for writes",
    ),
)

EVICT: tuple[Step, ...] = (
    # A failed remove changed nothing (the node is still a member): abort rather than escalate.
    dataclasses.replace(_REMOVE, on_failure="abort"),
    Step(
        name="verify",
        runs_on="anchor",
        destructive=False,
        timeout=120.0,
        attempts=3,
        on_failure="escalate",  # the node is out and writes still fail: something else is wrong
        precondition="the target is no longer a member",
        idempotency="read-only: the anchor is ready for writes (/v1/health/ready?write)",
    ),
)

_FENCE, _QUARANTINE, _START = REJOIN[0], REJOIN[1], REJOIN[3]

# Every step runs on the target, the host the backup is restored on (the anchor, when proposed): an anchor that
# takes over drives them there like a REJOIN's. The others then REJOIN it, one at a time, by the usual rules.
RESTORE: tuple[Step, ...] = (
    dataclasses.replace(
        _FENCE,
        precondition="a valid certificate naming this node and action; its own view says its state is lost",
    ),
    Step(
        name="fetch",
        runs_on="target",
        destructive=False,
        timeout=900.0,  # a download of the whole backup from another agent
        attempts=3,
        on_failure="abort",  # nothing was changed but a stopped service whose state was already lost
        precondition="an intact copy of the action's backup (its sha256) is held here or by a fresh peer",
        idempotency=(
            "a local copy whose sha256 and gzip check out is used as it is; otherwise it is downloaded from a "
            "holder into the backup directory (streamed, checked, renamed into place only when intact)"
        ),
    ),
    _QUARANTINE,
    dataclasses.replace(_START, precondition="the storage directory is empty"),
    Step(
        name="restore",
        runs_on="target",
        destructive=True,
        timeout=900.0,
        attempts=3,
        on_failure="escalate",  # a fresh node that will not take the backup: a human looks
        precondition="minkms answers live as a fresh single node (commit 0)",
        idempotency=(
            "if the node's commit has reached the backup's it was restored already (minkms itself refuses a "
            "restore onto a node that holds state); otherwise `minkms restore https://HOST FILE`"
        ),
    ),
    dataclasses.replace(
        REJOIN[5],
        precondition="the node answers as a single-node cluster that holds the backup's state",
    ),
    Step(
        name="verify",
        runs_on="target",
        destructive=False,
        timeout=300.0,
        attempts=3,
        on_failure="escalate",
        precondition="the backup is restored",
        idempotency="read-only: the node's commit has reached the backup's and it accepts writes",
    ),
)

TABLES: dict[str, tuple[Step, ...]] = {"REJOIN": REJOIN, "EVICT": EVICT, "RESTORE": RESTORE}


def steps(kind: str) -> tuple[Step, ...]:
    """The step table of `kind`; ValueError for a kind without one."""
    table = TABLES.get(kind)
    if table is None:
        raise ValueError(f"unknown action kind {kind!r} (known: {', '.join(TABLES)})")
    return table


def _done_count(table: tuple[Step, ...], kind: str, done: Sequence[str]) -> int:
    names = [s.name for s in table]
    if list(done) != names[: len(done)]:
        raise ValueError(
            f"{kind} progress {list(done)} is not a prefix of its steps {names}: the journal is damaged"
        )
    return len(done)


def next_step(kind: str, done: Sequence[str]) -> Step | None:
    """The step to run after `done` (a prefix of the table); None when every step is done."""
    table = steps(kind)
    k = _done_count(table, kind, done)
    return table[k] if k < len(table) else None


def position(kind: str, step: str, done: Sequence[str]) -> Position:
    """Where a request for `step` stands against the journaled progress `done`.

    behind: earlier than the last done step; running it could undo later progress (a delayed request from an
    old anchor): refuse. repeat: the last done step again (a retry after a lost reply): answer "done", do not
    run it again. next: run it. ahead: a step before it is not done: refuse.
    """
    table = steps(kind)
    k = _done_count(table, kind, done)
    names = [s.name for s in table]
    if step not in names:
        raise ValueError(f"{kind} has no step {step!r} (its steps: {', '.join(names)})")
    i = names.index(step)
    if i < k - 1:
        return "behind"
    if i == k - 1:
        return "repeat"
    return "next" if i == k else "ahead"


def is_behind(kind: str, step: str, done: Sequence[str]) -> bool:
    """True when a request for `step` must be refused because later steps are already done."""
    return position(kind, step, done) == "behind"
