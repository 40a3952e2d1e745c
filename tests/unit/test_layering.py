"""The layering of `agent/` (issue 13): the pure core decides and does no I/O, and no module needs another to be
imported first.

`agent/core` imports nothing from `agent.config` or `agent.io`, nor `asyncio`, `os` or `time`: whatever it needs
to know (settings, the time) is passed in, so the daemon and the simulator can drive the same code. Every module
of `agent/` imports alone, in a fresh interpreter state, and the module-level import graph has no cycle (an import
under `if TYPE_CHECKING:` is for the type checker only and does not count).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "agent"
CORE_FORBIDDEN = ("agent.config", "agent.io", "asyncio", "os", "time")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in AGENT.rglob("*.py"))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(module: str, *, module_level: bool) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each import in `module`'s source; `module_level`: only those that run when the
    module is imported (not in functions, not under TYPE_CHECKING)."""
    path = AGENT.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = path.with_suffix("") / "__init__.py"
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(nodes: list[ast.stmt]) -> Iterator[tuple[str, int]]:
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from ((alias.name, node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                yield base, node.lineno
                # `from agent import config` imports the module agent.config
                yield from ((f"{base}.{alias.name}", node.lineno) for alias in node.names)
            elif isinstance(node, ast.If) and module_level and _is_type_checking(node):
                yield from walk(node.orelse)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and module_level:
                continue
            else:
                for field in ("body", "orelse", "handlers", "finalbody"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        yield from walk([c for c in children if isinstance(c, ast.stmt)])

    yield from walk(ast.parse(path.read_text(), str(path)).body)


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in CORE_FORBIDDEN)


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("agent.core")])
def test_the_core_does_no_io(module: str) -> None:
    """Any import at all, in a function or for the type checker too: the core must not need them."""
    found = [f"line {line}: {name}" for name, line in imports(module, module_level=False) if _forbidden(name)]
    assert not found, f"{module} imports " + ", ".join(found)


# Run in a child interpreter, so that the fresh imports never touch this process's modules.
ALONE = """
import importlib, json, sys, traceback
problems = {}
for module in sys.argv[1:]:
    for name in [k for k in sys.modules if k == "agent" or k.startswith("agent.")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception:
        problems[module] = traceback.format_exc(limit=3)
        continue
    if module.startswith("agent.core"):  # nor through another module, transitively
        loaded = sorted(m for m in sys.modules if m.startswith(("agent.config", "agent.io")))
        if loaded:
            problems[module] = f"loads {loaded}"
print(json.dumps(problems))
"""


def test_every_module_imports_alone() -> None:
    out = subprocess.run(
        [sys.executable, "-c", ALONE, *MODULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    problems = json.loads(out.stdout)
    assert not problems, "\n".join(f"{m}: {why}" for m, why in problems.items())


def test_no_import_cycle() -> None:
    graph = {
        m: sorted({n for n, _ in imports(m, module_level=True) if n in MODULES and n != m}) for m in MODULES
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_scan_sees_what_it_claims() -> None:
    """The checks above are only as good as the scanner: it finds a relative import, one in a function, and
    skips one under TYPE_CHECKING at module level."""
    assert MODULES and "agent.core.guards" in MODULES and "agent.daemon" in MODULES
    everything = {n for n, _ in imports("agent.actions", module_level=False)}
    module_level = {n for n, _ in imports("agent.actions", module_level=True)}
    assert "agent.core.execution" in module_level
    assert "agent.daemon" in everything - module_level  # imported for the type checker only
