"""
Session-aware routing for MCP and ACP servers behind a tunnel: with several
agents serving one tunnel, a session's requests (Mcp-Session-Id,
Acp-Session-Id) go to the agent that served its first one; a session whose
agent is gone is refused with session_gone (404, which tells an MCP client to
start over) rather than sent to an agent that does not know it; per-method
limits (Mcp-Method).  Real edges, agents and MCP-shaped upstreams on loopback,
the agents on the streamable-HTTP transport.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
from typing import Any

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.end_to_end import EventCollector
from tests.harness import TunnelHarness, eventually, listen_upstream
from tests.test_router import FakeLink
from tunneld.config import LimitsSection, MethodLimits, TunnelLimits
from tunneld.model.keys import tunnel_key
from tunneld.model.messages import TunnelSpec
from tunneld.model.reasons import Reason
from tunneld.registry import available_transports
from tunneld.router import AgentSession, Route, Router

MISSING = (
    None if "streamable-http" in available_transports()
    else "tunneld-streamable-http is not installed (scripts/setup-tests)"
)
CURL = shutil.which("curl")
REFUSED = "refused {method} {host}{target} from {peer}: {reason}"


class MCPServer(Resource):
    """
    An MCP server's streamable-HTTP endpoint, as far as routing sees it:
    initialize creates a session and names it in Mcp-Session-Id; a request
    naming a session it does not know is answered 404, as the spec says.  ACP
    clients name their session themselves (Acp-Session-Id); it is taken as is.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.sessions: set[str] = set()
        self.acp_sessions: set[str] = set()
        self.held: list[Any] = []
        self.counter = itertools.count(1)

    def render_POST(self, request: Any) -> Any:  # noqa: N802
        message = json.loads(request.content.read() or b"{}")
        method = message.get("method", "")
        request.setHeader(b"Content-Type", b"application/json")
        acp = request.getHeader(b"acp-session-id")
        if acp is not None:
            self.acp_sessions.add(acp.decode())
            return json.dumps({"server": self.name, "session": acp.decode()}).encode()
        if method == "initialize":
            session = f"{self.name}-{next(self.counter)}"
            self.sessions.add(session)
            request.setHeader(b"Mcp-Session-Id", session.encode())
            return json.dumps({"server": self.name, "session": session}).encode()
        session = (request.getHeader(b"mcp-session-id") or b"").decode()
        if session not in self.sessions:
            request.setResponseCode(404)
            return b'{"error": "unknown session"}'
        if method == "tools/call" and message.get("params", {}).get("hold"):
            self.held.append(request)
            return NOT_DONE_YET
        return json.dumps({"server": self.name, "session": session, "method": method}).encode()

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.write(json.dumps({"server": self.name, "released": True}).encode())
            request.finish()


class SessionAffinityTests(TestCase):
    skip = MISSING
    timeout = 120

    async def mcp_tunnel(
        self, agents: int = 2, limits: LimitsSection | None = None, **edge: Any
    ) -> tuple[TunnelHarness, list[MCPServer]]:
        harness = TunnelHarness(self, "streamable-http", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge(limits=limits, **edge)
        url = f"http://127.0.0.1:{harness.link_address().port}/tunnel"
        servers = []
        for i in range(agents):
            server = MCPServer(f"agent{i}")
            port, _ = await listen_upstream(self, server)
            await harness.start_agent({"url": url}, [("mcp.test", port)], agent_id=f"agent{i}")
            servers.append(server)
        return harness, servers

    async def call(
        self, harness: TunnelHarness, method: str, session: str = "", header: str = "Mcp-Session-Id",
        params: dict[str, Any] | None = None, mcp_method: bool = False,
    ) -> tuple[int, Any, Any]:
        headers = {b"content-type": [b"application/json"], b"accept": [b"application/json"]}
        if session:
            headers[header.encode()] = [session.encode()]
        if mcp_method:
            headers[b"mcp-method"] = [method.encode()]
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}})
        code, response_headers, content = await harness.request(
            "mcp.test", "/mcp", b"POST", body.encode(), headers
        )
        try:
            answer = json.loads(content)
        except ValueError:
            answer = content.decode()
        return code, response_headers, answer

    async def test_mcp_session_requests_go_to_the_agent_that_created_it(self) -> None:
        """Twenty sessions initialised over two agents (both get some): every later request of a session reaches its creator, whatever the load, over HTTP/1.1 keep-alive."""
        harness, servers = await self.mcp_tunnel()
        created: dict[str, str] = {}
        for _ in range(20):
            code, headers, answer = await self.call(harness, "initialize")
            self.assertEqual(code, 200, answer)
            (session,) = headers.getRawHeaders(b"mcp-session-id")
            created[session.decode()] = answer["server"]
        self.assertEqual(set(created.values()), {"agent0", "agent1"})  # the load was spread
        for _ in range(3):
            for session, server in created.items():
                code, _, answer = await self.call(harness, "tools/list", session)
                self.assertEqual((code, answer["server"]), (200, server), session)
        assert harness.edge is not None
        self.assertEqual(harness.edge.router.affinities(), 20)

    async def test_http2_requests_follow_the_session_too(self) -> None:
        """Over cleartext HTTP/2 (curl --http2-prior-knowledge) a session's requests reach its creator as over HTTP/1.1; a session id first seen in an HTTP/2 response binds as well."""
        if CURL is None:
            raise SkipTest("curl is needed (scripts/setup-tests installs it)")
        harness, servers = await self.mcp_tunnel(public_h2c_listen=["tcp:0:interface=127.0.0.1"])
        assert harness.edge is not None
        port = harness.edge.public_h2c[0].address.port

        async def h2(method: str, session: str = "") -> tuple[str, dict[str, Any]]:
            out, head = self.mktemp(), self.mktemp()
            args = [
                "-sS", "--http2-prior-knowledge", "--max-time", "30", "-o", out, "-D", head,
                "-H", "Host: mcp.test", "-H", "Content-Type: application/json",
                "--data", json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}),
                f"http://127.0.0.1:{port}/mcp",
            ]
            if session:
                args[1:1] = ["-H", f"Mcp-Session-Id: {session}"]
            _, err, code = await getProcessOutputAndValue(CURL, args, env=dict(os.environ))
            self.assertEqual(code, 0, err)
            with open(head) as f:
                self.assertTrue(f.readline().startswith("HTTP/2 200"))
                headers = f.read().lower()
            with open(out) as f:
                return headers, json.load(f)

        created: dict[str, str] = {}
        while set(created.values()) != {"agent0", "agent1"}:
            headers, answer = await h2("initialize")
            self.assertIn(f"mcp-session-id: {answer['session']}", headers)
            created[answer["session"]] = answer["server"]
        for session, server in created.items():
            for _ in range(2):
                _, answer = await h2("tools/list", session)
                self.assertEqual(answer["server"], server)

    async def test_acp_session_sticks_from_its_first_request(self) -> None:
        """An ACP client names its session itself: from the first request carrying it, all its requests reach one agent."""
        harness, servers = await self.mcp_tunnel()
        for n in range(12):
            for _ in range(4):
                code, _, answer = await self.call(harness, "session/prompt", f"acp-{n}", "Acp-Session-Id")
                self.assertEqual(code, 200, answer)
        self.assertEqual(servers[0].acp_sessions & servers[1].acp_sessions, set())
        self.assertEqual(len(servers[0].acp_sessions | servers[1].acp_sessions), 12)
        self.assertTrue(servers[0].acp_sessions and servers[1].acp_sessions)

    async def test_session_of_a_gone_agent_is_refused_not_rerouted(self) -> None:
        """When an agent stops, its sessions' requests get 404 session_gone (an MCP client then starts over) and a log line; the other agent's sessions carry on; a new session goes to the agent left."""
        log = EventCollector(self)
        harness, servers = await self.mcp_tunnel()
        created: dict[str, str] = {}
        while set(created.values()) != {"agent0", "agent1"}:
            code, headers, answer = await self.call(harness, "initialize")
            created[headers.getRawHeaders(b"mcp-session-id")[0].decode()] = answer["server"]
        gone = harness.agents[0]
        await gone.stopService()
        assert harness.edge is not None
        await eventually(lambda: len(harness.edge.sessions.sessions) == 1, "the agent's session to go")  # type: ignore[union-attr]
        for session, server in created.items():
            code, headers, answer = await self.call(harness, "tools/list", session)
            if server == "agent0":
                self.assertEqual(code, 404, answer)
                self.assertEqual(headers.getRawHeaders(b"tunnel-error"), [b"session_gone"])
                self.assertIn("start a new session", answer)
            else:
                self.assertEqual((code, answer["server"]), (200, "agent1"))
        self.assertEqual(len(servers[1].sessions), sum(1 for s in created.values() if s == "agent1"))
        refused = [e for e in log.matching(REFUSED) if e["reason"] == "session_gone"]
        self.assertEqual(len(refused), sum(1 for s in created.values() if s == "agent0"))
        code, headers, answer = await self.call(harness, "initialize")
        self.assertEqual((code, answer["server"]), (200, "agent1"))

    async def test_per_method_rate_limit_and_concurrency(self) -> None:
        """With [limits.tunnels."mcp.test".methods."tools/call"] a tools/call past its rate gets 429 rate_limited naming the method, one past its concurrency 503 cap_reached; other methods pass meanwhile."""
        limits = LimitsSection(tunnels={"mcp.test": TunnelLimits(methods={
            "tools/call": MethodLimits(rate=0.001, burst=3, max_streams=1),
        })})
        harness, servers = await self.mcp_tunnel(agents=1, limits=limits)
        _, headers, _ = await self.call(harness, "initialize")
        session = headers.getRawHeaders(b"mcp-session-id")[0].decode()
        held = defer.ensureDeferred(
            self.call(harness, "tools/call", session, params={"hold": True}, mcp_method=True)
        )
        await eventually(lambda: servers[0].held, "the first tools/call to reach the server")
        code, headers, answer = await self.call(harness, "tools/call", session, mcp_method=True)
        self.assertEqual((code, headers.getRawHeaders(b"tunnel-error")), (503, [b"cap_reached"]))
        self.assertIn("1 tools/call exchanges in flight", answer)
        for _ in range(5):
            code, _, answer = await self.call(harness, "tools/list", session, mcp_method=True)
            self.assertEqual(code, 200, answer)
        servers[0].release()
        code, _, answer = await held
        self.assertEqual((code, answer["released"]), (200, True))
        code, _, _ = await self.call(harness, "tools/call", session, mcp_method=True)
        self.assertEqual(code, 200)
        # The burst of 3 is spent (one held, one refused at the cap, one now): the next waits for the rate.
        code, headers, answer = await self.call(harness, "tools/call", session, mcp_method=True)
        self.assertEqual((code, headers.getRawHeaders(b"tunnel-error")), (429, [b"rate_limited"]))
        self.assertIn("too many tools/call requests on this tunnel", answer)
        self.assertTrue(headers.getRawHeaders(b"retry-after"))
        code, _, _ = await self.call(harness, "tools/list", session, mcp_method=True)
        self.assertEqual(code, 200)


class AffinityTableTests(SynchronousTestCase):
    """The router's table of sessions, on its own."""

    def session(self, router: Router, name: str, streams: int = 0) -> AgentSession:
        session = AgentSession(name, name, FakeLink(name, streams))
        router.register(session, TunnelSpec("mcp.test"))
        return session

    def test_bound_session_wins_over_load_and_goes_gone(self) -> None:
        """A bound id reaches its agent session however loaded; once that session is unregistered (or draining) the id reads session_gone, never a new pick."""
        router = Router(random.Random(1))
        busy = self.session(router, "busy", streams=50)
        self.session(router, "idle")
        key = tunnel_key(TunnelSpec("mcp.test"))
        router.bind(key, "mcp:s1", busy)
        for _ in range(5):
            route = router.route("mcp.test", "/mcp", "mcp:s1")
            assert isinstance(route, Route)
            self.assertIs(route.session, busy)
        first = router.route("mcp.test", "/mcp", "acp:new")  # unknown: picked (least loaded), then bound
        assert isinstance(first, Route)
        self.assertEqual(first.session.agent_id, "idle")
        busy.draining = True
        self.assertIs(router.route("mcp.test", "/mcp", "mcp:s1"), Reason.SESSION_GONE)
        busy.draining = False
        router.unregister(busy)
        self.assertIs(router.route("mcp.test", "/mcp", "mcp:s1"), Reason.SESSION_GONE)
        router.bind(key, "mcp:s2", busy)  # a response arriving late from a gone session binds nothing
        route = router.route("mcp.test", "/mcp", "mcp:s2")
        assert isinstance(route, Route)
        self.assertEqual(route.session.agent_id, "idle")

    def test_table_is_bounded_least_recent_first(self) -> None:
        """Past max_affinities the least recently used ids are forgotten first, gone ones included."""
        router = Router(random.Random(1))
        router.max_affinities = 100
        one = self.session(router, "one")
        key = tunnel_key(TunnelSpec("mcp.test"))
        for n in range(100):
            router.bind(key, f"mcp:{n}", one)
        router.route("mcp.test", "/", "mcp:0")  # used again: the newest
        for n in range(100, 150):
            router.bind(key, f"mcp:{n}", one)
        self.assertEqual(router.affinities(), 100)
        self.assertIn((key, "mcp:0"), router._affinity)
        self.assertNotIn((key, "mcp:1"), router._affinity)
        router.unregister(one)
        self.assertEqual(router.affinities(), 100)
        self.assertEqual(router._affinities_of, {})
