"""The simulated world around the agents: hosts, their minkms nodes and the cluster's membership.

Modelled, not real: each node is a few fields (host up, minkms running, what its storage holds, its identity
marker, whether its storage probe hangs), the cluster is one membership map of minkms node ids (minkms keeps it
consistent; the sim does not model Raft). Ids are never reused: a node added again gets a new one, and every id
ever given keeps its host (`hosts_of`), so that a command carrying an id acts on that id only, however late it
lands. What an agent reads from it goes through the real core: its own node's verdict follows `classify_local`'s
precedence, its peers are classified by the real `classify_cluster` from their reports and a direct probe of
their minkms.

The steps of the playbooks change the world here, each idempotent as DESIGN §5 states it, and each refusing
when its precondition does not hold (a failure the executor then counts against the step's attempts). The three
destructive minkms commands (`remove`, `add`, `restore`) are applied when they land, which may be long after they
were sent (`sim.Simulation.land`): minkms has no term fencing, so a late command acts on the world as it is then.
Every change an agent's step or command makes to a node is stamped (`touched`), for the checker's fencing rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.core.backups import BackupInfo
from agent.core.classify import Verdict
from agent.core.model import NodeClass

STATE, EMPTY, FRESH = "state", "empty", "fresh"


@dataclass
class Node:
    name: str
    host: str
    up: bool = True  # the host is powered; when False neither its agent nor its minkms runs
    running: bool = True  # the minkms process
    data: str = STATE  # what the storage path holds: the cluster's state, nothing, or a fresh 1-node cluster
    marker_ok: bool = True  # the agent's identity marker is beside the state
    commit: int = 0  # the commit index its state holds (meaningful while data == STATE)
    lost_at: float | None = None  # real time its state was last lost (None: it holds state)
    probe_hang_until: float = 0.0  # real time until which its storage probe hangs (a hung volume)
    probe_hung_since: float = 0.0  # real time that hang began
    probe_blip: bool = False  # the hang begins with one misread: the storage path looked empty (issue 12)

    @property
    def live(self) -> bool:
        """What a probe of its minkms sees (partitions cut agents' links only, as in the lab)."""
        return self.up and self.running


class StepError(Exception):
    """A step's precondition does not hold: the step fails (and is retried or ends the action)."""


RestoreHook = Callable[[str, BackupInfo, bool], None]


class World:
    def __init__(self, names: tuple[str, ...], clock: Callable[[], float] = lambda: 0.0) -> None:
        self.nodes = {n: Node(n, f"h-{n}") for n in names}
        self.members: dict[str, int] = {n: i for i, n in enumerate(names)}  # node name -> minkms node id
        self.hosts_of: dict[int, str] = {i: f"h-{n}" for i, n in enumerate(names)}  # every id given -> host
        self.next_id = len(names)
        self.commit = 0  # the cluster's commit index: grows with writes, set back by a restore
        self.on_restore: RestoreHook | None = None  # the checker, told just before a restore takes effect
        self.clock = clock  # real time, for `touched`
        self.touched: dict[str, float] = {}  # node -> real time an agent's step or command last changed it

    def _touch(self, name: str) -> None:
        self.touched[name] = self.clock()

    def _new_id(self, name: str) -> int:
        nid = self.next_id
        self.next_id += 1
        self.hosts_of[nid] = self.nodes[name].host
        return nid

    # -- truth -------------------------------------------------------------------------------------------------

    def healthy(self, name: str) -> bool:
        """True health: up, running, holding the cluster's state with its marker, and a member."""
        n = self.nodes[name]
        return n.live and n.data == STATE and n.marker_ok and name in self.members

    def needs_care(self) -> list[str]:
        return sorted(n for n in self.nodes if not self.healthy(n))

    def writable(self) -> bool:
        """minkms writes need every member up (DESIGN §2)."""
        return all(self.nodes[m].live and self.nodes[m].data != EMPTY for m in self.members)

    def holds_state(self, name: str) -> bool:
        """The node's storage holds the cluster's state (a dead host's too): a restore would lose it."""
        return self.nodes[name].data == STATE

    def write(self) -> None:
        """A client write: commits while the cluster accepts writes, on every member holding its state."""
        if self.members and self.writable() and any(self.healthy(m) for m in self.members):
            self.commit += 1
            for m in self.members:
                self.nodes[m].commit = self.commit

    def membership(self) -> tuple[tuple[int, str], ...]:
        return tuple(sorted((nid, self.nodes[n].host) for n, nid in self.members.items()))

    def member_ids(self) -> dict[int, str]:
        """The membership as `minkms stat` on a member lists it: node id -> host."""
        return dict(self.membership())

    def probe_hangs(self, name: str, t: float) -> bool:
        return self.nodes[name].probe_hang_until > t

    def local_members(self, name: str) -> tuple[tuple[int, str], ...]:
        """The membership a node's own `minkms stat` reports: nothing when down or removed, itself when fresh."""
        n = self.nodes[name]
        if not n.live:
            return ()
        if (
            n.data == FRESH
        ):  # a fresh node is a cluster of one (a RESTORE's target is one of the dead cluster)
            return ((0, n.host),)
        return self.membership() if name in self.members else ()

    def own_verdict(
        self, name: str, reference: dict[int, str] | None, awaiting_mark: bool = False
    ) -> Verdict:
        """The node's verdict on itself, in `classify_local`'s order: lost state, down, evicted, degraded, healthy.
        `awaiting_mark`: its own REJOIN started it fresh and has not marked it yet (`classify._state_lost`)."""
        n = self.nodes[name]
        if n.data == EMPTY:
            return Verdict(NodeClass.STATE_LOST, "storage path is empty")
        local = self.local_members(name)
        joined = len(local) >= 2 and n.host in dict(local).values()
        if not n.marker_ok and not (awaiting_mark and joined):
            return Verdict(NodeClass.STATE_LOST, "identity marker is missing: the volume was replaced")
        if not n.running:
            return Verdict(NodeClass.DOWN, "service is inactive")
        members = reference or dict(self.local_members(name)) or None
        if members is None:
            return Verdict(NodeClass.DEGRADED, "membership unknown: no anchor and no local member list")
        if n.host not in members.values():
            return Verdict(NodeClass.EVICTED, "not in the cluster's membership")
        return Verdict(NodeClass.HEALTHY, "live, ready, a member, storage ok")

    # -- faults ------------------------------------------------------------------------------------------------

    def lose_state(self, name: str, t: float) -> None:
        """Disk loss: the state and the marker are gone; minkms dies and preflight keeps it from starting fresh.
        The backup directory is elsewhere on the host: its copies survive (see node.Disk.backups)."""
        n = self.nodes[name]
        n.data, n.marker_ok, n.running, n.commit = EMPTY, False, False, 0
        n.lost_at = t if n.lost_at is None else n.lost_at

    def host_down(self, name: str) -> None:
        self.nodes[name].up = False

    def host_up(self, name: str) -> None:
        """The host boots: minkms starts unless preflight refuses (an empty storage path of a cluster member)."""
        n = self.nodes[name]
        n.up = True
        n.running = n.data != EMPTY

    # -- the steps of the playbooks (DESIGN §5); each returns what it did, or raises StepError ----------------

    def fence(self, target: str) -> str:
        n = self.nodes[target]
        if not n.up:
            raise StepError(f"{target}'s host is down")
        was = n.running
        n.running = False
        if was:
            self._touch(target)
        return "minkms stopped" if was else "minkms was already stopped"

    def quarantine(self, target: str, t: float) -> str:
        n = self.nodes[target]
        if n.running:
            raise StepError("minkms is running: fence first")
        moved = n.data != EMPTY
        if n.data == STATE:
            n.lost_at = t
        if moved or n.marker_ok:
            self._touch(target)
        n.data, n.marker_ok = EMPTY, False
        return "state moved aside" if moved else "nothing left to move"

    def can_edit(self, anchor: str) -> None:
        """`minkms edit` and `minkms add` go to the anchor's own minkms: it must be a healthy member."""
        if not self.healthy(anchor):
            raise StepError(
                f"the anchor {anchor} cannot run minkms cluster commands: it is not a healthy member"
            )

    def removable(self, anchor: str, ids: tuple[int, ...]) -> dict[str, int]:
        """What `minkms edit --rm IDS` sent through `anchor` would remove now (node -> id): the ids that are
        members; StepError when the anchor's minkms cannot take it."""
        self.can_edit(anchor)
        return {n: nid for n, nid in self.members.items() if nid in ids}

    def remove(self, anchor: str, ids: tuple[int, ...]) -> str:
        """`minkms edit --rm IDS`: by id, never by host; an id that is not a member is left alone (a no-op)."""
        gone = self.removable(anchor, ids)
        if not gone:
            return f"node {', '.join(map(str, ids)) or '-'} is not a member: nothing removed"
        for name in gone:
            del self.members[name]
            self._touch(name)
        return "removed " + ", ".join(f"node {nid} ({self.hosts_of[nid]})" for nid in gone.values())

    def start(self, target: str, restoring: bool = False) -> str:
        """A RESTORE's start needs only the empty storage path: the membership it was in died with every node."""
        n = self.nodes[target]
        if not n.up:
            raise StepError(f"{target}'s host is down")
        if n.data == STATE or (target in self.members and not restoring):
            raise StepError("start needs an empty storage path on a node that is not a member")
        if not (n.running and n.data == FRESH):
            self._touch(target)
        n.running, n.data = True, FRESH
        return "minkms started fresh"

    def restore(self, target: str, backup: BackupInfo, intact: bool) -> str:
        """`minkms restore`: once. A node whose commit has reached the backup's was restored already (a repeat);
        minkms refuses a node that holds state or is not a live fresh one, and a file whose gzip is damaged.
        The restored node is a new cluster of one, with the backup's state (the others then REJOIN it)."""
        n = self.nodes[target]
        if n.live and n.data == STATE and n.commit >= backup.commit:  # (a commit-0 backup too: seed 3963)
            return f"already restored: commit {n.commit}"
        if not (n.live and n.data == FRESH):
            raise StepError(f"minkms refuses the restore: {target} is not a live fresh node ({n.data})")
        if self.on_restore is not None:
            self.on_restore(target, backup, intact)
        if not intact:
            raise StepError(f"minkms restore: {backup.id} is not a valid gzip file")
        n.data, n.commit, n.lost_at = STATE, backup.commit, None
        for name in self.members:
            self._touch(name)
        self.members = {target: self._new_id(target)}
        self._touch(target)
        self.commit = backup.commit
        return f"restored {backup.id} (commit {backup.commit})"

    def addable(self, anchor: str, target: str) -> bool:
        """Whether `minkms add` of `target` sent through `anchor` would add it now (False: it is a member
        already); StepError when minkms refuses it."""
        if target in self.members:
            return False
        n = self.nodes[target]
        if not self.healthy(anchor) or not self.writable():
            raise StepError("the cluster does not accept writes: every member must be up")
        if not (n.live and n.data == FRESH):
            raise StepError(f"{target} is not a live fresh node")
        return True

    def add(self, anchor: str, target: str) -> str:
        if not self.addable(anchor, target):
            return f"{target} is already a member"
        n = self.nodes[target]
        self.members[target] = self._new_id(target)
        n.data, n.commit, n.lost_at = STATE, self.commit, None
        self._touch(target)
        return f"added {target} as node {self.members[target]}"

    def mark(self, target: str) -> str:
        n = self.nodes[target]
        if not (n.live and n.data == STATE and target in self.members):
            raise StepError(f"{target} is not a live member")
        if not n.marker_ok:
            self._touch(target)
        n.marker_ok = True
        return "identity marker written"
