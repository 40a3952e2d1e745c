"""A local emulated minkms cluster: one node per loopback address, real TLS, every process supervised.

All state lives under one lab directory; nothing needs root. Used by the tests, the demo, the benchmarks
and by operators who want to try a runbook safely.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emulator import wire
from emulator.client import Client, CLIError
from emulator.hsm import SoftHSM
from emulator.lab import pki, supervisor

PORT = 7373
FAULTS = (
    "disk-loss",
    "corrupt",
    "kill",
    "stop",
    "start",
    "agent-kill",
    "agent-stop",
    "agent-start",
    "isolate",
    "heal",
)
AGENT_NOT_RUNNING = "agent not running"
# The agents' [timings] in a lab: short, so that tests and the demo see detection and recovery in seconds.
# Override any of them with Lab.up(agent_timings=...) or `kmlab up --agent-timing KEY=VALUE`.
LAB_TIMINGS: dict[str, str | int] = {
    "probe_interval": "1s",
    "peer_timeout": "3s",
    "lease": "5s",
    "state_lost_after": "3s",
    "corrupt_after": "10s",
    "evict_after": "30s",
    "cooldown": "30s",
    "crash_loop_restarts": 3,
    "crash_loop_window": "30s",
}
# The agents' environment variables a lab may set (Lab.set_agent_env): the test hooks, nothing else.
AGENT_ENV_KEYS = ("KMAGENT_FAILPOINTS", "KMAGENT_FAILPOINTS_DIR")


class LabError(Exception):
    """A lab operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class LabNode:
    name: str
    ip: str
    dir: str

    @property
    def host(self) -> str:
        return f"{self.ip}:{PORT}"

    @property
    def endpoint(self) -> str:
        return f"https://{self.host}"

    @property
    def data(self) -> Path:
        return Path(self.dir) / "data"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `condition` until it returns a truthy value; LabError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (CLIError, OSError, supervisor.SupervisorError, LabError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _free_subnet(n_nodes: int) -> str:
    """A random 127.A.B.0/24 whose port 7373 is free on the first addresses (parallel labs never clash)."""
    for _ in range(200):
        prefix = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"
        try:
            for i in range(1, n_nodes + 1):
                with socket.socket() as sock:
                    sock.bind((f"{prefix}.{i}", PORT))
        except OSError:
            continue
        return prefix
    raise LabError("no free loopback subnet found for the lab")


class Lab:
    def __init__(self, directory: Path) -> None:
        self.dir = directory.resolve()

    # ---- files -------------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.dir / "lab.json"

    @property
    def sock(self) -> Path:
        return self.dir / "supervisor.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "supervisor.pid"

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca" / "ca.crt"

    def exists(self) -> bool:
        return self.meta_path.exists()

    def meta(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.meta_path.read_text())
            return data
        except FileNotFoundError as exc:
            raise LabError(f"no lab in {self.dir}: run 'kmlab up --dir {self.dir}' first") from exc
        except ValueError as exc:
            raise LabError(f"{self.meta_path} is damaged: {exc}") from exc

    def nodes(self) -> list[LabNode]:
        return [LabNode(**n) for n in self.meta()["nodes"]]

    def node(self, name: str) -> LabNode:
        for node in self.nodes():
            if node.name == name or node.host == name or node.ip == name:
                return node
        names = ", ".join(n.name for n in self.nodes())
        raise LabError(f"no node {name!r} in this lab (nodes: {names})")

    def api_key(self) -> str:
        return (self.dir / "api.key").read_text().strip()

    def hsm_key(self) -> str:
        return (self.dir / "hsm.key").read_text().strip()

    def env(self, node: LabNode | None = None) -> dict[str, str]:
        """Environment for the `minkms` CLI against this lab (documented variables only, plus the CA)."""
        servers = [node] if node else self.nodes()
        return {
            "MINIO_KMS_SERVER": ",".join(n.endpoint for n in servers),
            "MINIO_KMS_API_KEY": self.api_key(),
            "MINIO_KMS_TLS_CA": str(self.ca_cert),
        }

    def client(self) -> Client:
        client = Client(self.api_key())
        client.ctx.load_verify_locations(cafile=str(self.ca_cert))
        return client

    def minkms(
        self, *args: str, node: LabNode | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the emulated `minkms` CLI as an operator would."""
        env = {**os.environ, **self.env(node)}
        proc = subprocess.run(
            [sys.executable, "-m", "emulator", *args], env=env, capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode != 0:
            raise LabError(f"minkms {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    # ---- life cycle ---------------------------------------------------------------------------------
    def create(
        self,
        n_nodes: int,
        heartbeat: str = "250ms",
        restart_sec: float = 0.5,
        agents: bool = False,
        agent_timings: Mapping[str, str] | None = None,
        agent_policy: Mapping[str, str | int | bool] | None = None,
        agent_backup: Mapping[str, str | int] | None = None,
    ) -> None:
        if n_nodes < 1 or n_nodes > 50:
            raise LabError("--nodes must be between 1 and 50")
        # the longest Unix socket of the lab: an agent's control socket (sun_path holds 107 bytes)
        longest = self.dir.resolve() / "nodes" / f"node{n_nodes}" / "agent" / "control.sock"
        if agents and len(os.fsencode(longest)) > 107:
            raise LabError(
                f"the lab directory {self.dir} is too deep for the agents' control sockets: {longest} is "
                "longer than a unix socket path may be (107 bytes); use a shorter --dir"
            )
        if self.exists():
            raise LabError(
                f"a lab already exists in {self.dir}; run 'kmlab down --dir {self.dir} --purge' first"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        prefix = _free_subnet(n_nodes)
        hsm = SoftHSM.generate()
        _write_secret(self.dir / "hsm.key", str(hsm) + "\n")
        _write_secret(self.dir / "api.key", hsm.root_api_key() + "\n")
        pki.create_ca(self.dir / "ca")
        nodes: list[LabNode] = []
        for i in range(1, n_nodes + 1):
            node = LabNode(name=f"node{i}", ip=f"{prefix}.{i}", dir=str(self.dir / "nodes" / f"node{i}"))
            base = Path(node.dir)
            node.data.mkdir(parents=True, exist_ok=True)
            cert, key = pki.issue(self.dir / "ca", base / "certs", node.name, ips=[node.ip], dns=[node.name])
            config = {
                "version": "v1",
                "tls": {"certs": [{"key": str(key), "cert": str(cert)}], "ca": str(self.ca_cert)},
                "heartbeat": heartbeat,
            }
            (base / "config.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
            nodes.append(node)
        meta = {
            "version": 1,
            "created": time.time(),
            "subnet": prefix,
            "restart_sec": restart_sec,
            "agents": agents,
            "agent_timings": {**LAB_TIMINGS, **(agent_timings or {})},
            "agent_policy": dict(agent_policy or {}),
            "agent_backup": dict(agent_backup or {}),
            "nodes": [asdict(n) for n in nodes],
        }
        self.meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        if agents:
            self._write_agent_configs(nodes)

    # ---- agents ---------------------------------------------------------------------------------------
    def has_agents(self) -> bool:
        return bool(self.meta().get("agents"))

    def agent_config(self, node: LabNode) -> Path:
        return Path(node.dir) / "agent" / "kmagent.toml"

    def agent_socket(self, node: LabNode) -> Path:
        return Path(node.dir) / "agent" / "control.sock"

    def _write_agent_configs(self, nodes: list[LabNode]) -> None:
        """One kmagent config per node, generated for the lab: short timings, the lab's supervisor."""
        wrapper = self.dir / "bin" / "minkms"
        wrapper.parent.mkdir(exist_ok=True)
        wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={_source_root()} exec {sys.executable} -m emulator "$@"\n')
        wrapper.chmod(0o755)
        agents = "".join(
            f'[[agents]]\nname = "{n.name}"\naddress = "{n.ip}:7443"\nminkms_host = "{n.host}"\n\n'
            for n in nodes
        )
        timings = self.meta().get("agent_timings") or LAB_TIMINGS
        policy = self.meta().get("agent_policy") or {}
        # [policy] only when asked for (e.g. actions_per_hour = 1 to see a node escalated): else the defaults
        policy_table = "".join(f"{k} = {_toml_value(v)}\n" for k, v in policy.items())
        # [backup]: the defaults (1h, keep 48) unless asked for (e.g. interval = "5s", keep = 2 in the tests)
        backup_table = "".join(
            f"{k} = {_toml_value(v)}\n" for k, v in (self.meta().get("agent_backup") or {}).items()
        )
        for node in nodes:
            base = Path(node.dir) / "agent"
            base.mkdir(parents=True, exist_ok=True)
            os.chmod(base, 0o700)
            cert, key = pki.issue(self.dir / "ca", base / "tls", node.name, ips=[node.ip], dns=[node.name])
            # `kmagent backup verify` restores into a scratch emulator started like the node (same HSM key from
            # scratch.env, the node's TLS certificate: kmagent talks to it with -k on 127.0.0.1)
            _write_secret(base / "scratch.env", f"MINIO_KMS_HSM_KEY={self.hsm_key()}\n")
            scratch = [sys.executable, "-m", "emulator", "server", "{dir}", "--address", "{address}"]
            scratch += ["--host", "{address}", "--config", str(Path(node.dir) / "config.yaml")]
            text = (
                f'cluster = "kmlab"\nname = "{node.name}"\n\n{agents}'
                f'[local]\nstorage_path = "{node.data}"\nservice = "{node.name}"\nsupervisor = "{self.sock}"\n'
                'low_space = "64MiB"\n\n'
                f'[minkms]\ncli = "{wrapper}"\nserver = "{node.endpoint}"\napi_key_file = "{self.dir / "api.key"}"\n'
                f'ca = "{self.ca_cert}"\ncommand_timeout = "10s"\nprobe_timeout = "1s"\n\n'
                f'[tls]\nca = "{self.ca_cert}"\ncert = "{cert}"\nkey = "{key}"\n\n'
                "[timings]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in timings.items()) + "\n"
                f'[peer]\nsource = "{node.ip}"\n\n'
                f'[state]\ndir = "{base / "state"}"\n\n'
                f'[backup]\ndir = "{base / "backups"}"\n{backup_table}'
                f"scratch_server = {json.dumps(scratch)}\n"
                f'scratch_env_file = "{base / "scratch.env"}"\n\n'
                f'[control]\nsocket = "{self.agent_socket(node)}"\n\n'
                f'[metrics]\naddress = "{node.ip}:9464"\n'
            )
            if policy_table:
                text += f"\n[policy]\n{policy_table}"
            self.agent_config(node).write_text(text)

    def agent_program(self, node: LabNode) -> dict[str, Any]:
        base = Path(node.dir) / "agent"
        return {
            "argv": [sys.executable, "-m", "agent.cli", "--config", str(self.agent_config(node)), "daemon"],
            "env": {**self.meta().get("agent_env", {}).get(node.name, {}), "PYTHONPATH": _source_root()},
            "cwd": str(base),
            "log": str(base / "kmagent.log"),
            "restart": "on-failure",
            "restart_sec": 1.0,
            "preflight": None,
        }

    def set_agent_env(self, name: str, env: Mapping[str, str]) -> None:
        """Run a node's agent with these extra variables (failpoints, for crash tests) instead of those set
        before; {} clears them. Kept in lab.json so that a resumed lab keeps them; a running lab restarts the
        agent with them at once (its supervisor program is replaced)."""
        node = self.node(name)
        if not self.has_agents():
            raise LabError(f"this lab runs no agents: {node.name} has no agent to configure")
        for key, value in env.items():
            if key not in AGENT_ENV_KEYS:
                raise LabError(
                    f"agent variable {key!r} cannot be set by a lab (allowed: {', '.join(AGENT_ENV_KEYS)})"
                )
            if not isinstance(value, str) or "\0" in value:
                raise LabError(f"agent variable {key}: the value must be a string without NUL bytes")
        meta = self.meta()
        meta.setdefault("agent_env", {})[node.name] = dict(env)
        self.meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        if not self.running():
            return
        program = f"{node.name}-agent"
        for request in (
            {"op": "remove", "name": program},
            {"op": "add", "name": program, "program": self.agent_program(node)},
        ):
            reply = supervisor.request(self.sock, request, timeout=30)
            if not reply.get("ok"):
                raise LabError(f"{request['op']} the agent of {node.name}: {reply.get('error')}")

    def program(self, node: LabNode) -> dict[str, Any]:
        base = Path(node.dir)
        return {
            "argv": [
                sys.executable,
                "-m",
                "emulator",
                "server",
                str(node.data),
                "--address",
                node.host,
                "--host",
                node.host,
                "--config",
                str(base / "config.yaml"),
            ],
            "env": {"MINIO_KMS_HSM_KEY": self.hsm_key(), "PYTHONPATH": _source_root()},
            "cwd": str(base),
            "log": str(base / "minkms.log"),
            "restart": "always",
            "restart_sec": float(self.meta().get("restart_sec", 0.5)),
            "preflight": self.preflight(node),
        }

    def preflight(self, node: LabNode) -> list[str] | None:
        """`kmagent preflight` of the node's agent, run before each start as systemd's ExecStartPre would
        (DESIGN §5): a node whose agent recorded its identity never starts on a wiped disk as a rogue cluster.
        None in a lab without agents, whose nodes are the bare emulator (the demo, the runbook oracle)."""
        if not self.has_agents():
            return None
        return [sys.executable, "-m", "agent.cli", "--config", str(self.agent_config(node)), "preflight"]

    def running(self) -> bool:
        try:
            supervisor.request(self.sock, {"op": "status"}, timeout=5)
            return True
        except supervisor.SupervisorError:
            return False

    def start_supervisor(self) -> None:
        if self.running():
            return
        spec = self.dir / "supervisor.json"
        programs = {n.name: self.program(n) for n in self.nodes()}
        if self.has_agents():
            programs.update({f"{n.name}-agent": self.agent_program(n) for n in self.nodes()})
        _write_secret(spec, json.dumps({"programs": programs}, indent=2) + "\n")
        supervisor.spawn_detached(spec, self.sock, self.pidfile, self.dir / "supervisor.log")

    def up(
        self,
        n_nodes: int,
        heartbeat: str = "250ms",
        timeout: float = 60.0,
        log: Callable[[str], None] = print,
        agents: bool = False,
        prepare: Callable[[Lab], None] | None = None,
        agent_timings: Mapping[str, str] | None = None,
        agent_policy: Mapping[str, str | int | bool] | None = None,
        agent_backup: Mapping[str, str | int] | None = None,
    ) -> None:
        """Create (or resume) the lab and return once the cluster is formed.

        `prepare` runs once a new lab's files exist and before any process starts: the moment to put a real
        volume (e.g. a small tmpfs) under a node's data directory, since nothing holds it open yet.
        """
        fresh = not self.exists()
        if fresh:
            self.create(
                n_nodes,
                heartbeat,
                agents=agents,
                agent_timings=agent_timings,
                agent_policy=agent_policy,
                agent_backup=agent_backup,
            )
            if prepare is not None:
                prepare(self)
        elif self.running():
            raise LabError(f"the lab in {self.dir} is already running")
        self.start_supervisor()
        nodes = self.nodes()
        client = self.client()
        wait_for(lambda: all(self.probe(n, "live") for n in nodes), timeout, "every node to answer")
        if fresh:
            first = nodes[0]
            for node in nodes[1:]:
                log(f"adding {node.name} ({node.host}) to the cluster")
                wait_for(lambda: self.probe(first, "ready?write"), timeout, "the cluster to accept writes")
                client.kms([first.endpoint], wire.CLUSTER_ADD_NODE, {"host": node.host})
        wait_for(lambda: self.formed(len(nodes)), timeout, f"all {len(nodes)} nodes to form one cluster")

    def down(self, purge: bool = False, timeout: float = 30.0) -> None:
        if self.exists():
            self.heal()  # a partition must never outlive its lab
        if self.running():
            try:
                supervisor.request(self.sock, {"op": "shutdown"}, timeout=timeout)
            except supervisor.SupervisorError:
                pass
        pid = _read_pid(self.pidfile)
        if pid is not None:
            wait_for(lambda: not _alive(pid), timeout, "the lab supervisor to exit")
        for node in self.nodes() if self.exists() else []:
            for proc in _processes_using(node.data):
                os.kill(proc, signal.SIGKILL)
        if purge:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- observation ---------------------------------------------------------------------------------
    def probe(self, node: LabNode, what: str = "live", timeout: float = 2.0) -> bool:
        """An unauthenticated health probe, as a load balancer would do it."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        conn = http.client.HTTPSConnection(node.ip, PORT, context=ctx, timeout=timeout)
        try:
            conn.request("GET", f"/v1/health/{what}")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def cluster_status(self, node: LabNode) -> dict[str, Any]:
        """`CLUSTER:STATUS` as seen by one node."""
        return self.client().kms([node.endpoint], wire.CLUSTER_STATUS, {})

    def formed(self, size: int) -> bool:
        """True when some node sees `size` members, all up, one leader, equal commits, and writes work."""
        for node in self.nodes():
            try:
                status = self.cluster_status(node)
            except CLIError:
                continue
            up = status.get("nodes_up", {})
            if len(up) != size or status.get("nodes_down"):
                continue
            commits = {s.get("commit") for s in up.values()}
            leaders = {s.get("leader_id") for s in up.values()}
            if (
                len(commits) == 1
                and len(leaders) == 1
                and "-1" not in leaders
                and self.probe(node, "ready?write")
            ):
                return True
        return False

    def programs(self) -> dict[str, Any]:
        reply = supervisor.request(self.sock, {"op": "status"})
        programs: dict[str, Any] = reply.get("programs", {})
        return programs

    def status(self) -> list[dict[str, Any]]:
        try:
            programs = self.programs()
        except supervisor.SupervisorError:
            programs = {}
        agents = self.has_agents()
        rows = []
        for node in self.nodes():
            prog = programs.get(node.name, {})
            row: dict[str, Any] = {
                "name": node.name,
                "host": node.host,
                "state": prog.get("state", "not running"),
                "pid": prog.get("pid"),
                "restarts": prog.get("n_restarts", 0),
                "live": self.probe(node, "live", 1.0),
                "ready": self.probe(node, "ready", 1.0),
                "write": self.probe(node, "ready?write", 1.0),
                "node_id": None,
                "role": None,
                "commit": None,
                "leader_id": None,
                "members": None,
                "agent": self.agent_view(node) if agents else None,
            }
            if row["live"]:
                try:
                    status = self.cluster_status(node)
                    me = next(
                        (s for s in status.get("nodes_up", {}).values() if s.get("host") == node.host), None
                    )
                    if me:
                        row.update(
                            node_id=me.get("node_id"),
                            role=me.get("role"),
                            commit=int(me.get("commit", 0)),
                            leader_id=int(me.get("leader_id", -1)),
                            members=len(me.get("nodes", {})),
                        )
                except CLIError as exc:
                    row["error"] = str(exc)
            rows.append(row)
        return rows

    def agent_view(self, node: LabNode) -> dict[str, Any]:
        """What the node's agent says of its node: {"class", "reason"}; class None when it cannot be asked."""
        from agent.io.control import ControlError, DaemonNotRunning, call  # the lab runs without agents too

        try:
            status = call(self.agent_socket(node), "GET", "/v1/status", timeout=3)
        except DaemonNotRunning:
            return {"class": None, "reason": AGENT_NOT_RUNNING}
        except (ControlError, OSError, http.client.HTTPException) as exc:
            return {"class": None, "reason": f"agent does not answer: {exc}"}
        mine = (status.get("local") or {}) if isinstance(status, dict) else {}
        if not isinstance(mine, dict) or "class" not in mine:
            return {"class": None, "reason": "agent has not classified its node yet"}
        return {"class": mine.get("class"), "reason": mine.get("reason")}

    # ---- faults ---------------------------------------------------------------------------------------
    def fault(self, name: str, kind: str) -> str:
        node = self.node(name)
        if kind not in FAULTS:
            raise LabError(f"unknown fault {kind!r}: choose one of {', '.join(FAULTS)}")
        if kind.startswith("agent-"):
            if not self.has_agents():
                raise LabError(f"this lab runs no agents: there is no agent of {node.name} to {kind[6:]}")
            op = kind[6:]
            if op == "kill":  # SIGKILL: no clean stop; the supervisor restarts it, as systemd would
                reply = supervisor.request(
                    self.sock, {"op": "kill", "name": f"{node.name}-agent", "signal": "KILL"}
                )
                if not reply.get("ok"):
                    raise LabError(f"kill the agent of {node.name}: {reply.get('error')}")
                return f"{node.name}: kmagent killed with SIGKILL (the supervisor restarts it)"
            reply = supervisor.request(self.sock, {"op": op, "name": f"{node.name}-agent"})
            if not reply.get("ok"):
                raise LabError(f"{op} the agent of {node.name}: {reply.get('error')}")
            return f"{node.name}: kmagent {'stopped' if op == 'stop' else 'started'}"
        if kind == "isolate":
            others = [n.name for n in self.nodes() if n.name != node.name]
            if not others:
                raise LabError(
                    f"{node.name} is the only node of this lab: there is nothing to cut it off from"
                )
            self.partition([node.name], others)
            return f"{node.name}: isolated (its agent and its minkms no longer reach the other nodes, nor they it)"
        if kind == "heal":
            self.heal()
            return f"{node.name}: healed (every isolation and partition of this lab removed)"
        if kind == "disk-loss":
            wipe(node.data)
            self._signal(node, "KILL")
            return f"{node.name}: storage wiped and minkms killed (it restarts on an empty disk)"
        if kind == "corrupt":
            corrupt(node.data)
            self._signal(node, "KILL")
            return f"{node.name}: kms.db corrupted and minkms killed (it now fails at every start)"
        if kind == "kill":
            self._signal(node, "KILL")
            return f"{node.name}: minkms killed with SIGKILL (the supervisor restarts it)"
        reply = supervisor.request(self.sock, {"op": kind, "name": node.name})
        if not reply.get("ok"):
            raise LabError(f"{kind} {node.name}: {reply.get('error')}")
        return f"{node.name}: minkms {'stopped' if kind == 'stop' else 'started'}"

    # ---- partitions of the nodes' network --------------------------------------------------------------
    @property
    def _nft_table(self) -> str:
        return "kmlab_" + str(self.meta()["subnet"]).replace(".", "_")

    def partition(self, *groups: list[str]) -> str:
        """Cut all traffic between the nodes' addresses across groups (nftables; root only).

        Everything a node sends to another comes from its own address: the agents' peer links and their live
        probes of other nodes' minkms (peer.source), and the emulated minkms' cluster traffic (its --address),
        so both are cut. Traffic from 127.0.0.1 passes: each agent's `minkms` CLI to its own node, and the
        lab's own probes and clients (an operator's console).
        """
        names = [n for g in groups for n in g]
        if len(set(names)) != len(names):
            raise LabError("a node can be in one group only")
        ips = {n: self.node(n).ip for n in names}
        rules = [
            f"add rule inet {self._nft_table} out ip saddr {ips[a]} ip daddr {ips[b]} drop"
            for i, g in enumerate(groups)
            for j, h in enumerate(groups)
            if i != j
            for a in g
            for b in h
        ]
        self.heal()
        script = "\n".join(
            [
                f"add table inet {self._nft_table}",
                f"add chain inet {self._nft_table} out {{ type filter hook output priority 0; }}",
                *rules,
            ]
        )
        _nft(script)
        return "partitioned: " + " | ".join(",".join(g) for g in groups)

    def heal(self) -> str:
        """Remove every partition of this lab (nothing to do when there is none)."""
        if (
            shutil.which("nft")
            and subprocess.run(
                ["nft", "list", "table", "inet", self._nft_table], capture_output=True, check=False
            ).returncode
            == 0
        ):
            _nft(f"delete table inet {self._nft_table}")
        return "healed: no partition"

    def _signal(self, node: LabNode, sig: str) -> None:
        reply = supervisor.request(self.sock, {"op": "kill", "name": node.name, "signal": sig})
        if not reply.get("ok"):
            raise LabError(f"kill {node.name}: {reply.get('error')}")


def _toml_value(value: object) -> str:
    """A timing or policy value for the agents' TOML: counts bare (crash_loop_restarts), booleans as TOML
    booleans, durations quoted ("30s")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text if text.isdigit() else json.dumps(text)


def _nft(script: str) -> None:
    if not shutil.which("nft"):
        raise LabError("partitions need nftables (apt-get install nftables) and root")
    proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"nft failed: {proc.stderr.strip()}")


def wipe(data: Path) -> None:
    """Empty a storage directory (keep the directory itself, as a mount point would stay). An entry that vanishes
    meanwhile is gone already: the agent's storage probe creates and deletes its own file in there every round."""
    for item in data.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink(missing_ok=True)


def corrupt(data: Path) -> None:
    """Overwrite the start of the database file and drop its WAL, as a torn disk would."""
    db = data / "kms.db"
    if not db.exists():
        raise LabError(f"{db} does not exist: nothing to corrupt")
    with open(db, "r+b") as fh:
        fh.write(os.urandom(4096))
        fh.flush()
        os.fsync(fh.fileno())
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)


def _write_secret(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _processes_using(data: Path) -> list[int]:
    """PIDs of emulator servers still serving `data` (left over after a supervisor crash)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "server" in cmdline and str(data) in cmdline:
            found.append(int(proc.info["pid"]))
    return found


def _source_root() -> str:
    """The directory that holds the `emulator` package, so that children import the same code."""
    return str(Path(__file__).resolve().parents[2])
