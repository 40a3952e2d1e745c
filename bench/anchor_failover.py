"""Anchor failover: time from SIGKILL of the anchor's agent to a new anchor that every survivor follows.

The design bound is lease + 2 probe intervals (DESIGN §4, issue 4). Runs a kmlab lab with agents (lease 5 s,
probe 1 s), kills the anchor's agent several times, and prints and records each figure.

    python -m bench.anchor_failover [--nodes 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from agent.io.control import ControlError, DaemonNotRunning, call
from bench.report import write_section
from emulator.lab.lab import Lab, wait_for

LEASE, PROBE = 5.0, 1.0


def anchor_of(lab: Lab, names: list[str]) -> str | None:
    """The one agent holding a lease that every agent in `names` follows, or None."""
    found: dict[str, Any] = {}
    for name in names:
        try:
            found[name] = call(lab.agent_socket(lab.node(name)), "GET", "/v1/status", timeout=5)
        except (DaemonNotRunning, ControlError, OSError):
            return None
    held = [
        n
        for n, s in found.items()
        if s["election"]["role"] == "anchor" and s["election"]["lease_remaining"] > 0
    ]
    if len(held) != 1 or any(s["anchor"] != held[0] for s in found.values()):
        return None
    return held[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kmagent-bench-") as tmp:
        lab = Lab(Path(tmp) / "lab")
        lab.up(args.nodes, heartbeat="100ms", log=lambda _line: None, agents=True)
        try:
            names = [n.name for n in lab.nodes()]
            for i in range(args.rounds):
                first = wait_for(lambda: anchor_of(lab, names), 60, "an anchor every agent follows")
                killed = time.monotonic()
                lab.fault(first, "agent-kill")
                lab.fault(first, "agent-stop")  # and keep it down: a quick restart may win the next term
                survivors = [n for n in names if n != first]
                wait_for(partial(anchor_of, lab, survivors), 60, "a new anchor", interval=0.05)
                figures.append(time.monotonic() - killed)
                lab.fault(first, "agent-start")
                print(
                    f"round {i + 1}: anchor {first} killed, new anchor after {figures[-1]:.2f}s", flush=True
                )
        finally:
            lab.down()
    bound = LEASE + 2 * PROBE
    body = (
        f"`python -m bench.anchor_failover --nodes {args.nodes} --rounds {args.rounds}`: a {args.nodes}-node lab "
        f"with agents (lease {LEASE:g} s, probe {PROBE:g} s); SIGKILL of the anchor's agent until every survivor "
        "follows one new anchor, polled every 50 ms over the control sockets.\n\n"
        f"| rounds | min | median | max | design bound (lease + 2 probes) |\n|---|---|---|---|---|\n"
        f"| {len(figures)} | {min(figures):.2f} s | {statistics.median(figures):.2f} s | {max(figures):.2f} s "
        f"| {bound:g} s |\n"
    )
    print(body)
    write_section(f"Anchor failover ({args.nodes} agents)", body)


if __name__ == "__main__":
    main()
