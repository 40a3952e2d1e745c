"""Tests of agent/config/: every malformed config names the key, the line and what is wrong."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import pytest

from agent.config import (
    TWO_AGENTS_WARNING,
    AgentSpec,
    BackupConfig,
    Config,
    ConfigError,
    ConfigIssue,
    ControlConfig,
    LocalConfig,
    MetricsConfig,
    MinkmsConfig,
    PeerConfig,
    Policy,
    StateConfig,
    Timings,
    TLSConfig,
    check_config_main,
    join_hostport,
    load_config,
    parse_duration,
    parse_size,
    read_secret,
    split_hostport,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "kmagent.toml.example"

BASE = """\
cluster = "prod-kms"
name = "km1"

[[agents]]
name = "km1"
address = "10.0.0.1:7443"
minkms_host = "10.0.0.1:7373"

[[agents]]
name = "km2"
address = "10.0.0.2:7443"
minkms_host = "10.0.0.2:7373"

[[agents]]
name = "km3"
address = "10.0.0.3:7443"
minkms_host = "10.0.0.3:7373"

[local]
storage_path = "/mnt/minio-kms"

[minkms]
api_key_file = "/etc/kmagent/minkms.key"

[tls]
ca = "/etc/kmagent/tls/ca.crt"
cert = "/etc/kmagent/tls/km1.crt"
key = "/etc/kmagent/tls/km1.key"

[timings]
lease = "10s"

[policy]
min_members = 2
"""

SECRET = "k1:SUPERSECRET-7f3a9c-do-not-print"


def write(tmp_path: Path, text: str, name: str = "kmagent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, check_files: bool = False) -> Config:
    return load_config(write(tmp_path, text), check_files=check_files)


def errors_of(tmp_path: Path, text: str, check_files: bool = False) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, check_files)
    return info.value.errors


def line_of(text: str, snippet: str, nth: int | None = None) -> int:
    """1-based line of the nth line containing snippet, or of the only one (the test's own line finder)."""
    hits = [n for n, line in enumerate(text.split("\n"), 1) if snippet in line]
    if nth is None:
        assert len(hits) == 1, f"{snippet!r} must occur once: lines {hits}"
        return hits[0]
    assert len(hits) >= nth, f"{snippet!r} occurs {len(hits)} times"
    return hits[nth - 1]


def edit(text: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert text.count(old) == 1, f"{old!r} must occur once"
        text = text.replace(old, new)
    return text


def agents_text(*specs: tuple[str, str]) -> str:
    """[[agents]] tables from (name, role) pairs, addresses numbered in order."""
    out = []
    for i, (name, role) in enumerate(specs, 1):
        out.append(f'[[agents]]\nname = "{name}"\naddress = "10.0.0.{i}:7443"\nrole = "{role}"\n')
        if role == "member":
            out.append(f'minkms_host = "10.0.0.{i}:7373"\n')
    return "\n".join(out)


def cluster_text(*specs: tuple[str, str], me: str = "km1") -> str:
    return (
        f'cluster = "c"\nname = "{me}"\n\n{agents_text(*specs)}\n'
        '[local]\nstorage_path = "/srv/kms"\n\n[minkms]\napi_key_file = "/etc/kmagent/minkms.key"\n\n'
        '[tls]\nca = "/etc/kmagent/ca.crt"\ncert = "/etc/kmagent/a.crt"\nkey = "/etc/kmagent/a.key"\n'
    )


# --------------------------------------------------------------------------------------------------------------
# Malformed configs: (id, edits, [(key, line, message)]) where line is None, a unique snippet of the mutated
# text, or (snippet, nth occurrence).

Line = None | str | tuple[str, int]
CASES: list[tuple[str, list[tuple[str, str]], list[tuple[str, Line, str]]]] = [
    (
        "unknown-key-suggested",
        [('lease = "10s"', 'leese = "10s"')],
        [("timings.leese", "leese", "unknown key, did you mean 'lease'?")],
    ),
    (
        "unknown-key-in-agent",
        [('address = "10.0.0.3:7443"', 'adress = "10.0.0.3:7443"')],
        [
            ("agents[2].address", ("[[agents]]", 3), "required key missing"),
            ("agents[2].adress", "adress", "unknown key, did you mean 'address'?"),
        ],
    ),
    (
        "unknown-table",
        [("[timings]", "[timing]")],
        [("timing", "[timing]", "unknown key, did you mean 'timings'?")],
    ),
    (
        "unknown-key-no-suggestion",
        [("min_members = 2", "min_members = 2\nfrobnicate = 1")],
        [
            (
                "policy.frobnicate",
                "frobnicate",
                "unknown key (known keys: actions_per_hour, min_members, auto_restore, quarantine_keep)",
            )
        ],
    ),
    (
        "top-level-key-below-a-table",
        [("min_members = 2", 'min_members = 2\ncluster = "other"')],
        [
            (
                "policy.cluster",
                'cluster = "other"',
                "unknown key: 'cluster' belongs at the top, above the first [table] header",
            )
        ],
    ),
    (
        "quoted-unknown-key",
        [('lease = "10s"', '"lease" = "10s"\n"grace period" = 1')],
        [
            (
                "timings.grace period",
                "grace period",
                "unknown key (known keys: probe_interval, peer_timeout, "
                "lease, state_lost_after, corrupt_after, evict_after, restore_after, cooldown, crash_loop_restarts, "
                "crash_loop_window)",
            )
        ],
    ),
    (
        "dotted-unknown-key",
        [('lease = "10s"', 'lease = "10s"\nextra.inner = 1')],
        [
            (
                "timings.extra",
                "extra.inner",
                "unknown key (known keys: probe_interval, peer_timeout, lease, "
                "state_lost_after, corrupt_after, evict_after, restore_after, cooldown, crash_loop_restarts, "
                "crash_loop_window)",
            )
        ],
    ),
    (
        "name-not-a-string",
        [('name = "km1"\n\n', "name = 1\n\n")],
        [("name", "name = 1", "expected a string, got an integer")],
    ),
    (
        "boolean-is-not-an-integer",
        [("min_members = 2", "min_members = true")],
        [("policy.min_members", "min_members", "expected an integer, got a boolean")],
    ),
    (
        "string-is-not-a-boolean",
        [('storage_path = "/mnt/minio-kms"', 'storage_path = "/mnt/minio-kms"\nrequire_mount = "yes"')],
        [("local.require_mount", "require_mount", "expected true or false, got a string")],
    ),
    (
        "string-is-not-an-integer",
        [("min_members = 2", 'min_members = 2\n\n[backup]\nkeep = "48"')],
        [("backup.keep", "keep", "expected an integer, got a string")],
    ),
    (
        "crash-loop-restarts-below-2",
        [('lease = "10s"', "crash_loop_restarts = 1")],
        [("timings.crash_loop_restarts", "crash_loop_restarts", "must be an integer >= 2 (got 1)")],
    ),
    (
        "actions-per-hour-zero",
        [("min_members = 2", "actions_per_hour = 0")],
        [("policy.actions_per_hour", "actions_per_hour", "must be an integer >= 1 (got 0)")],
    ),
    (
        "table-is-not-a-table",
        [("[policy]\nmin_members = 2\n", ""), ('name = "km1"\n\n', 'name = "km1"\npolicy = 3\n\n')],
        [("policy", "policy = 3", "expected a table ([policy]), got an integer")],
    ),
    ("missing-cluster", [('cluster = "prod-kms"\n', "")], [("cluster", None, "required key missing")]),
    (
        "missing-tls-key",
        [('key = "/etc/kmagent/tls/km1.key"\n', "")],
        [("tls.key", "[tls]", "required key missing")],
    ),
    (
        "missing-tls-table",
        [
            ("[tls]\n", ""),
            ('ca = "/etc/kmagent/tls/ca.crt"\n', ""),
            ('cert = "/etc/kmagent/tls/km1.crt"\n', ""),
            ('key = "/etc/kmagent/tls/km1.key"\n', ""),
        ],
        [("tls", None, "required table [tls] missing (it needs ca, cert, key)")],
    ),
    (
        "name-not-among-agents",
        [('name = "km1"\n\n', 'name = "km9"\n\n')],
        [("name", 'name = "km9"', '"km9" is not one of the [[agents]] (km1, km2, km3)')],
    ),
    (
        "duplicate-agent-name",
        [('name = "km3"', 'name = "km2"')],
        [("agents[2].name", ('name = "km2"', 2), 'duplicate agent name "km2" (also agents[1])')],
    ),
    (
        "duplicate-address",
        [('address = "10.0.0.3:7443"', 'address = "10.0.0.2:7443"')],
        [
            (
                "agents[2].address",
                ('address = "10.0.0.2:7443"', 2),
                "duplicate address 10.0.0.2:7443 (also address of agents[1] (km2))",
            )
        ],
    ),
    (
        "duplicate-minkms-host",
        [('minkms_host = "10.0.0.3:7373"', 'minkms_host = "10.0.0.2:7373"')],
        [
            (
                "agents[2].minkms_host",
                ('minkms_host = "10.0.0.2:7373"', 2),
                "duplicate address 10.0.0.2:7373 (also minkms_host of agents[1] (km2))",
            )
        ],
    ),
    (
        "address-is-another-agents-minkms-host",
        [('address = "10.0.0.3:7443"', 'address = "10.0.0.1:7373"')],
        [
            (
                "agents[2].address",
                'address = "10.0.0.1:7373"',
                "duplicate address 10.0.0.1:7373 (also minkms_host of agents[0] (km1))",
            )
        ],
    ),
    (
        "member-without-minkms-host",
        [('minkms_host = "10.0.0.2:7373"\n', "")],
        [
            (
                "agents[1].minkms_host",
                ("[[agents]]", 2),
                "required for a member: the --host of its minkms, HOST:PORT",
            )
        ],
    ),
    (
        "witness-with-minkms-host",
        [('minkms_host = "10.0.0.3:7373"', 'minkms_host = "10.0.0.3:7373"\nrole = "witness"')],
        [
            (
                "agents[2].minkms_host",
                'minkms_host = "10.0.0.3:7373"',
                "must be absent for a witness (a witness runs no minkms)",
            )
        ],
    ),
    (
        "unknown-role",
        [('minkms_host = "10.0.0.3:7373"', 'minkms_host = "10.0.0.3:7373"\nrole = "leader"')],
        [("agents[2].role", "role", 'expected "member" or "witness" (got "leader")')],
    ),
    (
        "member-without-storage-path",
        [('storage_path = "/mnt/minio-kms"\n', "")],
        [
            (
                "local.storage_path",
                "[local]",
                "required for a member: the absolute path of its minkms' storage",
            )
        ],
    ),
    (
        "member-without-api-key-file",
        [('api_key_file = "/etc/kmagent/minkms.key"\n', "")],
        [
            (
                "minkms.api_key_file",
                "[minkms]",
                "required for a member: the file that holds minkms' root API key",
            )
        ],
    ),
    (
        "relative-path",
        [('storage_path = "/mnt/minio-kms"', 'storage_path = "mnt/minio-kms"')],
        [("local.storage_path", "storage_path", 'must be an absolute path (got "mnt/minio-kms")')],
    ),
    (
        "evict-after-below-floor",
        [('lease = "10s"', 'evict_after = "10s"')],
        [
            (
                "timings.evict_after",
                "evict_after",
                'must be at least 30s (got "10s"): evicting sooner would remove nodes that are only rebooting '
                "(the floor is 30s)",
            )
        ],
    ),
    (
        "no-member",
        [
            ('minkms_host = "10.0.0.1:7373"', 'role = "witness"'),
            ('minkms_host = "10.0.0.2:7373"', 'role = "witness"'),
            ('minkms_host = "10.0.0.3:7373"', 'role = "witness"'),
        ],
        [
            (
                "agents",
                ("[[agents]]", 1),
                'at least one agent must have role "member" (witnesses run no minkms)',
            )
        ],
    ),
    (
        "metrics-address-without-port",
        [("min_members = 2", 'min_members = 2\n\n[metrics]\naddress = "localhost"')],
        [
            (
                "metrics.address",
                'address = "localhost"',
                'expected HOST:PORT (IPv6 as [::1]:7443): missing :PORT (got "localhost")',
            )
        ],
    ),
    (
        "peer-listen-port-zero",
        [("min_members = 2", 'min_members = 2\n\n[peer]\nlisten = "0.0.0.0:0"')],
        [
            (
                "peer.listen",
                "listen",
                "expected HOST:PORT (IPv6 as [::1]:7443): the port must be a number from 1 to 65535 "
                '(got "0.0.0.0:0")',
            )
        ],
    ),
    (
        "ipv6-address-without-brackets",
        [('address = "10.0.0.2:7443"', 'address = "fd00::2:7443"')],
        [
            (
                "agents[1].address",
                "fd00::2:7443",
                'expected HOST:PORT (IPv6 as [::1]:7443): an IPv6 address needs brackets (got "fd00::2:7443")',
            )
        ],
    ),
    (
        "duration-without-unit",
        [('lease = "10s"', 'lease = "10"')],
        [
            (
                "timings.lease",
                "lease",
                'invalid duration "10": use <number><unit> with units ms, s, m, h, d (e.g. "250ms", "1m30s", '
                '"7d") or a number of seconds',
            )
        ],
    ),
    (
        "duration-zero",
        [('lease = "10s"', "lease = 0")],
        [("timings.lease", "lease", "a duration must be greater than 0 (got 0)")],
    ),
    (
        "bad-size",
        [('storage_path = "/mnt/minio-kms"', 'storage_path = "/mnt/minio-kms"\nlow_space = "1gb"')],
        [
            (
                "local.low_space",
                "low_space",
                'invalid size "1gb": use integer bytes or <number><unit> with units B, KiB, MiB, GiB, TiB '
                "(powers of 1024) or KB, MB, GB, TB (powers of 1000)",
            )
        ],
    ),
    (
        "server-not-https",
        [("[minkms]\n", '[minkms]\nserver = "http://127.0.0.1:7373"\n')],
        [("minkms.server", "server", 'must start with https:// (got "http://127.0.0.1:7373")')],
    ),
    (
        "bad-cluster-name",
        [('cluster = "prod-kms"', 'cluster = "prod kms"')],
        [("cluster", "cluster", 'must be 1 to 64 characters from A-Z a-z 0-9 . _ - (got "prod kms")')],
    ),
    (
        "peer-timeout-not-above-probe-interval",
        [('lease = "10s"', 'probe_interval = "2s"\npeer_timeout = "2s"')],
        [
            (
                "timings.peer_timeout",
                "peer_timeout",
                "must be longer than timings.probe_interval (2s): reports are sent every probe_interval, so "
                "peers would look gone between two of them",
            )
        ],
    ),
    (
        "metrics-on-the-peer-listener",
        [("min_members = 2", 'min_members = 2\n\n[metrics]\naddress = "10.0.0.1:7443"')],
        [
            (
                "metrics.address",
                ('address = "10.0.0.1:7443"', 2),
                "10.0.0.1:7443 is also the peer listener (peer.listen)",
            )
        ],
    ),
    (
        "multi-line-value-is-not-a-key",
        [
            (
                "min_members = 2",
                'min_members = 2\nnotes = [\n  "lease = 1",\n  """\nkeep = 2\n""",\n]\nbogus = 3',
            )
        ],
        [
            (
                "policy.bogus",
                "bogus",
                "unknown key (known keys: actions_per_hour, min_members, auto_restore, quarantine_keep)",
            ),
            (
                "policy.notes",
                "notes",
                "unknown key (known keys: actions_per_hour, min_members, auto_restore, quarantine_keep)",
            ),
        ],
    ),
    (
        "toml-syntax-error",
        [('lease = "10s"', "lease = ")],
        [("", "lease = ", "TOML syntax error: Invalid value (column 9)")],
    ),
    (
        "toml-duplicate-key",
        [('lease = "10s"', 'lease = "10s"\nlease = "20s"')],
        [("", 'lease = "20s"', "TOML syntax error: Cannot overwrite a value (column 14)")],
    ),
]


def _expected_line(text: str, where: Line) -> int | None:
    if where is None:
        return None
    if isinstance(where, tuple):
        return line_of(text, where[0], where[1])
    return line_of(text, where)


@pytest.mark.parametrize(("edits", "expected"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_config(
    tmp_path: Path, edits: list[tuple[str, str]], expected: list[tuple[str, Line, str]]
) -> None:
    text = edit(BASE, *edits)
    got = errors_of(tmp_path, text)
    want = [ConfigIssue(key, _expected_line(text, where), message) for key, where, message in expected]
    assert sorted(got, key=str) == sorted(want, key=str)
    path = str(tmp_path / "kmagent.toml")
    for issue in got:
        assert str(issue).startswith(f"{path}:{issue.line}: " if issue.line else f"{path}: ")


def test_at_least_25_malformed_cases() -> None:
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


def test_base_is_valid(tmp_path: Path) -> None:
    config = load_text(tmp_path, BASE)
    assert config.name == "km1"
    assert config.warnings == ()


def test_all_errors_are_collected_and_sorted_by_line(tmp_path: Path) -> None:
    text = edit(
        BASE,
        ('cluster = "prod-kms"\n', ""),
        ('address = "10.0.0.2:7443"', 'adress = "10.0.0.2:7443"'),
        ('lease = "10s"', 'lease = "soon"'),
        ("min_members = 2", "min_members = 0"),
    )
    errors = errors_of(tmp_path, text)
    assert [(e.key, e.line) for e in errors] == [
        ("agents[1].address", line_of(text, "[[agents]]", 2)),
        ("agents[1].adress", line_of(text, "adress")),
        ("timings.lease", line_of(text, "lease")),
        ("policy.min_members", line_of(text, "min_members")),
        ("cluster", None),
    ]


def test_inline_table_falls_back_to_its_line(tmp_path: Path) -> None:
    text = edit(
        BASE,
        ("[policy]\nmin_members = 2\n", ""),
        ('name = "km1"\n\n', 'name = "km1"\npolicy = { min_member = 2 }\n\n'),
    )
    assert errors_of(tmp_path, text) == [
        ConfigIssue(
            "policy.min_member", line_of(text, "policy = {"), "unknown key, did you mean 'min_members'?"
        )
    ]


def test_agents_must_be_an_array_of_tables(tmp_path: Path) -> None:
    text = 'cluster = "c"\nname = "km1"\nagents = "km1"\n'
    errors = errors_of(tmp_path, text)
    assert ConfigIssue("agents", 3, "expected an array of tables ([[agents]]), got a string") in errors


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "kmagent.toml"
    path.write_bytes(b'cluster = "c"\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [ConfigIssue("", 2, "not valid UTF-8")]


def test_issue_and_error_strings() -> None:
    one = ConfigIssue("timings.lease", 7, "bad", "/etc/kmagent/kmagent.toml")
    two = ConfigIssue("cluster", None, "required key missing", "/etc/kmagent/kmagent.toml")
    assert str(one) == "/etc/kmagent/kmagent.toml:7: timings.lease: bad"
    assert str(two) == "/etc/kmagent/kmagent.toml: cluster: required key missing"
    assert str(ConfigError([one, two])) == f"{one}\n{two}"


# --------------------------------------------------------------------------------------------------------------
# The example and the defaults


def test_example_loads_with_defaults() -> None:
    config = load_config(EXAMPLE, check_files=False)
    assert (config.cluster, config.name, config.quorum, config.warnings) == ("prod-kms", "km1", 2, ())
    assert [a.name for a in config.agents] == ["km1", "km2", "km3"]
    assert config.local == LocalConfig(storage_path=Path("/mnt/minio-kms"))
    assert config.minkms == MinkmsConfig(
        server="https://10.0.0.1:7373", api_key_file=Path("/etc/kmagent/minkms.key")
    )
    assert config.tls == TLSConfig(
        Path("/etc/kmagent/tls/ca.crt"), Path("/etc/kmagent/tls/km1.crt"), Path("/etc/kmagent/tls/km1.key")
    )
    assert config.timings == Timings()
    assert config.policy == Policy()
    assert config.backup == BackupConfig()
    assert config.state == StateConfig()
    assert config.control == ControlConfig()
    assert config.metrics == MetricsConfig()
    assert config.peer == PeerConfig("10.0.0.1:7443")


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    for table, cls in [
        ("local", LocalConfig),
        ("minkms", MinkmsConfig),
        ("tls", TLSConfig),
        ("timings", Timings),
        ("policy", Policy),
        ("backup", BackupConfig),
        ("state", StateConfig),
        ("control", ControlConfig),
        ("metrics", MetricsConfig),
        ("peer", PeerConfig),
    ]:
        for f in dataclasses.fields(cls):
            commented = re.search(rf"^\[{table}\]$(?:(?!^\[).)*^# {f.name} = ", text, re.M | re.S)
            assert f.name in data[table] or commented, f"{table}.{f.name} is not in the example"
    assert set(data["agents"][0]) == {f.name for f in dataclasses.fields(AgentSpec)}


def test_example_with_the_witness(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    for line in ("[[agents]]", 'name = "kmw"', 'address = "10.0.0.9:7443"', 'role = "witness"'):
        text = text.replace(f"# {line}\n", f"{line}\n")
    config = load_text(tmp_path, text)
    assert [a.role for a in config.agents] == ["member", "member", "member", "witness"]
    assert (config.quorum, len(config.members)) == (3, 3)


def test_defaults_match_the_design(tmp_path: Path) -> None:
    config = load_text(tmp_path, BASE)
    assert config.timings == Timings(
        probe_interval=1.0,
        peer_timeout=3.0,
        lease=10.0,
        state_lost_after=5.0,
        corrupt_after=60.0,
        evict_after=120.0,
        restore_after=120.0,
        cooldown=600.0,
        crash_loop_restarts=3,
        crash_loop_window=60.0,
    )
    assert config.policy == Policy(
        actions_per_hour=3, min_members=2, auto_restore=False, quarantine_keep=604800.0
    )
    assert config.backup == BackupConfig(interval=3600.0, keep=48, dir=Path("/var/lib/kmagent/backups"))
    assert config.state.dir == Path("/var/lib/kmagent")
    assert config.control == ControlConfig(Path("/run/kmagent/control.sock"), "kmagent-admin")
    assert config.metrics.address == "127.0.0.1:9464" and config.metrics.enabled
    assert config.peer.listen == "10.0.0.1:7443"
    # require_mount unset (None): decided by the marker record (storage.mount_required)
    assert config.local == LocalConfig(Path("/mnt/minio-kms"), "minkms.service", None, 1024**3, None)
    assert config.minkms == MinkmsConfig(
        cli=Path("/usr/local/bin/minkms"),
        server="https://10.0.0.1:7373",
        api_key_file=Path("/etc/kmagent/minkms.key"),
        ca=None,
        insecure=False,
        command_timeout=10.0,
        probe_timeout=1.0,
    )


def test_explicit_values(tmp_path: Path) -> None:
    text = BASE + (
        '\n[metrics]\naddress = ""\n\n[peer]\nlisten = "[::]:7443"\n\n[backup]\ninterval = "1m30s"\nkeep = 2\n'
    )
    text = edit(
        text,
        ('lease = "10s"', 'lease = 12.5\ncooldown = "250ms"'),
        ("[minkms]\n", '[minkms]\nserver = "https://[::1]:7373"\ninsecure = true\n'),
    )
    config = load_text(tmp_path, text)
    assert not config.metrics.enabled
    assert config.peer.listen == "[::]:7443"
    assert (config.backup.interval, config.backup.keep) == (90.0, 2)
    assert (config.timings.lease, config.timings.cooldown) == (12.5, 0.25)
    assert config.minkms.server == "https://[::1]:7373"
    assert config.warnings == ("minkms.insecure = true: minkms' certificate is not verified",)


def test_lab_supervisor(tmp_path: Path) -> None:
    text = edit(BASE, ("[local]\n", '[local]\nsupervisor = "/tmp/lab/supervisor.sock"\nservice = "node1"\n'))
    local = load_text(tmp_path, text).local
    assert (local.supervisor, local.service) == (Path("/tmp/lab/supervisor.sock"), "node1")
    assert load_text(tmp_path, BASE).local.supervisor is None


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_text(tmp_path, BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "km2"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------------------
# Durations, sizes, addresses


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1m30s", 90.0),
        ("250ms", 0.25),
        ("7d", 604800.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (5, 5.0),
        (0.5, 0.5),
        ("2h30m", 9000.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "10", "1x", "-1s", "1m 30s", "s", 0, -1, 0.0, True, float("inf"), [1]])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1GiB", 1024**3),
        ("500MB", 500_000_000),
        (1024, 1024),
        ("1 KiB", 1024),
        ("1.5KiB", 1536),
        ("2TiB", 2 * 1024**4),
        ("3GB", 3_000_000_000),
        ("10B", 10),
        (0, 0),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["1gib", "GiB", "1", -1, 1.5, True, "1 GiB B"])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.1:7443", "10.0.0.1", 7443),
        ("[::1]:7443", "::1", 7443),
        ("km1.example.com:1", "km1.example.com", 1),
        ("[fd00::2]:65535", "fd00::2", 65535),
        ("localhost:9464", "localhost", 9464),
    ],
)
def test_split_hostport(text: str, host: str, port: int) -> None:
    assert split_hostport(text) == (host, port)
    assert join_hostport(host, port) == text


@pytest.mark.parametrize(
    "text",
    ["::1:7443", "host", "host:0", "host:65536", ":80", "[::1]", "[zz]:1", "host:port", "ho st:1", "[::1:80"],
)
def test_split_hostport_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected HOST:PORT"):
        split_hostport(text)


# --------------------------------------------------------------------------------------------------------------
# Quorum, peers, witnesses, warnings


@pytest.mark.parametrize(
    ("roles", "quorum"),
    [
        (["member"] * 3, 2),
        (["member"] * 4, 3),
        (["member"] * 5, 3),
        (["member", "member", "witness"], 2),
        (["member", "member", "member", "witness"], 3),
        (["member", "member", "member", "witness", "witness"], 3),
        (["member"], 1),
    ],
)
def test_quorum_counts_every_agent(tmp_path: Path, roles: list[str], quorum: int) -> None:
    specs = [(f"km{i}", role) for i, role in enumerate(roles, 1)]
    config = load_text(tmp_path, cluster_text(*specs))
    assert config.quorum == quorum
    assert len(config.members) == roles.count("member")
    assert [a.name for a in config.peers] == [name for name, _ in specs[1:]]
    assert config.me == config.agents[0] and not config.is_witness


def test_witness_needs_no_local_minkms(tmp_path: Path) -> None:
    text = cluster_text(("km1", "member"), ("km2", "member"), ("kmw", "witness"), me="kmw")
    text = (
        text.split("[local]")[0]
        + '[tls]\nca = "/etc/kmagent/ca.crt"\ncert = "/etc/kmagent/w.crt"\nkey = "/k"\n'
    )
    config = load_text(tmp_path, text)
    assert config.is_witness and config.me.minkms_host is None
    assert (config.local.storage_path, config.minkms.api_key_file, config.minkms.server) == (None, None, None)
    assert config.warnings == ()
    assert config.agent("km2") == config.agents[1] and config.agent("nobody") is None


def test_two_hosts_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_text(tmp_path, cluster_text(("km1", "member"), ("km2", "member")))
    assert config.quorum == 2
    assert TWO_AGENTS_WARNING in config.warnings
    assert TWO_AGENTS_WARNING == (
        "with 2 agents the quorum is both: nothing automatic can happen while one host is down; add a witness"
    )
    assert (
        check_config_main(str(write_files(tmp_path, cluster_text(("km1", "member"), ("km2", "member"))))) == 0
    )
    assert f"warning: {TWO_AGENTS_WARNING}" in capsys.readouterr().out


def test_min_members_above_members_warns(tmp_path: Path) -> None:
    config = load_text(tmp_path, edit(BASE, ("min_members = 2", "min_members = 4")))
    assert config.warnings == (
        "policy.min_members = 4 is more than the 3 members: no eviction can ever happen",
    )


# --------------------------------------------------------------------------------------------------------------
# Files: secrets, certificates, the CLI


def write_files(tmp_path: Path, text: str = BASE, key_mode: int = 0o600, api_mode: int = 0o600) -> Path:
    """Write the config with every file it names under tmp_path; returns the config's path."""
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    for name, mode in [
        ("ca.crt", 0o644),
        ("node.crt", 0o644),
        ("node.key", key_mode),
        ("minkms.key", api_mode),
    ]:
        (files / name).write_text(SECRET if name.endswith(".key") else "-----BEGIN CERTIFICATE-----\n")
        os.chmod(files / name, mode)
    cli = files / "minkms"
    cli.write_text("#!/bin/sh\n")
    cli.chmod(0o755)
    text = re.sub(r'^ca = ".*"$', f'ca = "{files}/ca.crt"', text, flags=re.M)
    text = re.sub(r'^cert = ".*"$', f'cert = "{files}/node.crt"', text, flags=re.M)
    text = re.sub(r'^key = ".*"$', f'key = "{files}/node.key"', text, flags=re.M)
    text = re.sub(
        r'^api_key_file = ".*"$', f'api_key_file = "{files}/minkms.key"\ncli = "{cli}"', text, flags=re.M
    )
    return write(tmp_path, text)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_secrets_are_accepted(tmp_path: Path, mode: int) -> None:
    config = load_config(write_files(tmp_path, key_mode=mode, api_mode=mode))
    assert config.minkms.api_key_file is not None
    assert read_secret(config.minkms.api_key_file) == SECRET
    assert read_secret(config.tls.key) == SECRET


def test_loose_secret_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = write_files(tmp_path, key_mode=0o644)
    text = path.read_text()
    key = tmp_path / "files" / "node.key"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        ConfigIssue(
            "tls.key",
            line_of(text, "node.key"),
            f"{key} has mode 0644: group or others may read it; fix with: chmod 600 {key}",
        )
    ]


def test_missing_secret_file(tmp_path: Path) -> None:
    path = write_files(tmp_path)
    api_key = tmp_path / "files" / "minkms.key"
    api_key.unlink()
    errors = errors_of(tmp_path, path.read_text(), check_files=True)
    assert errors == [
        ConfigIssue(
            "minkms.api_key_file",
            line_of(path.read_text(), "api_key_file"),
            f"cannot read {api_key}: No such file or directory",
        )
    ]


def test_secret_must_be_a_regular_file(tmp_path: Path) -> None:
    path = write_files(tmp_path)
    key = tmp_path / "files" / "node.key"
    key.unlink()
    key.mkdir(mode=0o700)
    assert [str(e.message) for e in errors_of(tmp_path, path.read_text(), check_files=True)] == [
        f"{key} is not a regular file"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_secret_owned_by_someone_else(tmp_path: Path) -> None:
    path = write_files(tmp_path)
    key = tmp_path / "files" / "node.key"
    os.chown(key, 4242, -1)
    assert [e.message for e in errors_of(tmp_path, path.read_text(), check_files=True)] == [
        f"{key} is owned by uid 4242, who may read it; fix with: chown root {key}"
    ]


def test_certificates_and_cli_must_exist(tmp_path: Path) -> None:
    path = write_files(tmp_path)
    files = tmp_path / "files"
    (files / "ca.crt").unlink()
    (files / "minkms").chmod(0o644)
    errors = errors_of(tmp_path, path.read_text(), check_files=True)
    assert [(e.key, e.message) for e in errors] == [
        ("minkms.cli", f"{files / 'minkms'} is not executable by this user"),
        ("tls.ca", f"cannot read {files / 'ca.crt'}: No such file or directory"),
    ]


def test_check_files_false_skips_files(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE), check_files=False).name == "km1"
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, BASE))


def test_read_secret(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text(f"\n  {SECRET}  \n")
    secret.chmod(0o600)
    assert read_secret(secret) == SECRET
    secret.chmod(0o640)
    with pytest.raises(ConfigError, match=re.escape(f"chmod 600 {secret}")):
        read_secret(secret, "minkms.api_key_file")
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        read_secret(empty)
    with pytest.raises(ConfigError, match="No such file or directory"):
        read_secret(tmp_path / "missing")


def test_secret_content_never_appears(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_files(tmp_path, key_mode=0o644, api_mode=0o666)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.errors) == 2
    assert SECRET not in str(info.value) and "SUPERSECRET" not in repr(info.value.errors)
    for secret in (tmp_path / "files" / "node.key", tmp_path / "files" / "minkms.key"):
        with pytest.raises(ConfigError) as info:
            read_secret(secret)
        assert "SUPERSECRET" not in str(info.value)
    assert check_config_main(str(path)) == 1
    out, err = capsys.readouterr()
    assert "chmod 600" in err and "SUPERSECRET" not in out + err


# --------------------------------------------------------------------------------------------------------------
# check_config_main


def test_check_config_main_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    path = write_files(tmp_path, BASE + f'\n[state]\ndir = "{state}"\n')
    assert check_config_main(str(path)) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"OK: {path} (cluster prod-kms, agent km1, 3 agents, quorum 2)",
        "local.require_mount: unset: from the marker record: not required (there is no marker record yet "
        f"({state}/marker.json: the agent writes it when it marks the node))",
    ]
    assert err == ""


# ---- local.require_mount is tri-state: unset follows the marker record, true/false win ------------------------


@pytest.mark.parametrize(
    ("line", "expected"), [("", None), ("require_mount = true", True), ("require_mount = false", False)]
)
def test_require_mount_is_tri_state(tmp_path: Path, line: str, expected: bool | None) -> None:
    text = edit(BASE, ('storage_path = "/mnt/minio-kms"', f'storage_path = "/mnt/minio-kms"\n{line}'))
    assert load_text(tmp_path, text).local.require_mount is expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"auto"', "expected true or false, got a string"),
        ("1", "expected true or false, got an integer"),
        ("0", "expected true or false, got an integer"),
    ],
)
def test_require_mount_rejects_anything_but_a_boolean(tmp_path: Path, value: str, message: str) -> None:
    """There is no spelled-out "auto": leaving the key out is the automatic mode, so a typo can never pass for it."""
    text = edit(
        BASE, ('storage_path = "/mnt/minio-kms"', f'storage_path = "/mnt/minio-kms"\nrequire_mount = {value}')
    )
    (issue,) = errors_of(tmp_path, text)
    assert issue.key == "local.require_mount" and issue.message == message
    assert issue.line == line_of(text, "require_mount")


def _config_with_record(tmp_path: Path, require: str, record: str | None) -> tuple[Path, Path]:
    state = tmp_path / "state"
    state.mkdir()
    if record is not None:
        (state / "marker.json").write_text(record)
    text = edit(BASE, ('storage_path = "/mnt/minio-kms"', f'storage_path = "/mnt/minio-kms"\n{require}'))
    return write_files(tmp_path, text + f'\n[state]\ndir = "{state}"\n'), state / "marker.json"


_MARKED = (
    '{{"format": 1, "cluster": "prod-kms", "host": "10.0.0.1:7373", "node_id": 0, "written": 1{volume}}}'
)
_ON_MOUNT = (
    ', "volume": {"dev": "8:17", "mount_point": true, "fstype": "xfs", "uuid": null, "source": "/dev/sdb1"}'
)
_NO_MOUNT = (
    ', "volume": {"dev": "254:0", "mount_point": false, "fstype": "ext4", "uuid": null, "source": null}'
)


@pytest.mark.parametrize(
    ("require", "record", "line", "warned"),
    [
        (
            "",
            _MARKED.format(volume=_ON_MOUNT),
            "unset: from the marker record: required (the marker record says "
            "/mnt/minio-kms was a mount point (xfs /dev/sdb1 (dev 8:17)) when marked)",
            False,
        ),
        (
            "",
            _MARKED.format(volume=_NO_MOUNT),
            "unset: from the marker record: not required (the marker record "
            "says /mnt/minio-kms was not a mount point (ext4 (dev 254:0)) when marked)",
            False,
        ),
        (
            "",
            _MARKED.format(volume=""),
            "unset: from the marker record: not required (the marker record {record} "
            "has no volume identity (an older agent wrote it; the agent records it once the node is healthy))",
            False,
        ),
        (
            "",
            "{damaged",
            "unset: from the marker record: required (the marker record {record} cannot be read "
            "(malformed marker {record}: not valid JSON",
            False,
        ),
        ("require_mount = true", None, "true (set): the storage path must be a mount point", False),
        ("require_mount = false", _MARKED.format(volume=_ON_MOUNT), "false (set): never required", True),
        ("require_mount = false", _MARKED.format(volume=_NO_MOUNT), "false (set): never required", False),
    ],
)
def test_check_config_describes_require_mount(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    require: str,
    record: str | None,
    line: str,
    warned: bool,
) -> None:
    path, record_path = _config_with_record(tmp_path, require, record)
    assert check_config_main(str(path)) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[1].startswith("local.require_mount: " + line.format(record=record_path)), lines
    warnings = [x for x in lines if x.startswith("warning: local.require_mount = false")]
    assert bool(warnings) is warned, lines
    if warned:
        assert "was a mount point" in warnings[0] and "remove the setting" in warnings[0]
    assert err == ""


def test_check_config_of_a_witness_says_nothing_of_require_mount(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = edit(
        BASE,
        (
            'name = "km3"\naddress = "10.0.0.3:7443"\nminkms_host = "10.0.0.3:7373"',
            'name = "km3"\naddress = "10.0.0.3:7443"\nrole = "witness"',
        ),
        ('name = "km1"\n\n', 'name = "km3"\n\n'),
    )
    path = write_files(tmp_path, text)
    assert check_config_main(str(path)) == 0
    out, _ = capsys.readouterr()
    assert "require_mount" not in out and out.startswith("OK: ")


def test_check_config_main_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = edit(
        BASE,
        ('cluster = "prod-kms"', 'cluster = "prod kms"'),
        ('lease = "10s"', 'leese = "10s"\nevict_after = 5'),
        ('address = "10.0.0.2:7443"', 'address = "10.0.0.2"'),
        ('storage_path = "/mnt/minio-kms"', 'storage_path = "relative"'),
    )
    path = write_files(tmp_path, text)
    text = path.read_text()
    address_line = line_of(text, 'address = "10.0.0.2"')
    assert check_config_main(str(path)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f'{path}:1: cluster: must be 1 to 64 characters from A-Z a-z 0-9 . _ - (got "prod kms")',
        f"{path}:{address_line}: agents[1].address: expected HOST:PORT (IPv6 as [::1]:7443): "
        'missing :PORT (got "10.0.0.2")',
        f'{path}:{line_of(text, "storage_path")}: local.storage_path: must be an absolute path (got "relative")',
        f"{path}:{line_of(text, 'leese')}: timings.leese: unknown key, did you mean 'lease'?",
        f"{path}:{line_of(text, 'evict_after')}: timings.evict_after: must be at least 30s (got 5): evicting "
        "sooner would remove nodes that are only rebooting (the floor is 30s)",
    ]


def test_check_config_main_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert check_config_main(str(missing)) == 1
    assert capsys.readouterr().err == f"cannot read {missing}: No such file or directory\n"


def test_check_config_main_default_path_from_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_files(tmp_path)
    monkeypatch.setenv("KMAGENT_CONFIG", str(path))
    assert check_config_main(None) == 0
    assert capsys.readouterr().out.startswith(f"OK: {path} ")
    monkeypatch.delenv("KMAGENT_CONFIG")
    if not Path("/etc/kmagent/kmagent.toml").exists():
        assert check_config_main(None) == 1
        assert capsys.readouterr().err == "cannot read /etc/kmagent/kmagent.toml: No such file or directory\n"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"minkms server"', "expected a non-empty array of strings"),
        ("[]", "expected a non-empty array of strings"),
        ('["minkms", "server", "{dir}", "--address", "{address}"]', "the program must be an absolute path"),
        ('["/usr/local/bin/minkms", "server", "{dir}"]', "no argument holds {address}"),
        ('["/usr/local/bin/minkms", 7, "{address}"]', "expected a string"),
    ],
)
def test_backup_scratch_server_is_an_argv_with_the_address(tmp_path: Path, value: str, message: str) -> None:
    text = cluster_text(("km1", "member"), ("km2", "member"), ("km3", "member"))
    text += f"\n[backup]\nscratch_server = {value}\n"
    (error,) = errors_of(tmp_path, text)
    assert error.key == "backup.scratch_server" and message in error.message
    assert error.line == line_of(text, "scratch_server =")


def test_backup_scratch_server_parsed(tmp_path: Path) -> None:
    text = cluster_text(("km1", "member"), ("km2", "member"), ("km3", "member"))
    text += '\n[backup]\nscratch_server = ["/bin/m", "server", "{dir}", "--address", "{address}"]\n'
    text += 'scratch_env_file = "/etc/default/minkms"\n'
    cfg = load_text(tmp_path, text)
    assert cfg.backup.scratch_server == ("/bin/m", "server", "{dir}", "--address", "{address}")
    assert cfg.backup.scratch_env_file == Path("/etc/default/minkms")
    assert load_text(tmp_path, cluster_text(("km1", "member"), ("km2", "member"))).backup.scratch_server == ()
