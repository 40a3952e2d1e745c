"""`make demo`: a local emulated cluster loses a node's disk and is healed, step by step.

Until the agent heals clusters by itself, the healing is the documented manual runbook, scripted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from emulator.lab import runbook
from emulator.lab.cli import _print_table
from emulator.lab.lab import Lab, LabError, wait_for
from emulator.lab.workload import create_keys, verify_keys


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kmlab-demo", description=__doc__)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--keys", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="leave the lab running at the end")
    args = p.parse_args(argv)

    lab = Lab(Path(tempfile.mkdtemp(prefix="kmlab-demo-")))
    started = time.monotonic()
    try:
        say(f"starting a {args.nodes}-node minkms cluster (emulated) in {lab.dir}")
        lab.up(args.nodes, log=lambda line: print("    " + line))
        _print_table(lab.status())

        say(f"workload: creating {args.keys} keys and a data key from each")
        keys = create_keys(lab, args.keys)
        print(
            f"    {len(keys)} keys created; every data key decrypts on every node: {not verify_keys(lab, keys)}"
        )

        victim = lab.nodes()[1]
        say(f"fault: {victim.name} loses its disk")
        print("    " + lab.fault(victim.name, "disk-loss"))
        fault_at = time.monotonic()
        wait_for(lambda: lab.probe(victim, "live"), 30, f"{victim.name} to restart")
        wait_for(lambda: not lab.probe(lab.nodes()[0], "ready?write"), 30, "the cluster to notice")
        _print_table(lab.status())
        print(f"    {victim.name} came back empty, as node 0 of a new single-node cluster;")
        print("    the cluster still reads, but refuses writes until the node is replaced.")

        say(f"recovery: the documented runbook for {victim.name}")
        timeline = runbook.rejoin(lab, victim.name, log=lambda line: print("    " + line))
        recovered = time.monotonic() - fault_at
        _print_table(lab.status())

        say("checking that nothing was lost")
        failures = verify_keys(lab, keys)
        for line in failures:
            print("    LOST " + line)
        print(f"    {len(keys)} keys x {len(lab.nodes())} nodes decrypted; failures: {len(failures)}")

        say("timeline")
        for s in timeline.steps:
            print(f"    {s.seconds:6.2f}s  {s.name}")
        print(
            f"    runbook {timeline.total:.2f}s; fault to healthy cluster {recovered:.2f}s; "
            f"demo {time.monotonic() - started:.1f}s"
        )
        return 1 if failures else 0
    except LabError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(
                f"\nlab left running: kmlab status --dir {lab.dir}; stop it with kmlab down --dir {lab.dir}"
            )
        else:
            say("tearing down")
            lab.down(purge=True)


if __name__ == "__main__":
    raise SystemExit(main())
