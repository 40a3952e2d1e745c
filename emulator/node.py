"""Cluster behaviour of one emulated minkms node (reference/minkms.md §5).

Raft-like, as minkms is: a leader elected by a majority of the members, heartbeats, an applied-entry log
with catch-up by entries or by a full snapshot. Unlike Raft, and as documented for minkms, a write needs
every member (n of n) and a read needs one. The cluster definition (members) carries an epoch so that a
forced `edit --rm`, applied on one survivor without quorum, can spread to the others and win over older
definitions.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from emulator.store import ClusterState, Entry, Store, StoreError

log = logging.getLogger("minkms")

VERSION = "2025-11-12T19-14-51Z"
API_VERSION = "v1"
MAX_ENTRIES_PER_APPEND = 500


class ClusterError(Exception):
    """A refused cluster operation: an HTTP status and the one-line message minkms would return."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def duration(seconds: float) -> str:
    """protojson form of google.protobuf.Duration."""
    return f"{max(seconds, 0.0):.3f}s"


def normalize_host(host: str) -> str:
    host = host.strip()
    for prefix in ("https://", "http://"):
        if host.startswith(prefix):
            host = host[len(prefix) :]
    host = host.rstrip("/")
    if not host:
        raise ClusterError(400, "empty host")
    if host.startswith("["):
        return host if "]:" in host else host + ":7373"
    return host if ":" in host else host + ":7373"


class Node:
    """The live cluster state machine of a node: election, replication, membership, status."""

    def __init__(
        self, store: Store, host: str, heartbeat: float, peer_ssl: ssl.SSLContext, source: str | None = None
    ) -> None:
        self.store = store
        self.host = host
        self.heartbeat = heartbeat
        self.election_min = 4 * heartbeat
        self.peer_ssl = peer_ssl
        # The address node-to-node connections come from: the listen address, so that a firewall rule on a
        # node's address cuts its cluster traffic both ways (kmlab isolates a node this way). None: any.
        self.source = source
        self.role = "Follower"
        self.leader_id = -1
        self.started = time.monotonic()
        self.last_leader_contact = time.monotonic()
        self.election_deadline = self._next_deadline()
        self.leader_since = 0.0
        self.follower_ack: dict[int, float] = {}
        self.follower_match: dict[int, tuple[int, int]] = {}
        self.leader_nodes_down: list[int] = []
        self.write_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._inflight: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def state(self) -> ClusterState:
        return self.store.state

    # ---- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=self.peer_ssl, limit=64, local_addr=(self.source, 0) if self.source else None
            ),
            timeout=aiohttp.ClientTimeout(total=3 * self.heartbeat + 1.0),
        )
        self._ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._session:
            await self._session.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _next_deadline(self) -> float:
        return time.monotonic() + random.uniform(self.election_min, 2 * self.election_min)

    async def _tick_forever(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one tick must not stop the node
                log.exception("cluster tick failed")
            await asyncio.sleep(self.heartbeat / 2)

    async def _tick(self) -> None:
        if self.state.removed:
            self.role, self.leader_id = "Follower", -1
            return
        if self.role == "Leader":
            if not self._leader_has_quorum():
                log.warning("lost contact with a majority of the cluster: stepping down")
                self._step_down(self.state.term)
                self.leader_id = -1
                return
            for fid in self.others():
                if fid not in self._inflight:
                    self._spawn(self._replicate_to(fid))
            return
        if len(self.state.members) == 1 and self.state.node_id in self.state.members:
            self.state.term += 1
            self.state.voted_for = self.state.node_id
            self.store.save_state()
            self._become_leader()
            return
        if time.monotonic() >= self.election_deadline:
            await self._run_election()

    def _leader_has_quorum(self) -> bool:
        """Check-quorum: a leader that cannot reach a majority stops claiming leadership."""
        now = time.monotonic()
        if now - self.leader_since < 2 * self.election_min:
            return True
        heard = sum(
            1 for fid in self.others() if now - self.follower_ack.get(fid, -1e9) < 2 * self.election_min
        )
        return heard + 1 >= self.majority()

    def others(self) -> list[int]:
        return sorted(i for i in self.state.members if i != self.state.node_id)

    def majority(self) -> int:
        return len(self.state.members) // 2 + 1

    # ---- peer RPC ----------------------------------------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        """Kept-alive HTTPS client to the other nodes, authenticated with the HSM-derived root identity."""
        if self._session is None:
            raise RuntimeError("node not started")
        return self._session

    async def rpc(self, host: str, name: str, payload: dict[str, Any], timeout: float | None = None) -> Any:
        url = f"https://{host}/v1/rpc/{name}"
        t = aiohttp.ClientTimeout(total=timeout) if timeout else None
        async with self.session.post(url, json=payload, timeout=t) as resp:
            if resp.status != 200:
                raise ClusterError(resp.status, (await resp.text())[:300])
            return await resp.json()

    def _base(self) -> dict[str, Any]:
        s = self.state
        return {"cluster_id": s.cluster_id, "term": s.term, "node_id": s.node_id, "epoch": s.epoch}

    def _maybe_learn_membership(self, reply: dict[str, Any]) -> None:
        """A peer with a newer cluster definition answered: adopt it (it may say we were removed)."""
        if reply.get("cluster_id") == self.state.cluster_id and int(reply.get("epoch", 0)) > self.state.epoch:
            members = {int(k): str(v) for k, v in reply["members"].items()}
            if self.store.adopt_membership(members, int(reply["epoch"]), int(reply["next_id"])):
                log.info("adopted cluster definition epoch %s: %s", self.state.epoch, members)
                if self.state.removed:
                    log.error("server not part of cluster: this node was removed")
                    self._step_down(self.state.term)
                elif self.role == "Leader":
                    self._prune_follower_tracking()

    def _step_down(self, term: int) -> None:
        if term > self.state.term:
            self.state.term = term
            self.state.voted_for = -1
            self.store.save_state()
        if self.role != "Follower":
            log.info("stepping down to follower in term %s", self.state.term)
        self.role = "Follower"
        self.election_deadline = self._next_deadline()

    # ---- election -----------------------------------------------------------------------------------
    async def _run_election(self) -> None:
        s = self.state
        s.term += 1
        s.voted_for = s.node_id
        self.store.save_state()
        self.role, self.leader_id = "Candidate", -1
        term = s.term
        self.election_deadline = self._next_deadline()
        request = {**self._base(), "commit": s.commit, "last_term": s.last_term}
        hosts = [(fid, s.members[fid]) for fid in self.others()]
        results = await asyncio.gather(
            *(self.rpc(h, "vote", request, timeout=2 * self.heartbeat) for _, h in hosts),
            return_exceptions=True,
        )
        votes = 1
        for reply in results:
            if not isinstance(reply, dict):
                continue
            self._maybe_learn_membership(reply)
            if int(reply.get("term", 0)) > self.state.term:
                self._step_down(int(reply["term"]))
                return
            if reply.get("granted"):
                votes += 1
        still_candidate = self.role == "Candidate" and self.state.term == term and not self.state.removed
        if still_candidate and votes >= self.majority():
            self._become_leader()

    def _become_leader(self) -> None:
        if self.role != "Leader":
            log.info("became leader in term %s", self.state.term)
        self.role = "Leader"
        self.leader_since = time.monotonic()
        self.leader_id = self.state.node_id
        self.follower_ack = {}
        self.follower_match = {}

    def on_vote(self, req: dict[str, Any]) -> dict[str, Any]:
        s = self.state
        reply = {**self._base(), "granted": False, "members": _members_json(s.members), "next_id": s.next_id}
        cand = int(req["node_id"])
        if req.get("cluster_id") != s.cluster_id or s.removed or cand not in s.members:
            return reply
        if int(req.get("epoch", 0)) < s.epoch:
            return reply
        term = int(req["term"])
        if term < s.term:
            return reply
        heard_leader = self.leader_id >= 0 and (
            self.role == "Leader" or time.monotonic() - self.last_leader_contact < self.election_min
        )
        if heard_leader and self.leader_id != cand:
            return reply  # a live leader exists: a disruptive candidate does not get to raise the term
        if term > s.term:
            self._step_down(term)
            self.leader_id = -1
        up_to_date = (int(req["last_term"]), int(req["commit"])) >= (s.last_term, s.commit)
        if s.voted_for in (-1, cand) and up_to_date:
            s.voted_for = cand
            self.store.save_state()
            self.election_deadline = self._next_deadline()
            reply["granted"] = True
        reply["term"] = s.term
        return reply

    # ---- replication --------------------------------------------------------------------------------
    def _append_request(self, fid: int, extra: list[Entry] | None = None) -> dict[str, Any]:
        s = self.state
        req: dict[str, Any] = {
            **self._base(),
            "leader_id": s.node_id,
            "members": _members_json(s.members),
            "next_id": s.next_id,
            "nodes_down": self.nodes_down(),
        }
        match = self.follower_match.get(fid)
        if match is None or match == (s.commit, s.last_term):
            return req
        commit, last_term = match
        if commit < s.commit and self.store.term_at(commit) == last_term:
            entries = self.store.entries_after(commit)
            if entries is not None:
                req["prev"] = [commit, last_term]
                req["entries"] = [e.to_json() for e in entries[:MAX_ENTRIES_PER_APPEND]]
                return req
        req["snapshot"] = self.store.snapshot()
        return req

    async def _replicate_to(self, fid: int) -> bool:
        """One append round to a follower; True when it holds everything the leader has."""
        self._inflight.add(fid)
        try:
            host = self.state.members.get(fid)
            if host is None:
                return False
            try:
                reply = await self.rpc(host, "append", self._append_request(fid), timeout=2 * self.heartbeat)
            except (TimeoutError, aiohttp.ClientError, ClusterError, ValueError):
                return False
            self._maybe_learn_membership(reply)
            if self.role != "Leader":
                return False
            if int(reply.get("term", 0)) > self.state.term:
                self._step_down(int(reply["term"]))
                return False
            if not reply.get("ok"):
                return False
            self.follower_ack[fid] = time.monotonic()
            self.follower_match[fid] = (int(reply["commit"]), int(reply["last_term"]))
            return self.follower_match[fid] == (self.state.commit, self.state.last_term)
        finally:
            self._inflight.discard(fid)

    def _prune_follower_tracking(self) -> None:
        for fid in list(self.follower_ack):
            if fid not in self.state.members:
                self.follower_ack.pop(fid, None)
                self.follower_match.pop(fid, None)

    async def on_append(self, req: dict[str, Any]) -> dict[str, Any]:
        s = self.state
        reply = {**self._base(), "ok": False, "members": _members_json(s.members), "next_id": s.next_id}
        if req.get("cluster_id") != s.cluster_id:
            reply["error"] = "node belongs to another cluster"
            return reply
        if s.removed:
            reply["error"] = "server not part of cluster"
            return reply
        if int(req["epoch"]) < s.epoch or int(req["term"]) < s.term:
            return reply
        if int(req["term"]) > s.term:
            self._step_down(int(req["term"]))
        if self.role != "Follower":
            self._step_down(s.term)
        self.leader_id = int(req["leader_id"])
        self.last_leader_contact = time.monotonic()
        self.election_deadline = self._next_deadline()
        if int(req["epoch"]) > s.epoch:
            self.store.adopt_membership(
                {int(k): str(v) for k, v in req["members"].items()}, int(req["epoch"]), int(req["next_id"])
            )
            if self.state.removed:
                reply["error"] = "server not part of cluster"
                return reply
        self.leader_nodes_down = [int(i) for i in req.get("nodes_down", [])]
        try:
            if "snapshot" in req:
                fresh = ClusterState(**{**self.state.__dict__, "members": dict(self.state.members)})
                self.store.install_snapshot(req["snapshot"], fresh)
                log.info("installed snapshot at commit %s from leader %s", self.state.commit, self.leader_id)
            elif req.get("entries") and req.get("prev") == [self.state.commit, self.state.last_term]:
                self.store.apply([Entry.from_json(e) for e in req["entries"]])
        except StoreError as exc:
            log.error("replication failed: %s", exc)
        reply.update(ok=True, term=self.state.term, commit=self.state.commit, last_term=self.state.last_term)
        return reply

    def on_membership(self, req: dict[str, Any]) -> dict[str, Any]:
        """A survivor spreads the cluster definition it was told by `edit --rm`; only a member may."""
        sender = int(req.get("node_id", -1))
        if (
            req.get("cluster_id") == self.state.cluster_id
            and not self.state.removed
            and sender in self.state.members
        ):
            members = {int(k): str(v) for k, v in req["members"].items()}
            if self.store.adopt_membership(members, int(req["epoch"]), int(req["next_id"])):
                log.info("adopted cluster definition epoch %s: %s", self.state.epoch, members)
                if self.state.removed:
                    self._step_down(self.state.term)
                if self.leader_id not in members:
                    self.leader_id = -1
                    self.election_deadline = time.monotonic()
                self._prune_follower_tracking()
        return {**self._base(), "ok": True}

    # ---- health --------------------------------------------------------------------------------------
    def nodes_down(self) -> list[int]:
        """Members the leader has not heard from recently (leader's view)."""
        now = time.monotonic()
        window = self.election_min
        return [
            fid
            for fid in self.others()
            if now - self.follower_ack.get(fid, -1e9) > window
            or self.follower_match.get(fid) != (self.state.commit, self.state.last_term)
        ]

    def has_leader(self) -> bool:
        if self.role == "Leader":
            return True
        return self.leader_id >= 0 and time.monotonic() - self.last_leader_contact < self.election_min

    def write_blocker(self) -> str | None:
        """Why a write cannot succeed now, or None."""
        if self.state.removed:
            return "server not part of cluster"
        if not self.has_leader():
            return "cluster has no leader"
        down = self.nodes_down() if self.role == "Leader" else self.leader_nodes_down
        if down:
            hosts = ", ".join(f"node {i} ({self.state.members.get(i, '?')})" for i in down)
            n = len(self.state.members)
            return f"not all cluster nodes are available: {hosts} down; writes need all {n} nodes"
        return None

    # ---- status -----------------------------------------------------------------------------------
    def server_status(self) -> dict[str, Any]:
        import os
        import platform

        s = self.state
        now = time.monotonic()
        last_hb = 0.0 if self.role == "Leader" else now - self.last_leader_contact
        machine = platform.machine()
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
        try:
            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            rss = 0
        return {
            "version": VERSION,
            "api_version": API_VERSION,
            "host": self.host,
            "uptime": duration(now - self.started),
            "role": self.role,
            "commit": str(s.commit),
            "nodes": _members_json(s.members),
            "node_id": s.node_id,
            "leader_id": str(self.leader_id if self.has_leader() else -1),
            "last_heartbeat": duration(last_hb),
            "heartbeat_interval": duration(self.heartbeat),
            "election_timeout": duration(self.election_min),
            "sys_os": "linux",
            "sys_cpu_arch": arch,
            "sys_cpu_num": os.cpu_count() or 1,
            "sys_mem_heap_used": str(rss),
            "hsm": 1,
            "hsm_active": 1,
        }

    def on_status(self) -> dict[str, Any]:
        s = self.state
        return {
            **self._base(),
            "status": self.server_status(),
            "members": _members_json(s.members),
            "next_id": s.next_id,
            "removed": s.removed,
        }

    async def cluster_status(self) -> dict[str, Any]:
        s = self.state
        up: dict[str, Any] = {}
        down: dict[str, str] = {}

        async def one(fid: int, host: str) -> None:
            if fid == s.node_id:
                up[str(fid)] = self.server_status()
                return
            try:
                reply = await self.rpc(host, "status", {}, timeout=1.0)
                if reply.get("cluster_id") != s.cluster_id or reply.get("removed"):
                    down[str(fid)] = host
                else:
                    up[str(fid)] = reply["status"]
            except (TimeoutError, aiohttp.ClientError, ClusterError, ValueError, KeyError):
                down[str(fid)] = host

        await asyncio.gather(*(one(fid, host) for fid, host in sorted(s.members.items())))
        if s.node_id not in s.members:  # removed: show ourselves anyway, the view is our own
            up[str(s.node_id)] = self.server_status()
        return {"nodes_up": dict(sorted(up.items())), "nodes_down": dict(sorted(down.items()))}

    # ---- writes (leader) -------------------------------------------------------------------------------
    async def write(self, make_op: Callable[[], dict[str, Any]]) -> None:
        """Apply one operation on every member; `make_op` validates against the current state."""
        async with self.write_lock:
            blocker = self.write_blocker()
            if blocker:
                raise ClusterError(503, blocker)
            await self._commit(make_op())

    async def _commit(self, op: dict[str, Any]) -> None:
        s = self.state
        self.store.apply([Entry(s.commit + 1, s.term, op)])
        followers = self.others()
        results = await asyncio.gather(*(self._replicate_to(fid) for fid in followers))
        missing = [fid for fid, ok in zip(followers, results, strict=True) if not ok]
        if missing:
            hosts = ", ".join(f"node {i}" for i in missing)
            raise ClusterError(503, f"write not confirmed by {hosts}; it completes when they catch up")

    async def add_node(self, host: str) -> int:
        host = normalize_host(host)
        async with self.write_lock:
            blocker = self.write_blocker()
            if blocker:
                raise ClusterError(503, f"cannot add {host}: {blocker}")
            s = self.state
            if host in s.members.values():
                raise ClusterError(409, f"node {host} is already a member of the cluster")
            try:
                status = await self.rpc(host, "status", {}, timeout=3.0)
            except aiohttp.ClientConnectorCertificateError as exc:
                raise ClusterError(502, f"cannot verify the TLS certificate of node {host}: {exc}") from exc
            except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
                raise ClusterError(
                    502, f"node {host} refused this cluster's identity (a different HSM key?): {exc}"
                ) from exc
            except (TimeoutError, aiohttp.ClientError, ClusterError, ValueError) as exc:
                raise ClusterError(502, f"cannot reach node {host}: {_describe(exc)}") from exc
            if status.get("removed") or len(status.get("members", {})) != 1:
                n = len(status.get("members", {}))
                raise ClusterError(409, f"node {host} is not a fresh node: it is part of a {n}-node cluster")
            new_id = s.next_id
            members = {**s.members, new_id: host}
            op = {
                "op": "members",
                "members": _members_json(members),
                "epoch": s.epoch + 1,
                "next_id": new_id + 1,
            }
            join = {
                "cluster_id": s.cluster_id,
                "node_id": new_id,
                "members": op["members"],
                "epoch": op["epoch"],
                "next_id": op["next_id"],
                "term": s.term,
                "leader_id": s.node_id,
                "snapshot": self.store.snapshot(),
            }
            try:
                await self.rpc(host, "join", join, timeout=60.0)
            except ClusterError as exc:
                raise ClusterError(409, f"node {host} refused to join: {exc.message}") from exc
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                raise ClusterError(502, f"node {host} did not complete the join: {_describe(exc)}") from exc
            self.follower_match[new_id] = (s.commit, s.last_term)
            self.follower_ack[new_id] = time.monotonic()
            await self._commit(op)
            log.info("added node %s at %s", new_id, host)
            return new_id

    async def on_join(self, req: dict[str, Any]) -> dict[str, Any]:
        s = self.state
        if s.removed or len(s.members) != 1:
            raise ClusterError(409, f"not a fresh node: part of a {len(s.members)}-node cluster")
        node_id = int(req["node_id"])
        members = {int(k): str(v) for k, v in req["members"].items()}
        if members.get(node_id) != self.host:
            raise ClusterError(
                409, f"this node calls itself {self.host}, not {members.get(node_id)}; add it by that name"
            )
        async with self.write_lock:
            fresh = ClusterState(
                cluster_id=str(req["cluster_id"]),
                node_id=node_id,
                members=members,
                epoch=int(req["epoch"]),
                next_id=int(req["next_id"]),
                term=int(req["term"]),
                voted_for=-1,
            )
            self.store.install_snapshot(req["snapshot"], fresh)
            self.role = "Follower"
            self.leader_id = int(req["leader_id"])
            self.last_leader_contact = time.monotonic()
            self.election_deadline = self._next_deadline()
        log.info("joined cluster %s as node %s", fresh.cluster_id, node_id)
        return {"ok": True}

    async def remove_node(self, host: str) -> int:
        host = normalize_host(host)
        async with self.write_lock:
            s = self.state
            ids = [i for i, h in s.members.items() if h == host]
            if not ids:
                raise ClusterError(404, f"node {host} is not a member of the cluster")
            blocker = self.write_blocker()
            if blocker:
                raise ClusterError(503, f"cannot remove {host}: {blocker}; use 'minkms edit --rm' instead")
            members = {i: h for i, h in s.members.items() if i != ids[0]}
            op = {
                "op": "members",
                "members": _members_json(members),
                "epoch": s.epoch + 1,
                "next_id": s.next_id,
            }
            old_followers = self.others()
            entry = Entry(s.commit + 1, s.term, op)
            self.store.apply([entry])
            self.follower_match.pop(ids[0], None)
            # The removed node is told too, so that it stops serving as a member.
            if ids[0] in old_followers:
                await self._tell_removed(host, op)
            await asyncio.gather(*(self._replicate_to(fid) for fid in self.others()))
            if self.state.removed:
                self._step_down(self.state.term)
            return ids[0]

    async def _tell_removed(self, host: str, op: dict[str, Any]) -> None:
        try:
            await self.rpc(host, "membership", {**self._base(), **op}, timeout=2.0)
        except (TimeoutError, aiohttp.ClientError, ClusterError, ValueError):
            log.warning("removed node %s could not be told", host)

    async def edit(self, remove: list[int]) -> dict[str, str]:
        """`minkms edit HOST --rm ID`: applied here without quorum, then spread to reachable survivors."""
        s = self.state
        if s.removed:
            raise ClusterError(409, "server not part of cluster: a removed node cannot edit the cluster")
        if not remove:
            raise ClusterError(400, "nothing to edit: give at least one --rm ID")
        for nid in remove:
            if nid not in s.members:
                raise ClusterError(404, f"node {nid} is not a member of the cluster")
            if nid == s.node_id:
                raise ClusterError(
                    400, f"node {nid} is the node applying the edit; run it on a surviving node"
                )
        async with self.write_lock:
            members = {i: h for i, h in s.members.items() if i not in remove}
            self.store.adopt_membership(members, s.epoch + 1, s.next_id)
            self._prune_follower_tracking()
            if self.leader_id in remove:
                self.leader_id = -1
                self.election_deadline = time.monotonic()
        spread = {**self._base(), "members": _members_json(members), "next_id": s.next_id}
        await asyncio.gather(
            *(self.rpc(h, "membership", spread, timeout=1.0) for i, h in members.items() if i != s.node_id),
            return_exceptions=True,
        )
        log.info("cluster definition edited: removed %s", remove)
        return _members_json(members)


def _members_json(members: dict[int, str]) -> dict[str, str]:
    return {str(k): v for k, v in sorted(members.items())}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
