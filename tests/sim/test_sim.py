"""The simulator in CI: thousands of seeded schedules across cluster shapes, and proof that it catches breakage.

Seed counts were chosen for about 20-25 s on a loaded 2-core machine; `python -m tests.sim --seeds 0:10000`
runs a long sweep. A failing seed prints a one-line replay command.
"""

from __future__ import annotations

import time

import pytest

from tests.sim.sim import HEAL_PER_NODE, SimConfig, describe, liveness_bound, run

# (agents, witnesses, seeds): about 2,650 schedules in total
CONFIGURATIONS = [
    (1, 0, 50),
    (2, 1, 300),
    (3, 0, 1000),
    (4, 0, 500),
    (5, 0, 300),
    (5, 1, 300),
    (7, 0, 100),
    (7, 2, 100),
]


@pytest.mark.parametrize(("agents", "witnesses", "seeds"), CONFIGURATIONS)
def test_invariants_and_liveness_hold_for_every_seed(agents: int, witnesses: int, seeds: int) -> None:
    start = time.monotonic()
    failures: list[str] = []
    anchors = rejoins = 0
    slowest = 0.0
    for seed in range(seeds):
        result = run(SimConfig(seed=seed, agents=agents, witnesses=witnesses))
        if not result.ok:
            failures.append(describe(result))
            continue
        anchors += result.anchor_after_quiet is not None
        rejoins += result.stats["rejoins"]
        slowest = max(slowest, result.anchor_after_quiet or 0.0)
    print(
        f"\n{seeds} seeds, {agents} agents ({witnesses} witnesses): {len(failures)} failing, {rejoins} rejoins, "
        f"slowest anchor after faults {slowest:.1f}s (bound {liveness_bound(SimConfig(agents=agents)):.1f}s), "
        f"{time.monotonic() - start:.1f}s"
    )
    assert not failures, "\n".join(failures[:10])
    # the runs must exercise what they claim to: elections after faults and real REJOINs
    assert anchors == seeds
    if witnesses < agents - 1:
        assert rejoins > seeds // 4


def _first_violation(cfg: SimConfig, seeds: range) -> str | None:
    for seed in seeds:
        result = run(SimConfig(**{**cfg.__dict__, "seed": seed}))
        if not result.ok:
            assert result.violation is not None
            print("\n" + describe(result))
            return result.violation
    return None


@pytest.mark.parametrize(
    ("broken", "agents", "expected"),
    [
        ("ignore-promise", 3, "two anchors"),  # a voter that votes twice in a term / ignores its promise
        ("ignore-promise", 5, "two anchors"),
        ("no-margin", 3, "two anchors"),  # a candidate that counts its lease from the grant, without margin
        ("skip-fsync", 3, "sent a grant for term"),  # a shell that sends a grant it did not persist
    ],
)
def test_a_broken_rule_is_reported_for_some_seed(broken: str, agents: int, expected: str) -> None:
    violation = _first_violation(SimConfig(agents=agents, broken=broken), range(400))
    assert violation is not None, f"{broken}: no seed in 0:400 showed a violation"
    assert expected in violation


def test_clock_drift_beyond_the_bound_is_caught() -> None:
    """The bound rho <= margin/(2-margin) is not slack: at 6x that drift, leases overlap for some seed."""
    violation = _first_violation(SimConfig(agents=5, drift=0.3), range(1000))
    assert violation is not None and "two anchors" in violation


def test_a_seed_replays_exactly() -> None:
    cfg = SimConfig(seed=42, agents=5, witnesses=1)
    a, b = run(cfg, verbose=True), run(cfg, verbose=True)
    assert a.trace == b.trace and a.events == b.events and a.trace
    assert cfg.replay() == "python -m tests.sim --seed 42 --agents 5 --witnesses 1 -v"


def test_bad_configuration_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="at least one non-witness"):
        SimConfig(agents=2, witnesses=2)
    with pytest.raises(ValueError, match="unknown broken rule"):
        SimConfig(broken="nope")
    assert HEAL_PER_NODE > 0
