"""pytest for scripts/test-debian: Debian 12's pytest 7.2 with pytest-asyncio 0.20.

Run as a file (not `-m pytest`) so that, as with the venv's `pytest` command, the checkout is importable only
through pyproject.toml's `pythonpath`, not through the current directory.
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import pytest

LOOP_SCOPE = "asyncio_default_fixture_loop_scope"


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class LoopScopeOption:
    """pyproject.toml sets `asyncio_default_fixture_loop_scope` for pytest-asyncio >= 0.24, which warns when
    it is unset. Older releases do not know it, and pytest would report it as an unknown option; they give
    every async fixture a function-scoped loop, which is what the setting asks for. Declaring it keeps pytest's
    check of every other option."""

    @staticmethod
    def pytest_addoption(parser: pytest.Parser) -> None:
        parser.addini(LOOP_SCOPE, f"{LOOP_SCOPE} (pytest-asyncio >= 0.24; older: always function)")


def main() -> int:
    plugins: list[object] = []
    if _release(version("pytest-asyncio")) < (0, 24):
        plugins.append(LoopScopeOption())
    return int(pytest.main(sys.argv[1:], plugins=plugins))


if __name__ == "__main__":
    sys.exit(main())
