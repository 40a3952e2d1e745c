"""The node's state on disk: one SQLite database `kms.db` in the storage directory (crash-safe: WAL, fsync).

It holds the cluster definition (cluster id, node id, members), the election state, the applied-entry log and
the key database. Key material is sealed with the HSM key, so a node started with another HSM key cannot
read it, and neither can anyone holding only a backup.
"""

from __future__ import annotations

import base64
import datetime
import json
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag

from emulator.hsm import SoftHSM

DB_NAME = "kms.db"
BACKUP_FORMAT = "minkms-emulator-backup/1"
LOG_KEEP = 10_000
SEAL_CHECK = b"minkms node state"
DEFAULT_ENCLAVE = "default"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enclaves (name TEXT PRIMARY KEY, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    enclave TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    algorithm TEXT NOT NULL, created TEXT NOT NULL, material BLOB NOT NULL,
    PRIMARY KEY (enclave, name, version));
CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, op TEXT NOT NULL);
"""


class StoreError(Exception):
    """The state on disk cannot be used; the message is the start-up error."""


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


@dataclass
class ClusterState:
    cluster_id: str
    node_id: int
    members: dict[int, str]
    epoch: int
    next_id: int
    commit: int = 0
    last_term: int = 0
    term: int = 0
    voted_for: int = -1
    removed: bool = False
    created: str = field(default_factory=now_iso)


@dataclass(frozen=True)
class Entry:
    idx: int
    term: int
    op: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"idx": self.idx, "term": self.term, "op": self.op}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Entry:
        return Entry(int(data["idx"]), int(data["term"]), dict(data["op"]))


def _members_from_json(text: str) -> dict[int, str]:
    return {int(k): str(v) for k, v in json.loads(text).items()}


class Store:
    def __init__(self, conn: sqlite3.Connection, hsm: SoftHSM, state: ClusterState) -> None:
        self._db = conn
        self.hsm = hsm
        self.state = state

    # ---- opening ---------------------------------------------------------------------------------
    @staticmethod
    def open(directory: Path, hsm: SoftHSM, host: str) -> Store:
        """Open the node state in `directory`, or create a fresh single-node cluster (node 0) there."""
        if not directory.is_dir():
            raise StoreError(f"storage path {directory} is not a directory")
        path = directory / DB_NAME
        fresh = not path.exists()
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            check = conn.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise StoreError(f"database {path} is corrupt: {check[0] if check else 'no answer'}")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"failed to open database {path}: {exc}") from exc
        if fresh:
            state = ClusterState(
                cluster_id=str(uuid.uuid4()), node_id=0, members={0: host}, epoch=1, next_id=1
            )
            store = Store(conn, hsm, state)
            with store._tx():
                store._put("seal_check", base64.b64encode(hsm.seal(SEAL_CHECK, b"seal-check")).decode())
                store._save_state()
                conn.execute("INSERT OR IGNORE INTO enclaves VALUES (?, ?)", (DEFAULT_ENCLAVE, state.created))
            return store
        try:
            meta = dict(conn.execute("SELECT k, v FROM meta").fetchall())
            hsm.unseal(base64.b64decode(meta["seal_check"]), b"seal-check")
            state = ClusterState(
                cluster_id=meta["cluster_id"],
                node_id=int(meta["node_id"]),
                members=_members_from_json(meta["members"]),
                epoch=int(meta["epoch"]),
                next_id=int(meta["next_id"]),
                commit=int(meta["commit"]),
                last_term=int(meta["last_term"]),
                term=int(meta["term"]),
                voted_for=int(meta["voted_for"]),
                removed=meta["removed"] == "1",
                created=meta.get("created", now_iso()),
            )
        except InvalidTag as exc:
            raise StoreError("the HSM key cannot unseal this node's state (another HSM key?)") from exc
        except (KeyError, ValueError, sqlite3.DatabaseError) as exc:
            raise StoreError(f"database {path} is incomplete or corrupt: {exc!r}") from exc
        return Store(conn, hsm, state)

    def close(self) -> None:
        self._db.close()

    # ---- helpers -----------------------------------------------------------------------------------
    def _tx(self) -> _Tx:
        """`with store._tx():` runs the block in one transaction (commit on success, rollback on error)."""
        self._db.execute("BEGIN IMMEDIATE")
        return _Tx(self._db)

    def _put(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _save_state(self) -> None:
        s = self.state
        for key, value in (
            ("cluster_id", s.cluster_id),
            ("node_id", str(s.node_id)),
            ("members", json.dumps({str(k): v for k, v in sorted(s.members.items())})),
            ("epoch", str(s.epoch)),
            ("next_id", str(s.next_id)),
            ("commit", str(s.commit)),
            ("last_term", str(s.last_term)),
            ("term", str(s.term)),
            ("voted_for", str(s.voted_for)),
            ("removed", "1" if s.removed else "0"),
            ("created", s.created),
        ):
            self._put(key, value)

    def save_state(self) -> None:
        with self._tx():
            self._save_state()

    # ---- replication ------------------------------------------------------------------------------
    def apply(self, entries: list[Entry]) -> None:
        """Apply entries that follow the current commit, atomically."""
        with self._tx():
            for entry in entries:
                if entry.idx != self.state.commit + 1:
                    raise StoreError(f"entry {entry.idx} does not follow commit {self.state.commit}")
                self._apply_op(entry.op)
                self._db.execute(
                    "INSERT OR REPLACE INTO log VALUES (?, ?, ?)",
                    (entry.idx, entry.term, json.dumps(entry.op)),
                )
                self.state.commit = entry.idx
                self.state.last_term = entry.term
            self._db.execute("DELETE FROM log WHERE idx <= ?", (self.state.commit - LOG_KEEP,))
            self._save_state()

    def _apply_op(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "create_enclave":
            self._db.execute("INSERT OR IGNORE INTO enclaves VALUES (?, ?)", (op["name"], op["created"]))
        elif kind == "delete_enclave":
            self._db.execute("DELETE FROM enclaves WHERE name = ?", (op["name"],))
            self._db.execute("DELETE FROM keys WHERE enclave = ?", (op["name"],))
        elif kind == "create_key":
            self._db.execute(
                "INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?, ?, ?)",
                (
                    op["enclave"],
                    op["name"],
                    op["version"],
                    op["algorithm"],
                    op["created"],
                    base64.b64decode(op["material"]),
                ),
            )
        elif kind == "delete_key":
            self._db.execute("DELETE FROM keys WHERE enclave = ? AND name = ?", (op["enclave"], op["name"]))
        elif kind == "members":
            self._adopt_membership({int(k): v for k, v in op["members"].items()}, op["epoch"], op["next_id"])
        else:
            raise StoreError(f"unknown operation {kind!r}")

    def _adopt_membership(self, members: dict[int, str], epoch: int, next_id: int) -> bool:
        if epoch <= self.state.epoch:
            return False
        self.state.members = dict(members)
        self.state.epoch = epoch
        self.state.next_id = max(self.state.next_id, next_id)
        if self.state.node_id not in members:
            self.state.removed = True
        return True

    def adopt_membership(self, members: dict[int, str], epoch: int, next_id: int) -> bool:
        """Take a newer cluster definition (edit spread, heartbeat); False when it is not newer."""
        with self._tx():
            changed = self._adopt_membership(members, epoch, next_id)
            self._save_state()
        return changed

    def term_at(self, idx: int) -> int | None:
        if idx == 0:
            return 0
        if idx == self.state.commit:
            return self.state.last_term
        row = self._db.execute("SELECT term FROM log WHERE idx = ?", (idx,)).fetchone()
        return int(row[0]) if row else None

    def entries_after(self, idx: int) -> list[Entry] | None:
        rows = self._db.execute("SELECT idx, term, op FROM log WHERE idx > ? ORDER BY idx", (idx,)).fetchall()
        if len(rows) != self.state.commit - idx:
            return None
        return [Entry(r[0], r[1], json.loads(r[2])) for r in rows]

    # ---- snapshots (add a node, catch up a diverged follower) -----------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "commit": self.state.commit,
            "last_term": self.state.last_term,
            "enclaves": [list(r) for r in self._db.execute("SELECT name, created FROM enclaves")],
            "keys": [
                [r[0], r[1], r[2], r[3], r[4], base64.b64encode(r[5]).decode()]
                for r in self._db.execute("SELECT * FROM keys ORDER BY enclave, name, version")
            ],
        }

    def install_snapshot(self, snap: dict[str, Any], state: ClusterState) -> None:
        with self._tx():
            self._db.execute("DELETE FROM enclaves")
            self._db.execute("DELETE FROM keys")
            self._db.execute("DELETE FROM log")
            self._db.executemany("INSERT INTO enclaves VALUES (?, ?)", [tuple(e) for e in snap["enclaves"]])
            self._db.executemany(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?)",
                [(k[0], k[1], k[2], k[3], k[4], base64.b64decode(k[5])) for k in snap["keys"]],
            )
            state.commit = int(snap["commit"])
            state.last_term = int(snap["last_term"])
            self.state = state
            self._save_state()

    # ---- backup and restore -------------------------------------------------------------------------
    def backup(self) -> bytes:
        """An SQLite database with the keys and enclaves, without membership (as documented)."""
        out = sqlite3.connect(":memory:")
        out.executescript(
            "CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);"
            "CREATE TABLE enclaves (name TEXT PRIMARY KEY, created TEXT NOT NULL);"
            "CREATE TABLE keys (enclave TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,"
            " algorithm TEXT NOT NULL, created TEXT NOT NULL, material BLOB NOT NULL,"
            " PRIMARY KEY (enclave, name, version));"
        )
        snap = self.snapshot()
        meta = {
            "format": BACKUP_FORMAT,
            "commit": str(snap["commit"]),
            "created": now_iso(),
            "cluster_id": self.state.cluster_id,
            "seal_check": base64.b64encode(self.hsm.seal(SEAL_CHECK, b"seal-check")).decode(),
        }
        out.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        out.executemany("INSERT INTO enclaves VALUES (?, ?)", [tuple(e) for e in snap["enclaves"]])
        out.executemany(
            "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?)",
            [(k[0], k[1], k[2], k[3], k[4], base64.b64decode(k[5])) for k in snap["keys"]],
        )
        out.commit()
        data = out.serialize()
        out.close()
        return data

    def restore(self, data: bytes) -> int:
        """Replace the keys with a backup's. Only onto a fresh single node sealed by the same HSM key."""
        if len(self.state.members) > 1:
            raise StoreError(
                f"restore refused: this node is part of a {len(self.state.members)}-node cluster; "
                "restore needs a fresh single-node cluster"
            )
        if self.state.commit != 0:
            raise StoreError(
                f"restore refused: this node holds state (commit {self.state.commit}); "
                "restore needs a fresh node"
            )
        snap = read_backup(data, self.hsm)
        fresh = ClusterState(**{**self.state.__dict__, "members": dict(self.state.members)})
        snap["last_term"] = self.state.term
        self.install_snapshot(snap, fresh)
        return int(snap["commit"])

    # ---- key reads ----------------------------------------------------------------------------------
    def enclaves(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._db.execute("SELECT name, created FROM enclaves ORDER BY name")]

    def key_versions(self, enclave: str, name: str) -> list[tuple[int, str, str, bytes]]:
        rows = self._db.execute(
            "SELECT version, algorithm, created, material FROM keys WHERE enclave = ? AND name = ? "
            "ORDER BY version",
            (enclave, name),
        ).fetchall()
        return [(int(r[0]), r[1], r[2], bytes(r[3])) for r in rows]

    def key_names(self, enclave: str, prefix: str) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT name FROM keys WHERE enclave = ? AND substr(name, 1, ?) = ? ORDER BY name",
            (enclave, len(prefix), prefix),
        ).fetchall()
        return [r[0] for r in rows]


class _Tx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def read_backup(data: bytes, hsm: SoftHSM) -> dict[str, Any]:
    """Validate a backup (format, integrity, HSM key) and return it as a snapshot."""
    conn = sqlite3.connect(":memory:")
    try:
        try:
            conn.deserialize(data)
            check = conn.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise StoreError("backup is corrupt")
            meta = dict(conn.execute("SELECT k, v FROM meta").fetchall())
            enclaves = [list(r) for r in conn.execute("SELECT name, created FROM enclaves")]
            keys = [
                [r[0], r[1], r[2], r[3], r[4], base64.b64encode(r[5]).decode()]
                for r in conn.execute("SELECT * FROM keys")
            ]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"not a minkms backup: {exc}") from exc
        if meta.get("format") != BACKUP_FORMAT:
            raise StoreError(f"not a minkms backup: unknown format {meta.get('format')!r}")
        try:
            hsm.unseal(base64.b64decode(meta["seal_check"]), b"seal-check")
        except (InvalidTag, KeyError, ValueError) as exc:
            raise StoreError(
                "backup was sealed by a different HSM key; restore it with the original key"
            ) from exc
        return {"commit": int(meta["commit"]), "last_term": 0, "enclaves": enclaves, "keys": keys}
    finally:
        conn.close()
