"""`kmlab`: run a local emulated minkms cluster, inject faults, and run the manual runbook.

Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from emulator.lab import runbook
from emulator.lab.lab import FAULTS, Lab, LabError
from emulator.lab.supervisor import SupervisorError

DEFAULT_DIR = "./lab"


def _print_table(rows: list[dict[str, Any]]) -> None:
    """The node table; with agents, a column for the class each agent reports and its reasons below."""
    agents = any(r.get("agent") for r in rows)
    header: tuple[str, ...] = (
        "NODE",
        "HOST",
        "PROCESS",
        "PID",
        "RESTARTS",
        "LIVE",
        "READY",
        "WRITE",
        "ID",
        "ROLE",
        "COMMIT",
        "MEMBERS",
    ) + (("AGENT",) if agents else ())
    table = [header]
    for r in rows:

        def yn(v: object) -> str:
            return "yes" if v else "no"

        table.append(
            (
                str(r["name"]),
                str(r["host"]),
                str(r["state"]),
                str(r["pid"] or "-"),
                str(r["restarts"]),
                yn(r["live"]),
                yn(r["ready"]),
                yn(r["write"]),
                "-" if r["node_id"] is None else str(r["node_id"]),
                str(r["role"] or "-"),
                "-" if r["commit"] is None else str(r["commit"]),
                "-" if r["members"] is None else str(r["members"]),
            )
            + ((str((r.get("agent") or {}).get("class") or "-"),) if agents else ())
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if agents:
        print()
        for r in rows:
            agent = r.get("agent") or {}
            print(f"{r['name']} agent: {agent.get('reason') or '-'}")


def cmd_up(args: argparse.Namespace) -> int:
    lab = Lab(Path(args.dir))
    timings: dict[str, str] = {}
    for item in args.agent_timing:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise LabError(f"--agent-timing {item!r}: expected KEY=VALUE, e.g. corrupt_after=20s")
        timings[key.strip()] = value.strip()
    lab.up(
        args.nodes, heartbeat=args.heartbeat, timeout=args.timeout, agents=args.agents, agent_timings=timings
    )
    _print_table(lab.status())
    if lab.has_agents():
        print(
            "\nagents: kmagent --config " + str(lab.agent_config(lab.nodes()[0])) + " status   (one per node)"
        )
    print(f'\nlab is up in {lab.dir}; use it with:  eval "$(kmlab env --dir {shlex.quote(str(lab.dir))})"')
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lab = Lab(Path(args.dir))
    if not lab.exists():
        print(f"no lab in {lab.dir}")
        return 0
    lab.down(purge=args.purge)
    print(f"lab in {lab.dir} stopped" + (" and removed" if args.purge else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = Lab(Path(args.dir))
    rows = lab.status()
    if args.json:
        print(json.dumps({"dir": str(lab.dir), "running": lab.running(), "nodes": rows}, indent=2))
    else:
        _print_table(rows)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    lab = Lab(Path(args.dir))
    for key, value in lab.env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    print(Lab(Path(args.dir)).fault(args.node, args.kind))
    return 0


def cmd_runbook(args: argparse.Namespace) -> int:
    lab = Lab(Path(args.dir))
    timeline = runbook.rejoin(lab, args.node, timeout=args.timeout)
    print(f"runbook finished: {len(timeline.steps)} steps in {timeline.total:.2f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmlab",
        description="Run a local emulated minkms cluster (one node per loopback address, real TLS), "
        "inject faults, and run the documented manual recovery runbook.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("--dir", default=DEFAULT_DIR, help=f"lab directory (default {DEFAULT_DIR})")
        return s

    s = add("up", "start a lab and wait until the cluster is formed")
    s.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    s.add_argument("--heartbeat", default="250ms", help="leader heartbeat interval (default 250ms)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the cluster (default 60)")
    s.add_argument("--agents", action="store_true", help="also run one kmagent per node")
    s.add_argument(
        "--agent-timing",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one of the agents' [timings] (lab defaults are short), e.g. --agent-timing corrupt_after=20s",
    )
    s.set_defaults(func=cmd_up)

    s = add("down", "stop every process of the lab")
    s.add_argument("--purge", action="store_true", help="also delete the lab directory")
    s.set_defaults(func=cmd_down)

    s = add("status", "show every node: process, health, cluster role, commit, and what its agent sees")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = add("env", "print the environment for the minkms CLI against this lab")
    s.set_defaults(func=cmd_env)

    s = add("fault", "inject a fault into one node")
    s.add_argument("node", help="node name (node1, node2, ...) or its address")
    s.add_argument(
        "kind",
        choices=FAULTS,
        help="isolate cuts the node's agent and minkms off the other nodes (root, nftables); heal removes it",
    )
    s.set_defaults(func=cmd_fault)

    s = add("runbook", "run a documented recovery procedure with perfect knowledge")
    s.add_argument("procedure", choices=["rejoin"])
    s.add_argument("node", help="the failed node")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait at each step (default 60)")
    s.set_defaults(func=cmd_runbook)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except (LabError, SupervisorError) as exc:
        print(f"kmlab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
