"""Total-failure restore (DESIGN §5 RESTORE, guard rail 5): when it is called for, whether it is armed, which
backup it uses, and what an operator is told. Pure.

Called for: no node serves (none HEALTHY or DEGRADED) and the anchor's own node has lost its state. Allowed only
when armed — `policy.auto_restore`, or an operator's `kmagent restore --approve` that every agent knows from the
reports — and when every other node's agent reports its state lost for `restore_after`. A node without such
evidence (unreachable, agent down, holding state, VOLUME_MISSING: its volume is not mounted, STALLED: its
storage probe hangs) blocks it: it may hold newer state than any backup. Only an operator's approval may name
such nodes (`--accept-loss-of`), and never a node that serves.

The restore runs on the anchor (a host whose state is lost), from the freshest backup any agent holds an intact
copy of (`backups.choose`); the others then REJOIN it one at a time, as for any node whose state is lost.
"""

from __future__ import annotations

from agent.core import backups
from agent.core.classify import human_duration
from agent.core.facts import ClusterFacts, NodeFacts
from agent.core.messages import Action, RestoreApproval
from agent.core.model import NodeClass

__all__ = [
    "ACCEPT",
    "APPROVAL_VALIDITY",
    "BACKUP",
    "RESTORE",
    "SHA256",
    "active_approval",
    "advice",
    "called_for",
    "choice",
    "command",
    "established",
    "needed",
    "problem",
    "proposal",
]

RESTORE = "RESTORE"
BACKUP, SHA256, COMMIT, ACCEPT = "backup", "sha256", "commit", "accept_loss_of"
REQUESTED_BY = "requested_by"  # who approved (guards.REQUESTED_BY is this one)
APPROVAL_VALIDITY = 3600.0  # an approval is for the situation `explain` showed, not for the next disaster
_SERVING = (NodeClass.HEALTHY, NodeClass.DEGRADED)
# Every class but STATE_LOST (and the serving ones) blocks a restore, as an unreachable host does: its state may
# still exist. These two say more precisely why (DESIGN §6 rails 10 and 11): neither is ever evidence of loss.
_MAY_HOLD_STATE = {
    NodeClass.VOLUME_MISSING: (
        "its storage path is not on the volume it was marked on, and its state may still be on that volume "
        "(mount it and it serves again)"
    ),
    NodeClass.STALLED: "its storage probe does not return (a hung volume): its state may still be there",
}


def needed(facts: ClusterFacts) -> bool:
    """No node serves, and some node's state is lost: only a restore (or a host's return) can end it."""
    nodes = [n.verdict.cls for n in facts.nodes if n.verdict is not None]
    return not any(c in _SERVING for c in nodes) and NodeClass.STATE_LOST in nodes


def established(facts: ClusterFacts) -> bool:
    """A restore is needed, and this agent has positive, lasting evidence that nothing but a restore can end it:
    every node (witnesses aside) has been STATE_LOST, or named by the operator's active approval
    (`--accept-loss-of`), for at least `restore_after` on this agent's clock, the wait of an automatic restore.

    Stricter than `needed`, which counts every silent node as not serving: an AGENT_DOWN node's minkms answers
    (it may serve), an UNREACHABLE one may only be cut off from this agent, and a DOWN, CORRUPT or EVICTED one may
    hold state; each of them blocks the restore itself (`_blocks`) too."""
    if not needed(facts):
        return False
    approval = active_approval(facts)
    accept = tuple(approval.accept_loss_of) if approval is not None else ()
    return all(
        n.verdict is None
        or (_blocks(n, facts, accept, False) is None and n.held_seconds >= facts.timings.restore_after)
        for n in facts.nodes
    )


def called_for(facts: ClusterFacts) -> bool:
    """A restore is needed, and the anchor's own node is one whose state is lost (it is where a restore runs)."""
    if not needed(facts):
        return False
    anchor = facts.node(facts.anchor) if facts.anchor is not None else None
    return anchor is not None and anchor.verdict is not None and anchor.verdict.cls is NodeClass.STATE_LOST


def active_approval(facts: ClusterFacts) -> RestoreApproval | None:
    """The operator's approval, while it has not expired and no RESTORE has started since it was given."""
    a = facts.approval
    if a is None or facts.wall_now >= a.until:
        return None
    given = a.until - APPROVAL_VALIDITY
    if any(e.kind == RESTORE and e.started_wall >= given for e in facts.history):
        return None  # used: an approval arms one restore
    return a


def choice(facts: ClusterFacts) -> backups.Choice:
    approval = active_approval(facts)
    return backups.choose(dict(facts.backups), (approval.backup or None) if approval else None)


def proposal(facts: ClusterFacts) -> Action | None:
    """The RESTORE the anchor would propose now (armed or not: `explain` shows the rules refusing it)."""
    if not called_for(facts) or facts.anchor is None:
        return None
    chosen = choice(facts).backup
    approval = active_approval(facts)
    params: list[tuple[str, str]] = []
    if chosen is not None:
        params += [(BACKUP, chosen.id), (SHA256, chosen.sha256), (COMMIT, str(chosen.commit))]
    if approval is not None:
        if approval.accept_loss_of:
            params.append((ACCEPT, ",".join(approval.accept_loss_of)))
        params.append((REQUESTED_BY, approval.by))
    ident = f"restore-{facts.anchor}-{facts.term}-{round(facts.wall_now * 1000)}"
    return Action(ident, RESTORE, facts.anchor, tuple(params))


def _param(action: Action, key: str) -> str | None:
    return next((v for k, v in action.params if k == key), None)


def accepted(action: Action) -> tuple[str, ...]:
    value = _param(action, ACCEPT)
    return tuple(value.split(",")) if value else ()


def problem(action: Action, facts: ClusterFacts) -> str | None:
    """Why guard rail 5 forbids `action` (a RESTORE) in this agent's view; None when it allows it."""
    approval = active_approval(facts)
    by = _param(action, REQUESTED_BY)
    accept = accepted(action)
    if by is not None:
        if approval is None or approval.by != by:
            return f"the restore names an approval by {by!r} that this agent does not know (or it expired or was used)"
        if tuple(approval.accept_loss_of) != accept:
            return "the nodes whose loss the restore accepts differ from the operator's approval"
    elif not facts.policy.auto_restore:
        return (
            f"restore is not armed: policy.auto_restore is off and no operator approved it ({command(facts)})"
        )
    elif accept:
        return "only an operator's approval may accept the loss of a node"
    target = facts.node(action.target)
    if target is None or target.verdict is None:
        return f"{action.target!r} is not a node one can restore on"
    if target.verdict.cls is not NodeClass.STATE_LOST:
        return f"{target.name} is {target.verdict.cls}: a restore never runs over a node that may hold state"
    blocked = [
        why for n in facts.nodes if (why := _blocks(n, facts, accept, by is not None) or _restored(n, facts))
    ]
    if blocked:
        return "; ".join(blocked)
    chosen = choice(facts)
    if chosen.backup is None:
        return f"no backup to restore: {chosen.reason}"
    if _param(action, BACKUP) != chosen.backup.id or _param(action, SHA256) != chosen.backup.sha256:
        return (
            f"the restore names backup {_param(action, BACKUP)!r}; the freshest intact one this agent knows is "
            f"{chosen.backup.id} (never an older backup while a newer one is available)"
        )
    return None


def _blocks(node: NodeFacts, facts: ClusterFacts, accept: tuple[str, ...], approved: bool) -> str | None:
    """Why `node` blocks the restore: it serves, may hold state, or has not been lost long enough."""
    if node.verdict is None:
        return None  # a witness holds no state
    cls = node.verdict.cls
    if cls in _SERVING:
        return f"{node.name} is {cls}: the cluster still serves, it needs no restore"
    if node.name in accept:
        return None
    if cls is not NodeClass.STATE_LOST:
        why = _MAY_HOLD_STATE.get(cls, "it may hold newer state than any backup")
        return f"{node.name} is {cls}: {why} (an operator may accept its loss: --accept-loss-of {node.name})"
    needed = facts.timings.restore_after
    if not approved and node.held_seconds < needed:
        return (
            f"{node.name} has been STATE_LOST for {human_duration(node.held_seconds)}; "
            f"an automatic restore needs {human_duration(needed)} on every node"
        )
    return None


def _restored(node: NodeFacts, facts: ClusterFacts) -> str | None:
    """Why `node`'s evidence of loss does not count: it began before the node's last RESTORE ended, so it is the
    loss that restore repaired, seen by an agent whose view has not caught up yet (found in the lab: a second
    RESTORE proposed a second after the first one finished, while the restored node still looked STATE_LOST).
    The end, not the start: the RESTORE itself restarts the evidence (its quarantine, a crash of the target's
    agent during it), so evidence newer than its start was still that loss (issue 12: a second RESTORE, of
    another node, acked by all three agents a second after the first finished)."""
    if node.verdict is None or node.verdict.cls is not NodeClass.STATE_LOST:
        return None
    restores = [
        max(e.started_wall, e.finished_wall)
        for e in facts.history
        if e.kind == RESTORE and e.target == node.name
    ]
    lost_since = facts.wall_now - node.held_seconds
    if restores and lost_since <= max(restores):
        return (
            f"{node.name} was restored {human_duration(max(0.0, facts.wall_now - max(restores)))} ago and its "
            "state-lost evidence is older than that: it is the loss that restore repaired"
        )
    return None


def command(facts: ClusterFacts) -> str:
    """The exact command an operator runs to approve the restore `explain` shows."""
    chosen = backups.choose(dict(facts.backups)).backup
    silent = [
        n.name
        for n in facts.nodes
        if n.verdict is not None
        and n.verdict.cls not in _SERVING
        and n.verdict.cls is not NodeClass.STATE_LOST
    ]
    words = ["kmagent restore"]
    if chosen is not None:
        words.append(f"--backup {chosen.id}")
    words.append("--approve")
    words += [f"--accept-loss-of {n}" for n in silent]
    return " ".join(words)


def advice(facts: ClusterFacts) -> str | None:
    """One paragraph for `status` and `explain` while a restore is called for: from which backup, what it loses,
    and the command (None when no restore is needed)."""
    if not needed(facts):
        return None
    chosen = choice(facts)
    if chosen.backup is None:
        return (
            f"RESTORE NEEDED: no node holds state, and {chosen.reason}: restore by hand (docs/operations.md)"
        )
    b = chosen.backup
    age = human_duration(max(0.0, facts.wall_now - b.created))
    lost = [
        n.name
        for n in facts.nodes
        if n.verdict is not None
        and n.verdict.cls not in _SERVING
        and n.verdict.cls is not NodeClass.STATE_LOST
    ]
    text = (
        f"RESTORE NEEDED: no node holds state. The freshest intact backup is {b.id} (commit {b.commit}, taken "
        f"{age} ago by {b.source}, copies on {', '.join(chosen.holders)}); every change after it is lost."
    )
    if lost:
        text += (
            f" {', '.join(lost)} may hold newer state than that backup: a restore loses it;"
            " bring them back instead if you can."
        )
    armed = "armed (policy.auto_restore)" if facts.policy.auto_restore and not lost else "not armed"
    if active_approval(facts) is not None:
        armed = "approved by an operator"
    return text + f" Restore is {armed}. To approve: {command(facts)}"
