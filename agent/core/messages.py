"""The messages agents exchange over the peer API (DESIGN §4), as immutable dataclasses.

Only plain field types are used (str, int, float, bool, None, tuples and nested message dataclasses), so that
`agent.core.wire` can encode and strictly decode every one of them from the dataclass definition alone. Times in
messages are durations or the sender's own wall clock for display: no agent ever compares another agent's
monotonic clock with its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from agent.core.backups import BackupInfo

ACTION_KINDS = ("REJOIN", "EVICT", "RESTORE")
ACTION_ID_MAX = 128
"""An action id is `<kind>-<agent name>-<term>-<wall ms>`: 7 + 64 + 20 + 15 characters and three dashes at most
(agent names are up to 64 characters). It names a quarantine directory (`<UTC time>-<id>`, far under 255)."""
ACTION_ID_RE = re.compile(rf"[A-Za-z0-9._-]{{1,{ACTION_ID_MAX}}}")


def action_id_problem(value: object) -> str | None:
    """Why `value` is no action id, None when it is one: ids name files and directories, so they are checked
    wherever one is read back."""
    if isinstance(value, str) and ACTION_ID_RE.fullmatch(value):
        return None
    return f"action id {value!r} must be 1 to {ACTION_ID_MAX} characters from A-Z a-z 0-9 . _ -"


@dataclass(frozen=True)
class NodeReport:
    """The sender's view of its own node (absent for a witness)."""

    cls: str  # NodeClass value
    reason: str
    held_seconds: float  # how long the class has held on the sender's clock
    host: str  # the minkms host
    node_id: int | None = None
    role: str = ""
    commit: int | None = None
    leader_id: int | None = None
    members: tuple[tuple[int, str], ...] = ()  # the membership the local minkms reports (id, host)
    # How old, on the sender's clock, the observation behind `cls` was when the report was made (None: a sender
    # that does not say). An observation older than `view.stale_after` is STALLED for everyone (`view.vouched`).
    observed_seconds: float | None = None


@dataclass(frozen=True)
class RestoreApproval:
    """An operator's `kmagent restore --approve`, cluster-wide like the pause: the higher epoch wins everywhere,
    so any anchor (a later one too) and every acker know it. An epoch with `until` 0 withdraws it."""

    epoch: int
    until: float  # wall-clock epoch seconds: an approval is for the situation `explain` showed, not for ever
    by: str  # who approved, on which host (signed into the action as requested_by)
    backup: str = ""  # the backup the operator named (--backup); "" for the freshest intact one
    accept_loss_of: tuple[str, ...] = ()  # nodes the operator accepts losing the state of (--accept-loss-of)


@dataclass(frozen=True)
class Report:
    """Pushed by every agent to every peer each probe interval; fresh for peer_timeout after receipt."""

    cluster: str
    sender: str
    seq: int  # increases with every report of one agent process (older or equal ones are dropped)
    boot: str  # random id of the sender's process: a restart resets seq
    term: int  # the highest term the sender knows
    anchor: str | None  # the agent it follows as anchor (itself when it holds the lease)
    anchor_lease_seconds: float | None  # when the sender is anchor: the lease it still holds, on its clock
    node: NodeReport | None
    in_flight: str | None = None  # the unfinished action id it has acked or drives
    in_flight_action: Action | None = (
        None  # that action whole: a new anchor that never acked it can resume it
    )
    version: str = ""
    restarting: bool = False  # within one lease of its start: it votes for nobody and does not stand
    views: tuple[tuple[str, str, float], ...] = ()  # its classification of every node: (name, class, held s)
    # The cluster-wide pause (DESIGN §6.7) as the sender knows it: every agent adopts the state with the higher
    # epoch, so a pause or a resume given on any host reaches all. paused_until is wall-clock epoch seconds
    # (0: not paused); an operator's pause is a human-scale duration, so NTP-level skew does not matter.
    pause_epoch: int = 0
    paused_until: float = 0.0
    pause_reason: str = ""  # who paused, and why, for status
    finished: tuple[str, ...] = ()  # ids of the actions it recorded finished lately: ackers release them
    acks: tuple[
        tuple[str, float], ...
    ] = ()  # (node, wall time) of the latest `kmagent ack` it knows per node
    # the newest backup copies it holds intact (at most backups.REPORTED), and the newest restore approval it knows
    backups: tuple[BackupInfo, ...] = ()
    restore: RestoreApproval | None = None


@dataclass(frozen=True)
class VoteRequest:
    """A candidate asks for (or renews) a lease in `term`."""

    cluster: str
    term: int
    candidate: str
    round: int = (
        0  # the candidate's request round within the term; echoed so that late grants count only for it
    )


@dataclass(frozen=True)
class VoteReply:
    cluster: str
    term: int  # the term of the request it answers
    voter: str
    granted: bool
    reason: str  # why it was refused, for humans; "" when granted
    voter_term: int  # the highest term the voter has voted in
    round: int = 0  # the round of the request it answers


@dataclass(frozen=True)
class Action:
    """A destructive action; `id` is unique and stays the same when a new anchor re-certifies it."""

    id: str
    kind: str  # one of ACTION_KINDS
    target: str  # agent name of the node acted upon
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AckRequest:
    """The anchor asks a peer to sign `action` in `term`."""

    cluster: str
    term: int
    anchor: str
    action: Action


@dataclass(frozen=True)
class Ack:
    """A signature over ack_payload(cluster, term, action) with the signer's TLS key."""

    signer: str
    certificate: str  # the signer's certificate, PEM, so that anyone can verify the ack alone
    signature: str  # base64


@dataclass(frozen=True)
class AckReply:
    granted: bool
    reason: str
    ack: Ack | None = None
    holding: Action | None = None  # on refusal: the different unfinished action the refuser acked (to adopt)


@dataclass(frozen=True)
class Certificate:
    """Q acks of distinct configured agents over the same (cluster, term, action)."""

    cluster: str
    term: int
    action: Action
    acks: tuple[Ack, ...]


def ack_payload(cluster: str, term: int, action: Action) -> bytes:
    """The canonical bytes every ack signs: sorted keys, no spaces, UTF-8; the same on every agent."""
    body = {
        "cluster": cluster,
        "term": term,
        "action": {
            "id": action.id,
            "kind": action.kind,
            "target": action.target,
            "params": [list(p) for p in action.params],
        },
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class StepRequest:
    """The anchor asks the target of a certified action to run one of its steps (DESIGN §4.4)."""

    certificate: Certificate
    step: str


@dataclass(frozen=True)
class StepReply:
    ok: bool
    detail: str  # what happened, or why it was refused or failed
    progress: tuple[str, ...] = ()  # the steps of this action the target has journaled done, in order
    # the step did not run, and it is no failure of the step: its command was fenced, its journal write did not
    # return in time, or the target holds the issuer deposed. The anchor tries again; no attempt is counted.
    not_run: bool = False


@dataclass(frozen=True)
class OperatorRequest:
    """`kmagent rejoin|evict NODE` given on any host, forwarded to the anchor: it still needs a quorum's acks."""

    action: Action
