"""Replay one seed with its trace, or sweep a range: `python -m tests.sim --seed 7 -v`, `--seeds 0:10000`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from tests.sim.base import TUNABLE
from tests.sim.sim import BROKEN_RULES, SimConfig, describe, run


def _range(text: str) -> range:
    lo, sep, hi = text.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or int(lo) >= int(hi):
        raise argparse.ArgumentTypeError(f"expected START:END with START < END, got {text!r}")
    return range(int(lo), int(hi))


def _setting(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in TUNABLE:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE with NAME one of {', '.join(TUNABLE)}, got {text!r}"
        )
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None
    return name, int(number) if isinstance(getattr(SimConfig, name), int) else number


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, default=0, help="replay this seed (default 0)")
    which.add_argument("--seeds", type=_range, help="run every seed in START:END, print failures")
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--witnesses", type=int, default=0)
    ap.add_argument("--drift", type=float, default=SimConfig.drift, help="clock rate error bound")
    ap.add_argument("--broken", choices=BROKEN_RULES, help="run a deliberately broken rule (test only)")
    ap.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change a numeric setting of SimConfig (total_loss, freeze_in_command, crash_rate, ...)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="print the trace")
    args = ap.parse_args(argv)
    try:
        base = SimConfig(
            agents=args.agents,
            witnesses=args.witnesses,
            drift=args.drift,
            broken=args.broken,
            **dict(args.set),
        )
    except ValueError as exc:
        ap.error(str(exc))
    if args.seeds is None:
        result = run(dataclasses.replace(base, seed=args.seed), verbose=args.verbose)
        if args.verbose:
            print("\n".join(result.trace))
        print(describe(result))
        return 0 if result.ok else 1
    failures = 0
    start = time.monotonic()
    for seed in args.seeds:
        result = run(dataclasses.replace(base, seed=seed))
        if not result.ok:
            failures += 1
            print(describe(result), flush=True)
    took = time.monotonic() - start
    print(f"{len(args.seeds)} seeds, {failures} failing, {took:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
