"""The executor's rules (DESIGN §4.4, §5), pure: what the anchor and the target do with an action's steps.

`agent/actions.py` runs them against minkms, the journal and the network; the simulator (`tests/sim/`) runs the
same functions under faults. Keeping them here, apart from the I/O, is what lets the simulator test the
daemon's rules instead of a copy of them.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.core import playbooks, restore
from agent.core.election import quorum
from agent.core.facts import ClusterFacts
from agent.core.messages import Action, Report, StepReply
from agent.core.model import NodeClass, NodeStatus
from agent.core.view import NodeView

__all__ = [
    "FAILED",
    "FINISHED",
    "FINISH_STEP",
    "RECENT_FINISHED",
    "REJOIN_CLASSES",
    "SUPERSEDED",
    "TargetDecision",
    "adoptable",
    "already_finished",
    "ask_progress",
    "awaiting_mark",
    "close_unconfirmed",
    "done_after",
    "dropped_by_target",
    "evict_remove_refusal",
    "finished_ids",
    "none_serves",
    "superseded",
    "superseded_in",
    "target_closes",
    "target_decision",
    "target_position",
    "to_adopt",
    "unfinished_action",
    "writes_wait_for",
]

FINISH_STEP = "finish"
"""Not in the tables: the anchor tells the target to close its side (journal, held ack, fresh-start grant)."""
FINISHED = "already finished"
"""How a target that closed the action answers any step of it; the anchor then closes its side too."""

RECENT_FINISHED = 16
"""Finished action ids carried in reports, so that every acker releases them."""
REJOIN_CLASSES = frozenset({NodeClass.STATE_LOST, NodeClass.CORRUPT, NodeClass.EVICTED})
"""A node's own classes that call for its REJOIN: the target begins one only in these."""
FAILED = frozenset({NodeClass.UNREACHABLE, NodeClass.STATE_LOST, NodeClass.CORRUPT})
"""Classes of a member that does not serve: minkms writes wait for it, and an EVICT may remove it."""
_SUPERSEDABLE = frozenset({"REJOIN", "EVICT"})
_SERVING = frozenset({NodeClass.HEALTHY, NodeClass.DEGRADED})
SUPERSEDED = "superseded: no node serves; a restore is needed"
"""The detail an agent records when it closes (or releases) an action that a total loss superseded."""


def none_serves(views: Iterable[NodeView]) -> bool:
    """No node HEALTHY or DEGRADED in these views: the cheap first half of `superseded`, checked before the
    facts are built (an agent asks which action is unfinished many times a round)."""
    return not any(v.verdict is not None and v.verdict.cls in _SERVING for v in views)


def superseded_in(views: Sequence[NodeView], facts: Callable[[], ClusterFacts]) -> Callable[[Action], bool]:
    """`unfinished_action`'s `skip`: `superseded` in this agent's facts, built once and only when an action that
    can be superseded is looked at while no node serves in `views` (no views yet: nothing is skipped)."""
    built: list[ClusterFacts] = []

    def skip(action: Action) -> bool:
        if action.kind not in _SUPERSEDABLE or not views or not none_serves(views):
            return False
        if not built:
            built.append(facts())
        return superseded(action, built[0]) is not None

    return skip


def superseded(action: Action, facts: ClusterFacts) -> str | None:
    """Why a total loss supersedes the unfinished REJOIN or EVICT `action` in this agent's view (None: it does not).

    Such an action can never finish: its cluster steps run through a serving anchor (`anchor-serves`) and no
    node serves; yet it comes before the RESTORE (the planner resumes it first, its holders ack nothing else).
    So every agent, each round, closes its journal of it as aborted and releases its ack, and no longer resumes
    it from a peer's report. Only once `restore.established`: no node serves, and every node's state has been
    lost (or its loss accepted by an operator) for `restore_after`, the restore's own wait, so that neither a
    transient nor an agent that is merely cut off or silent ever drops an action a serving anchor still runs.
    Never a RESTORE. Aborting runs no step: at worst an action is dropped that is proposed again later."""
    if action.kind not in _SUPERSEDABLE or not restore.established(facts):
        return None
    return SUPERSEDED


def awaiting_mark(me: str, pending: Iterable[tuple[Action, Sequence[str]]]) -> bool:
    """`me` is the target of its own unfinished REJOIN (action, target steps done) that started it fresh and has
    not marked it yet: a missing marker is then expected, not a replaced volume (`classify._state_lost`)."""
    return any(
        a.kind == "REJOIN" and a.target == me and "start" in done and "mark" not in done
        for a, done in pending
    )


def adoptable(
    my_host: str,
    unmarked: bool,
    own_rejoin_pending: bool,
    local: NodeStatus | None,
    reference: Mapping[int, str],
) -> int | None:
    """The node id under which this node writes its marker outside any action (None: it does not).

    `unmarked`: a REJOIN of this node started it fresh and no `mark` followed (a durable note, kept when the
    REJOIN closes). The REJOIN's `add` can land after the action closed failed: killed at its timeout, its
    effect in doubt (simulator seed 3492). The node is then a member holding the cluster's state, copied by the
    join, and without its marker, which would read as a replaced volume (STATE_LOST) and license an EVICT of a
    node that holds the state. It adopts the membership, as `mark` would have: only with no REJOIN of its own
    unfinished (`mark` does it then), and only when its own minkms and the anchor's membership both list this
    host under the same id in a cluster of two or more: a fresh node joins one only through `add`."""
    if not unmarked or own_rejoin_pending or local is None or len(local.members) < 2:
        return None
    mine = [nid for nid, host in local.members if host == my_host]
    if mine != [local.node_id] or reference.get(local.node_id) != my_host:
        return None
    if sorted(nid for nid, host in reference.items() if host == my_host) != [local.node_id]:
        return None
    return local.node_id


def close_unconfirmed(
    action_id: str | None,
    me: str,
    agents: Sequence[str],
    reports: Iterable[Report],
    confirmed: Container[str] = (),
) -> tuple[str, ...]:
    """The agents to share the close of `action_id` with before the anchor proposes anything new (empty: none).

    A close counts once a quorum of agents recorded it (its history entry, or a superseded drop): a later
    resume gathers its acks from a quorum too, and one agent in both refuses it (guard rule `finished`), so a
    counted close is never run again. A close recorded by fewer (the anchor closed while cut off, then died:
    simulator seed 471) may still be resumed and its steps run again, idempotently and under the fences; the
    anchor waits until its newest close counts, sharing it meanwhile. `confirmed`: agents that answered the
    share; `reports`: fresh ones, whose finished ids say the same."""
    if action_id is None:
        return ()
    recorded = {me} | {r.sender for r in reports if action_id in r.finished}
    recorded |= {a for a in agents if a in confirmed}
    if len(recorded & set(agents)) >= quorum(len(agents)):
        return ()
    return tuple(a for a in agents if a not in recorded)


def dropped_by_target(action: Action | None, me: str, own_class: NodeClass | None) -> str | None:
    """Why the anchor drops the unfinished EVICT of its own node (None: it does not).

    Proposed while this node was unreachable and never finished, it still comes first for its holders, who ack
    nothing else; yet no anchor acts on itself (not-the-anchor), so when its target is the anchor nothing ever
    moves again (simulator seed 1532: the survivor that came back led, the two lost nodes were never rejoined).
    The anchor drops it like a superseded action: its reports' finished ids release every holder. Safe: a node
    that serves and leads was not removed (its remove never ran), and one resumed later still re-checks the
    target's class before its remove (`evict_remove_refusal`)."""
    if action is None or action.kind != "EVICT" or action.target != me:
        return None
    if own_class not in (NodeClass.HEALTHY, NodeClass.DEGRADED):
        return None
    return f"an EVICT of the anchor's own node, which serves ({own_class}): no anchor acts on itself"


def finished_ids(history: Sequence[str], superseded: Sequence[str]) -> tuple[str, ...]:
    """The finished ids an agent's reports carry (oldest first): its history's newest, and the actions it dropped
    as superseded. A holder that only acked has no certificate for a history entry, so it keeps their ids
    apart; without them an anchor could later resume the dropped action from a lagging report, and a resume
    skips the rules that licensed its start (found by the simulator: an old REJOIN re-certified after the
    restore). At most RECENT_FINISHED of each, so that drops never crowd out the newest close, whose count
    `close_unconfirmed` reads here."""
    return tuple(dict.fromkeys([*history[-RECENT_FINISHED:], *superseded[-RECENT_FINISHED:]]))


def unfinished_action(
    held: Action | None,
    pending: Sequence[Action],
    reports: Iterable[Report],
    finished: Container[str],
    skip: Callable[[Action], bool] = lambda _action: False,
) -> Action | None:
    """The unfinished action an agent must resume before anything else: the one it acked (held), else one its
    journal has open, else one a fresh peer report carries whole that neither this agent (`finished`: its
    history) nor any fresh report has seen finished; never one `skip` names (`superseded` in this agent's view:
    it must not come before the RESTORE, even while a peer still reports it or before this agent's round has
    released and closed it).

    Why reported actions: agents that acked an action under an anchor that has gone refuse every other action
    while they hold it; a new anchor that never acked it would otherwise never learn of it, and the cluster
    would be blocked for ever. Why the reports' finished ids too: a holder that missed the end of an action
    still reports it for a while, and an agent that missed the history share (down at the time) would resume
    an action already finished (found by the simulator: a second, needless EVICT remove)."""
    fresh = list(reports)
    done = {i for r in fresh for i in r.finished}
    reported = (
        a
        for r in fresh
        if (a := r.in_flight_action) is not None and a.id not in finished and a.id not in done
    )
    own = ([held] if held is not None else []) + list(pending)
    return next((a for a in itertools.chain(own, reported) if not skip(a)), None)


def target_position(kind: str, step: str, done: Sequence[str]) -> playbooks.Position:
    """Where a step request stands against the target's own journal, which holds only the target's steps: the
    anchor's steps before the requested one are vouched for by the anchor (it runs them before asking)."""
    table = playbooks.steps(kind)
    names = [s.name for s in table]
    if step not in names or table[names.index(step)].runs_on != "target":
        raise ValueError(f"{kind} has no target step {step!r}")
    mine = [s.name for s in table if s.runs_on == "target"]
    if list(done) != mine[: len(done)]:
        raise ValueError(
            f"{kind} progress {list(done)} is not a prefix of the target's steps {mine}: the journal is damaged"
        )
    i, k = mine.index(step), len(done)
    if i < k - 1:
        return "behind"
    if i == k - 1:
        return "repeat"
    return "next" if i == k else "ahead"


@dataclass(frozen=True)
class TargetDecision:
    """What the target does with a certified step request: run it (`run`), or answer `ok`/`detail` at once."""

    run: bool
    ok: bool = False
    detail: str = ""


def target_decision(
    action: Action,
    step: str,
    *,
    cert_term: int,
    max_cert_term: int,
    begun: bool,
    finished: bool,
    done: Sequence[str],
    own_class: NodeClass | None,
) -> TargetDecision:
    """The target's answer to a step request whose certificate verified and names it (not FINISH_STEP).

    * a term older than one it executed: refused (a delayed request from an old anchor);
    * an action it closed: `FINISHED` (the anchor closes its side: nothing of it may run again);
    * the first step of a REJOIN (or RESTORE) its own view does not call for: refused. A resumed action that was never
      begun, whose node has recovered since, must never fence and wipe a healthy node; the refused fence
      aborts it, and the aborted action releases every holder;
    * else placed against its journal: behind and repeat answered done without running, ahead refused."""
    if cert_term < max_cert_term:
        return TargetDecision(
            False, False, f"refused: term {cert_term} is older than term {max_cert_term} already seen"
        )
    if finished:
        return TargetDecision(False, False, f"{FINISHED}: this node closed the action already")
    if not begun and (
        (action.kind == "REJOIN" and own_class not in REJOIN_CLASSES)
        or (action.kind == "RESTORE" and own_class is not NodeClass.STATE_LOST)
    ):
        return TargetDecision(
            False, False, f"refused: this node is {own_class or 'not yet classified'} in its own view"
        )
    try:
        where = target_position(action.kind, step, done)
    except ValueError as exc:
        return TargetDecision(False, False, f"refused: {exc}")
    if where == "behind":
        return TargetDecision(False, True, f"skipped: already past {step} (done: {', '.join(done)})")
    if where == "repeat":
        return TargetDecision(False, True, f"{step} already done")
    if where == "ahead":
        return TargetDecision(False, False, f"refused: {step} before its earlier steps (done: {list(done)})")
    return TargetDecision(True)


def already_finished(reply: StepReply) -> bool:
    """The target closed the action (an earlier anchor finished it): the anchor closes its side and runs
    nothing more of it."""
    return not reply.ok and reply.detail.startswith(FINISHED)


def done_after(kind: str, step: str, target_done: Sequence[str]) -> str | None:
    """A target step after `step` that the target has journaled done, if any. An anchor that resumed the action
    has no record of its predecessor's steps; the target did `later` only once `step` was done, so `step` must
    never run again (a second remove would take out the node the add already brought back)."""
    names = [s.name for s in playbooks.steps(kind)]
    return next((name for name in names[names.index(step) + 1 :] if name in target_done), None)


def ask_progress(action: Action, step: playbooks.Step, me: str, progress_known: bool) -> bool:
    """True when the anchor must ask the target again for a target step its own journal shows done, before going
    on: its journal may be behind the target's (it crashed, or another anchor went further since), and only the
    target's progress tells which of the anchor's later steps were done already (`done_after`). The target
    answers a repeat from its journal and runs nothing (found by the simulator: an anchor that crashed at a
    remove's intent resumed later and removed a node another anchor had added back meanwhile)."""
    return step.runs_on == "target" and action.target != me and not progress_known


def evict_remove_refusal(action: Action, target_class: NodeClass | None) -> str | None:
    """Why a remove must not run now, or None. An EVICT's target must still be failed in the anchor's view (a
    resumed EVICT of a node that came back would remove a healthy member). A REJOIN's target was fenced and emptied
    by then, so its class says nothing, except when it serves: a REJOIN's target that is HEALTHY or DEGRADED at its
    remove was healed by another anchor (re-added; if minkms reused its old id, the certified id would name the
    healed node: issue 12)."""
    if action.kind == "EVICT" and target_class not in FAILED:
        return f"{action.target} is {target_class} now: not evicted"
    if action.kind == "REJOIN" and target_class in (NodeClass.HEALTHY, NodeClass.DEGRADED):
        return f"{action.target} is {target_class} now: it serves (healed by another anchor?), not removed"
    return None


def deposed(peer: str, cert_term: int, following: str | None, known_term: int) -> str | None:
    """Why a target refuses a step request from `peer`, or None: this agent follows another anchor, in a term newer
    than the certificate's. The request comes from a deposed anchor that stalled and woke up (issue 12): a step of
    the same action comes again from the anchor that resumed it, certified in its own term."""
    if following is None or following == peer or known_term <= cert_term:
        return None
    return (
        f"refused: {peer} is deposed: this agent follows {following} in term {known_term}, "
        f"the certificate is of term {cert_term}"
    )


def writes_wait_for(action: Action, views: Iterable[NodeView]) -> tuple[str, ...]:
    """Other failed nodes an EVICT's verify must not wait writes for (none for a REJOIN): while one is still a
    member, writes cannot work until its own EVICT, next, makes room; its target being out is then enough."""
    if action.kind != "EVICT":
        return ()
    return tuple(
        v.name for v in views if v.name != action.target and v.verdict is not None and v.verdict.cls in FAILED
    )


def to_adopt(
    fresh: bool,
    certified: bool,
    holding: Mapping[str, Action],
    finished: Container[str] = (),
    quorum: int | None = None,
) -> Action | None:
    """The held action a new anchor adopts instead of its own uncertified proposal, or None.

    Only a fresh proposal (nothing was unfinished in its view) is dropped: peers that refuse it because they
    hold a different unfinished action may hold a certified, half-done one, which comes first (DESIGN §4.4);
    nobody else acked the fresh proposal and only this anchor collects its acks, so dropping it is safe.
    Never one in `finished` (this anchor's history): a refuser that missed its end still holds it, and
    adopting it would hold it again here for ever (found by the simulator: an anchor re-adopted the EVICT it
    had just closed, and nothing moved again; the refuser releases it from the reports' finished ids).

    A resumed action gives way too, but only to an action that `quorum` refusers hold: every certified,
    unfinished action is held by a quorum (holds are fsynced and released only when it finished) and no agent
    holds two, so ours was never certified and nothing of it ran (found by the simulator, seed 1013: an anchor
    cut off during its proposal later resumed it for ever, while the others held a half-done REJOIN)."""
    if certified:
        return None
    unfinished = sorted((name, a) for name, a in holding.items() if a.id not in finished)
    if fresh:
        return unfinished[0][1] if unfinished else None
    counts = Counter(a for _, a in unfinished)
    best = max(counts.items(), key=lambda item: (item[1], item[0].id), default=None)
    return best[0] if best is not None and quorum is not None and best[1] >= quorum else None


def target_closes(
    action: Action | None, me: str, done: Sequence[str], own_class: NodeClass | None
) -> tuple[str, ...] | None:
    """When `me`, holding the lease, is the target of the unfinished `action`: the own steps it must still run
    before it closes the action itself, done; None when it may not close it.

    No one else can close it: no anchor acts on itself (not-the-anchor), and while it is the only eligible anchor
    no other can take over. Its fence, quarantine and start done and its node HEALTHY show what the remaining
    anchor steps were for, the node a member again with its state; its journal holds the certificate the history
    entry needs. A trailing `mark` may be missing (a crash between running it and journaling it: simulator seeds
    1153, 1487): it is run first, as it would have been; it only writes the marker of a member."""
    if action is None or action.target != me or own_class is not NodeClass.HEALTHY:
        return None
    mine = [s.name for s in playbooks.steps(action.kind) if s.runs_on == "target"]
    if not mine or list(done) != mine[: len(done)]:
        return None
    remaining = tuple(mine[len(done) :])
    return remaining if remaining in ((), ("mark",)) else None
