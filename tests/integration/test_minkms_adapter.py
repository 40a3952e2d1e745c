"""The minkms adapter against real processes: emulated labs (real TLS, real CLI) and small fake CLIs."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.core.model import HealthObs
from agent.io.minkms import OUTPUT_CAP, RC_FENCED, TRUST_STORE, Minkms, MinkmsSettings
from emulator.hsm import new_api_key
from emulator.lab.lab import Lab, LabNode, wipe

BAD_KEY = new_api_key()


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Callable[[], Lab]]:
    labs: list[Lab] = []

    def make() -> Lab:
        lab = Lab(tmp_path / f"lab{len(labs)}")
        labs.append(lab)
        lab.up(3, heartbeat="100ms", log=lambda _line: None)
        return lab

    yield make
    for lab in labs:
        lab.down()


@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A 3-node lab for the tests that neither change membership nor break nodes."""
    lab = Lab(tmp_path_factory.mktemp("minkms") / "lab")
    try:
        lab.up(3, heartbeat="100ms", log=lambda _line: None)
        yield lab
    finally:
        lab.down()


def settings(lab: Lab, node: LabNode, home: Path, **overrides: object) -> MinkmsSettings:
    base: dict[str, object] = {
        "cli": (sys.executable, "-m", "emulator"),
        "server": node.endpoint,
        "api_key": lab.api_key,
        "ca": lab.ca_cert,
        "home": home,
    }
    return MinkmsSettings(**{**base, **overrides})  # type: ignore[arg-type]


def fake(script: str, tmp_path: Path, **overrides: object) -> MinkmsSettings:
    """A fake CLI: `python -c SCRIPT`; the adapter's arguments arrive in sys.argv[1:]."""
    ca = tmp_path / "ca.crt"
    if not ca.exists():
        ca.write_text("not a certificate, only copied\n")
    base: dict[str, object] = {
        "cli": (sys.executable, "-c", script),
        "server": "https://127.0.0.1:1",
        "api_key": lambda: SECRET,
        "ca": ca,
        "home": tmp_path / "home",
    }
    return MinkmsSettings(**{**base, **overrides})  # type: ignore[arg-type]


SECRET = "k1:" + "S3cr3t" * 7 + "x"


async def eventually(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Await an async condition until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- a healthy cluster --------------------------------------------------------------------------------------
async def test_cluster_status_of_a_healthy_cluster(shared_lab: Lab, tmp_path: Path) -> None:
    nodes = shared_lab.nodes()
    async with Minkms(settings(shared_lab, nodes[0], tmp_path / "home")) as minkms:
        view = await minkms.cluster_status()
    assert view.error is None
    assert view.nodes_down == ()
    assert [n.host for n in view.nodes_up] == [n.host for n in nodes]
    assert [n.node_id for n in view.nodes_up] == [0, 1, 2]
    assert sorted(n.role for n in view.nodes_up) == ["Follower", "Follower", "Leader"]
    leader = next(n for n in view.nodes_up if n.role == "Leader")
    for status in view.nodes_up:
        assert status.leader_id == leader.node_id
        assert status.members == ((0, nodes[0].host), (1, nodes[1].host), (2, nodes[2].host))
        assert status.commit is not None and status.commit >= 2
        assert status.uptime is not None and status.uptime > 0


async def test_probe_of_a_healthy_node(shared_lab: Lab, tmp_path: Path) -> None:
    node = shared_lab.nodes()[1]
    async with Minkms(settings(shared_lab, node, tmp_path / "home", probe_timeout=2.0)) as minkms:
        for _ in range(3):  # the session is kept and reused
            health = await minkms.probe()
            assert (health.live, health.ready, health.write) == (True, True, True)
            assert health.latency is not None and 0 < health.latency < 2.0


async def test_the_trust_store_is_prepared_and_used(shared_lab: Lab, tmp_path: Path) -> None:
    # A CA *directory*: MINIO_KMS_TLS_CA is not set, so the CLI can only trust the lab through $HOME.
    ca_dir = tmp_path / "cas"
    ca_dir.mkdir()
    shutil.copy(shared_lab.ca_cert, ca_dir / "lab-ca.crt")
    home = tmp_path / "home"
    store = home / TRUST_STORE
    store.mkdir(parents=True)
    home.chmod(0o755)
    (store / "stale.crt").write_text("removed by the adapter\n")
    async with Minkms(settings(shared_lab, shared_lab.nodes()[0], home, ca=ca_dir)) as minkms:
        view = await minkms.cluster_status()
        assert view.error is None and len(view.nodes_up) == 3
        assert sorted(p.name for p in store.iterdir()) == ["lab-ca.crt"]
        assert (store / "lab-ca.crt").read_bytes() == shared_lab.ca_cert.read_bytes()
        assert home.stat().st_mode & 0o777 == 0o700
        # refreshed when the source changes
        (ca_dir / "lab-ca.crt").write_bytes(shared_lab.ca_cert.read_bytes() + b"# rotated\n")
        assert (await minkms.cluster_status()).error is None
        assert (store / "lab-ca.crt").read_bytes().endswith(b"# rotated\n")
        # and without a trust store the CLI cannot verify the lab
        shutil.rmtree(store)
        untrusted = await Minkms(settings(shared_lab, shared_lab.nodes()[0], home, ca=None)).cluster_status()
        assert untrusted.error is not None and "verify" in untrusted.error


async def test_backup_and_a_refused_restore(shared_lab: Lab, tmp_path: Path) -> None:
    node = shared_lab.nodes()[0]
    target = tmp_path / "backup.db.gzip"
    async with Minkms(settings(shared_lab, node, tmp_path / "home")) as minkms:
        for _ in range(2):  # the second run overwrites (--force)
            result = await minkms.backup(target)
            assert result.ok, result.error
        assert gzip.decompress(target.read_bytes())
        refused = await minkms.restore(node.host, target)
    assert not refused.ok
    assert refused.error is not None and "restore refused" in refused.error
    assert refused.argv[-2:] == (node.endpoint, str(target))


# ---- failures -------------------------------------------------------------------------------------------------
async def test_a_wrong_api_key_is_reported_and_never_shown(shared_lab: Lab, tmp_path: Path) -> None:
    node = shared_lab.nodes()[0]
    minkms = Minkms(settings(shared_lab, node, tmp_path / "home", api_key=lambda: BAD_KEY))
    view = await minkms.cluster_status()
    assert view.error is not None and "access denied" in view.error
    assert BAD_KEY not in view.error
    result = await minkms.run("stat", "--json")
    assert BAD_KEY not in repr(result)
    await minkms.close()


async def test_a_missing_cli(tmp_path: Path) -> None:
    minkms = Minkms(fake("", tmp_path, cli=("/nonexistent/minkms",)))
    result = await minkms.run("stat", "--json")
    assert (result.returncode, result.error) == (127, "minkms CLI not found: /nonexistent/minkms")
    assert (await minkms.cluster_status()).error == (
        "minkms stat --json failed: minkms CLI not found: /nonexistent/minkms"
    )


async def test_no_server_configured(tmp_path: Path) -> None:
    # a witness host has no local minkms: the daemon passes server=""
    async with Minkms(fake("", tmp_path, server="")) as minkms:
        result = await minkms.run("stat", "--json")
        assert (result.returncode, result.error) == (125, "no minkms server configured")
        assert await minkms.probe() == HealthObs()
        assert (
            await minkms.cluster_status()
        ).error == "minkms stat --json failed: no minkms server configured"


async def test_an_unreadable_api_key_is_an_error_not_an_exception(tmp_path: Path) -> None:
    def no_key() -> str:
        return (tmp_path / "missing.key").read_text()

    result = await Minkms(fake("", tmp_path, api_key=no_key)).run("ls")
    assert result.returncode == 125
    assert (
        result.error == f"cannot prepare the minkms call: No such file or directory: {tmp_path}/missing.key"
    )


async def test_a_timeout_kills_the_child_and_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "print('partial', flush=True)\n"
        "time.sleep(30)\n"
    )
    minkms = Minkms(fake(script, tmp_path, command_timeout=1.0))
    started = time.monotonic()
    result = await minkms.run("stat", "--json")
    assert time.monotonic() - started < 10
    assert (result.returncode, result.error, result.ok) == (-9, "timed out after 1s", False)
    assert result.stdout == "partial\n"
    child, grandchild = (int(p) for p in pids.read_text().split())
    assert not alive(child)  # killed and reaped
    await eventually(lambda: not alive(grandchild), "the grandchild to be gone", timeout=5)
    # a per-call timeout overrides the default
    quick = await minkms.run("stat", timeout=0.5)
    assert quick.error == "timed out after 0.5s"


async def test_the_key_is_redacted_from_what_the_cli_prints(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "key = os.environ['MINIO_KMS_API_KEY']\n"
        "print('out', key)\n"
        "sys.stderr.write(f'minkms: error: invalid API key {key}; another k2:AAAAAAAAAAAAAAAAAAAAAAAA\\n')\n"
        "sys.exit(1)\n"
    )
    result = await Minkms(fake(script, tmp_path)).run("stat")
    assert result.error == "minkms: error: invalid API key ***; another k2:***"
    assert SECRET not in result.stdout and SECRET not in result.stderr
    assert result.stdout == "out ***\n"


async def test_environment_and_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMAGENT_UNRELATED", "must not leak")
    monkeypatch.setenv("MINIO_KMS_SERVER", "https://elsewhere:7373")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    script = (
        "import hashlib, json, os, sys\n"
        "env = dict(os.environ)\n"
        "env['MINIO_KMS_API_KEY'] = hashlib.sha256(env['MINIO_KMS_API_KEY'].encode()).hexdigest()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'env': env}))\n"
    )
    minkms = Minkms(fake(script, tmp_path, insecure=True, server="127.0.0.1:7373"))
    result = await minkms.edit_remove("127.0.0.2:7373", [2, 4])
    assert result.ok, result.error
    seen = json.loads(result.stdout)
    assert seen["argv"] == ["edit", "https://127.0.0.2:7373", "--rm", "2", "--rm", "4", "-k"]
    env = seen["env"]
    assert env["MINIO_KMS_SERVER"] == "https://127.0.0.2:7373"  # edit is sent to the surviving HOST
    assert env["MINIO_KMS_API_KEY"] == hashlib.sha256(SECRET.encode()).hexdigest()
    assert env["HOME"] == str(tmp_path / "home")
    assert env["MINIO_KMS_TLS_CA"] == str(tmp_path / "ca.crt")
    assert "KMAGENT_UNRELATED" not in env and "HTTPS_PROXY" not in env
    assert all(SECRET not in arg for arg in result.argv)
    assert (tmp_path / "home" / TRUST_STORE / "ca.crt").read_text() == "not a certificate, only copied\n"

    seen = json.loads((await minkms.add("127.0.0.1:7373", "https://127.0.0.3")).stdout)
    assert seen["argv"] == ["add", "https://127.0.0.1:7373", "https://127.0.0.3:7373", "-k"]
    assert seen["env"]["MINIO_KMS_SERVER"] == "https://127.0.0.1:7373"
    seen = json.loads((await minkms.run("stat", "--json")).stdout)
    assert seen["env"]["MINIO_KMS_SERVER"] == "https://127.0.0.1:7373"  # the local node by default
    seen = json.loads((await minkms.backup(Path("rel/b.gz"))).stdout)
    assert seen["argv"] == ["backup", f"{os.getcwd()}/rel/b.gz", "--force", "-k"]
    for bad in ("", "--api-key=x"):
        with pytest.raises(ValueError):
            await minkms.add("127.0.0.1:7373", bad)
    with pytest.raises(ValueError):
        await minkms.edit_remove("127.0.0.1:7373", [])
    with pytest.raises(ValueError):
        await minkms.edit_remove("127.0.0.1:7373", [-1])


async def test_runaway_output_is_capped(tmp_path: Path) -> None:
    script = "import sys\nfor _ in range(96): sys.stdout.write('x' * 65536)\n"
    minkms = Minkms(fake(script, tmp_path))
    result = await minkms.run("stat", "--json")
    assert result.ok and result.truncated
    assert len(result.stdout) == OUTPUT_CAP
    assert (await minkms.cluster_status()).error == f"stat --json output exceeds {OUTPUT_CAP} bytes"


async def test_probe_of_nothing_listening(tmp_path: Path) -> None:
    async with Minkms(fake("", tmp_path, server="https://127.0.0.1:1", insecure=True)) as minkms:
        health = await minkms.probe()
    assert (health.live, health.ready, health.write, health.latency) == (None, None, None, None)


# ---- faults and the documented recovery ------------------------------------------------------------------------
async def test_probe_after_a_node_stops(lab_factory: Callable[[], Lab], tmp_path: Path) -> None:
    lab = lab_factory()
    node1, _, node3 = lab.nodes()
    lab.fault("node3", "stop")
    async with (
        Minkms(settings(lab, node1, tmp_path / "home")) as survivor,
        Minkms(settings(lab, node3, tmp_path / "home")) as stopped,
    ):

        async def survivor_not_writable() -> bool:
            return (await survivor.probe()).write is False

        await eventually(survivor_not_writable, "node1 to report not ready for writes")
        health = await survivor.probe()
        assert (health.live, health.ready) == (True, True)

        async def stopped_silent() -> bool:
            return (await stopped.probe()).live is None

        await eventually(stopped_silent, "node3 to stop answering")
        view = await survivor.cluster_status()
        assert view.nodes_down == ((2, node3.host),)


async def test_edit_remove_and_add_recover_a_wiped_node(
    lab_factory: Callable[[], Lab], tmp_path: Path
) -> None:
    lab = lab_factory()
    node1, _, node3 = lab.nodes()
    async with (
        Minkms(settings(lab, node1, tmp_path / "home")) as anchor,
        Minkms(settings(lab, node3, tmp_path / "home")) as target,
    ):
        before = await anchor.cluster_status()
        lost = before.node_by_host(node3.host)
        assert lost is not None
        lab.fault("node3", "stop")
        wipe(node3.data)

        removed = await anchor.edit_remove(node1.host, [lost.node_id])
        assert removed.ok, removed.error

        async def node3_gone() -> bool:
            view = await anchor.cluster_status()
            me = view.node_by_host(node1.host)
            return me is not None and node3.host not in dict(me.members).values()

        await eventually(node3_gone, "node3 to leave node1's membership")

        lab.fault("node3", "start")

        async def node3_fresh() -> bool:
            view = await target.cluster_status()
            me = view.node_by_host(node3.host)
            return me is not None and me.members == ((0, node3.host),)

        await eventually(node3_fresh, "node3 to come up as a fresh single node")

        added = await anchor.add(node1.endpoint, node3.endpoint)
        assert added.ok, added.error

        async def formed() -> bool:
            return await asyncio.to_thread(lab.formed, 3)

        await eventually(formed, "the cluster to form again with 3 nodes", timeout=60)
        view = await anchor.cluster_status()
        assert sorted(n.host for n in view.nodes_up) == sorted(n.host for n in lab.nodes())


# ---- fenced commands (agent.core.fencing, issue 12) --------------------------------------------------------
async def test_a_fenced_command_that_may_not_leave_is_never_started(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    m = Minkms(fake(f"open({str(marker)!r}, 'w').write('ran')", tmp_path))
    calls: list[bool] = []

    def fence(running: bool) -> str | None:
        calls.append(running)
        return "this agent no longer holds the anchor lease"

    result = await m.edit_remove("127.0.0.1:7373", [2], fence)
    assert result.returncode == RC_FENCED and "not started: this agent no longer holds" in result.error
    assert calls == [False] and not marker.exists()


async def test_a_fenced_command_is_killed_as_soon_as_its_fence_objects(tmp_path: Path) -> None:
    """A command that runs on while the lease ends is killed (its process group), not left to finish late."""
    pidfile = tmp_path / "pid"
    script = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    m = Minkms(fake(script, tmp_path, command_timeout=120.0))
    lost = asyncio.Event()

    def fence(running: bool) -> str | None:
        return "the anchor lease has 0.4s left" if running and lost.is_set() else None

    async def lose_the_lease() -> None:
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the fake CLI never started"
            await asyncio.sleep(0.01)
        lost.set()

    started = time.monotonic()
    loser = asyncio.ensure_future(lose_the_lease())
    result = await m.add("127.0.0.1:7373", "127.0.0.2:7373", fence)
    await loser
    assert result.returncode == RC_FENCED and "killed while running" in result.error
    assert time.monotonic() - started < 30  # not the 60 s the child wanted, nor the 120 s timeout
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


async def test_a_fenced_command_that_may_go_on_completes(tmp_path: Path) -> None:
    m = Minkms(fake("import time; time.sleep(0.5); print('ok')", tmp_path))
    result = await m.add("127.0.0.1:7373", "127.0.0.2:7373", lambda _running: None)
    assert result.ok and result.stdout.strip() == "ok"
