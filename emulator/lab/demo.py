"""`make demo`: a local emulated cluster loses a node's disk and its agents heal it, step by step.

Three emulated minkms nodes, each with a kmagent (short lab timings). One non-anchor node loses its disk; the
demo shows, live, the agents detecting it (STATE_LOST in every agent's view), agreeing (proposal, signed acks,
certificate: from the agents' own logs) and healing it step by step, then the timeline, a check that every key
still decrypts on every node, and `kmagent history`. The lab is always torn down, also on Ctrl-C or failure.

`--manual` runs the older story instead: the documented manual runbook, scripted, without agents.
"""

from __future__ import annotations

import argparse
import datetime
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from agent.cli import render_history, render_status
from agent.core import playbooks
from agent.io.control import ControlError, DaemonNotRunning, call
from emulator.lab import runbook
from emulator.lab.cli import _print_table
from emulator.lab.lab import Lab, LabError, LabNode, wait_for
from emulator.lab.workload import DataKey, create_keys, verify_keys

SETTLE_TIMEOUT = 90.0  # the agents elect an anchor and see every node HEALTHY
POLL = 0.25  # seconds between two looks at the agents (logs and status): live, but no busy loop
STEPS = tuple(s.name for s in playbooks.REJOIN)
# The agents' log events the story is made of; everything else in their logs stays there.
STORY_EVENTS = frozenset(
    {
        "proposed",
        "ack_given",
        "ack_refused",
        "certified",
        "not_certified",
        "step_started",
        "step_done",
        "step_failed",
        "action_finished",
    }
)
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
_UNESCAPE = re.compile(r"\\(.)")


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def indent(text: str) -> None:
    print("\n".join(f"    {line}" if line else "" for line in text.splitlines()), flush=True)


# ---- the agents' logs ------------------------------------------------------------------------------------


def parse_line(line: str) -> dict[str, str]:
    """The fields of one `key=value` log line (agent.io.logs.kv); quoted values unescaped."""
    fields = {}
    for key, value in _FIELD.findall(line):
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = _UNESCAPE.sub(lambda m: "\n" if m[1] == "n" else m[1], value[1:-1])
        fields[key] = value
    return fields


def log_time(fields: dict[str, str]) -> float | None:
    """The wall-clock time of a log line (`time=` is local time with milliseconds), None without one."""
    try:
        return datetime.datetime.strptime(fields["time"], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
    except (KeyError, ValueError):
        return None


class LogTail:
    """The complete lines appended to an agent's log since the tail was opened (a torn last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]


# ---- the story -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    at: float  # wall clock
    agent: str
    text: str


@dataclass
class Story:
    """What the agents did about one node since its fault: the events worth a line, and the timeline's marks."""

    victim: str
    fault_at: float
    events: list[Event] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # timeline mark -> wall clock of its first time
    notes: dict[str, str] = field(default_factory=dict)  # timeline mark -> what it was
    seen_lost: dict[str, float] = field(default_factory=dict)  # agent -> when it first saw the victim lost
    seen_healthy: set[str] = field(default_factory=set)
    actions: set[str] = field(default_factory=set)
    finished: dict[str, str] = field(default_factory=dict)  # action id -> outcome
    _said: set[tuple[str, ...]] = field(default_factory=set)

    def tell(self, key: tuple[str, ...], at: float, agent: str, text: str) -> None:
        """One line per distinct event: a target step is logged by the target and mirrored by the anchor."""
        if key not in self._said:
            self._said.add(key)
            self.events.append(Event(at, agent, text))

    def mark(self, label: str, at: float, note: str = "") -> None:
        if label not in self.marks:
            self.marks[label], self.notes[label] = at, note

    def from_log(self, agent: str, fields: dict[str, str]) -> None:
        event, action = fields.get("event", ""), fields.get("action", "")
        at = log_time(fields)
        if event not in STORY_EVENTS or at is None or at < self.fault_at:
            return
        if fields.get("target") == self.victim:
            self.actions.add(action)
        if action not in self.actions:
            return
        kind, target, term = fields.get("kind", ""), fields.get("target", ""), fields.get("term", "?")
        step, detail = fields.get("step", ""), fields.get("detail", "")
        if event == "proposed":
            self.mark("proposed", at, f"{kind} {target} by {agent}, the anchor")
            why = fields.get("why", "").removeprefix(f"{kind} {target} ({action}): ")
            self.tell((event, action, term), at, agent, f"proposes {kind} {target} as {action} (term {term})")
            if why:
                self.tell(("why", action, term), at, agent, f"  because {why}")
        elif event == "ack_given":
            self.tell((event, action, agent), at, agent, f"agrees: signs {kind} {target} (term {term})")
        elif event == "ack_refused":
            self.tell((event, action, agent), at, agent, f"does not agree yet: {fields.get('reason', '?')}")
        elif event == "certified":
            signers = fields.get("signers", "?")
            self.mark("certified", at, f"signed by {signers}")
            self.tell((event, action, term), at, agent, f"certified: a quorum signed ({signers})")
        elif event == "not_certified":
            self.tell((event, action), at, agent, f"not certified yet: {fields.get('refusals', '?')}")
        elif event == "step_started":
            self.tell((event, action, step), at, agent, f"step {step} started")
        elif event == "step_done":
            self.mark(f"{step} done", at, f"on {agent}")
            self.tell((event, action, step), at, agent, f"step {step} done: {detail}")
        elif event == "step_failed":
            self.tell((event, action, step, detail), at, agent, f"step {step} FAILED: {detail}")
        elif event == "action_finished":
            outcome = fields.get("outcome", "?")
            self.finished[action] = outcome
            self.tell((event, action), at, agent, f"action {action} finished: {outcome} ({detail})")

    def from_status(self, agent: str, status: dict[str, Any], now: float) -> None:
        """The agent's view of the victim: when it first showed STATE_LOST (backdated by how long it has held),
        and whether it shows HEALTHY again after an action has finished."""
        view = next((n for n in status.get("nodes", []) if n.get("name") == self.victim), None)
        if view is None:
            return
        cls = view.get("class")
        if cls == "STATE_LOST" and agent not in self.seen_lost:
            at = max(self.fault_at, now - float(view.get("since_seconds") or 0.0))
            self.seen_lost[agent] = at
            self.tell(
                ("lost", agent), at, agent, f"sees {self.victim} STATE_LOST: {view.get('reason') or '?'}"
            )
        elif cls == "HEALTHY" and "done" in self.finished.values():
            self.seen_healthy.add(agent)

    def detected(self, agents: list[str]) -> None:
        if all(a in self.seen_lost for a in agents):
            self.mark("detected", max(self.seen_lost[a] for a in agents), "STATE_LOST in every agent's view")

    def healed(self, agents: list[str], now: float) -> bool:
        if all(a in self.seen_healthy for a in agents):
            if "healed" not in self.marks:
                self.mark("healed", now, "HEALTHY in every agent's view")
                self.tell(("healed",), now, "all", f"every agent sees {self.victim} HEALTHY again")
            return True
        return False

    def timeline(self) -> list[tuple[str, float | None, str]]:
        """Every mark of a REJOIN in order: its seconds since the fault (None: never seen) and what it was."""
        labels = ["detected", "proposed", "certified", *(f"{s} done" for s in STEPS), "healed"]
        return [
            (label, self.marks[label] - self.fault_at, self.notes[label])
            if label in self.marks
            else (label, None, "")
            for label in labels
        ]


def agent_status(lab: Lab, node: LabNode) -> dict[str, Any] | None:
    """The agent's /v1/status, None while it does not answer (e.g. restarting)."""
    try:
        status: dict[str, Any] = call(lab.agent_socket(node), "GET", "/v1/status", timeout=3)
    except (DaemonNotRunning, ControlError, OSError):
        return None
    return status


def settled(lab: Lab) -> str | None:
    """The anchor, once every agent follows the same one and sees every node HEALTHY; else None."""
    anchors = set()
    for node in lab.nodes():
        status = agent_status(lab, node)
        if status is None or not status.get("anchor"):
            return None
        if any(n.get("class") != "HEALTHY" for n in status.get("nodes", [])):
            return None
        anchors.add(status["anchor"])
    return anchors.pop() if len(anchors) == 1 else None


def agent_log(lab: Lab, node: LabNode) -> Path:
    return Path(lab.agent_program(node)["log"])


def last_errors(lab: Lab) -> list[str]:
    """The last error each agent logged: why a story that did not happen did not."""
    found = []
    for node in lab.nodes():
        path = agent_log(lab, node)
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - 65536))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        errors = [line for line in lines if "level=error" in line]
        if errors:
            found.append(f"{node.name}: {errors[-1]}")
    return found


def show_status(lab: Lab, name: str) -> None:
    status = agent_status(lab, lab.node(name))
    if status is None:
        print(f"    (the agent of {name} does not answer)")
    else:
        indent(render_status(status))


def follow(lab: Lab, victim: LabNode, fault_at: float, tails: dict[str, LogTail], timeout: float) -> Story:
    """Print the story live until the victim is healed in every agent's view; LabError after `timeout`."""
    story = Story(victim.name, fault_at)
    names = [n.name for n in lab.nodes()]
    deadline = time.monotonic() + timeout
    printed = 0
    while True:
        # in time order across the agents: the first to log a mirrored step (the target) tells it
        lines = [(name, parse_line(line)) for name, tail in tails.items() for line in tail.new_lines()]
        for name, fields in sorted(lines, key=lambda item: log_time(item[1]) or 0.0):
            story.from_log(name, fields)
        for node in lab.nodes():
            status = agent_status(lab, node)
            if status is not None:
                story.from_status(node.name, status, time.time())
        story.detected(names)
        done = story.healed(names, time.time())
        fresh = sorted(story.events[printed:], key=lambda e: e.at)
        printed = len(story.events)
        for e in fresh:
            print(f"    +{e.at - fault_at:5.1f}s  {e.agent:<6} {e.text}", flush=True)
        if done:
            return story
        if time.monotonic() >= deadline:
            raise LabError(f"{victim.name} not healed {timeout:.0f}s after the fault (see the agents' logs)")
        time.sleep(POLL)


# ---- the two demos ---------------------------------------------------------------------------------------


def run_agents(lab: Lab, args: argparse.Namespace) -> bool:
    say(f"starting a {args.nodes}-node minkms cluster (emulated), a kmagent on every node, in {lab.dir}")
    try:
        lab.up(args.nodes, heartbeat="100ms", log=lambda line: print("    " + line), agents=True)
    except LabError as exc:
        if "unix socket path" in str(exc):  # the demo's lab lives in TMPDIR: say which knob to turn
            raise LabError(f"{exc} (for the demo: set TMPDIR to a shorter directory)") from None
        raise
    print("    the agents elect an anchor and classify every node ...", flush=True)
    anchor = wait_for(
        lambda: settled(lab), SETTLE_TIMEOUT, "the agents to agree on an anchor, every node HEALTHY"
    )
    say(f"kmagent status (as the agent of {anchor} sees the cluster)")
    show_status(lab, anchor)

    keys = workload(lab, args.keys)

    victim = [n for n in lab.nodes() if n.name != anchor][-1]
    tails = {n.name: LogTail(agent_log(lab, n)) for n in lab.nodes()}
    say(f"fault: {victim.name} loses its disk ({anchor} is the anchor)")
    fault_at = time.time()
    indent(lab.fault(victim.name, "disk-loss"))

    say("the agents detect it, agree, and heal it (live; seconds since the fault)")
    story = follow(lab, victim, fault_at, tails, args.timeout)
    healed_after = story.marks["healed"] - fault_at

    say(f"kmagent status after the recovery (agent of {anchor})")
    show_status(lab, anchor)

    lost = check_keys(lab, keys)

    say("timeline (seconds since the fault)")
    timeline = story.timeline()
    for label, seconds, note in timeline:
        when = "never" if seconds is None else f"{seconds:.1f}s"
        print(f"    {when:>7}  {label}" + (f": {note}" if note else ""))
    print(f"    time to recover: {healed_after:.1f}s")

    say(f"kmagent history (agent of {anchor})")
    try:
        entries = call(lab.agent_socket(lab.node(anchor)), "GET", "/v1/history", timeout=5)["entries"]
        indent(render_history(entries))
    except (DaemonNotRunning, ControlError, OSError) as exc:
        print(f"    history not available: {exc}")
    missing = [label for label, seconds, _ in timeline if seconds is None]
    if missing:
        print(f"    the timeline misses: {', '.join(missing)}", file=sys.stderr)
    return not lost and not missing


def run_manual(lab: Lab, args: argparse.Namespace) -> bool:
    say(f"starting a {args.nodes}-node minkms cluster (emulated), no agents, in {lab.dir}")
    lab.up(args.nodes, log=lambda line: print("    " + line))
    _print_table(lab.status())
    keys = workload(lab, args.keys)

    victim = lab.nodes()[1]
    say(f"fault: {victim.name} loses its disk")
    indent(lab.fault(victim.name, "disk-loss"))
    fault_at = time.monotonic()
    wait_for(lambda: not lab.probe(lab.nodes()[0], "ready?write"), 30, "the cluster to notice")
    _print_table(lab.status())
    print(
        f"    {victim.name} lost its state: the cluster still reads, but refuses writes until it is replaced."
    )

    say(f"recovery: the documented runbook for {victim.name}, by hand")
    timeline = runbook.rejoin(lab, victim.name, log=lambda line: print("    " + line))
    recovered = time.monotonic() - fault_at
    _print_table(lab.status())
    lost = check_keys(lab, keys)

    say("timeline")
    for s in timeline.steps:
        print(f"    {s.seconds:6.2f}s  {s.name}")
    print(f"    runbook {timeline.total:.2f}s; fault to healthy cluster {recovered:.2f}s")
    return not lost


def workload(lab: Lab, count: int) -> list[DataKey]:
    say(f"workload: creating {count} keys and a data key from each")
    keys = create_keys(lab, count)
    failures = verify_keys(lab, keys)
    print(f"    {len(keys)} keys created; every data key decrypts on every node: {not failures}")
    return keys


def check_keys(lab: Lab, keys: list[DataKey]) -> list[str]:
    say("checking that nothing was lost: every data key, decrypted on every node")
    failures = verify_keys(lab, keys)
    for line in failures:
        print("    LOST " + line)
    print(f"    {len(keys)} keys x {len(lab.nodes())} nodes decrypted; failures: {len(failures)}")
    return failures


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kmlab-demo", description=__doc__)
    p.add_argument("--nodes", type=int, default=3, help="nodes in the lab (at least 3; default 3)")
    p.add_argument("--keys", type=int, default=20, help="keys of the workload (default 20)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the recovery")
    p.add_argument("--manual", action="store_true", help="no agents: the manual runbook, scripted")
    p.add_argument("--keep", action="store_true", help="leave the lab running at the end")
    args = p.parse_args(argv)
    if args.nodes < 3:
        p.error("--nodes: at least 3 (a REJOIN needs a quorum of agents besides the lost node)")
    if args.keys < 1 or args.timeout <= 0:
        p.error("--keys and --timeout must be positive")

    run: Callable[[Lab, argparse.Namespace], bool] = run_manual if args.manual else run_agents
    lab = Lab(Path(tempfile.mkdtemp(prefix="kmlab-demo-")))
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _terminate)  # a kill tears the lab down too
    code = 1
    try:
        ok = run(lab, args)
        say(f"{'done' if ok else 'FAILED'} in {time.monotonic() - started:.0f}s")
        code = 0 if ok else 1
    except LabError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        if lab.exists() and lab.has_agents():
            for line in last_errors(lab):
                print(f"    last error of {line}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if args.keep:
            print(
                f"\nlab left running: kmlab status --dir {lab.dir}; stop it with kmlab down --dir {lab.dir} --purge"
            )
        else:
            say("tearing down")
            lab.down(purge=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
