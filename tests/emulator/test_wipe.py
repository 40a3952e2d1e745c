"""The lab's disk-loss fault empties a storage path even while the agent's probe file comes and goes in it (a
`FileNotFoundError` from a probe file deleted between the listing and the unlink failed a recovery lab once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.lab.lab import wipe


def test_an_entry_that_vanishes_during_the_wipe_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "kms.db").write_text("state")
    (tmp_path / "wal").mkdir()
    (tmp_path / "wal" / "0001").write_text("log")
    vanished = tmp_path / ".kmagent-probe-123"  # listed, then deleted by the agent before the unlink
    listed = [*tmp_path.iterdir(), vanished]
    real = Path.iterdir

    def iterdir(self: Path) -> Iterator[Path]:
        return iter(listed) if self == tmp_path else real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    wipe(tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
