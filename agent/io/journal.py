"""The durable intent journal, the agreement state and the action history (DESIGN §4.4, §5, §6.8).

Every step of a destructive action is journaled: an intent record (fsynced) before the step runs, an outcome
record (fsynced) after. A crash at any instant then leaves one of three states per step: not started (no intent),
done or failed (outcome), or *in doubt* (intent without outcome: the step may or may not have happened, so the
caller re-runs it through its idempotency check). Replay on start rebuilds exactly that.

The journal is JSON lines, one record per line, appended with O_APPEND and fsynced. A crash in the middle of an
append leaves a torn last line: the writer never saw its fsync return, so nobody acted on that record, and replay
ignores it (with a warning) and the next append cuts it off. Any other damage is a `JournalError` naming the file
and the line: guessing past a damaged journal could repeat or skip a destructive step.

Finished actions move to the `History` (append-only, never compacted); the journal is compacted by an atomic
rewrite that keeps the unfinished actions and, as tombstones, the ids of the last finished ones, so that a
delayed step request for a finished action is still recognised after compaction.

Records are dataclasses encoded by `agent.core.wire`, so that decoding is as strict as for peer messages.
The writing methods block (fsync): the daemon calls them from a thread, with a deadline (`agent.io.durable.Writes`);
a lock keeps concurrent writes in order. Reads (`state`, `entries`, `find`) never wait for a write's fsync: they
take a second, short lock, and see a record only once it is durable. A hung disk therefore stalls the writer, never
the event loop that reads the state for every report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from agent.core import wire
from agent.core.agreement import Held
from agent.core.messages import Action, Certificate
from agent.io import logs
from agent.io.durable import atomic_write, fsync_dir, read_json, write_json

__all__ = [
    "OUTCOMES",
    "ActionState",
    "History",
    "HistoryEntry",
    "Journal",
    "JournalError",
    "JournalState",
    "Outcome",
    "Progress",
    "StepEntry",
    "StepState",
    "close_action",
    "history_entry",
]

log = logging.getLogger(__name__)

VERSION = 1
"""Record format version; a record with a higher one was written by a newer kmagent and is refused."""
COMPACT_BYTES = 1 << 20
"""Compact the journal once finished actions have made it larger than this."""
KEEP_FINISHED = 256
"""Finished action ids kept as tombstones through a compaction."""
FILE_MODE = 0o600

Outcome = Literal["done", "aborted", "failed"]
OUTCOMES: tuple[str, ...] = ("done", "aborted", "failed")

R = TypeVar("R")


class JournalError(Exception):
    """The journal, the history or the held-action file cannot be trusted: names the file and, when known, the
    line. The daemon reports it and does not act on that file's contents."""

    def __init__(self, path: Path, problem: str, line: int | None = None) -> None:
        self.path, self.problem, self.line = path, problem, line
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


# --------------------------------------------------------------------------------------------------------------
# Records as written (one JSON object per line)


@dataclass(frozen=True)
class _Begin:
    kind: Literal["begin"]
    v: int
    time: float
    agent: str
    action: Action
    certificate: Certificate
    role: str


@dataclass(frozen=True)
class _Intent:
    kind: Literal["intent"]
    v: int
    time: float
    agent: str
    action_id: str
    step: str
    term: int
    certificate: (
        Certificate | None
    )  # None: the action's latest certificate, unchanged (saves kilobytes a step)


@dataclass(frozen=True)
class _Outcome:
    kind: Literal["outcome"]
    v: int
    time: float
    agent: str
    action_id: str
    step: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class _Finish:
    kind: Literal["finish"]
    v: int
    time: float
    agent: str
    action_id: str
    outcome: Literal["done", "aborted", "failed"]
    detail: str


_Record = _Begin | _Intent | _Outcome | _Finish
_KINDS: dict[str, type[Any]] = {"begin": _Begin, "intent": _Intent, "outcome": _Outcome, "finish": _Finish}


# --------------------------------------------------------------------------------------------------------------
# Replayed state


@dataclass(frozen=True)
class StepState:
    """The latest attempt of one step; `ok` None means in doubt (intent journaled, no outcome)."""

    step: str
    term: int
    intent_time: float
    attempts: int
    ok: bool | None = None
    detail: str = ""
    outcome_time: float | None = None

    @property
    def in_doubt(self) -> bool:
        return self.ok is None


@dataclass(frozen=True)
class Progress:
    """What an action's journal says about its steps: `done` in order, `failed` (latest attempt failed), and the
    one step in doubt, which the caller re-runs through its idempotency check."""

    done: tuple[str, ...]
    failed: tuple[str, ...]
    in_doubt: str | None


@dataclass(frozen=True)
class ActionState:
    action: Action
    certificate: Certificate  # the latest one journaled (a new anchor re-certifies in its term)
    role: str
    began: float  # wall time of the first begin record
    steps: tuple[StepState, ...] = ()  # in the order of their first intent
    outcome: Outcome | None = None  # None: unfinished
    detail: str = ""
    finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def step(self, name: str) -> StepState | None:
        return next((s for s in self.steps if s.step == name), None)

    @property
    def progress(self) -> Progress:
        return Progress(
            done=tuple(s.step for s in self.steps if s.ok is True),
            failed=tuple(s.step for s in self.steps if s.ok is False),
            in_doubt=next((s.step for s in self.steps if s.in_doubt), None),
        )


@dataclass(frozen=True)
class JournalState:
    """The journal replayed: every action it still holds, and the finished ids kept as tombstones."""

    actions: dict[str, ActionState] = dataclasses.field(default_factory=dict)  # in the order begun
    tombstones: tuple[str, ...] = ()  # finished actions whose records were compacted away
    warnings: tuple[str, ...] = ()  # e.g. the torn last line that was ignored

    def get(self, action_id: str) -> ActionState | None:
        return self.actions.get(action_id)

    def unfinished(self) -> list[ActionState]:
        """Actions begun and not finished, oldest first: resume or abort each on start."""
        return [a for a in self.actions.values() if not a.finished]

    def progress(self, action_id: str) -> Progress:
        """The steps of `action_id`; empty for an action never begun here."""
        state = self.actions.get(action_id)
        return state.progress if state is not None else Progress((), (), None)

    def is_finished(self, action_id: str) -> bool:
        state = self.actions.get(action_id)
        return (state is not None and state.finished) or action_id in self.tombstones


class _Fold:
    """Applies records in order; `problem` says why a record cannot follow the ones before it."""

    def __init__(self) -> None:
        self.actions: dict[str, ActionState] = {}
        self.tombstones: deque[str] = deque(maxlen=KEEP_FINISHED)
        self.lines: dict[str, list[bytes]] = {}  # raw lines of each action still in the file
        self.tombstone_lines: deque[bytes] = deque(maxlen=KEEP_FINISHED)

    def problem(self, rec: _Record) -> str | None:
        if isinstance(rec, _Begin):
            old = self.actions.get(rec.action.id)
            if rec.certificate.action != rec.action:
                return f"begin of {rec.action.id} with a certificate for another action"
            if rec.action.id in self.tombstones or (old is not None and old.finished):
                return f"begin of action {rec.action.id}, which is already finished"
            if old is not None and old.action != rec.action:
                return f"begin of action {rec.action.id} with content different from its first begin"
            return None
        state = self.actions.get(rec.action_id)
        if isinstance(rec, _Finish) and state is None:
            return None if rec.action_id not in self.tombstones else f"{rec.action_id} finished twice"
        if state is None:
            return f"{rec.kind} for action {rec.action_id}, which was never begun"
        if state.finished:
            return f"{rec.kind} for action {rec.action_id}, which is already finished"
        if isinstance(rec, _Intent):
            if rec.certificate is not None and rec.certificate.action != state.action:
                return f"intent for {rec.action_id} with a certificate for another action"
            doubt = state.progress.in_doubt
            if doubt is not None and doubt != rec.step:
                return f"intent for step {rec.step!r} of {rec.action_id} while step {doubt!r} is in doubt"
        if isinstance(rec, _Outcome):
            step = state.step(rec.step)
            if step is None or not step.in_doubt:
                return f"outcome of step {rec.step!r} of {rec.action_id} without an open intent"
        return None

    def apply(self, rec: _Record, line: bytes) -> None:
        if isinstance(rec, _Finish) and rec.action_id not in self.actions:
            self.tombstones.append(rec.action_id)  # a tombstone kept by an earlier compaction
            self.tombstone_lines.append(line)
            return
        aid = rec.action.id if isinstance(rec, _Begin) else rec.action_id
        self.lines.setdefault(aid, []).append(line)
        self.actions[aid] = _next_state(self.actions.get(aid), rec)

    def snapshot(self, warnings: Sequence[str] = ()) -> JournalState:
        return JournalState(dict(self.actions), tuple(self.tombstones), tuple(warnings))


def _next_state(state: ActionState | None, rec: _Record) -> ActionState:
    """One action's state after a record that `_Fold.problem` accepted."""
    if isinstance(rec, _Begin):
        if state is None:
            return ActionState(rec.action, rec.certificate, rec.role, rec.time)
        return dataclasses.replace(state, certificate=rec.certificate, role=rec.role)
    assert state is not None
    if isinstance(rec, _Finish):
        return dataclasses.replace(state, outcome=rec.outcome, detail=rec.detail, finished_time=rec.time)
    steps = list(state.steps)
    index = next((i for i, s in enumerate(steps) if s.step == rec.step), None)
    if isinstance(rec, _Intent):
        attempts = 1 if index is None else steps[index].attempts + 1
        new = StepState(rec.step, rec.term, rec.time, attempts)
        if index is None:
            steps.append(new)
        else:
            steps[index] = new
        cert = rec.certificate if rec.certificate is not None else state.certificate
        return dataclasses.replace(state, steps=tuple(steps), certificate=cert)
    assert index is not None
    steps[index] = dataclasses.replace(steps[index], ok=rec.ok, detail=rec.detail, outcome_time=rec.time)
    return dataclasses.replace(state, steps=tuple(steps))


# --------------------------------------------------------------------------------------------------------------
# JSON lines on disk, shared by the journal and the history


def _clip(text: str, limit: int = wire.MAX_STRING) -> str:
    """Human text (a detail, a piece of evidence) cut to what a record may hold, rather than refused."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_line(path: Path, number: int, line: bytes, kinds: dict[str, type[R]]) -> R:
    """One line as its record; JournalError naming the line otherwise."""
    try:
        data = wire.parse_json(line)
    except wire.WireError as exc:
        raise JournalError(path, f"damaged record: {exc}", number) from None
    if not isinstance(data, dict):
        raise JournalError(path, "damaged record: not a JSON object", number)
    version = data.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise JournalError(path, f"record without a valid version: {repr(version)[:40]}", number)
    if version > VERSION:
        raise JournalError(path, f"record version {version} was written by a newer kmagent", number)
    kind = data.get("kind")
    cls = kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise JournalError(
            path, f"unknown record kind {repr(kind)[:40]} (written by a newer kmagent?)", number
        )
    try:
        return wire.decode(cls, data)
    except wire.WireError as exc:
        raise JournalError(path, f"damaged record: {exc}", number) from None


def _read_lines(path: Path) -> tuple[list[bytes], int, str | None]:
    """The complete lines of a JSON-lines file, the byte size they span, and a warning for a torn last line.

    A torn last line is what a crash during an append leaves: bytes without their newline, or a last line that
    is not JSON at all (a crash can leave zeros where the data was not yet written). Either is dropped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, None
    except OSError as exc:
        raise JournalError(path, f"cannot read: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last append was torn
    good = len(data) - len(tail)
    warning = None
    if tail:
        warning = (
            f"{path}: ignored a torn last line ({len(tail)} bytes without a newline, line {len(lines) + 1})"
        )
    elif lines:
        try:
            wire.parse_json(lines[-1])
        except wire.WireError:
            good -= len(lines[-1]) + 1
            warning = f"{path}: ignored a damaged last line (line {len(lines)}), as left by a crash"
            lines.pop()
    return lines, good, warning


class _Appender:
    """Appends lines with fsync; the file is created 0600 (and its directory synced), a torn tail is cut off
    before the first append so that it never becomes a damaged middle line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.good_size: int | None = None  # set by the reader; None: not read yet

    def append(self, line: bytes) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        created = not self.path.exists()
        fd = os.open(self.path, flags, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            if self.good_size is not None and os.fstat(fd).st_size > self.good_size:
                os.ftruncate(fd, self.good_size)
                log.warning(logs.kv(event="journal_torn_tail_removed", path=self.path, size=self.good_size))
            view = memoryview(line + b"\n")
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            self.good_size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)


def _line(record: object) -> bytes:
    return wire.dumps(record)


# --------------------------------------------------------------------------------------------------------------
# The journal


class Journal:
    """The append-only intent journal of one agent, and its persisted agreement state (`Held`)."""

    def __init__(
        self,
        path: Path,
        agent: str,
        *,
        held_path: Path | None = None,
        clock: Callable[[], float] = time.time,
        compact_bytes: int = COMPACT_BYTES,
    ) -> None:
        self.path = Path(path)
        self.agent = agent
        self.held_path = held_path if held_path is not None else self.path.with_name("held.json")
        self.clock = clock
        self._compact_bytes = compact_bytes
        self._appender = _Appender(self.path)
        self._fold: _Fold | None = None
        self._lock = threading.Lock()  # writers, in order (held across the fsync)
        self._state_lock = threading.Lock()  # the in-memory state (never held across disk I/O once loaded)

    # --- reading

    def replay(self) -> JournalState:
        """Read the file again and rebuild the state; JournalError when it cannot be trusted."""
        with self._lock, self._state_lock:
            return self._replay()

    def state(self) -> JournalState:
        """The current state (replays the file on first use); never waits for a write in progress."""
        with self._state_lock:
            return self._loaded().snapshot()

    def _replay(self) -> JournalState:
        lines, good, warning = _read_lines(self.path)
        fold = _Fold()
        for number, line in enumerate(lines, 1):
            rec: _Record = _decode_line(self.path, number, line, _KINDS)
            if rec.agent != self.agent:
                stranger = (
                    f"record written by agent {rec.agent!r}, this is {self.agent!r} (a copied state dir?)"
                )
                raise JournalError(self.path, stranger, number)
            problem = fold.problem(rec)
            if problem is not None:
                raise JournalError(self.path, problem, number)
            fold.apply(rec, line)
        if warning is not None:
            log.warning(logs.kv(event="journal_torn_line", message=warning))
        self._fold, self._appender.good_size = fold, good
        return fold.snapshot([warning] if warning else [])

    def _loaded(self) -> _Fold:
        if self._fold is None:
            self._replay()
        assert self._fold is not None
        return self._fold

    # --- writing

    def begin(self, action: Action, certificate: Certificate, role: str) -> ActionState:
        """Record that this agent takes part in `action` as `role` ("anchor", "target", ...). Begun again (a new
        anchor's certificate, a new role) it updates both; the content of the action may not change."""
        if not role:
            raise ValueError("begin: empty role")
        return self._write(_Begin("begin", VERSION, self.clock(), self.agent, action, certificate, role))

    def intent(self, action: Action, step: str, term: int, certificate: Certificate) -> ActionState:
        """Journal (fsync) that `step` of `action` is about to run in `term`; call before the step."""
        _check_step(step)
        state = self._loaded().actions.get(action.id)
        if state is not None and state.action != action:
            raise ValueError(f"intent: action {action.id} differs from the one begun")
        cert = None if state is not None and state.certificate == certificate else certificate
        rec = _Intent("intent", VERSION, self.clock(), self.agent, action.id, step, term, cert)
        return self._write(rec)

    def outcome(self, action_id: str, step: str, ok: bool, detail: str) -> ActionState:
        """Journal (fsync) how `step` ended; call after the step, before anyone relies on it."""
        _check_step(step)
        rec = _Outcome("outcome", VERSION, self.clock(), self.agent, action_id, step, ok, _clip(detail))
        return self._write(rec)

    def finish(self, action_id: str, outcome: Outcome, detail: str) -> ActionState:
        """Journal the end of an action; compacts the journal when finished actions have made it large."""
        if outcome not in OUTCOMES:
            raise ValueError(f"finish: outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        rec = _Finish("finish", VERSION, self.clock(), self.agent, action_id, outcome, _clip(detail))
        state = self._write(rec, must_exist=True)
        with self._lock:
            if (self._appender.good_size or 0) > self._compact_bytes:
                self._compact()
        return state

    def compact(self) -> None:
        """Rewrite the file atomically with only the unfinished actions and the finished ids as tombstones."""
        with self._lock:
            self._compact()

    def _write(self, rec: _Record, must_exist: bool = False) -> ActionState:
        line = _line(rec)  # WireError (a ValueError) before anything is written
        aid = rec.action.id if isinstance(rec, _Begin) else rec.action_id
        with self._lock:
            with self._state_lock:
                fold = self._loaded()
                problem = fold.problem(rec)
            if must_exist and aid not in fold.actions:  # in a replay, this is a tombstone; here, a mistake
                problem = f"{rec.kind} for action {aid}, which was never begun (or finished and compacted)"

            if problem is not None:
                raise ValueError(problem)
            self._appender.append(line)  # the fsync: readers go on meanwhile, and see the record once durable
            with self._state_lock:
                fold.apply(rec, line)
                return fold.actions[aid]

    def _compact(self) -> None:
        with self._state_lock:
            fold = self._loaded()
        keep = {aid: s for aid, s in fold.actions.items() if not s.finished}
        if len(keep) == len(fold.actions):
            return  # nothing finished to drop: a rewrite would not shrink the file
        finish_lines = [fold.lines[aid][-1] for aid, s in fold.actions.items() if s.finished]
        compacted = _Fold()
        compacted.tombstones.extend(fold.tombstones)
        compacted.tombstone_lines.extend(fold.tombstone_lines)
        compacted.tombstones.extend(aid for aid, s in fold.actions.items() if s.finished)
        compacted.tombstone_lines.extend(finish_lines)
        compacted.actions = keep
        compacted.lines = {aid: fold.lines[aid] for aid in keep}
        body = list(compacted.tombstone_lines) + [ln for aid in keep for ln in compacted.lines[aid]]
        data = b"".join(ln + b"\n" for ln in body)
        atomic_write(self.path, data, FILE_MODE)
        log.info(logs.kv(event="journal_compacted", path=self.path, kept=len(keep), size=len(data)))
        with self._state_lock:
            self._fold, self._appender.good_size = compacted, len(data)

    # --- the agreement state

    def save_held(self, held: Held | None) -> None:
        """Persist (atomically, fsynced) the unfinished action this agent acked; before the ack is sent."""
        write_json(
            self.held_path, {"v": VERSION, "held": None if held is None else wire.encode(held)}, FILE_MODE
        )

    def load_held(self) -> Held | None:
        """The persisted held action; JournalError when the file is damaged: forgetting it could let this agent
        ack a second action, so a damaged file is never read as "holding nothing"."""
        try:
            data = read_json(self.held_path)
        except ValueError as exc:
            raise JournalError(self.held_path, f"damaged: {exc}") from None
        except OSError as exc:
            raise JournalError(self.held_path, f"cannot read: {exc.strerror or exc}") from None
        if data is None:
            return None
        if not isinstance(data, dict) or set(data) != {"v", "held"} or data["v"] != VERSION:
            raise JournalError(self.held_path, "unexpected content (not a held-action file of this version)")
        if data["held"] is None:
            return None
        try:
            return wire.decode(Held, data["held"])
        except wire.WireError as exc:
            raise JournalError(self.held_path, f"damaged: {exc}") from None


def _check_step(step: str) -> None:
    if not step or len(step) > 64 or not step.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"bad step name {step[:70]!r}: letters, digits, '-' and '_', at most 64")


# --------------------------------------------------------------------------------------------------------------
# The history


@dataclass(frozen=True)
class StepEntry:
    step: str
    ok: bool | None  # None: still in doubt when the action ended (e.g. aborted after a crash)
    seconds: float
    attempts: int
    detail: str = ""


@dataclass(frozen=True)
class HistoryEntry:
    """One finished destructive action, as DESIGN §6.8 wants it audited: who agreed (the certificate, verifiable
    alone), on what evidence, when, how each step went and how it ended."""

    action: Action
    certificate: Certificate
    agent: str  # the agent that recorded it
    role: str
    evidence: tuple[str, ...]
    started: float  # wall times, epoch seconds
    finished: float
    duration: float
    outcome: Literal["done", "aborted", "failed"]
    detail: str
    steps: tuple[StepEntry, ...]

    @property
    def signers(self) -> tuple[str, ...]:
        return tuple(ack.signer for ack in self.certificate.acks)


@dataclass(frozen=True)
class _HistoryRecord:
    kind: Literal["history"]
    v: int
    entry: HistoryEntry


class History:
    """The append-only history of finished actions (never compacted: it is the audit record)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._appender = _Appender(self.path)
        self._entries: list[HistoryEntry] | None = None
        self._lock = threading.Lock()  # writers, in order (held across the fsync)
        self._state_lock = threading.Lock()  # the entries in memory (readers never wait for a write's fsync)

    def append(self, entry: HistoryEntry) -> None:
        """Append and fsync; evidence and texts too long for a record are clipped, not refused."""
        entry = dataclasses.replace(
            entry,
            evidence=tuple(_clip(e) for e in entry.evidence[: wire.MAX_ITEMS]),
            detail=_clip(entry.detail),
            steps=tuple(dataclasses.replace(s, detail=_clip(s.detail)) for s in entry.steps),
        )
        line = _line(_HistoryRecord("history", VERSION, entry))
        with self._lock:
            with self._state_lock:
                self._load()
            self._appender.append(line)
            with self._state_lock:
                self._load().append(entry)

    def entries(self, limit: int | None = None) -> list[HistoryEntry]:
        """The recorded actions, newest last; the last `limit` of them when given."""
        with self._state_lock:
            entries = self._load()
            return list(entries if limit is None else entries[max(0, len(entries) - limit) :])

    def find(self, action_id: str) -> HistoryEntry | None:
        with self._state_lock:
            return next((e for e in reversed(self._load()) if e.action.id == action_id), None)

    def recent(self, target: str, since_wall: float) -> list[HistoryEntry]:
        """Actions on `target` that were still running at or after `since_wall`: what the cooldown and the hourly
        budget of DESIGN §6.6 count."""
        with self._state_lock:
            return [e for e in self._load() if e.action.target == target and e.finished >= since_wall]

    def _load(self) -> list[HistoryEntry]:
        if self._entries is None:
            lines, good, warning = _read_lines(self.path)
            if warning is not None:
                log.warning(logs.kv(event="history_torn_line", message=warning))
            kinds = {"history": _HistoryRecord}
            self._entries = [_decode_line(self.path, n, ln, kinds).entry for n, ln in enumerate(lines, 1)]
            self._appender.good_size = good
        return self._entries


def history_entry(
    state: ActionState, *, agent: str, outcome: Outcome, detail: str, evidence: Iterable[str], finished: float
) -> HistoryEntry:
    """The history entry of an action from its journaled state (step durations from the journal's wall times)."""
    steps = tuple(
        StepEntry(
            s.step,
            s.ok,
            max(0.0, (s.outcome_time if s.outcome_time is not None else s.intent_time) - s.intent_time),
            s.attempts,
            s.detail,
        )
        for s in state.steps
    )
    return HistoryEntry(
        action=state.action,
        certificate=state.certificate,
        agent=agent,
        role=state.role,
        evidence=tuple(evidence),
        started=state.began,
        finished=finished,
        duration=max(0.0, finished - state.began),
        outcome=outcome,
        detail=detail,
        steps=steps,
    )


def close_action(
    journal: Journal, history: History, action_id: str, outcome: Outcome, detail: str, evidence: Iterable[str]
) -> HistoryEntry:
    """End an action crash-safely: the history entry first, then the journal's finish record. A crash between
    the two leaves the action unfinished with its entry already recorded; calling this again on resume finishes
    it without a second entry."""
    journaled = journal.state()
    entry = history.find(action_id)
    if entry is not None and journaled.is_finished(action_id):
        return entry
    state = journaled.get(action_id)
    if state is None:
        raise ValueError(f"close_action: action {action_id} was never begun in {journal.path}")
    if entry is None:
        entry = history_entry(
            state,
            agent=journal.agent,
            outcome=outcome,
            detail=detail,
            evidence=evidence,
            finished=journal.clock(),
        )
        history.append(entry)
    if not state.finished:
        journal.finish(action_id, entry.outcome, entry.detail)
    return entry
