"""Key paths -> line numbers: tomllib gives none, so that every issue can still say where it is.

`scan_lines` maps "timings.lease", "agents[1].address" or "agents[1]" to the line that sets it; `parent_key`
climbs from a key to the table that holds it, for keys that no line sets (defaults, missing keys).
"""

from __future__ import annotations

import json
import re

# --------------------------------------------------------------------------------------------------------------
# Line numbers: tomllib gives none, so a small scanner maps key paths to the line that sets them.

_BARE_KEY = r"[A-Za-z0-9_-]+"
_BASIC_KEY = r'"(?:[^"\\]|\\.)*"'
_LITERAL_KEY = r"'[^']*'"
_KEY_PART = re.compile(rf"\s*({_BARE_KEY}|{_BASIC_KEY}|{_LITERAL_KEY})\s*")
_DOTTED = rf"\s*(?:{_BARE_KEY}|{_BASIC_KEY}|{_LITERAL_KEY})\s*(?:\.\s*(?:{_BARE_KEY}|{_BASIC_KEY}|{_LITERAL_KEY})\s*)*"
_ARRAY_HEADER = re.compile(rf"\s*\[\[({_DOTTED})\]\]")
_TABLE_HEADER = re.compile(rf"\s*\[({_DOTTED})\]")
_KEY_VALUE = re.compile(rf"({_DOTTED})=")
_INDEX_SUFFIX = re.compile(r"\[[0-9]+\]$")


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for m in _KEY_PART.finditer(dotted):
        raw = m.group(1)
        if raw.startswith('"'):
            try:
                raw = json.loads(raw)
            except ValueError:
                raw = raw[1:-1]
        elif raw.startswith("'"):
            raw = raw[1:-1]
        parts.append(raw)
    return parts


class _ValueScanner:
    """Tracks multi-line strings and arrays so that their contents are never mistaken for keys."""

    def __init__(self) -> None:
        self.depth = 0
        self.multiline: str | None = None

    @property
    def inside(self) -> bool:
        return self.depth > 0 or self.multiline is not None

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            if self.multiline is not None:
                end = text.find(self.multiline, i)
                if end < 0:
                    return
                i, self.multiline = end + 3, None
                continue
            c = text[i]
            if c == "#":
                return
            if text.startswith('"""', i) or text.startswith("'''", i):
                self.multiline = text[i : i + 3]
                i += 3
                continue
            if c == '"':
                i += 1
                while i < len(text) and text[i] != '"':
                    i += 2 if text[i] == "\\" else 1
            elif c == "'":
                end = text.find("'", i + 1)
                i = len(text) if end < 0 else end
            elif c in "[{":
                self.depth += 1
            elif c in "]}":
                self.depth = max(0, self.depth - 1)
            i += 1


def scan_lines(text: str) -> dict[str, int]:
    """Map full key paths ("timings.lease", "agents[1].address", "agents[1]") to 1-based line numbers."""
    lines: dict[str, int] = {}
    counts: dict[str, int] = {}
    table: list[str] = []
    values = _ValueScanner()

    def resolve(parts: list[str], array: bool, lineno: int) -> list[str]:
        out: list[str] = []
        for i, part in enumerate(parts):
            path = ".".join([*out, part])
            last = i == len(parts) - 1
            if array and last:
                index = counts.get(path, 0)
                counts[path] = index + 1
                lines.setdefault(path, lineno)
                part = f"{part}[{index}]"
            elif path in counts:
                part = f"{part}[{counts[path] - 1}]"
            out.append(part)
        return out

    for lineno, raw in enumerate(text.split("\n"), 1):
        if values.inside:
            values.feed(raw)
            continue
        if m := _ARRAY_HEADER.match(raw):
            table = resolve(_key_parts(m.group(1)), True, lineno)
        elif m := _TABLE_HEADER.match(raw):
            table = resolve(_key_parts(m.group(1)), False, lineno)
        elif m := _KEY_VALUE.match(raw):
            parts = [*table, *_key_parts(m.group(1))]
            for n in range(len(table) + 1, len(parts) + 1):
                lines.setdefault(".".join(parts[:n]), lineno)
            values.feed(raw[m.end() :])
            continue
        else:
            continue
        for n in range(1, len(table) + 1):
            lines.setdefault(".".join(table[:n]), lineno)
    return lines


def parent_key(key: str) -> str:
    if _INDEX_SUFFIX.search(key):
        return _INDEX_SUFFIX.sub("", key)
    return key.rpartition(".")[0]
