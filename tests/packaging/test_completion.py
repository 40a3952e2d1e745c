"""packaging/kmagent.bash-completion completes the commands and options that `kmagent --help` lists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.packaging.conftest import ROOT

pytestmark = pytest.mark.packaging

BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


def complete(tmp_path: Path, *words: str) -> list[str]:
    if not BASH_COMPLETION.exists():
        pytest.skip("bash-completion not installed (apt-get install bash-completion)")
    kmagent = tmp_path / "kmagent"  # this checkout's CLI, as the installed launcher would run it
    kmagent.write_text(f'#!/bin/sh\nexec {sys.executable} -m agent.cli "$@"\n')
    kmagent.chmod(0o755)
    line = " ".join(words)
    script = (
        f"source {BASH_COMPLETION}; source {ROOT}/packaging/kmagent.bash-completion; "
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
        f"COMP_LINE={line!r}; COMP_POINT={len(line)}; "
        f'_kmagent kmagent {words[-1]!r} {words[-2]!r}; printf "%s\\n" "${{COMPREPLY[@]}}"'
    )
    proc = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_commands_subcommands_and_options(tmp_path: Path) -> None:
    assert complete(tmp_path, "kmagent", "st") == ["status"]
    assert complete(tmp_path, "kmagent", "backup", "") == ["now", "list", "verify"]
    assert "--json" in complete(tmp_path, "kmagent", "status", "--")
