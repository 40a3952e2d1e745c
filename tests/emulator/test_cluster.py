"""Cluster semantics (reference/minkms.md §5), shown with real processes and real TLS, refusals included."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from emulator.lab.lab import Lab, LabNode, wait_for, wipe
from emulator.lab.workload import create_keys, verify_keys


def stat(lab: Lab, node: LabNode) -> dict[str, Any]:
    proc = lab.minkms("stat", "--json", node=node)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def own(status: dict[str, Any], node: LabNode) -> dict[str, Any]:
    for s in status["nodes_up"].values():
        if s["host"] == node.host:
            result: dict[str, Any] = s
            return result
    raise AssertionError(f"{node.host} missing from {status}")


def add_key(lab: Lab, name: str, node: LabNode | None = None) -> Any:
    return lab.minkms("add-key", name, node=node, check=False)


# ---- status ---------------------------------------------------------------------------------------------
def test_stat_json_is_the_protojson_of_cluster_status(shared_lab: Lab) -> None:
    status = stat(shared_lab, shared_lab.nodes()[0])
    assert set(status) == {"nodes_up", "nodes_down"}
    assert sorted(status["nodes_up"]) == ["0", "1", "2"] and status["nodes_down"] == {}
    roles = sorted(s["role"] for s in status["nodes_up"].values())
    assert roles == ["Follower", "Follower", "Leader"]
    for node_id, s in status["nodes_up"].items():
        assert s["node_id"] == int(node_id)
        assert isinstance(s["commit"], str) and s["commit"].isdigit()  # uint64 -> string
        assert isinstance(s["leader_id"], str) and int(s["leader_id"]) >= 0  # sint64 -> string
        assert s["uptime"].endswith("s") and float(s["uptime"][:-1]) >= 0  # Duration
        assert s["api_version"] == "v1" and s["version"]
        assert set(s["nodes"]) == {"0", "1", "2"}
    assert len({s["leader_id"] for s in status["nodes_up"].values()}) == 1


def test_ls_lists_id_status_role_uptime_host(shared_lab: Lab) -> None:
    out = shared_lab.minkms("ls").stdout.splitlines()
    assert out[0].split() == ["ID", "STATUS", "ROLE", "UPTIME", "HOST"]
    hosts = {line.split()[-1] for line in out[1:]}
    assert hosts == {n.host for n in shared_lab.nodes()}
    assert all(line.split()[1] == "online" for line in out[1:])


def test_health_endpoints_and_version_are_unauthenticated(shared_lab: Lab) -> None:
    import http.client
    import ssl

    node = shared_lab.nodes()[1]
    ctx = ssl.create_default_context(cafile=str(shared_lab.ca_cert))

    def get(path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(node.ip, 7373, context=ctx, timeout=5)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()

    assert get("/v1/health/live")[0] == 200
    assert get("/v1/health/ready")[0] == 200
    assert get("/v1/health/ready?write")[0] == 200
    status, body = get("/version")
    assert status == 200 and json.loads(body)["api_version"] == "v1"
    status, body = get("/v1/health/metrics")  # needs an identity
    assert status == 401 and b"not authenticated" in body


def test_metrics_with_the_api_key_are_openmetrics(shared_lab: Lab) -> None:
    client = shared_lab.client()
    headers, body = client.ok([shared_lab.nodes()[0].endpoint], "GET", "/v1/health/metrics")
    text = body.decode()
    assert "application/openmetrics-text" in headers["content-type"]
    assert "minkms_cluster_nodes 3" in text and text.rstrip().endswith("# EOF")


def test_a_wrong_api_key_is_refused_with_a_clear_message(shared_lab: Lab) -> None:
    import os
    import subprocess
    import sys

    from emulator.hsm import new_api_key

    env = {**os.environ, **shared_lab.env(), "MINIO_KMS_API_KEY": new_api_key()}
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "ls"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0
    assert "access denied" in proc.stderr
    env.pop("MINIO_KMS_API_KEY")
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "ls"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1 and "no API key" in proc.stderr


def test_server_certificate_is_verified_unless_insecure(shared_lab: Lab, tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, **shared_lab.env(), "HOME": str(tmp_path)}
    env.pop("MINIO_KMS_TLS_CA")
    run = [sys.executable, "-m", "emulator", "ls"]
    proc = subprocess.run(run, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "cannot verify the TLS certificate" in proc.stderr
    assert subprocess.run([*run, "-k"], env=env, capture_output=True, text=True, timeout=30).returncode == 0
    cas = tmp_path / ".minkms" / "certs" / "CAs"
    cas.mkdir(parents=True)
    (cas / "lab.crt").write_bytes(shared_lab.ca_cert.read_bytes())
    assert subprocess.run(run, env=env, capture_output=True, text=True, timeout=30).returncode == 0


def test_a_list_of_servers_falls_back_to_the_next_one(shared_lab: Lab) -> None:
    import os
    import subprocess
    import sys

    dead = shared_lab.nodes()[0].ip.rsplit(".", 1)[0] + ".200:7373"
    env = {
        **os.environ,
        **shared_lab.env(),
        "MINIO_KMS_SERVER": f"https://{dead},{shared_lab.nodes()[2].endpoint}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "ls-key"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


# ---- writes need every node -------------------------------------------------------------------------------
def test_writes_fail_while_a_member_is_down_and_work_again_after_edit_rm(lab3: Lab) -> None:
    n1, n2, n3 = lab3.nodes()
    assert add_key(lab3, "before").returncode == 0
    down_id = own(stat(lab3, n3), n3)["node_id"]
    lab3.fault(n3.name, "stop")
    wait_for(lambda: not lab3.probe(n1, "ready?write"), 20, "write readiness to drop")
    assert lab3.probe(n1, "ready") and lab3.probe(n2, "ready")  # reads still work
    refused = add_key(lab3, "during")
    assert refused.returncode == 1
    assert "writes need all 3 nodes" in refused.stderr
    assert lab3.minkms("ls-key", node=n2).stdout.split() == ["before"]  # a read on one node works

    status = stat(lab3, n1)
    assert status["nodes_down"] == {str(down_id): n3.host}

    lab3.minkms("edit", n2.endpoint, "--rm", str(down_id))
    # spread to the reachable survivor
    wait_for(lambda: n3.host not in own(stat(lab3, n1), n1)["nodes"].values(), 10, "the edit to spread")
    wait_for(lambda: lab3.probe(n1, "ready?write"), 20, "writes to work again")
    assert add_key(lab3, "after", node=n1).returncode == 0
    assert sorted(lab3.minkms("ls-key", node=n2).stdout.split()) == ["after", "before"]


def test_edit_refuses_unknown_ids_and_the_receiving_node(shared_lab: Lab) -> None:
    n1 = shared_lab.nodes()[0]
    my_id = own(stat(shared_lab, n1), n1)["node_id"]
    proc = shared_lab.minkms("edit", n1.endpoint, "--rm", "42", check=False)
    assert proc.returncode == 1 and "node 42 is not a member" in proc.stderr
    proc = shared_lab.minkms("edit", n1.endpoint, "--rm", str(my_id), check=False)
    assert proc.returncode == 1 and "surviving node" in proc.stderr
    proc = shared_lab.minkms("edit", n1.endpoint, check=False)
    assert proc.returncode == 2 and "--rm" in proc.stderr


def test_edit_can_remove_several_nodes_at_once(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(3)
    n1, n2, n3 = lab.nodes()
    ids = [str(own(stat(lab, n), n)["node_id"]) for n in (n2, n3)]
    lab.fault(n2.name, "stop")
    lab.fault(n3.name, "stop")
    lab.minkms("edit", n1.endpoint, "--rm", ids[0], "--rm", ids[1])
    wait_for(lambda: lab.probe(n1, "ready?write"), 20, "the single survivor to lead and accept writes")
    assert add_key(lab, "alone", node=n1).returncode == 0


# ---- membership changes -----------------------------------------------------------------------------------
def test_add_refuses_a_member_and_a_node_of_another_multi_node_cluster(
    lab3: Lab, lab_factory: Callable[..., Lab]
) -> None:
    n1, n2, _ = lab3.nodes()
    proc = lab3.minkms("add", n2.endpoint, node=n1, check=False)
    assert proc.returncode == 1 and "already a member" in proc.stderr
    other = lab_factory(2, name="other")
    proc = lab3.minkms("add", other.nodes()[1].endpoint, node=n1, check=False)
    assert proc.returncode == 1
    # the other lab has its own CA (and HSM key): its certificate is not trusted by this cluster
    assert "cannot verify the TLS certificate" in proc.stderr


def test_add_is_refused_while_the_cluster_cannot_write(lab3: Lab, lab_factory: Callable[..., Lab]) -> None:
    n1, _, n3 = lab3.nodes()
    lab3.fault(n3.name, "stop")
    wait_for(lambda: not lab3.probe(n1, "ready?write"), 20, "write readiness to drop")
    spare = lab_factory(1, name="spare").nodes()[0]
    proc = lab3.minkms("add", spare.endpoint, node=n1, check=False)
    assert proc.returncode == 1 and "cannot add" in proc.stderr


def test_add_is_refused_without_a_leader(lab3: Lab) -> None:
    n1, n2, n3 = lab3.nodes()
    lab3.fault(n2.name, "stop")
    lab3.fault(n3.name, "stop")
    wait_for(lambda: own(stat(lab3, n1), n1)["leader_id"] == "-1", 20, "the lone node to lose its leader")
    assert lab3.probe(n1, "ready")  # still serves reads
    proc = add_key(lab3, "x", node=n1)
    assert proc.returncode == 1 and "no leader" in proc.stderr


def test_a_wiped_node_comes_up_as_node_0_of_a_new_cluster(lab3: Lab) -> None:
    n1, n2, _ = lab3.nodes()
    assert add_key(lab3, "k").returncode == 0
    cluster_before = own(stat(lab3, n1), n1)["nodes"]
    lab3.fault(n2.name, "disk-loss")
    wait_for(lambda: lab3.probe(n2, "live"), 20, "the wiped node to restart")
    wait_for(lambda: own(stat(lab3, n2), n2)["role"] == "Leader", 20, "the wiped node to lead itself")
    me = own(stat(lab3, n2), n2)
    assert me["node_id"] == 0 and me["nodes"] == {"0": n2.host} and me["commit"] == "0"
    assert lab3.minkms("ls-key", node=n2).stdout.strip() == ""  # empty answers: the hazard
    assert own(stat(lab3, n1), n1)["nodes"] == cluster_before  # the cluster still counts it as a member
    assert not lab3.probe(n1, "ready?write")


def test_rm_needs_a_healthy_cluster_and_a_removed_node_cannot_restart(lab3: Lab) -> None:
    n1, n2, n3 = lab3.nodes()
    lab3.fault(n3.name, "stop")
    wait_for(lambda: not lab3.probe(n1, "ready?write"), 20, "write readiness to drop")
    proc = lab3.minkms("rm", n2.endpoint, node=n1, check=False)
    assert proc.returncode == 1 and "minkms edit --rm" in proc.stderr
    lab3.fault(n3.name, "start")
    wait_for(lambda: lab3.probe(n1, "ready?write"), 20, "the cluster to heal")

    lab3.minkms("rm", n2.endpoint, node=n1)
    assert n2.host not in own(stat(lab3, n1), n1)["nodes"].values()
    wait_for(lambda: not lab3.probe(n2, "ready"), 10, "the removed node to stop serving as a member")
    assert lab3.probe(n2, "live")
    leader_id = own(stat(lab3, n1), n1)["node_id"]
    rogue = lab3.minkms("edit", n2.endpoint, "--rm", str(leader_id), node=n1, check=False)
    assert rogue.returncode == 1 and "not part of cluster" in rogue.stderr  # a removed node evicts nobody
    assert n1.host in own(stat(lab3, n3), n3)["nodes"].values()
    lab3.fault(n2.name, "kill")  # restarted by the supervisor with its old state
    wait_for(lambda: lab3.programs()[n2.name]["n_restarts"] >= 2, 30, "the removed node to fail at start")
    log = (__import__("pathlib").Path(n2.dir) / "minkms.log").read_text()
    assert "server not part of cluster" in log
    assert lab3.probe(n1, "ready?write")


def test_an_isolated_node_removed_by_edit_learns_it_when_it_returns(lab3: Lab) -> None:
    n1, n2, n3 = lab3.nodes()
    n3_id = own(stat(lab3, n3), n3)["node_id"]
    lab3.fault(n3.name, "stop")
    lab3.minkms("edit", n1.endpoint, "--rm", str(n3_id))
    lab3.fault(n3.name, "start")
    wait_for(lambda: lab3.probe(n3, "live"), 20, "the old node to start")
    wait_for(lambda: not lab3.probe(n3, "ready"), 20, "the old node to learn it was removed")
    assert own(stat(lab3, n1), n1)["nodes"].keys() == own(stat(lab3, n2), n2)["nodes"].keys()
    assert lab3.probe(n1, "ready?write")


def test_a_new_leader_is_elected_when_the_leader_dies(lab3: Lab) -> None:
    nodes = lab3.nodes()
    status = stat(lab3, nodes[0])
    leader_id = next(s for s in status["nodes_up"].values() if s["role"] == "Leader")["node_id"]
    leader = next(n for n in nodes if own(status, n)["node_id"] == leader_id)
    others = [n for n in nodes if n is not leader]
    lab3.fault(leader.name, "stop")

    def new_leader() -> bool:
        s = own(stat(lab3, others[0]), others[0])
        return s["leader_id"] not in ("-1", str(leader_id))

    wait_for(new_leader, 20, "a new leader")
    lab3.fault(leader.name, "start")
    wait_for(lambda: lab3.formed(3), 20, "the old leader to rejoin as a follower")


def test_restart_restarts_nodes_in_place(lab3: Lab) -> None:
    n1, n2, _ = lab3.nodes()
    pid = lab3.programs()[n2.name]["pid"]

    def started_between() -> tuple[float, float]:
        """When n2's server started, on this clock: bounds, since a CLI call takes a while (longer on Debian's
        stack, where comparing bare uptimes once failed: a restart seen late looked older than a fresh start)."""
        before = time.monotonic()
        uptime = float(own(stat(lab3, n2), n2)["uptime"].rstrip("s"))
        return before - uptime, time.monotonic() - uptime

    _, first_start_latest = started_between()
    lab3.minkms("restart", n2.endpoint, node=n1)

    def restarted() -> bool:
        return started_between()[0] > first_start_latest

    wait_for(restarted, 20, "the node to restart")
    assert lab3.programs()[n2.name]["pid"] == pid  # re-exec in place, as a service manager sees it
    wait_for(lambda: lab3.formed(3), 20, "the cluster to be whole again")


def test_added_node_receives_the_whole_state(lab3: Lab) -> None:
    n1, _, n3 = lab3.nodes()
    keys = create_keys(lab3, 5)
    n3_id = own(stat(lab3, n3), n3)["node_id"]
    lab3.fault(n3.name, "stop")
    wipe(n3.data)
    lab3.minkms("edit", n1.endpoint, "--rm", str(n3_id))
    lab3.fault(n3.name, "start")
    wait_for(lambda: lab3.probe(n3, "live"), 20, "the wiped node to start")
    lab3.minkms("add", n1.endpoint, n3.endpoint)  # the two-argument form
    wait_for(lambda: lab3.formed(3), 20, "the cluster to be whole")
    new_id = own(stat(lab3, n3), n3)["node_id"]
    assert new_id not in (n3_id, 0)  # a fresh ID, never reused
    assert verify_keys(lab3, keys, [n3]) == []


@pytest.mark.parametrize("args", [["frobnicate"], ["edit"], ["add"], ["restore"]])
def test_usage_errors_exit_2(shared_lab: Lab, args: list[str]) -> None:
    assert shared_lab.minkms(*args, check=False).returncode == 2
