"""How the cost of re-adding a node grows with the data, and how long the manual runbook takes (the oracle).

`minkms add` copies the whole state to the new node, so the time a REJOIN takes grows with the key database.
This prints figures and writes them into docs/benchmarks.md; it never asserts a timing.

    .venv/bin/python -m bench.emulator_add_cost [--sizes 0,500,2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.report import write_section
from emulator import wire
from emulator.lab import runbook
from emulator.lab.lab import Lab, wait_for


def fill(lab: Lab, count: int) -> None:
    client = lab.client()
    servers = [lab.nodes()[0].endpoint]
    for i in range(count):
        client.kms(servers, wire.KEY_CREATE, {"name": f"fill-{i}"})


def measure(size: int, repeat: int) -> dict[str, float]:
    lab = Lab(Path(tempfile.mkdtemp(prefix="bench-add-")) / "lab")
    try:
        lab.up(3, heartbeat="100ms", log=lambda _line: None)
        fill(lab, size)
        backup = lab.client().ok([lab.nodes()[0].endpoint], "GET", "/v1/db")[1]
        adds, totals, recoveries = [], [], []
        victim = lab.nodes()[2]
        for _ in range(repeat):
            lab.fault(victim.name, "disk-loss")
            fault_at = time.monotonic()
            wait_for(lambda: lab.probe(victim, "live"), 30, "the wiped node to restart")
            timeline = runbook.rejoin(lab, victim.name, log=lambda _line: None)
            recoveries.append(time.monotonic() - fault_at)
            totals.append(timeline.total)
            adds.append(next(s.seconds for s in timeline.steps if s.name.startswith("4.")))
        return {
            "keys": size,
            "db_bytes": len(backup),
            "add_s": statistics.median(adds),
            "runbook_s": statistics.median(totals),
            "fault_to_healthy_s": statistics.median(recoveries),
        }
    finally:
        lab.down(purge=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0,500,2000", help="key counts to measure (comma-separated)")
    p.add_argument("--repeat", type=int, default=3, help="runs per size; the median is reported")
    args = p.parse_args(argv)
    rows = [measure(int(s), args.repeat) for s in args.sizes.split(",")]
    lines = [
        "| keys | backup size | `minkms add` (median) | runbook, all steps | disk loss to healthy cluster |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['keys']:.0f} | {r['db_bytes'] / 1024:.0f} KiB | {r['add_s'] * 1000:.0f} ms | "
            f"{r['runbook_s'] * 1000:.0f} ms | {r['fault_to_healthy_s'] * 1000:.0f} ms |"
        )
    table = "\n".join(lines)
    print(table)
    write_section(
        "Emulator: cost of re-adding a node, and the manual runbook (oracle)",
        "Command: `.venv/bin/python -m bench.emulator_add_cost "
        f"--sizes {args.sizes} --repeat {args.repeat}`. A 3-node kmlab cluster (heartbeat 100 ms); node3 loses "
        "its disk and `kmlab runbook rejoin` heals it with perfect knowledge, no detection delay. "
        "`minkms add` copies the whole key database, so its time grows with the data; at small sizes the fixed "
        "costs (a CLI process start, TLS handshakes, one heartbeat) dominate. Other work may have shared the "
        "machine; compare runs made on one machine.\n\n" + table,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
