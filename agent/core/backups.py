"""Backups as the agents know them (DESIGN §5 BACKUP, RESTORE; guard rail 5): names, retention, and the choice
of the backup a total-failure restore uses.

Pure. A backup is taken once, by the anchor, and copied to every agent; each copy is checked on arrival (sha256
and gzip) and again by `kmagent backup verify`. Every agent reports the copies it holds intact
(`Report.backups`), so any agent can tell which backup is the freshest one a quorum could restore, and who holds
a copy of it.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "REPORTED",
    "BackupInfo",
    "Choice",
    "backup_id",
    "check_id",
    "choose",
    "holders",
    "newest_first",
    "to_drop",
]

# The newest copies a report carries: a restore uses the freshest intact one, so older ones are only listed by
# `kmagent backup list`, which asks each agent for its whole catalogue.
REPORTED = 16

_ID = re.compile(r"^\d{8}T\d{6}Z-[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BackupInfo:
    """One backup's catalogue entry; identical on every agent that holds a copy."""

    id: str  # "<UTC time>-<source agent>": unique, sortable, and safe as a file name (`check_id`)
    created: float  # wall-clock epoch seconds on the source agent when `minkms backup` finished
    commit: int  # the source node's commit index just before the backup: how much it holds
    size: int  # bytes of the gzip file
    sha256: str  # hex digest of the gzip file
    source: str  # the agent that took it (the anchor then)

    def problems(self) -> list[str]:
        """What is wrong with an entry read from a peer or from disk ([] when nothing)."""
        found = [] if _ID.fullmatch(self.id) else [f"backup id {self.id!r} is not <YYYYmmddTHHMMSSZ>-<agent>"]
        if not _SHA256.fullmatch(self.sha256):
            found.append(f"sha256 of {self.id} is not 64 lowercase hex digits")
        if self.size <= 0:
            found.append(f"size of {self.id} must be positive, got {self.size}")
        if self.commit < 0:
            found.append(f"commit of {self.id} must not be negative, got {self.commit}")
        if not self.created > 0:
            found.append(f"created time of {self.id} must be positive, got {self.created}")
        return found


def check_id(backup: str) -> str:
    """`backup` when it is a well-formed id (it names files on disk); ValueError naming the problem otherwise."""
    if not _ID.fullmatch(backup):  # not match: "$" would let a trailing newline through
        raise ValueError(
            f"{backup!r} is not a backup id (expected <YYYYmmddTHHMMSSZ>-<agent>, see `kmagent backup list`)"
        )
    return backup


def backup_id(created: float, source: str) -> str:
    """The id of a backup `source` finished at wall time `created` (ValueError for a time no calendar holds)."""
    try:
        stamp = datetime.datetime.fromtimestamp(created, datetime.UTC)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"{created!r} is not a backup time: {exc}") from None
    return check_id(stamp.strftime("%Y%m%dT%H%M%SZ") + "-" + source)


def newest_first(entries: Iterable[BackupInfo]) -> list[BackupInfo]:
    """Freshest first: by commit (what it holds), then time, then id, so every agent orders them alike."""
    return sorted(entries, key=lambda b: (b.commit, b.created, b.id), reverse=True)


def to_drop(entries: Sequence[BackupInfo], keep: int) -> list[BackupInfo]:
    """The copies retention removes: all but the `keep` freshest (and never the freshest one)."""
    return newest_first(entries)[max(1, keep) :]


def holders(holdings: Mapping[str, Sequence[BackupInfo]], backup: str) -> list[str]:
    """The agents that report an intact copy of `backup`, sorted (a copy must match the others' sha256)."""
    infos = {agent: next((b for b in held if b.id == backup), None) for agent, held in holdings.items()}
    return sorted(agent for agent, info in infos.items() if info is not None)


@dataclass(frozen=True)
class Choice:
    """The backup a restore would use, who holds it, and the newer ones it passed over and why."""

    backup: BackupInfo | None
    holders: tuple[str, ...]
    reason: str  # why there is none, or why an operator's request was refused ("" when chosen)


def choose(holdings: Mapping[str, Sequence[BackupInfo]], requested: str | None = None) -> Choice:
    """The freshest backup any agent holds an intact copy of (guard rail 5: never an older one while a newer one
    is available). `holdings`: each agent's reported intact copies. Copies of one id that disagree on the
    checksum are not trusted: the id is skipped, and the next freshest used. `requested`: an operator's
    `--backup ID`, accepted only when it is that freshest one."""
    by_id: dict[str, set[BackupInfo]] = {}
    for held in holdings.values():
        for info in held:
            if not info.problems():
                by_id.setdefault(info.id, set()).add(info)
    consistent = [next(iter(infos)) for infos in by_id.values() if len(infos) == 1]
    if not consistent:
        return Choice(None, (), "no agent holds an intact backup")
    best = newest_first(consistent)[0]
    who = tuple(holders({a: [b for b in h if b == best] for a, h in holdings.items()}, best.id))
    if requested is not None and requested != best.id:
        if requested in by_id and len(by_id[requested]) == 1:
            return Choice(
                None,
                (),
                f"{requested} is older than {best.id} (commit {best.commit}): a restore never uses an older backup while a newer one is available",
            )
        return Choice(None, (), f"no agent holds an intact copy of {requested}")
    return Choice(best, who, "")
