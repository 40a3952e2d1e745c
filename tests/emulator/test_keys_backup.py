"""Key commands (a workload needs them) and backups (reference/minkms.md §1.2 backup/restore, §1.4, §5)."""

from __future__ import annotations

import gzip
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from emulator.lab.lab import Lab, wait_for
from emulator.lab.workload import create_keys, verify_keys


def test_key_commands(shared_lab: Lab) -> None:
    n1, n2, n3 = shared_lab.nodes()
    assert shared_lab.minkms("add-key", "orders", node=n2).stdout.startswith("Created key orders")
    dup = shared_lab.minkms("add-key", "orders", node=n3, check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert "orders" in shared_lab.minkms("ls-key", "ord", node=n3).stdout.split()
    info = json.loads(shared_lab.minkms("stat-key", "orders", "--json", node=n1).stdout)
    assert info["name"] == "orders" and info["version"] == 1 and info["algorithm"] == "AES256"

    generated = json.loads(shared_lab.minkms("keygen", "orders", "--json", node=n1).stdout)
    assert generated["ciphertext"].startswith("v1:")
    for node in (n1, n2, n3):
        out = json.loads(
            shared_lab.minkms("decrypt", "orders", generated["ciphertext"], "--json", node=node).stdout
        )
        assert out["plaintext"] == generated["plaintext"]

    shared_lab.minkms("add-key", "orders", "--version", node=n3)
    assert json.loads(shared_lab.minkms("stat-key", "orders", "--json", node=n2).stdout)["version"] == 2
    v2 = json.loads(shared_lab.minkms("keygen", "orders", "--json", node=n2).stdout)
    assert v2["ciphertext"].startswith("v2:")
    old = json.loads(
        shared_lab.minkms("decrypt", "orders", generated["ciphertext"], "--json", node=n3).stdout
    )
    assert old["plaintext"] == generated["plaintext"]  # old versions still decrypt

    bad = shared_lab.minkms(
        "decrypt", "orders", "v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", node=n1, check=False
    )
    assert bad.returncode == 1 and "invalid ciphertext" in bad.stderr
    missing = shared_lab.minkms("stat-key", "nope", node=n1, check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    invalid = shared_lab.minkms("add-key", "bad name!", node=n1, check=False)
    assert invalid.returncode == 1 and "invalid name" in invalid.stderr


def test_backup_file_handling(shared_lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "b.db.gzip"
    shared_lab.minkms("backup", str(target))
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip by default
    again = shared_lab.minkms("backup", str(target), check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    shared_lab.minkms("backup", str(target), "--force")
    raw = tmp_path / "raw.db"
    shared_lab.minkms("backup", str(raw), "--compress", "off")
    db = sqlite3.connect(raw)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
    db.close()
    assert {"keys", "enclaves", "meta"} <= tables
    assert "members" not in meta and "node_id" not in meta  # membership is not in a backup
    assert gzip.decompress(target.read_bytes())[:16] == b"SQLite format 3\x00"


def test_backup_default_name(shared_lab: Lab, tmp_path: Path, monkeypatch: object) -> None:
    import os
    import subprocess
    import sys

    # Another working directory: the emulator is importable from the checkout only through PYTHONPATH
    # (the venv's editable install hides that; Debian's python3 in `make test-debian` does not).
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **shared_lab.env(), "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "backup"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip()
    assert name.endswith("_kms.db.gzip") and len(name) == len("YYYYMMDD_HHMMSS_kms.db.gzip")
    assert (tmp_path / name).is_file()


def test_restore_onto_a_fresh_node_then_grow_the_cluster(
    lab_factory: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = lab_factory(3)
    keys = create_keys(lab, 4)
    backup = tmp_path / "full.db.gzip"
    lab.minkms("backup", str(backup))
    later = create_keys(lab, 1, prefix="after-backup")

    # total loss: every node's storage is wiped
    for node in lab.nodes():
        lab.fault(node.name, "stop")
    for node in lab.nodes():
        for item in node.data.iterdir():
            item.unlink()
    n1, n2, n3 = lab.nodes()
    lab.fault(n1.name, "start")
    wait_for(lambda: lab.probe(n1, "ready?write"), 20, "the fresh node to lead itself")
    lab.minkms("restore", n1.endpoint, str(backup), node=n1)
    again = lab.minkms("restore", n1.endpoint, str(backup), node=n1, check=False)
    assert again.returncode == 1 and "holds state" in again.stderr  # never restored twice
    for node in (n2, n3):
        lab.fault(node.name, "start")
        wait_for(lambda n=node: lab.probe(n, "live"), 20, f"{node.name} to start")
        lab.minkms("add", n1.endpoint, node.endpoint, node=n1)
    wait_for(lambda: lab.formed(3), 30, "the rebuilt cluster")
    assert verify_keys(lab, keys) == []
    assert len(verify_keys(lab, later, [n1])) == 1  # created after the backup: lost, as expected


def test_restore_refusals(lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(2)
    backup = tmp_path / "b.db.gzip"
    lab.minkms("backup", str(backup))
    n1, _ = lab.nodes()

    multi = lab.minkms("restore", n1.endpoint, str(backup), node=n1, check=False)
    assert multi.returncode == 1 and "2-node cluster" in multi.stderr

    other = lab_factory(1, name="other-hsm")  # a fresh single node with another HSM key
    node = other.nodes()[0]
    wrong = other.minkms("restore", node.endpoint, str(backup), node=node, check=False)
    assert wrong.returncode == 1 and "different HSM key" in wrong.stderr

    junk = tmp_path / "junk.gzip"
    junk.write_bytes(gzip.compress(b"this is not a database"))
    bad = other.minkms("restore", node.endpoint, str(junk), node=node, check=False)
    assert bad.returncode == 1 and "not a minkms backup" in bad.stderr

    truncated = tmp_path / "truncated.gzip"
    truncated.write_bytes(backup.read_bytes()[:100])
    cut = other.minkms("restore", node.endpoint, str(truncated), node=node, check=False)
    assert cut.returncode == 1 and "corrupt" in cut.stderr

    missing = other.minkms("restore", str(tmp_path / "nope"), node=node, check=False)
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    assert other.probe(node, "ready?write")  # the refusals changed nothing
