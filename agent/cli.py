"""`kmagent`: the command line of the node agent. Talks to the daemon over the local control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from agent import __version__

DEFAULT_CONFIG = "/etc/kmagent/kmagent.toml"
DEFAULT_SOCKET = "/run/kmagent/control.sock"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_DENIED = 0, 1, 2, 3, 4

EPILOG = """exit codes:
  0  success
  1  failure (an invalid config, a rejected reload, ...)
  2  usage error
  3  the daemon is not running
  4  permission denied (read commands need root or the kmagent-admin group; changes need root)

environment:
  KMAGENT_CONFIG  config file (default /etc/kmagent/kmagent.toml)
  KMAGENT_SOCKET  control socket (default: control.socket from the config, else /run/kmagent/control.sock)
"""


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("KMAGENT_CONFIG") or DEFAULT_CONFIG)


def _socket_path(args: argparse.Namespace) -> Path:
    explicit = args.socket or os.environ.get("KMAGENT_SOCKET")
    if explicit:
        return Path(explicit)
    from agent.config import ConfigError, load_config

    path = _config_path(args)
    try:
        return Path(load_config(path, check_files=False).control.socket)
    except ConfigError:
        pass  # e.g. a bad edit before `kmagent reload`: the running daemon still listens where the file says
    except OSError:
        return Path(DEFAULT_SOCKET)
    try:
        with open(path, "rb") as f:
            socket = tomllib.load(f).get("control", {}).get("socket")
    except (OSError, ValueError, AttributeError):
        socket = None
    return Path(socket) if isinstance(socket, str) and socket.startswith("/") else Path(DEFAULT_SOCKET)


def _call(args: argparse.Namespace, method: str, route: str, timeout: float = 30.0, body: Any = None) -> Any:
    from agent.io.control import call

    return call(_socket_path(args), method, route, body=body, timeout=timeout)


def _yn(value: object) -> str:
    return "yes" if value is True else "no" if value is False else "?"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _opt(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render_status(status: dict[str, Any]) -> str:
    """The cluster as this agent sees it, then this host's own probes."""
    election = status.get("election", {})
    anchor = status.get("anchor")
    lease = election.get("lease_remaining") or 0
    lines = [
        f"cluster {status['cluster']}   agent {status['agent']}   kmagent {status['version']}   "
        f"up {int(status['uptime_seconds'])}s",
        f"anchor {anchor or 'none'}   term {status.get('term', '?')}"
        + (
            f"   (this agent holds the lease: {lease:.1f}s left)"
            if anchor == status["agent"] and lease
            else ""
        ),
    ]
    advice = (status.get("actions") or {}).get("restore")
    if advice:
        lines.append(advice)
    paused = status.get("paused")
    if paused:
        until = paused.get("until", 0)
        when = (
            "until resumed"
            if until >= 253402300799.0
            else "until " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until))
        )
        lines.append(f"PAUSED {when}: {paused.get('reason') or 'no reason given'} (kmagent resume ends it)")
    stalled = status.get("disk_stalled")
    if stalled:
        lines.append(
            f"DISK STALLED: a durable write ({stalled.get('write')}) has not returned for {stalled.get('seconds')}s: "
            "this agent neither leads nor runs a step until it does"
        )
    lines.append("")
    rows: list[tuple[str, ...]] = [
        ("NODE", "ROLE", "CLASS", "SINCE", "ID", "MINKMS", "COMMIT", "LAG", "ANCHOR", "REPORT", "OBSERVED")
    ]
    for n in status.get("nodes", []):
        age = n.get("report_age_seconds")
        rows.append(
            (
                n["name"] + (" (me)" if n.get("self") else ""),
                n.get("role") or "-",
                n.get("class") or "-",
                _opt(n.get("since_seconds"), "{:.0f}s"),
                _opt(n.get("node_id")),
                n.get("minkms_role") or "-",
                _opt(n.get("commit")),
                _opt(n.get("lag")),
                "*" if n.get("anchor") else "",
                "-" if n.get("self") else ("never" if age is None else f"{age:.1f}s ago"),
                _opt(n.get("observed_seconds"), "{:.1f}s ago"),
            )
        )
    lines += _table(rows)
    for n in status.get("nodes", []):
        if n.get("reason") and n.get("class") != "HEALTHY":
            lines.append(f"  {n['name']}: {n['reason']}")
        if n.get("error") and not n.get("self"):
            lines.append(f"  {n['name']}: {n['error']}")
    backups = status.get("backups")
    if backups:
        lines.append("")
        if backups.get("newest"):
            lines.append(
                f"backups: newest {backups['newest']} ({_age(backups['newest_age_seconds'])} old), "
                f"{backups['copies']} held here"
            )
        else:
            lines.append("backups: none held here")
        failure = backups.get("last_failure")
        if failure:
            lines.append(f"  last backup failure {_utc(failure['at'])}: {failure['error']}")
        for peer, error in sorted((backups.get("push_errors") or {}).items()):
            lines.append(f"  copy to {peer} failed: {error}")
    local = status.get("local")
    if local and local.get("health") is not None:
        health, storage = local.get("health", {}), local.get("storage", {})
        free = storage.get("free_bytes")
        lines += [
            "",
            f"this host: minkms {local.get('host') or '-'}   live {_yn(health.get('live'))}   "
            f"ready {_yn(health.get('ready'))}   write {_yn(health.get('write'))}   "
            f"free {'-' if free is None else f'{free / (1 << 30):.1f}G'}   "
            f"service {local.get('service', {}).get('state', '?')}",
        ]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    while True:
        status = _call(args, "GET", "/v1/status")
        text = json.dumps(status, indent=2, sort_keys=True) if args.json else render_status(status)
        if args.watch is None:
            print(text)
            return EXIT_OK
        print("\033[2J\033[H" + text, flush=True)
        time.sleep(args.watch)


def cmd_reload(args: argparse.Namespace) -> int:
    from agent.io.control import ControlError

    try:
        _call(args, "POST", "/v1/reload", timeout=60)
    except ControlError as exc:
        if exc.status == 422:
            print(f"kmagent: {exc}: see the daemon's log, or run: kmagent check-config", file=sys.stderr)
            return EXIT_FAILED
        raise
    print("reloaded")
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    from agent.config import parse_duration

    try:
        seconds = parse_duration(args.duration) if args.duration is not None else None
    except ValueError as exc:
        print(f"kmagent pause: --for: {exc}", file=sys.stderr)
        return EXIT_USAGE
    answer = _call(args, "POST", "/v1/pause", body={"seconds": seconds, "reason": args.reason or ""})
    until = answer["paused_until"]
    when = (
        "until resumed"
        if seconds is None
        else "until " + time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(until))
    )
    print(f"automation paused on every agent {when}: no destructive action will be proposed or agreed to")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    _call(args, "POST", "/v1/resume")
    print("automation resumed on every agent")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    answer = _call(args, "GET", "/v1/explain")
    if args.json:
        answer.pop("text", None)
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(answer["text"])
    return EXIT_OK


def render_history(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no destructive action has been recorded on this agent"
    rows: list[tuple[str, ...]] = [
        ("STARTED", "ACTION", "KIND", "TARGET", "OUTCOME", "TOOK", "AGREED", "DETAIL")
    ]
    for e in entries:
        signers = ",".join(a["signer"] for a in e["certificate"]["acks"])
        rows.append(
            (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["started"])),
                e["action"]["id"],
                e["action"]["kind"],
                e["action"]["target"],
                e["outcome"],
                f"{e['duration']:.1f}s",
                f"{signers} (term {e['certificate']['term']})",
                e["detail"],
            )
        )
    return "\n".join(_table(rows))


def cmd_history(args: argparse.Namespace) -> int:
    entries = _call(args, "GET", "/v1/history")["entries"]
    print(json.dumps(entries, indent=2, sort_keys=True) if args.json else render_history(entries))
    return EXIT_OK


def cmd_request(args: argparse.Namespace) -> int:
    from agent.io.control import ControlError

    try:
        answer = _call(args, "POST", "/v1/request", body={"kind": args.kind, "node": args.node})
    except ControlError as exc:
        if exc.status == 409:
            print(f"kmagent {args.kind.lower()}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise
    print(answer["message"])
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from agent.io.control import ControlError

    body = {"approve": args.approve, "backup": args.backup, "accept_loss_of": args.accept_loss_of}
    try:
        answer = _call(args, "POST", "/v1/restore", body=body)
    except ControlError as exc:
        if exc.status == 409:
            print(f"kmagent restore: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise
    print(answer["message"])
    return EXIT_OK


def cmd_ack(args: argparse.Namespace) -> int:
    print(_call(args, "POST", "/v1/ack", body={"node": args.node})["message"])
    return EXIT_OK


def _age(seconds: float) -> str:
    from agent.core.classify import human_duration

    return human_duration(max(0.0, seconds))


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def render_backups(catalogue: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [("BACKUP", "TAKEN", "AGE", "COMMIT", "SIZE", "SOURCE", "HELD BY")]
    for b in catalogue.get("backups", []):
        held = ",".join(b["holders"])
        if b.get("conflicting"):
            held += f"  (DIFFERENT CONTENT on {','.join(b['conflicting'])})"
        rows.append(
            (
                b["id"],
                _utc(b["created"]),
                _age(b["age_seconds"]),
                str(b["commit"]),
                _size(b["size"]),
                b["source"],
                held,
            )
        )
    lines = _table(rows) if len(rows) > 1 else ["no backup is held by any agent that answered"]
    asked = catalogue.get("asked", [])
    unreachable = catalogue.get("unreachable", {})
    lines.append("")
    lines.append(f"asked {len(asked)} agents: {len(asked) - len(unreachable)} answered")
    for name, error in sorted(unreachable.items()):
        lines.append(f"  {name} did not answer: {error}")
    return "\n".join(lines)


def cmd_backup_now(args: argparse.Namespace) -> int:
    from agent.io.control import ControlError

    try:
        answer = _call(args, "POST", "/v1/backup/now", timeout=120)
    except ControlError as exc:
        if exc.status == 409:
            print(f"kmagent backup now: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise
    print(f"backup {answer['backup']} taken; the anchor copies it to every agent")
    return EXIT_OK


def cmd_backup_list(args: argparse.Namespace) -> int:
    catalogue = _call(args, "GET", "/v1/backups", timeout=60)
    print(json.dumps(catalogue, indent=2, sort_keys=True) if args.json else render_backups(catalogue))
    return EXIT_OK


def cmd_backup_verify(args: argparse.Namespace) -> int:
    from agent.io.control import ControlError

    try:
        answer = _call(args, "POST", "/v1/backup/verify", timeout=180, body={"backup": args.backup})
    except ControlError as exc:
        if exc.status == 400:
            print(f"kmagent backup verify: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        for check in answer["checks"]:
            mark = {True: "ok", False: "FAILED", None: "skipped"}[check["ok"]]
            print(f"{check['check']}: {mark}: {check['detail']}")
        print(f"backup {answer['backup']}: {'verified' if answer['ok'] else 'NOT verified'}")
    return EXIT_OK if answer["ok"] else EXIT_FAILED


BACKUP_EPILOG = """exit codes: 0 done / verified, 1 refused or failed (no anchor, minkms error, a damaged copy), 2 bad
arguments, 3 the daemon is not running, 4 permission denied
"""


def _add_backup_parser(sub: Any) -> None:
    p = sub.add_parser(
        "backup",
        help="take, list and verify backups (the anchor takes them; every agent keeps copies)",
        description="Backups of minkms' key database: the anchor agent takes one every backup.interval and "
        "copies it to every agent, which keep backup.keep copies in backup.dir.",
        epilog=BACKUP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=lambda _args: p.print_help(sys.stderr) or EXIT_USAGE)
    backup_sub = p.add_subparsers(metavar="{now,list,verify}")
    s = backup_sub.add_parser(
        "now",
        help="take a backup now (on the anchor; asked from another host, it is forwarded to the anchor)",
        epilog=BACKUP_EPILOG,
    )
    s.set_defaults(func=cmd_backup_now)
    s = backup_sub.add_parser(
        "list",
        help="every backup across the cluster: time, age, commit, size, source, which agents hold a copy",
        epilog=BACKUP_EPILOG,
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_backup_list)
    s = backup_sub.add_parser(
        "verify",
        help="check this host's copy of a backup (sha256, gzip) and restore it into a scratch minkms when "
        "backup.scratch_server is set; a damaged copy is moved to backup.dir/corrupt/",
        epilog=BACKUP_EPILOG,
    )
    s.add_argument("backup", metavar="ID", help="the backup id (see kmagent backup list)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_backup_verify)


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.config import check_config_main

    return check_config_main(args.path or args.config)


def cmd_daemon(args: argparse.Namespace) -> int:
    from agent.daemon import main as daemon_main

    return daemon_main(_config_path(args))


def cmd_version(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"version": __version__}))
    else:
        print(f"kmagent {__version__}")
    return EXIT_OK


PKI_EPILOG = """example (a quick start; your own PKI works too: CN and a SAN DNS name = the agent's name):
  kmagent pki init --dir /root/kmagent-ca --cluster prod
  kmagent pki issue node1 --dir /root/kmagent-ca --address 10.0.0.1 --address node1.example.net

Keep the CA directory off the hosts if you can: whoever holds ca.key can make certificates every agent trusts.
exit codes: 0 written, 1 refused or failed (an existing file, a missing or damaged CA), 2 bad arguments
"""


def cmd_pki_init(args: argparse.Namespace) -> int:
    from agent import pki

    cert, key = pki.init_ca(Path(args.dir), args.cluster, force=args.force)
    print(f"wrote {cert}  (the cluster CA certificate: every host needs it)")
    print(f"wrote {key}  (the CA private key, 0600: keep it here, never copy it to the hosts)")
    print(
        f"next: kmagent pki issue NAME --dir {args.dir} --address HOST_OR_IP   (once per agent of the config)"
    )
    return EXIT_OK


def cmd_pki_issue(args: argparse.Namespace) -> int:
    from agent import pki

    out = Path(args.out) if args.out else None
    cert, key = pki.issue(
        Path(args.dir), args.name, args.address, args.key_type, args.days, args.force, out_dir=out
    )
    names = ", ".join([args.name, *args.address])
    print(f"wrote {cert}  (agent {args.name}: {args.key_type}, {args.days} days, names: {names})")
    print(f"wrote {key}  (its private key, 0600)")
    ca = Path(args.dir) / pki.CA_CERT
    print(
        f"next: copy {ca}, {cert.name} and {key.name} to host {args.name} (e.g. to /etc/kmagent/tls/, the key "
        "owned by root, mode 0600) and point its kmagent.toml at them:\n"
        f'  [tls]\n  ca = "/etc/kmagent/tls/{ca.name}"\n  cert = "/etc/kmagent/tls/{cert.name}"\n'
        f'  key = "/etc/kmagent/tls/{key.name}"'
    )
    return EXIT_OK


def cmd_pki(args: argparse.Namespace) -> int:
    """Run a pki subcommand; its errors are about files and arguments, not the daemon, so handled here."""
    from agent.pki import PKIError

    try:
        return int(args.pki_func(args))
    except ValueError as exc:
        print(f"kmagent pki: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PKIError as exc:
        print(f"kmagent pki: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _add_pki_parser(sub: Any) -> None:
    from agent.pki import KEY_TYPES, LEAF_DAYS

    p = sub.add_parser(
        "pki",
        help="create a cluster CA and agent certificates (quick start)",
        description="A minimal PKI for the agents' mutual TLS and signed acks: one CA per cluster, one "
        "certificate per agent.",
        epilog=PKI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=lambda _args: p.print_help(sys.stderr) or EXIT_USAGE)
    pki_sub = p.add_subparsers(metavar="{init,issue}")

    s = pki_sub.add_parser(
        "init",
        help="create the cluster CA: ca.crt (0644) and ca.key (0600) in --dir (created 0700)",
        description="Create the cluster CA (ECDSA P-256, 10 years). Refuses to replace an existing CA "
        "unless --force: certificates issued by the old CA would no longer be trusted.",
    )
    s.add_argument("--dir", required=True, help="CA directory (created 0700 if missing)")
    s.add_argument("--cluster", default="kmagent", help="cluster name, shown in the CA's name (kmagent)")
    s.add_argument("--force", action="store_true", help="replace an existing CA")
    s.set_defaults(func=cmd_pki, pki_func=cmd_pki_init)

    s = pki_sub.add_parser(
        "issue",
        help="issue agent NAME a certificate: NAME.crt (0644) and NAME.key (0600)",
        description="Issue a certificate for agent NAME (the name in the config's [[agents]]), signed by "
        "the CA in --dir, for both TLS server and client use. CN and a SAN DNS name are NAME; each "
        "--address adds a SAN, so that peers can reach the agent at that address.",
    )
    s.add_argument("name", metavar="NAME", help="agent name: 1-64 characters from A-Z a-z 0-9 . _ -")
    s.add_argument("--dir", required=True, help="CA directory (from kmagent pki init)")
    s.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="HOST_OR_IP",
        help="an extra name: an IP address (IP SAN) or a host name (DNS SAN); repeatable",
    )
    s.add_argument("--key-type", choices=KEY_TYPES, default="ec", help="key type (ec: ECDSA P-256)")
    s.add_argument("--days", type=int, default=LEAF_DAYS, help=f"validity in days ({LEAF_DAYS})")
    s.add_argument("--out", metavar="DIR", help="write NAME.crt and NAME.key here instead of --dir")
    s.add_argument("--force", action="store_true", help="replace an existing NAME.crt / NAME.key")
    s.set_defaults(func=cmd_pki, pki_func=cmd_pki_issue)


PREFLIGHT_EPILOG = """minkms.service runs this as ExecStartPre= (kmagent-preflight.conf); no running daemon is needed.
exit codes: 0 minkms may start, 1 refused (the reason on stderr), 2 usage or config error (start refused too)
"""


def cmd_preflight(args: argparse.Namespace) -> int:
    """Allow or refuse the start of minkms; standalone: no daemon, no aiohttp (it runs before every start)."""
    from agent import preflight
    from agent.config import ConfigError, load_config

    path = _config_path(args)
    # Only the default path: an explicit --config or $KMAGENT_CONFIG naming a missing file is an error.
    if not args.config and not os.environ.get("KMAGENT_CONFIG"):
        verdict = preflight.unconfigured(path)
        if verdict is not None:
            print(f"kmagent preflight: ok: {verdict.reason}")
            return EXIT_OK
    try:  # the TLS and key files are not needed here, and must not block minkms when missing
        cfg = load_config(path, check_files=False)
    except ConfigError as exc:
        detail = "; ".join(str(issue) for issue in exc.errors)
        print(
            f"kmagent preflight: refusing to start minkms: invalid config {path}: {detail}", file=sys.stderr
        )
        return EXIT_USAGE
    verdict = preflight.check(cfg, time.time())
    if not verdict.ok:
        print(f"kmagent preflight: {verdict.reason}", file=sys.stderr)
        return EXIT_FAILED
    print(f"kmagent preflight: ok: {verdict.reason}")
    return EXIT_OK


def cmd_forget_volume(args: argparse.Namespace) -> int:
    """Drop the recorded volume identity, once an operator has replaced the volume on purpose (standalone)."""
    from agent.config import ConfigError, load_config
    from agent.io.storage import StorageError, forget_volume, read_marker
    from agent.preflight import record_path

    try:
        cfg = load_config(_config_path(args), check_files=False)
    except ConfigError as exc:
        print(
            f"kmagent forget-volume: invalid config: {'; '.join(str(i) for i in exc.errors)}", file=sys.stderr
        )
        return EXIT_USAGE
    record = record_path(Path(cfg.state.dir))
    try:
        recorded = read_marker(record)
    except StorageError as exc:
        print(f"kmagent forget-volume: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if recorded is None or recorded.volume is None:
        print(f"kmagent forget-volume: {record} records no volume: nothing to forget")
        return EXIT_OK
    what = f"the record {record} says the storage path {cfg.local.storage_path} was on {recorded.volume.describe()}"
    if not args.yes:
        print(
            f"kmagent forget-volume: {what}.\nForgetting it makes an empty storage path STATE_LOST, and the agents "
            "then REJOIN this node onto the volume mounted there now (its old state, if any, is quarantined, never "
            "deleted). Only do this when the volume was replaced on purpose; if it merely did not mount, mount it "
            "instead. Run again with --yes to forget it."
        )
        return EXIT_FAILED
    if os.geteuid() != 0:
        print("kmagent forget-volume: needs root (it changes the agent's state)", file=sys.stderr)
        return EXIT_FAILED
    try:
        forget_volume(record)
    except (OSError, StorageError) as exc:
        print(f"kmagent forget-volume: cannot rewrite {record}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"kmagent forget-volume: forgotten: {what}. The next REJOIN records the volume mounted now.")
    return EXIT_OK


def _add_preflight_parser(sub: Any) -> None:
    s = sub.add_parser(
        "preflight",
        help="check that minkms may start here (refuses on a wiped or foreign storage path)",
        description="Refuse to start minkms when its storage path is empty or carries another identity while "
        "the agent's record says this host belongs to a cluster, unless a REJOIN or RESTORE authorised a "
        "fresh start: minkms on an empty directory would come up as a rogue fresh cluster.",
        epilog=PREFLIGHT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", default=argparse.SUPPRESS, help="config file (as the global --config)")
    s.set_defaults(func=cmd_preflight, standalone=True)
    s = sub.add_parser(
        "forget-volume",
        help="forget the volume the node was marked on (only after replacing it on purpose)",
        description="A storage path that is not on the volume recorded when the node was marked is "
        "VOLUME_MISSING: nothing automatic touches it, and minkms is not started there. When the volume was "
        "replaced on purpose, this drops the recorded identity, so that the new volume is rejoined as usual.",
    )
    s.add_argument("--config", default=argparse.SUPPRESS, help="config file (as the global --config)")
    s.add_argument("--yes", action="store_true", help="forget it (without: say what would be forgotten)")
    s.set_defaults(func=cmd_forget_volume, standalone=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmagent",
        description="Node agent for AIStor Key Manager (minkms) clusters: watches the local minkms, agrees "
        "with the other hosts' agents, and runs the documented recovery runbooks automatically and safely.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="config file (default $KMAGENT_CONFIG or /etc/kmagent/kmagent.toml)")
    p.add_argument("--socket", help="control socket (default: from the config)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("daemon", help="run the agent (systemd starts it; not for interactive use)")
    s.set_defaults(func=cmd_daemon)

    s = sub.add_parser("status", help="show the cluster as this agent sees it")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument(
        "--watch", type=float, nargs="?", const=2.0, metavar="SECONDS", help="refresh every SECONDS (2)"
    )
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("check-config", help="validate a config file: prints OK or every error")
    s.add_argument(
        "path", nargs="?", help="config file (default: --config, $KMAGENT_CONFIG, /etc/kmagent/kmagent.toml)"
    )
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("reload", help="reload the config; waits until applied (a bad config is rejected)")
    s.set_defaults(func=cmd_reload)

    s = sub.add_parser("explain", help="what would happen next, on what evidence, and who would agree")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("history", help="every destructive action recorded here: who agreed, how it went")
    s.add_argument("--json", action="store_true", help="machine-readable output (with the certificates)")
    s.set_defaults(func=cmd_history)

    for kind, what in (
        ("REJOIN", "rejoin a node now: wipe (quarantine) it, remove it, start it fresh, add it"),
        ("EVICT", "evict a dead node now: remove it from the cluster so that writes work again"),
    ):
        s = sub.add_parser(
            kind.lower(),
            help=what,
            description=f"{what}. Only the wait for the class to hold is waived: the node's class must call for "
            "it, every guard rail still applies, and a quorum of agents must agree. A refusal names the rule.",
        )
        s.add_argument("node", help="the agent name of the node")
        s.set_defaults(func=cmd_request, kind=kind)

    s = sub.add_parser(
        "restore",
        help="rebuild the cluster from a backup after total failure (shows the plan; --approve arms it)",
        description="When no node holds state, restore the freshest intact backup on one host and let the others "
        "rejoin it. Without --approve it only says what would be restored and what would be lost. --approve arms "
        "one restore for an hour on every agent; a quorum of agents must still agree, each from its own view, "
        "that every node's state is lost. A node that may hold newer state (unreachable, agent down) blocks it "
        "unless named with --accept-loss-of after `kmagent explain` has said what that loses.",
    )
    s.add_argument(
        "--backup", metavar="ID", help="the backup to restore (refused when a newer one is available)"
    )
    s.add_argument("--approve", action="store_true", help="arm the restore (otherwise: only show the plan)")
    s.add_argument(
        "--accept-loss-of",
        metavar="NODE",
        action="append",
        default=[],
        help="a node without evidence of loss whose state the restore may lose (repeatable)",
    )
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("ack", help="release an ESCALATED node: automation may act on it again")
    s.add_argument("node", help="the agent name of the node")
    s.set_defaults(func=cmd_ack)

    s = sub.add_parser(
        "pause",
        help="stop every destructive proposal and agreement, on every agent",
        description="Pause automation cluster-wide: no agent proposes or agrees to a destructive action until "
        "the pause expires or `kmagent resume`. Observation, elections and backups go on.",
    )
    s.add_argument(
        "--for", dest="duration", metavar="D", help='how long, e.g. "30m", "2h" (default: until resumed)'
    )
    s.add_argument("--reason", metavar="TEXT", help="shown by kmagent status on every host")
    s.set_defaults(func=cmd_pause)

    s = sub.add_parser("resume", help="end a pause, on every agent")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("version", help="print the version")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_version)

    _add_backup_parser(sub)
    _add_pki_parser(sub)
    _add_preflight_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if getattr(args, "standalone", False):  # runs without the daemon: none of its imports
        return int(args.func(args))
    from agent.io.control import ControlError, DaemonNotRunning

    try:
        return int(args.func(args))
    except DaemonNotRunning as exc:
        print(f"kmagent: {exc}; start it with: systemctl start kmagent", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"kmagent: {exc}", file=sys.stderr)
        return EXIT_DENIED if exc.status == 403 else EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
