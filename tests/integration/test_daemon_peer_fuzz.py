"""The real daemon's peer API under fuzzing (issue 4): whatever node2's certificate sends to node1's agent, the
answer is the right 4xx (or 200 for a request that is really valid), the daemon keeps answering, never crashes,
logs no traceback, and the cluster keeps one anchor that every agent follows.

The requests are near-valid `Report` and `VoteRequest` bodies (valid ones mutated: wrong types, missing and
extra fields, huge strings, out-of-range integers, NaN, deep nesting, another cluster, another sender or
candidate), random JSON and bytes, random paths, methods and content types. Hypothesis is derandomized, so a
CI run is reproducible. Two bugs it found are fixed and kept as tests at the end (a term at the int64 limit wedged
the election; aiohttp 3.8 stalled a kept-alive connection after an early answer to an unread body).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from agent.config import AgentSpec, Config, load_config
from agent.coordination import MAX_TERM, REPORT_PATH, VOTE_PATH
from agent.core import wire
from agent.core.messages import NodeReport, Report, VoteReply, VoteRequest
from agent.io.peers import MAX_BODY, PeerClient, PeerError, client_context
from emulator.lab import pki as lab_pki
from emulator.lab.lab import Lab, LabNode, wait_for
from tests.integration.test_election_lab import one_anchor_followed_by_all, statuses

DEADLINE = 10.0  # generous: only to turn a hang into a failure, never a timing assertion
CLUSTER = "kmlab"  # the lab's cluster name
TARGET, CALLER = "node1", "node2"  # the daemon under test, and the agent whose certificate the fuzzer uses
JSON_TYPES = ("application/json", "application/json; charset=utf-8")
ROUTES: dict[str, type[Any]] = {REPORT_PATH: Report, VOTE_PATH: VoteRequest}


# --------------------------------------------------------------------------------------------------------------
# The lab and the caller's tools


def names(lab: Lab) -> list[str]:
    return [node.name for node in lab.nodes()]


def one_anchor(lab: Lab) -> str:
    return str(
        wait_for(
            lambda: one_anchor_followed_by_all(lab, names(lab)), 60, "one anchor that every agent follows"
        )
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("peerfuzz") / "lab")
    try:
        lab.up(3, heartbeat="100ms", log=lambda _line: None, agents=True)
        one_anchor(lab)  # fuzz a working cluster
        yield lab
    finally:
        lab.down()


@dataclasses.dataclass
class Caller:
    """node2's identity, on a private loop so that hypothesis (synchronous) can drive it."""

    lab: Lab
    loop: asyncio.AbstractEventLoop
    config: Config
    client: PeerClient  # the real peer client, for valid messages
    session: aiohttp.ClientSession  # raw requests with node2's client certificate
    target: AgentSpec
    seq: int = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def post(self, path: str, msg: object, reply_cls: type[Any], config: Config | None = None) -> Any:
        """The real client's POST; with another `config`, as another identity."""
        if config is None:
            return self.run(self.client.post(self.target, path, msg, reply_cls, timeout=DEADLINE))

        async def once() -> Any:
            client = PeerClient(config)
            try:
                return await client.post(self.target, path, msg, reply_cls, timeout=DEADLINE)
            finally:
                await client.close()

        return self.run(once())

    def send(
        self,
        method: str,
        path: str,
        content_type: str | None,
        body: bytes,
        session: aiohttp.ClientSession | None = None,
    ) -> tuple[int, Any]:
        session = session or self.session
        headers = {"Content-Type": content_type} if content_type is not None else {}
        url = URL(f"https://{self.target.address}{path}", encoded=True)

        async def once() -> tuple[int, Any]:
            async with asyncio.timeout(DEADLINE):
                async with session.request(method, url, data=body, headers=headers) as resp:
                    assert resp.content_type == "application/json", (resp.status, await resp.text())
                    return resp.status, await resp.json()

        result: tuple[int, Any] = self.run(once())
        return result

    def still_answers(self) -> None:
        """A valid report is answered with node1's report within DEADLINE (PeerError otherwise)."""
        self.seq += 1
        probe = Report(CLUSTER, CALLER, self.seq, "fuzz-probe", 0, None, None, None)
        reply = self.post(REPORT_PATH, probe, Report)
        assert (reply.sender, reply.cluster) == (TARGET, CLUSTER)


@pytest.fixture(scope="module")
def caller(lab: Lab) -> Iterator[Caller]:
    loop = asyncio.new_event_loop()
    config = load_config(lab.agent_config(lab.node(CALLER)))
    target = config.agent(TARGET)
    assert target is not None

    async def open_session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=client_context(config), local_addr=(lab.node(CALLER).ip, 0))
        return aiohttp.ClientSession(connector=connector)

    session = loop.run_until_complete(open_session())
    c = Caller(lab, loop, config, PeerClient(config), session, target)
    try:
        yield c
    finally:
        loop.run_until_complete(c.client.close())
        loop.run_until_complete(session.close())
        loop.close()


def agent_log(node: LabNode) -> str:
    return (Path(node.dir) / "agent" / "kmagent.log").read_text(errors="replace")


# --------------------------------------------------------------------------------------------------------------
# What to send


VALID_REPORT = wire.encode(
    Report(
        cluster=CLUSTER,
        sender=CALLER,
        seq=1,
        boot="fuzz",
        term=1,
        anchor=None,
        anchor_lease_seconds=None,
        node=NodeReport(
            cls="HEALTHY",
            reason="",
            held_seconds=1.5,
            host="127.0.0.2:7373",
            node_id=1,
            role="follower",
            commit=3,
            leader_id=0,
            members=((0, "127.0.0.1:7373"), (1, "127.0.0.2:7373")),
        ),
        views=(("node1", "HEALTHY", 2.0),),
    )
)
VALID_VOTE = wire.encode(VoteRequest(CLUSTER, 1, CALLER, 1))

INT64 = (wire.INT64_MIN, wire.INT64_MAX)
INTS = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([*INT64, INT64[0] - 1, INT64[1] + 1, 2**53 + 1, -(2**100), 10**30]),
    st.integers(),
)
FLOATS = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5]))
NAMES = st.sampled_from(["node1", "node2", "node3", "node9", "", "NODE2", "node2 ", "kmlab", "other"])
STRINGS = st.one_of(
    NAMES,
    st.text(max_size=12),
    st.integers(wire.MAX_STRING + 1, wire.MAX_STRING + 500).map(lambda n: "x" * n),  # over the string limit
)
JSON = st.recursive(
    st.none() | st.booleans() | INTS | FLOATS | STRINGS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
RAW = "\x00raw:"  # a string value `RAW + text` is written into the JSON body as the bare text
RAW_IN_JSON = re.compile(r'"\\u0000raw:([^"\\]*)"')
TOKENS = st.one_of(
    st.sampled_from(["1e400", "-1e400", "NaN", "-Infinity", "1.0", "-0", "01", "1E2", "0x10", "'x'", "[1,]"]),
    # nested deeper than wire.MAX_DEPTH, up to far deeper than json.loads' recursion limit
    st.integers(wire.MAX_DEPTH - 1, 100_000).map(lambda depth: "[" * depth + "]" * depth),
)
VALUES = st.one_of(JSON, TOKENS.map(lambda token: RAW + token))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON tree (object keys and list indexes), so a mutation can hit nested fields too."""
    found: list[tuple[Any, ...]] = [prefix] if prefix else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found += _paths(child, (*prefix, key))
    return found


def _container(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> Any:
    """`valid` with a few fields replaced, removed or added; often none, so valid messages are sent too."""
    tree = json.loads(json.dumps(valid))
    identity = ("cluster", "sender" if "sender" in tree else "candidate")
    for field in identity:  # who it claims to be, and for which cluster: plausible wrong values
        if draw(st.integers(0, 3)) == 0:
            tree[field] = draw(NAMES)
    for _ in range(draw(st.integers(0, 3))):
        places = _paths(tree)
        if not places:
            break
        op, path = draw(st.sampled_from(["set", "set", "delete", "extra"])), draw(st.sampled_from(places))
        parent = _container(tree, path)
        if op == "set":
            parent[path[-1]] = draw(VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "", "term ", "Sender"]) | st.text(max_size=8))] = draw(
                VALUES
            )
        else:
            parent.append(draw(VALUES))
    return tree


def to_json(value: Any) -> bytes:
    """JSON text of `value`, NaN and infinities included, RAW strings spliced in as they are."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    return RAW_IN_JSON.sub(lambda m: m.group(1), text).encode("utf-8", "surrogatepass")


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str | None
    body: bytes


ROUTE_PATHS = st.sampled_from([REPORT_PATH, VOTE_PATH])
PATHS = st.one_of(
    ROUTE_PATHS,
    ROUTE_PATHS.map(lambda p: p + "?term=1"),
    st.sampled_from(["/v1/peer/report/", "/v1/peer/VOTE", "//v1/peer/vote", "/", "/v1/peer", "/v1/status"]),
    st.text(max_size=30).map(lambda t: "/" + urllib.parse.quote(t, safe="/:@!$&'()*+,;=")),
)
CONTENT_TYPES = st.sampled_from(
    [*JSON_TYPES, *JSON_TYPES, "text/plain", "application/json; charset=latin-1", "application/x-json", None]
)


METHODS = st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])


@st.composite
def mostly(draw: st.DrawFn, value: Any, others: st.SearchStrategy[Any], times: int = 6) -> Any:
    """`value` about `times` times out of `times + 1`, else one of `others`: most requests should get past the
    routing and the content type to the body checks and the handlers."""
    return value if draw(st.integers(0, times)) < times else draw(others)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    body_kind = draw(st.sampled_from(["report", "report", "vote", "vote", "json", "bytes", "huge"]))
    if body_kind in ("report", "vote"):
        route = REPORT_PATH if body_kind == "report" else VOTE_PATH
        path = draw(mostly(route, PATHS))
        tree = draw(mutated(VALID_REPORT if body_kind == "report" else VALID_VOTE))
        body = to_json(tree)
    elif body_kind == "json":
        path, body = draw(PATHS), to_json(draw(VALUES))
    elif body_kind == "bytes":
        path, body = draw(PATHS), draw(st.binary(max_size=300))
    else:  # over the body limit: a valid report with a huge string, or junk
        path = draw(ROUTE_PATHS)
        huge = draw(st.sampled_from([{**VALID_REPORT, "boot": "b" * MAX_BODY}, RAW + "[" * (MAX_BODY + 1)]))
        body = to_json(huge)
    method = draw(mostly("POST", METHODS, 10))
    content_type = draw(mostly(JSON_TYPES[0], CONTENT_TYPES))
    return Request(method, path, content_type, body)


def expectation(req: Request) -> tuple[int, Any]:
    """The status node1 must answer `req` with (its peer API and Coordinator's rules), and the decoded message
    when it reaches a handler."""
    cls = ROUTES.get(urllib.parse.urlsplit(req.path).path)
    if cls is None:
        return 404, None
    if req.method != "POST":
        return 405, None
    if req.content_type not in JSON_TYPES:
        return 400, None
    if len(req.body) > MAX_BODY:
        return 413, None
    try:
        msg = wire.loads(cls, req.body)
    except wire.WireError:
        return 400, None
    if isinstance(msg, Report):
        if msg.sender != CALLER:
            return 403, msg
        if msg.cluster != CLUSTER or msg.term > MAX_TERM or msg.pause_epoch > MAX_TERM:
            return 422, msg
        return 200, msg
    if msg.candidate != CALLER:
        return 403, msg
    return (422 if msg.term > MAX_TERM else 200), msg


def check_answer(req: Request, status: int, answer: Any) -> None:
    expected, msg = expectation(req)
    assert status == expected, (req, status, answer)
    if status != 200:
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"], answer
        return
    if isinstance(msg, Report):
        reply = wire.decode(Report, answer)
        assert (reply.sender, reply.cluster) == (TARGET, CLUSTER)
    else:
        vote = wire.decode(VoteReply, answer)
        assert (vote.voter, vote.cluster, vote.term, vote.round) == (TARGET, CLUSTER, msg.term, msg.round)
        assert vote.granted or vote.reason


# --------------------------------------------------------------------------------------------------------------
# The fuzzing


def test_fuzzed_peer_requests_get_4xx_and_never_crash_or_stall_the_daemon(lab: Lab, caller: Caller) -> None:
    agent = f"{TARGET}-agent"
    before = lab.programs()[agent]
    assert before["pid"], before
    seen: dict[int, int] = {}

    @settings(
        max_examples=500,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(req=requests())
    def fuzz(req: Request) -> None:
        status, answer = caller.send(req.method, req.path, req.content_type, req.body)
        seen[status] = seen.get(status, 0) + 1
        check_answer(req, status, answer)
        caller.still_answers()

    fuzz()
    # the generator reached every outcome, including handlers that answered
    assert {200, 400, 403, 404, 405, 413, 422} <= set(seen), seen

    after = lab.programs()[agent]
    assert (after["pid"], after["n_restarts"]) == (before["pid"], before["n_restarts"]), (before, after)
    for node in lab.nodes():
        log = agent_log(node)
        assert "Traceback" not in log and "peer_task_failed" not in log, (node.name, log[-3000:])
    one_anchor(lab)  # fuzzed reports may have moved node1's view for a moment; the election settles again


# --------------------------------------------------------------------------------------------------------------
# Explicit cases


def test_a_report_naming_another_sender_is_forbidden(caller: Caller) -> None:
    forged = Report(CLUSTER, "node3", 1, "forged", 1, "node3", 5.0, None)
    with pytest.raises(PeerError) as info:
        caller.post(REPORT_PATH, forged, Report)
    assert info.value.status == 403
    assert "report names sender 'node3', certificate says 'node2'" in str(info.value)


def test_a_vote_request_for_another_candidate_is_forbidden(caller: Caller) -> None:
    with pytest.raises(PeerError) as info:
        caller.post(VOTE_PATH, VoteRequest(CLUSTER, 10**6, "node3", 1), VoteReply)
    assert info.value.status == 403
    assert "vote request for 'node3' sent by 'node2'" in str(info.value)


def test_a_report_of_another_cluster_is_refused(caller: Caller) -> None:
    with pytest.raises(PeerError) as info:
        caller.post(REPORT_PATH, Report("other", CALLER, 1, "other", 1, None, None, None), Report)
    assert info.value.status == 422
    assert "wrong cluster 'other'" in str(info.value)


def test_a_vote_request_of_another_cluster_is_refused_without_a_vote(lab: Lab, caller: Caller) -> None:
    before = statuses(lab, [TARGET])[TARGET]["election"]["ballot_term"]
    reply = caller.post(VOTE_PATH, VoteRequest("other", MAX_TERM, CALLER, 1), VoteReply)
    assert not reply.granted and "wrong cluster 'other'" in reply.reason
    assert statuses(lab, [TARGET])[TARGET]["election"]["ballot_term"] == before  # a refusal changes nothing


def identity(caller: Caller, cert: Path, key: Path) -> Config:
    """node2's config with another certificate and key."""
    tls = dataclasses.replace(caller.config.tls, cert=cert, key=key)
    return dataclasses.replace(caller.config, tls=tls)


def test_a_certificate_of_another_ca_is_refused_in_the_handshake(caller: Caller, tmp_path: Path) -> None:
    lab_pki.create_ca(tmp_path / "other-ca", name="another CA")
    ip = caller.lab.node(CALLER).ip
    cert, key = lab_pki.issue(tmp_path / "other-ca", tmp_path / "leaf", CALLER, ips=[ip], dns=[CALLER])
    with pytest.raises(PeerError) as info:
        caller.post(
            REPORT_PATH,
            Report(CLUSTER, CALLER, 1, "x", 0, None, None, None),
            Report,
            identity(caller, cert, key),
        )
    assert info.value.status is None  # refused in TLS, before any HTTP
    caller.still_answers()


def test_a_lab_ca_certificate_of_an_unknown_agent_gets_403(caller: Caller, tmp_path: Path) -> None:
    ip = caller.lab.node(CALLER).ip
    cert, key = lab_pki.issue(caller.lab.dir / "ca", tmp_path / "leaf", "node9", ips=[ip], dns=["node9"])
    with pytest.raises(PeerError) as info:
        caller.post(VOTE_PATH, VoteRequest(CLUSTER, 1, "node9", 1), VoteReply, identity(caller, cert, key))
    assert info.value.status == 403
    assert "certificate name 'node9' is not a configured agent" in str(info.value)


def test_a_client_without_certificate_is_refused(caller: Caller) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(caller.lab.ca_cert))
    body = wire.dumps(Report(CLUSTER, CALLER, 1, "x", 0, None, None, None))
    request = (
        b"POST %s HTTP/1.1\r\nHost: node1\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (REPORT_PATH.encode(), len(body), body)
    )
    host, port = caller.target.address.rsplit(":", 1)

    async def exchange() -> bytes:
        try:
            connect = asyncio.open_connection(host, int(port), ssl=ctx)
            reader, writer = await asyncio.wait_for(connect, DEADLINE)
        except (ssl.SSLError, ConnectionError):
            return b""
        try:
            writer.write(request)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), DEADLINE)
        except (ssl.SSLError, ConnectionError):
            return b""  # TLS 1.3: the missing certificate is refused after the client's side of the handshake
        finally:
            writer.close()

    assert caller.run(exchange()) == b""  # nothing answered, not even an HTTP error
    caller.still_answers()


# --------------------------------------------------------------------------------------------------------------
# The bugs the fuzzing found


def test_a_kept_alive_connection_answers_after_an_early_answer_to_an_unread_body(caller: Caller) -> None:
    body = b'{"cluster": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # under MAX_BODY, never read
    early = (
        Request("POST", "//v1/peer/vote", JSON_TYPES[0], body),
        Request("POST", VOTE_PATH, "text/plain", body),
    )

    async def kept_alive() -> aiohttp.ClientSession:  # one connection, reused for every request
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(caller.config), limit=1)
        )

    session = caller.run(kept_alive())
    try:
        for req in early * 8:  # on aiohttp 3.8 it happens about every other time
            status, answer = caller.send(req.method, req.path, req.content_type, req.body, session)
            check_answer(req, status, answer)
    finally:
        caller.run(session.close())


def test_a_term_at_the_int64_limit_is_refused_and_the_election_goes_on(tmp_path: Path) -> None:
    """A forged huge term once spread through the reports and left no next term to stand in (found by the fuzzer)."""
    lab = Lab(tmp_path / "lab")
    loop = asyncio.new_event_loop()
    try:
        lab.up(3, heartbeat="100ms", log=lambda _line: None, agents=True)
        config = load_config(lab.agent_config(lab.node(CALLER)))
        client = PeerClient(config)
        target = config.agent(TARGET)
        assert target is not None
        stopped = one_anchor(lab)
        poison = Report(CLUSTER, CALLER, 1, "poison", wire.INT64_MAX, None, None, None)
        vote = VoteRequest(CLUSTER, wire.INT64_MAX, CALLER, 1)
        try:
            for path, msg, reply in ((REPORT_PATH, poison, Report), (VOTE_PATH, vote, VoteReply)):
                with pytest.raises(PeerError) as refused:
                    loop.run_until_complete(client.post(target, path, msg, reply, timeout=DEADLINE))
                assert refused.value.status == 422, refused.value
        finally:
            loop.run_until_complete(client.close())
        assert all(s["term"] <= MAX_TERM for s in statuses(lab).values())
        lab.fault(stopped, "agent-stop")  # the survivors elect a new anchor, in a new term
        survivors = [n for n in names(lab) if n != stopped]
        wait_for(lambda: one_anchor_followed_by_all(lab, survivors), 60, "a new anchor among the survivors")
    finally:
        loop.close()
        lab.down()
