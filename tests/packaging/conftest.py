"""Packaging tests: the unit file always; the built packages when dist/ holds them (make deb, make rpm).

`make test-packaging` builds both and runs these on Debian's python3; in `make test` and `make test-debian`
(which build nothing) the artefact tests skip with the reason, and the unit checks run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import __version__

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"


def artefact(pattern: str, how: str) -> Path:
    """The one built file of this version matching pattern, or skip saying how to build it."""
    found = sorted(DIST.glob(pattern.format(version=__version__)))
    if not found:
        pytest.skip(f"no dist/{pattern.format(version=__version__)}: run `{how}` first")
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="session")
def deb() -> Path:
    return artefact("kmagent_{version}_all.deb", "make deb")


@pytest.fixture(scope="session")
def rpm() -> Path:
    return artefact("kmagent-{version}-*.noarch.rpm", "make rpm")
