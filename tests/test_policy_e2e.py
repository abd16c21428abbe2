"""
Policy end to end on real loopback sockets: an edge, an agent and an
upstream in the test's reactor.  A burst over the rate gets exactly the
expected 429s; a cap refuses only the newcomer; and after 10,000 requests of
which many are refused, timed out or cut off, every counter is back to zero.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import h11
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from tests.harness import TunnelHarness, listen_upstream, sleep
from tunneld.config import LimitsSection, TunnelLimits

HOST = "app.test"
SLOW = "slow.test"


class _Closed(Exception):
    pass


class KeepAliveClient(Protocol):
    """One keep-alive HTTP/1.1 connection: send a request, await its status."""

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.CLIENT)
        self.waiting: defer.Deferred[int] | None = None
        self.status = 0
        self.closed = False
        self.gone: defer.Deferred[None] = defer.Deferred()

    def request(self, path: str, host: str = HOST) -> defer.Deferred[int]:
        assert self.transport is not None
        d: defer.Deferred[int] = defer.Deferred()
        if self.closed or self.conn.our_state is not h11.IDLE:
            d.errback(_Closed())
            return d
        self.waiting = d
        self.transport.write(self.conn.send(h11.Request(
            method="GET", target=path, headers=[("host", host)]
        )))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        return d

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self._fail()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                d, self.waiting = self.waiting, None
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                else:
                    self.closed = True
                    assert self.transport is not None
                    self.transport.loseConnection()
                if d is not None:
                    d.callback(self.status)
            elif isinstance(event, h11.ConnectionClosed):
                self._fail()
                return

    def _fail(self) -> None:
        self.closed = True
        d, self.waiting = self.waiting, None
        if d is not None:
            d.errback(_Closed())

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self._fail()
        self.gone.callback(None)


class _Raw(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.gone: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.gone.callback(None)


class PolicyEndToEndTests(TestCase):
    # Ten thousand requests through edge and agent take 20 s alone and
    # several minutes on a machine busy with other work: a bound for a hang.
    timeout = 480

    async def tunnel(
        self, limits: LimitsSection, hosts: tuple[str, ...] = (HOST,), **agent: Any
    ) -> tuple[TunnelHarness, Any]:
        port, upstream = await listen_upstream(self)
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge(limits=limits)
        address = harness.link_address()
        await harness.start_agent(
            {"url": f"ws://127.0.0.1:{address.port}/tunnel"}, [(h, port) for h in hosts], **agent
        )
        return harness, upstream

    async def connect(self, harness: TunnelHarness) -> KeepAliveClient:
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", harness.public_port), KeepAliveClient()
        )
        self.addCleanup(lambda: client.gone if client.transport.abortConnection() is None else None)  # type: ignore[union-attr]
        return client

    async def test_burst_gets_exactly_the_expected_429s(self) -> None:
        """30 requests at once against a burst of 8 (and a negligible rate): 8 answered, 22 refused with 429."""
        harness, upstream = await self.tunnel(LimitsSection(rate=0.001, burst=8))
        answers = await defer.gatherResults(
            [defer.ensureDeferred(harness.request(HOST, "/hello")) for _ in range(30)]
        )
        codes = Counter(code for code, _, _ in answers)
        self.assertEqual(codes, Counter({200: 8, 429: 22}))
        refused = [headers for code, headers, _ in answers if code == 429]
        self.assertEqual({tuple(h.getRawHeaders(b"tunnel-error")) for h in refused},
                         {(b"rate_limited",)})
        retry = {int(h.getRawHeaders(b"retry-after")[0]) for h in refused}
        self.assertTrue(all(r >= 1 for r in retry), retry)
        self.assertEqual(upstream.requests, 8)

    async def test_cap_refuses_only_the_newcomer(self) -> None:
        """At max_streams the third exchange gets 503 cap_reached; the two in flight complete intact."""
        harness, upstream = await self.tunnel(LimitsSection(max_streams=2))
        first, second, third = [await self.connect(harness) for _ in range(3)]
        pending = [first.request("/hang"), second.request("/hang")]
        while len(upstream.hanging) < 2:
            await sleep(0.01)
        self.assertEqual(await third.request("/hello"), 503)
        self.assertEqual(harness.edge.policy.snapshot()["refusals"], {"cap_reached": 1})  # type: ignore[union-attr]
        for request in upstream.hanging:
            request.write(b"done")
            request.finish()
        self.assertEqual(await defer.gatherResults(pending), [200, 200])
        self.assertEqual(await third.request("/hello"), 200)

    async def test_proxy_protocol_from_trusted_balancer(self) -> None:
        """With proxy_protocol on, a trusted peer's PROXY v1 header sets the client the agent is told about."""
        harness, upstream = await self.tunnel(
            LimitsSection(proxy_protocol=True, trusted_proxies=["127.0.0.0/8"])
        )
        raw = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", harness.public_port), _Raw()
        )
        raw.transport.write(  # type: ignore[union-attr]
            b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 80\r\n"
            b"GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        )
        await raw.gone
        self.assertIn(b"HTTP/1.1 200 ", raw.data)
        self.assertIn(b"x-forwarded-for: 198.51.100.7\n", raw.data)

    async def test_failing_upstream_probe_takes_agent_out_of_routing(self) -> None:
        """An agent whose http health check fails reports it; the edge routes the tunnel to the healthy agent only."""
        from tunneld.agent.service import AgentService
        from tunneld.config import AgentConfig, AgentSection, TunnelSection
        from tunneld.registry import transport_options

        harness, upstream = await self.tunnel(LimitsSection())
        port, _ = await listen_upstream(self)
        section = AgentSection(id="sick", transports=["websocket"])
        config = AgentConfig(
            section,
            [TunnelSection(hostname=HOST, upstream=f"tcp:host=127.0.0.1:port={port}",
                           health_check="http:/missing", health_interval=0.2)],
            {"websocket": {"url": f"ws://127.0.0.1:{harness.link_address().port}/tunnel"}},
            "(test)",
        )
        sick = AgentService(
            config, transport_options(["websocket"], config.transports, "(test)", edge=False),
            reactor,
        )
        sick.startService()
        self.addCleanup(sick.stopService)
        await sick.ready
        edge = harness.edge
        assert edge is not None
        while not any(s.unhealthy for s in edge.sessions.sessions.values()):
            await sleep(0.02)
        for _ in range(20):
            self.assertEqual((await harness.request(HOST, "/hello"))[0], 200)
        self.assertEqual(upstream.requests, 20)

    async def test_ten_thousand_requests_leave_every_counter_at_zero(self) -> None:
        """10,000 requests, many refused (429, 503), timed out (504) or cut off: all counters return to 0."""
        # app.test is rate limited per client; slow.test is not, so that its
        # hanging (504) and cut-off requests always reach the agent.  More
        # workers than the per-client connection cap make 503s certain.
        limits = LimitsSection(
            client_rate=50.0, client_burst=20, max_streams=40, max_connections_per_client=48,
            tunnels={SLOW: TunnelLimits(client_rate=0.0)},
        )
        harness, upstream = await self.tunnel(
            limits, (HOST, SLOW), upstream_response_timeout=0.2
        )
        edge = harness.edge
        assert edge is not None
        rng = random.Random(5)
        outcomes: Counter[str] = Counter()
        total, workers = 10_000, 64
        plan = rng.choices(
            [(HOST, "/hello"), (HOST, "/bytes/20000"), (SLOW, "/hello"), (SLOW, "/hang"),
             (SLOW, "cut")],
            [70, 14, 7, 3, 6], k=total,
        )
        shares = [plan[i::workers] for i in range(workers)]

        async def worker(requests: list[tuple[str, str]]) -> None:
            client: KeepAliveClient | None = None
            for host, path in requests:
                if client is None or client.closed:
                    client = await self.connect(harness)
                if path == "cut":
                    client.request("/bytes/5000000", host).addErrback(lambda _: None)
                    await sleep(0)
                    client.transport.abortConnection()  # type: ignore[union-attr]
                    outcomes["cut"] += 1
                    client = None
                    continue
                try:
                    outcomes[str(await client.request(path, host))] += 1
                except _Closed:
                    outcomes["closed"] += 1
            if client is not None:
                client.transport.loseConnection()  # type: ignore[union-attr]
                await client.gone

        await defer.gatherResults(
            [defer.ensureDeferred(worker(share)) for share in shares]
        )
        self.assertEqual(sum(outcomes.values()), total)
        for status in ("200", "429", "503", "504", "cut"):
            self.assertGreater(outcomes[status], 0, outcomes)
        policy = edge.policy
        links = [s.link for s in edge.sessions.sessions.values()] + [
            a.link for a in harness.agents if a.link is not None
        ]

        # The counters as an operator reads them: the admin API.
        assert edge.observe.admin is not None
        admin = f"http://127.0.0.1:{edge.observe.admin.address.port}/api/policy".encode()

        async def busy() -> list[Any]:
            from twisted.web.client import readBody

            response = await harness.client.request(b"GET", admin)
            published = json.loads(await readBody(response))
            snapshot = published["counters"]
            in_use = [snapshot[k] for k in ("connections", "client_connections",
                                            "tunnel_streams", "tunnels_with_streams",
                                            "clients_with_connections")]
            in_use += list(published["agent_streams"].values())
            return [n for n in in_use + [link.active_streams() for link in links] if n]

        for _ in range(200):  # the last connections' close takes a few turns
            if not await busy():
                break
            await sleep(0.02)
        self.assertEqual(await busy(), [], (policy.snapshot(), outcomes))
        self.assertEqual(policy.tunnel_streams.counts, {})
        self.assertEqual(policy.client_connections.counts, {})
