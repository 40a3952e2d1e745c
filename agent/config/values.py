"""The value parsers: one TOML value -> a Python value, or a ValueError whose message says what is expected.

`parse_duration`, `parse_size`, `split_hostport` and `join_hostport` are the package's public API (the CLI reuses
them); the other `parse_*` functions and the name and host rules (`NAME_RE`, `HOSTNAME_RE`, which `agent.pki`
shares) serve the validator of this package.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from agent.config.schema import Role

# --------------------------------------------------------------------------------------------------------------
# Value parsers (public ones are reused by the CLI, e.g. `pause --for 30m`)

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_HOSTPORT_HINT = "expected HOST:PORT (IPv6 as [::1]:7443)"


def describe(value: object) -> str:
    """What kind of TOML value this is ("an integer", "a table"), for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def show(value: object) -> str:
    """A value as TOML would spell it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def parse_duration(value: object) -> float:
    """Seconds from a number (> 0) or a string such as "250ms", "1m30s", "7d"; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f'expected a duration (seconds, or a string like "1m30s"), got {describe(value)}')
    if isinstance(value, str):
        text, pos, seconds = value.strip(), 0, 0.0
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if m is None:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            raise ValueError(
                f"invalid duration {show(value)}: use <number><unit> with units ms, s, m, h, d "
                '(e.g. "250ms", "1m30s", "7d") or a number of seconds'
            )
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be greater than 0 (got {show(value)})")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer (>= 0) or a string such as "1GiB", "500MB"; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f'expected a size (integer bytes, or a string like "1GiB"), got {describe(value)}')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must not be negative (got {value})")
        return value
    m = _SIZE.fullmatch(value.strip())
    if m is None:
        raise ValueError(
            f"invalid size {show(value)}: use integer bytes or <number><unit> with units B, KiB, MiB, GiB, "
            "TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"
        )
    return round(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def split_hostport(text: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into (host without brackets, port); ValueError when malformed."""
    if not isinstance(text, str):
        raise ValueError(f"{_HOSTPORT_HINT}, got {describe(text)}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{_HOSTPORT_HINT}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_HOSTPORT_HINT}: {show(host)} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"{_HOSTPORT_HINT}: missing :PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{_HOSTPORT_HINT}: missing :PORT")
        if ":" in host:
            raise ValueError(f"{_HOSTPORT_HINT}: an IPv6 address needs brackets")
        if not host:
            raise ValueError(f"{_HOSTPORT_HINT}: missing HOST")
        if len(host) > 253 or not HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{_HOSTPORT_HINT}: {show(host)} is not a host name or IP address")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{_HOSTPORT_HINT}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def join_hostport(host: str, port: int) -> str:
    """The inverse of split_hostport: brackets around IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint_key(text: str) -> tuple[str, int]:
    """A comparable form of host:port, so that "[::01]:1" and "[::1]:1" count as the same address."""
    host, port = split_hostport(text)
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        host = host.lower().rstrip(".")
    return host, port


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe(value)}")
    return value


def parse_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {describe(value)}")
    return value


def integer_at_least(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {describe(value)}")
        if value < minimum:
            raise ValueError(f"must be an integer >= {minimum} (got {value})")
        return value

    return parse


def duration_at_least(floor: float | None = None, why: str = "") -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if floor is not None and seconds < floor:
            raise ValueError(f"must be at least {floor:g}s (got {show(value)}){why}")
        return seconds

    return parse


def parse_name(value: object) -> str:
    text = _string(value)
    if not NAME_RE.fullmatch(text):
        raise ValueError(f"must be 1 to 64 characters from A-Z a-z 0-9 . _ - (got {show(text)})")
    return text


def parse_scratch_command(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty array of strings (an argv), got {describe(value)}")
    argv = tuple(_string(item) for item in value)
    if not os.path.isabs(argv[0]):
        raise ValueError(f"the program must be an absolute path (got {show(argv[0])})")
    if any("\0" in a for a in argv):
        raise ValueError("an argument contains a NUL byte")
    if not any("{address}" in a for a in argv):
        raise ValueError("no argument holds {address}: the scratch server must listen where kmagent looks")
    return argv


def parse_abspath(value: object) -> Path:
    text = _string(value)
    if "\0" in text or not os.path.isabs(text):
        raise ValueError(f"must be an absolute path (got {show(text)})")
    return Path(text)


def parse_hostport(value: object) -> str:
    text = _string(value)
    try:
        split_hostport(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (got {show(text)})") from None
    return text


def parse_ip_or_empty(value: object) -> str:
    text = _string(value)
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f'expected an IP address or "" (got {show(text)})') from None
    return text


def parse_hostport_or_empty(value: object) -> str:
    text = _string(value)
    return text if text == "" else parse_hostport(text)


def parse_https_url(value: object) -> str:
    text = _string(value)
    if not text.startswith("https://"):
        raise ValueError(f"must start with https:// (got {show(text)})")
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"not a valid https:// URL (got {show(text)})") from None
    if (
        not url.hostname
        or url.username
        or url.password
        or url.path not in ("", "/")
        or url.query
        or url.fragment
    ):
        raise ValueError(f"expected https://HOST:PORT with nothing after it (got {show(text)})")
    return text


def parse_unit_name(value: object) -> str:
    text = _string(value)
    if not text or "/" in text or any(c.isspace() for c in text):
        raise ValueError(f"expected a systemd unit name such as minkms.service (got {show(text)})")
    return text


def parse_group_name(value: object) -> str:
    text = _string(value)
    if not text or ":" in text or any(c.isspace() for c in text):
        raise ValueError(f"expected a group name (got {show(text)})")
    return text


def parse_role(value: object) -> Role:
    text = _string(value)
    if text == "member":
        return "member"
    if text == "witness":
        return "witness"
    raise ValueError(f'expected "member" or "witness" (got {show(text)})')
