"""Fixtures that start real emulated clusters (real processes, real TLS) and always tear them down."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emulator.lab.lab import Lab


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(nodes: int = 3, name: str = "lab") -> Lab:
        lab = Lab(tmp_path / name)
        labs.append(lab)
        lab.up(nodes, heartbeat="100ms", log=lambda _line: None)
        return lab

    yield make
    for lab in labs:
        lab.down()


@pytest.fixture
def lab3(lab_factory: Callable[..., Lab]) -> Lab:
    return lab_factory(3)


@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A 3-node lab for tests that do not change membership or break nodes."""
    lab = Lab(tmp_path_factory.mktemp("shared") / "lab")
    lab.up(3, heartbeat="100ms", log=lambda _line: None)
    yield lab
    lab.down()
