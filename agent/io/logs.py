"""Logs as `key=value` lines; with journald priority prefixes (`<3>`) when stderr is the journal."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(**fields: Any) -> str:
    """`a=1 b="two words"`: the fields of one log event, in the order given."""
    return " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)


class KeyValueFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += " " + kv(exception=self.formatException(record.exc_info).splitlines()[-1])
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>level={record.levelname.lower()} {text}"
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}"
        return f"time={stamp} level={record.levelname.lower()} {text}"


def setup(level: str = "info") -> None:
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(journald))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
