"""`minkms`: the emulated command line, with the documented syntax, flags and environment.

Exit codes (undocumented for the real binary): 0 on success, 1 on any failure with one line on stderr,
2 for a usage error.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any

from emulator import wire
from emulator.client import Client, CLIError, endpoints, host_of, normalize_endpoint
from emulator.hsm import (
    KeyFormatError,
    SoftHSM,
    identity_of_api_key,
    new_api_key,
    parse_api_key,
)


class UsageError(CLIError):
    """Wrong arguments: exit code 2, as argparse uses."""


def _api_key(args: argparse.Namespace) -> str:
    key: str | None = args.api_key or os.environ.get("MINIO_KMS_API_KEY")
    if not key:
        raise CLIError("no API key: set MINIO_KMS_API_KEY or use --api-key")
    try:
        parse_api_key(key)
    except KeyFormatError as exc:
        raise CLIError(str(exc)) from exc
    return key


def _client(args: argparse.Namespace) -> Client:
    return Client(_api_key(args), insecure=args.insecure)


def go_duration(text: str) -> str:
    """`1473.500s` (protojson) -> `24m33s`."""
    try:
        seconds = float(str(text).rstrip("s"))
    except ValueError:
        return str(text)
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    total = int(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"


# ---- commands ------------------------------------------------------------------------------------------
def cmd_server(args: argparse.Namespace) -> int:
    from emulator.server import run

    if args.dev:
        raise CLIError("--dev is not supported by the emulator; give a storage directory")
    return run(args.dir, args.address, args.host, args.config)


def cmd_identity(args: argparse.Namespace) -> int:
    arg = args.key
    if arg and Path(arg).is_file():
        arg = Path(arg).read_text().strip()
    try:
        if not arg:
            api_key = new_api_key()
        elif arg.startswith("hsm:"):
            api_key = SoftHSM.parse(arg).root_api_key()
        else:
            api_key = arg
        identity = identity_of_api_key(api_key)
    except KeyFormatError as exc:
        raise CLIError(str(exc)) from exc
    if args.json:
        print(json.dumps({"identity": identity, "api_key": api_key}, indent=2))
    else:
        print(f"Identity:  {identity}\nAPI Key:   {api_key}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    if len(args.hosts) == 1:
        servers, new = endpoints(), args.hosts[0]
    elif len(args.hosts) == 2:
        servers, new = [normalize_endpoint(args.hosts[0])], args.hosts[1]
    else:
        raise UsageError("usage: minkms add [EXISTING] HOST[:PORT]")
    reply = _client(args).kms(servers, wire.CLUSTER_ADD_NODE, {"host": host_of(new)})
    print(f"Added node {reply.get('node_id')}: {host_of(new)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    reply = _client(args).kms(endpoints(), wire.CLUSTER_REMOVE_NODE, {"host": host_of(args.host)})
    print(f"Removed node {reply.get('node_id')}: {host_of(args.host)}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    if not args.rm:
        raise UsageError("nothing to edit: give at least one --rm ID")
    server = normalize_endpoint(args.host)
    reply = _client(args).kms([server], wire.CLUSTER_EDIT, {"host": host_of(args.host), "remove": args.rm})
    nodes = reply.get("nodes", {})
    print(f"Cluster definition on {host_of(args.host)} now has {len(nodes)} node(s):")
    for nid, host in sorted(nodes.items(), key=lambda kv: int(kv[0])):
        print(f"  Node {nid}: {host}")
    return 0


def _status(args: argparse.Namespace) -> dict[str, Any]:
    return _client(args).kms(endpoints(), wire.CLUSTER_STATUS, {})


def _sorted_ids(status: dict[str, Any]) -> list[str]:
    ids = set(status.get("nodes_up", {})) | set(status.get("nodes_down", {}))
    return sorted(ids, key=int)


def cmd_ls(args: argparse.Namespace) -> int:
    status = _status(args)
    rows = [("ID", "STATUS", "ROLE", "UPTIME", "HOST")]
    for nid in _sorted_ids(status):
        up = status.get("nodes_up", {}).get(nid)
        if up:
            rows.append((nid, "online", up["role"], go_duration(up["uptime"]), up["host"]))
        else:
            rows.append((nid, "offline", "-", "-", status["nodes_down"][nid]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    status = _status(args)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    for nid in _sorted_ids(status):
        up = status.get("nodes_up", {}).get(nid)
        if not up:
            print(f"○  Node {nid} at {status['nodes_down'][nid]}\n   State       Offline\n")
            continue
        leader = int(up.get("leader_id", -1))
        print(
            f"●  Node {nid} at {up['host']}\n"
            f"   Version     {up['version']}\n"
            f"   Uptime      {go_duration(up['uptime'])}\n"
            f"   HSMs        {up.get('hsm_active', 1)}\n"
            f"   Commit      {up['commit']}\n"
            f"   State       {up['role']}\n"
            f"   Leader      {'Node ' + str(leader) if leader >= 0 else 'none'}\n"
            f"   Heartbeat   {go_duration(up.get('last_heartbeat', '0s'))} ago\n"
            f"   System\n"
            f"      OS       {up.get('sys_os', '')}\n"
            f"      CPUs     {up.get('sys_cpu_num', '')} {up.get('sys_cpu_arch', '')}\n"
            f"      Memory   {int(up.get('sys_mem_heap_used', 0)) / (1 << 20):.2f}MiB\n"
        )
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    compress = args.compress == "gzip"
    name = args.file or datetime.datetime.now().strftime("%Y%m%d_%H%M%S") + (
        "_kms.db.gzip" if compress else "_kms.db"
    )
    path = Path(name)
    if path.exists() and not args.force:
        raise CLIError(f"{path} already exists; use --force to overwrite it")
    headers, data = _client(args).ok(endpoints(), "GET", "/v1/db", headers={"Accept-Encoding": "gzip"})
    gzipped = headers.get("content-encoding") == "gzip"
    if gzipped and not compress:
        data = gzip.decompress(data)
    elif compress and not gzipped:
        data = gzip.compress(data)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CLIError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if not args.file:
        print(name)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if len(args.args) == 1:
        servers, file = endpoints()[:1], args.args[0]
    elif len(args.args) == 2:
        servers, file = [normalize_endpoint(args.args[0])], args.args[1]
    else:
        raise UsageError("usage: minkms restore [HOST[:PORT]] FILE")
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {file}: {exc.strerror or exc}") from exc
    _, body = _client(args).ok(servers, "PUT", "/v1/db", data, {"Content-Type": "application/octet-stream"})
    commit = json.loads(body).get("commit") if body else None
    print(f"Restored {file} on {host_of(servers[0])} (commit {commit})")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    client = _client(args)
    if not args.hosts:
        client.ok(endpoints(), "POST", "/v1/debug/restart")
        print("Restarting all nodes")
        return 0
    for host in args.hosts:
        client.ok([normalize_endpoint(host)], "POST", "/v1/debug/restart?self")
        print(f"Restarting {host_of(host)}")
    return 0


def cmd_add_key(args: argparse.Namespace) -> int:
    message: dict[str, Any] = {"name": args.name, "algorithm": args.type, "add_version": args.version}
    command = wire.KEY_CREATE
    if args.import_key:
        message["key"] = args.import_key
        command = wire.KEY_IMPORT
    reply = _client(args).kms(endpoints(), command, message, args.enclave)
    print(f"Created key {args.name} version {reply.get('version', 1)}")
    return 0


def cmd_ls_key(args: argparse.Namespace) -> int:
    reply = _client(args).kms(endpoints(), wire.KEY_LIST, {"prefix": args.prefix or ""}, args.enclave)
    names = reply.get("names", [])
    print(json.dumps(names) if args.json else "\n".join(names))
    return 0


def cmd_stat_key(args: argparse.Namespace) -> int:
    reply = _client(args).kms(endpoints(), wire.KEY_STATUS, {"name": args.name}, args.enclave)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(f"Name     {reply['name']}\nVersion  {reply['version']}\nType     {reply['algorithm']}")
        print(f"Created  {reply['created_at']}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    message = {"name": args.name, "version": args.key_version or 0}
    reply = _client(args).kms(endpoints(), wire.KEY_GENERATE, message, args.enclave)
    ciphertext = f"v{reply['version']}:{reply['ciphertext']}"
    if args.json:
        print(json.dumps({"plaintext": reply["plaintext"], "ciphertext": ciphertext}, indent=2))
    else:
        print(f"Plaintext   {reply['plaintext']}\nCiphertext  {ciphertext}")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    data = args.data
    version = 0
    if data.startswith("v") and ":" in data:
        prefix, data = data.split(":", 1)
        try:
            version = int(prefix[1:])
        except ValueError as exc:
            raise CLIError("invalid ciphertext: expected v<VERSION>:<base64>") from exc
    reply = _client(args).kms(
        endpoints(),
        wire.KEY_DECRYPT,
        {"name": args.name, "ciphertext": data, "version": version},
        args.enclave,
    )
    plaintext = base64.b64decode(reply["plaintext"])
    if args.json:
        print(json.dumps({"plaintext": reply["plaintext"]}, indent=2))
    else:
        try:
            print(plaintext.decode())
        except UnicodeDecodeError:
            print(reply["plaintext"])
    return 0


# ---- argument parsing -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-a", "--api-key", help="API key (default: $MINIO_KMS_API_KEY)")
    common.add_argument("-k", "--insecure", action="store_true", help="skip server certificate verification")
    enclave = argparse.ArgumentParser(add_help=False)
    enclave.add_argument("-e", "--enclave", default="", help="enclave (default: the default enclave)")

    p = argparse.ArgumentParser(
        prog="minkms",
        description="minkms emulator (kmagent development). Server: $MINIO_KMS_SERVER "
        "(comma-separated, default https://localhost:7373); key: $MINIO_KMS_API_KEY.",
    )
    p.add_argument("--soft-hsm", action="store_true", help="print a new software HSM key")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("server", help="start a server")
    s.add_argument("dir", help="data directory")
    s.add_argument("--address", default="0.0.0.0:7373")
    s.add_argument("--host", help="this node's public HOST:PORT")
    s.add_argument("--config", help="YAML config file")
    s.add_argument("--license", help="ignored (deprecated)")
    s.add_argument("--dev", action="store_true")
    s.set_defaults(func=cmd_server)

    s = sub.add_parser("identity", help="print an API key and its identity")
    s.add_argument("key", nargs="?", help="HSM key, API key or key file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_identity)

    s = sub.add_parser("add", parents=[common], help="add a new node to the cluster")
    s.add_argument("hosts", nargs="+", metavar="HOST", help="[EXISTING] NEW")
    s.set_defaults(func=cmd_add)

    s = sub.add_parser("rm", parents=[common], help="remove a node from a healthy cluster")
    s.add_argument("host")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("edit", parents=[common], help="edit the cluster definition on HOST")
    s.add_argument("host")
    s.add_argument("--rm", type=int, action="append", default=[], metavar="ID", help="remove node ID")
    s.set_defaults(func=cmd_edit)

    s = sub.add_parser("ls", parents=[common], help="list the cluster nodes")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("stat", parents=[common], help="show the status of every node")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stat)

    s = sub.add_parser("backup", parents=[common], help="back up the key database")
    s.add_argument("file", nargs="?")
    s.add_argument("--force", action="store_true", help="overwrite FILE")
    s.add_argument("--compress", choices=["gzip", "off"], default="gzip")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("restore", parents=[common], help="restore a backup onto a fresh node")
    s.add_argument("args", nargs="+", metavar="[HOST] FILE")
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("restart", parents=[common], help="restart all nodes, or the HOSTs given")
    s.add_argument("hosts", nargs="*", metavar="HOST")
    s.set_defaults(func=cmd_restart)

    s = sub.add_parser("add-key", parents=[common, enclave], help="create a key")
    s.add_argument("name")
    s.add_argument("--type", default="AES256", choices=["AES256", "ChaCha20"])
    s.add_argument("--version", action="store_true", help="add a new version to an existing key")
    s.add_argument("--import", dest="import_key", metavar="BASE64KEY")
    s.set_defaults(func=cmd_add_key)

    s = sub.add_parser("ls-key", parents=[common, enclave], help="list keys")
    s.add_argument("prefix", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ls_key)

    s = sub.add_parser("stat-key", parents=[common, enclave], help="show a key")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stat_key)

    s = sub.add_parser("keygen", parents=[common, enclave], help="generate a data key")
    s.add_argument("name")
    s.add_argument("-v", "--version", dest="key_version", type=int)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("decrypt", parents=[common, enclave], help="decrypt a data key")
    s.add_argument("name")
    s.add_argument("data", help="v<VERSION>:<base64 ciphertext>")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_decrypt)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.soft_hsm:
        key = str(SoftHSM.generate())
        if sys.stdout.isatty():
            print(f"┌{'─' * 60}┐\n│ Your software HSM key:{' ' * 37}│\n│ {key.ljust(58)} │\n└{'─' * 60}┘")
        else:
            print(key)
        return 0
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"minkms: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except BrokenPipeError:  # `minkms ls | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
