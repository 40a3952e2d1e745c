"""The settings the core decides with: detection and coordination timers, and the limits on automation.

They live in the core, not in `agent.config`, so that the core imports nothing of the shell (the layering test);
`agent.config` reads them from the `[timings]` and `[policy]` tables and validates them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Policy", "Timings"]


@dataclass(frozen=True)
class Timings:
    """Detection and coordination timers, in seconds (crash_loop_restarts is a count)."""

    probe_interval: float = 1.0
    peer_timeout: float = 3.0
    lease: float = 10.0
    state_lost_after: float = 5.0
    corrupt_after: float = 60.0
    evict_after: float = 120.0
    restore_after: float = 120.0
    cooldown: float = 600.0
    crash_loop_restarts: int = 3
    crash_loop_window: float = 60.0


@dataclass(frozen=True)
class Policy:
    """Limits on automation (§6 of the design); quarantine_keep in seconds."""

    actions_per_hour: int = 3
    min_members: int = 2
    auto_restore: bool = False
    quarantine_keep: float = 7 * 86400.0
