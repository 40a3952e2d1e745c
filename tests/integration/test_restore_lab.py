"""Total-failure restore in a lab with agents and a key workload (DESIGN §5 RESTORE, guard rail 5): every node's
storage wiped; nothing destructive until the restore is armed; `kmagent restore --approve` (or `auto_restore`)
rebuilds the cluster to full size from the freshest backup, once, and every key created before that backup
decrypts on every node. An unreachable host blocks the automatic restore; a host whose agent is gone is named
by the operator, and the restore uses another agent's copy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator.lab.lab import Lab, LabNode, wait_for
from emulator.lab.workload import DataKey, create_keys, verify_keys
from tests.integration.crashlab import history, kmagent, needs_nft, status
from tests.integration.restorelab import (
    backup_everywhere,
    rebuilt,
    restored_from,
    restores,
    wipe_all,
)

TIMINGS = {"state_lost_after": "2s", "restore_after": "6s", "cooldown": "1s"}
POLICY: dict[str, Any] = {"actions_per_hour": 100}
BACKUP = {
    "interval": "1h",
    "keep": 3,
}  # backups on demand (`kmagent backup now`): the test knows which is newest
REBUILD_TIMEOUT = 420.0  # a restore and two REJOINs, ~20 s each here; generous for a loaded CI


def make_lab(tmp_path: Path, **policy: Any) -> Lab:
    lab = Lab(tmp_path / "lab")
    lab.up(
        3,
        heartbeat="100ms",
        log=lambda _line: None,
        agents=True,
        agent_timings=TIMINGS,
        agent_policy={**POLICY, **policy},
        agent_backup=BACKUP,
    )
    return lab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = make_lab(tmp_path)
    yield lab
    lab.down()


def advice(lab: Lab, node: LabNode) -> str:
    return str((status(lab, node).get("actions") or {}).get("restore") or "")


def check_rebuilt(lab: Lab, keys: list[DataKey], backup: str) -> str:
    """The cluster at full size from `backup`, restored exactly once; returns the RESTORE's id."""
    found = restores(lab)
    assert len(found) == 1 and list(found.values()) == [{"done"}], found
    (action,) = found
    assert restored_from(lab, action) == backup
    assert verify_keys(lab, keys) == []
    # the others rejoined the restored node, each once
    rejoins = {
        e["action"]["target"]
        for n in lab.nodes()
        for e in history(lab, n)
        if e["action"]["kind"] == "REJOIN" and e["outcome"] == "done"
    }
    assert len(rejoins) == 2, rejoins
    return action


def test_total_loss_waits_for_the_operator_then_rebuilds_from_the_freshest_backup(lab: Lab) -> None:
    """Not marked slow (~40 s): `make test-debian` runs one whole restore on Debian's own stack."""
    keys = create_keys(lab, 6)
    backup = backup_everywhere(lab)
    late = create_keys(lab, 2, prefix="late")  # after the backup: the restore loses these, as it says
    wipe_all(lab)

    # not armed: nothing destructive, and status names the backup and the exact command
    text = wait_for(lambda: "RESTORE NEEDED" in (a := advice(lab, lab.node("node2"))) and a, 90, "the advice")
    assert backup in text and f"kmagent restore --backup {backup} --approve" in text
    wait_for(
        lambda: "RESTORE NEEDED" in kmagent(lab, lab.node("node3"), "status").stdout,
        60,
        "status on node3 to say it",
    )
    plan = kmagent(lab, lab.node("node3"), "restore")
    assert plan.returncode == 0 and "Nothing was done" in plan.stdout, plan.stdout + plan.stderr
    explained = wait_for(
        lambda: "restore is not armed" in (e := kmagent(lab, lab.node("node1"), "explain").stdout) and e,
        60,
        "explain to say the restore is not armed",
    )
    assert "0 of 3 would agree" in explained, explained
    assert restores(lab) == {} and not any(history(lab, n) for n in lab.nodes())

    # an older backup is refused while a newer one is available
    older = kmagent(lab, lab.node("node2"), "restore", "--backup", "20000101T000000Z-node1", "--approve")
    assert older.returncode == 1 and "no agent holds an intact copy" in older.stderr, older.stderr

    approved = kmagent(lab, lab.node("node2"), "restore", "--approve")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    wait_for(lambda: rebuilt(lab), REBUILD_TIMEOUT, "the cluster to be rebuilt to three nodes")
    check_rebuilt(lab, keys, backup)
    assert verify_keys(lab, late, [lab.node("node1")]) != []  # written after the backup: lost
    # the approval was used: nothing more is restored, and the advice is gone
    assert all(not advice(lab, n) for n in lab.nodes())


@pytest.mark.slow
@needs_nft
def test_auto_restore_waits_for_an_unreachable_host_which_then_makes_it_unneeded(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, auto_restore=True)
    try:
        keys = create_keys(lab, 4)
        backup_everywhere(lab)
        lab.fault("node3", "isolate")
        wipe_all(lab, [lab.node("node1"), lab.node("node2")])
        text = wait_for(
            lambda: "--accept-loss-of node3" in (a := advice(lab, lab.node("node1"))) and a, 90, "the advice"
        )
        assert "node3 may hold newer state" in text

        # well past restore_after: still nothing restored, nothing destroyed
        def only_node3_blocks() -> bool:
            """restore_after has passed for node1 and node2: node3 alone stands in the way."""
            text = kmagent(lab, lab.node("node2"), "explain").stdout
            return (
                "node3 is UNREACHABLE: it may hold newer state" in text
                and "an automatic restore needs" not in text
            )

        wait_for(only_node3_blocks, 60, "explain to name node3, alone, as what blocks the restore")
        assert restores(lab) == {}
        lab.fault("node3", "heal")
        wait_for(lambda: rebuilt(lab), REBUILD_TIMEOUT, "node1 and node2 to rejoin node3")
        assert restores(lab) == {}  # node3's state was there: no restore needed, none done
        assert verify_keys(lab, keys) == []
    finally:
        lab.down()


@pytest.mark.slow
def test_auto_restore_without_the_backups_source_uses_another_agents_copy(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, auto_restore=True)
    try:
        keys = create_keys(lab, 4)
        backup = backup_everywhere(lab)
        source = backup.rsplit("-", 1)[1]  # the agent that took it (the anchor then)
        lab.fault(source, "agent-stop")
        wipe_all(lab)
        text = wait_for(
            lambda: (
                f"--accept-loss-of {source}"
                in (a := advice(lab, next(n for n in lab.nodes() if n.name != source)))
                and a
            ),
            90,
            "the advice to name the source",
        )
        assert backup in text
        assert restores(lab) == {}  # its agent is down: it blocks the automatic restore
        other = next(n for n in lab.nodes() if n.name != source)
        approved = kmagent(lab, other, "restore", "--approve", "--accept-loss-of", source)
        assert approved.returncode == 0, approved.stdout + approved.stderr
        wait_for(lambda: restores(lab), REBUILD_TIMEOUT, "a restore")
        lab.fault(source, "agent-start")  # its host comes back empty: it rejoins
        wait_for(lambda: rebuilt(lab), REBUILD_TIMEOUT, "the cluster to be rebuilt to three nodes")
        action = check_rebuilt(lab, keys, backup)
        entry = next(e for n in lab.nodes() for e in history(lab, n) if e["action"]["id"] == action)
        assert entry["action"]["target"] != source
    finally:
        lab.down()
