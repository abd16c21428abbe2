"""
Streamable HTTP across several edges: three edges sharing a real
redis-server, behind Debian's HAProxy in round robin without stickiness, so
that each of the agent's requests (its initialise, its POSTs, its event
stream's GETs) may land on any edge.  The agent's traffic is spread over all
three and the end-to-end mixin's core cases pass.

Public requests go to the edge where the agent's link lives (the edge that
took its initialise): relaying public traffic between edges is issue 20's.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.end_to_end import EndToEndMixin
from tests.harness import TunnelHarness, eventually, listen_upstream
from tests.redis_servers import MISSING as REDIS_MISSING
from tests.redis_servers import LoggedProcess, candidate_port, start_server
from tunneld.config import AgentGrant, EdgeStateSection
from tunneld.registry import available_transports

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
EDGES = 3


def _missing() -> str | None:
    if HAPROXY is None:
        return "haproxy is needed (scripts/setup-tests installs it)"
    if REDIS_MISSING:
        return REDIS_MISSING
    if "streamable-http" not in available_transports():
        return "tunneld-streamable-http is not installed (scripts/setup-tests)"
    return None


class HAProxy:
    """HAProxy in the foreground: round robin over the edges, each request on its own, its log on stdout."""

    def __init__(self, case: TestCase, servers: list[int]) -> None:
        self.directory = os.path.abspath(case.mktemp())
        os.makedirs(self.directory)
        self.servers = servers
        self.port = 0
        self.process: LoggedProcess | None = None
        case.addCleanup(lambda: defer.ensureDeferred(self.stop()))

    async def start(self) -> None:
        for _ in range(10):
            port = candidate_port()
            config = os.path.join(self.directory, "haproxy.cfg")
            with open(config, "w") as f:
                f.write(
                    "global\n  log stdout format raw local0 info\n  maxconn 1000\n"
                    "defaults\n  mode http\n  log global\n  option httplog\n"
                    "  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n"
                    f"frontend agents\n  bind 127.0.0.1:{port}\n  default_backend edges\n"
                    # Round robin, no stickiness: every request is balanced on its own.
                    "backend edges\n  balance roundrobin\n"
                    + "".join(
                        f"  server edge{i} 127.0.0.1:{server}\n" for i, server in enumerate(self.servers)
                    )
                )
            process = LoggedProcess(f"haproxy on {port}")
            assert HAPROXY is not None
            process.process = reactor.spawnProcess(  # type: ignore[attr-defined]
                process, HAPROXY, [HAPROXY, "-db", "-f", config], env={}, path=self.directory
            )
            self.process = process
            self.port = port
            try:
                await eventually(lambda: self._listening(), "haproxy to listen", timeout=30)
                await self._probe()
                return
            except Exception:
                await process.stop()
                if "cannot bind" in process.output.lower():
                    continue
                raise
        raise AssertionError("no free port for haproxy after 10 tries")

    def _listening(self) -> bool:
        assert self.process is not None
        if not self.process.running:
            raise AssertionError(f"haproxy ended:\n{self.process.output[-2000:]}")
        import socket

        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    async def _probe(self) -> None:
        """A connection accepted and closed, so the log's first line is no test's."""
        done: defer.Deferred[None] = defer.Deferred()

        class Closer(Protocol):
            def connectionMade(self) -> None:  # noqa: N802
                self.transport.loseConnection()  # type: ignore[union-attr]

            def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
                done.callback(None)

        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(Factory.forProtocol(Closer))
        await done

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()

    def requests_by_server(self, method: str) -> dict[str, int]:
        """How many C{method} requests HAProxy logged for each edge."""
        assert self.process is not None
        counts = {f"edge{i}": 0 for i in range(len(self.servers))}
        for line in self.process.output.splitlines():
            if f'"{method} /tunnel' not in line:
                continue
            for server in counts:
                if f" edges/{server} " in line:
                    counts[server] += 1
        return counts


class Cluster:
    """A redis-server, three edges sharing it, HAProxy in front of their agent endpoints."""

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.harnesses: list[TunnelHarness] = []
        self.haproxy: HAProxy | None = None

    async def start(
        self, grants: list[AgentGrant] | None = None, **table: Any
    ) -> None:
        redis = await start_server(self.case)
        for i in range(EDGES):
            harness = TunnelHarness(
                self.case, "streamable-http", {"listen": "tcp:0:interface=127.0.0.1", **table}
            )
            await harness.start_edge(
                grants,
                state=EdgeStateSection(
                    backend="redis", redis_url=redis.url, edge_name=f"edge{i}",
                    heartbeat_interval=1.0, edge_ttl=5.0,
                ),
            )
            self.harnesses.append(harness)
        self.haproxy = HAProxy(self.case, [h.link_address().port for h in self.harnesses])
        await self.haproxy.start()

    @property
    def url(self) -> str:
        assert self.haproxy is not None
        return f"http://127.0.0.1:{self.haproxy.port}/tunnel"

    def owner(self) -> TunnelHarness:
        """The edge where the agent's link (its session) lives."""
        (owner,) = [h for h in self.harnesses if h.edge is not None and h.edge.sessions.sessions]
        return owner


_CORE = [
    "test_get",
    "test_post",
    "test_bodyless_responses",
    "test_forwarding_headers",
    "test_concurrent_requests",
    "test_keep_alive",
    "test_unknown_host",
    "test_upstream_timeout",
    "test_stalled_reader_stalls_only_its_stream",
    "test_agent_gone_mid_response",
    "test_large_upload_streams",
]
# Left out for the suite's time: test_large_download_streams passes (200 MB from the
# agent, two thirds of its POSTs relayed to the owning edge through Redis) but takes
# about 50 s; test_slow_reader_is_not_a_stalled_upstream passes in about 17 s.  The
# mixin's tests that build their own single edge do not apply here.


class _ClusterTunnel:
    """EndToEndMixin's tunnel, with the agent dialling the edges through HAProxy."""

    transport = "streamable-http"
    link_sockets = 5
    skip = _missing()
    timeout = 120

    async def tunnel(
        self, grants: list[AgentGrant] | None = None, **agent: Any
    ) -> tuple[TunnelHarness, Any]:
        cluster = Cluster(self)  # type: ignore[arg-type]
        await cluster.start(grants)
        port, upstream = await listen_upstream(self)
        first = cluster.harnesses[0]
        service = await first.start_agent({"url": cluster.url}, [("app.test", port)], **agent)
        owner = cluster.owner()
        if owner is not first:
            first.agents.remove(service)
            owner.agents.append(service)
        self.cluster = cluster
        return owner, upstream


# The mixin's helpers and its core cases, over the cluster.
StreamableHTTPClusterEndToEnd = type(
    "StreamableHTTPClusterEndToEnd",
    (_ClusterTunnel, TestCase),
    {
        "__doc__": "The end-to-end mixin's core cases, the agent's link spread over three edges by HAProxy.",
        "__module__": __name__,
        **{
            name: value for name, value in vars(EndToEndMixin).items()
            if not name.startswith(("test_", "__")) and name not in ("tunnel", "transport", "link_sockets", "timeout")
        },
        **{name: vars(EndToEndMixin)[name] for name in _CORE},
    },
)


class SpreadTests(TestCase):
    """The agent's requests land on every edge, and nothing it carries is lost."""

    skip = _missing()
    timeout = 180

    async def test_agent_traffic_spread_over_all_edges(self) -> None:
        """Through HAProxy (round robin, no stickiness) the agent's POSTs and event-stream GETs land on all three edges, which share its connection through Redis: every exchange comes back whole, with one connection and one session throughout."""
        cluster = Cluster(self)
        await cluster.start(max_stream_duration=0.5)
        port, _ = await listen_upstream(self)
        agent = await cluster.harnesses[0].start_agent(
            {"url": cluster.url, "resume_initial": 0.02, "healthy_after": 0.2}, [("app.test", port)],
        )
        owner = cluster.owner()
        wire = agent.link.wire  # type: ignore[union-attr]
        assert cluster.haproxy is not None
        for i in range(60):
            payload = b"%d " % i * (1 + (i * 37) % 4000)
            code, _, body = await owner.request("app.test", "/echo", b"POST", payload)
            self.assertEqual((code, body), (200, payload))
        await eventually(lambda: wire.streams_opened >= 4, "event streams resumed on other edges")
        posts = cluster.haproxy.requests_by_server("POST")
        gets = cluster.haproxy.requests_by_server("GET")
        self.assertTrue(all(posts.values()), posts)  # frames POSTed to every edge
        self.assertGreaterEqual(sum(1 for n in gets.values() if n), 2, gets)  # streams from more than one
        self.assertEqual(wire.duplicates, 0)
        self.assertIs(agent.link.wire, wire)  # type: ignore[union-attr]
        self.assertEqual(
            [len(h.edge.transports["streamable-http"].connections) for h in cluster.harnesses  # type: ignore[union-attr]
             if h is owner], [1],
        )
        self.assertEqual(sum(len(h.edge.sessions.sessions) for h in cluster.harnesses), 1)  # type: ignore[union-attr]
