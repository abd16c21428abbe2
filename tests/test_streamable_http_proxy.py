"""
An agent behind an HTTP/1.1-only forward proxy (Debian's tinyproxy, started
by the test, refusing CONNECT and passing no upgrade): its transport chain
grpc → websocket → streamable-http ends on streamable HTTP and serves; once
the proxy lets tunnels through again, and for an agent with no proxy at all,
the chain is back on its first choice.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tests.end_to_end import EventCollector
from tests.harness import eventually, listen_upstream, open_fds
from tests.redis_servers import LoggedProcess, candidate_port
from tunneld.agent.service import AgentService
from tunneld.config import (
    AgentConfig,
    AgentSection,
    EdgeConfig,
    EdgeSection,
    LimitsSection,
    TunnelSection,
)
from tunneld.edge.service import EdgeService
from tunneld.model.reasons import Reason
from tunneld.registry import available_transports, transport_options

TINYPROXY = shutil.which("tinyproxy") or ("/usr/bin/tinyproxy" if os.path.exists("/usr/bin/tinyproxy") else None)
CHAIN = ["grpc", "websocket", "streamable-http"]
FALLING_BACK = "transport {transport} failed ({error}); falling back to {fallback}"
BACK = "preferred transport {transport} is back; moving off {old}"
RESUMING = "streamable-http {connection}: {why}; resuming after event {last} in {delay:.2f}s"


def _missing() -> str | None:
    if TINYPROXY is None:
        return "tinyproxy is needed (scripts/setup-tests installs it)"
    if "streamable-http" not in available_transports():
        return "tunneld-streamable-http is not installed (scripts/setup-tests)"
    return None


class Tinyproxy:
    """A tinyproxy in the foreground, on a port of its own, restartable with another policy."""

    def __init__(self, case: TestCase) -> None:
        self.directory = os.path.abspath(case.mktemp())
        os.makedirs(self.directory)
        self.port = 0
        self.process: LoggedProcess | None = None
        case.addCleanup(lambda: defer.ensureDeferred(self.stop()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, allow_connect: bool, port: int = 0) -> None:
        for _ in range(10):
            chosen = port or candidate_port()
            config = os.path.join(self.directory, "tinyproxy.conf")
            with open(config, "w") as f:
                f.write(
                    f"Port {chosen}\nListen 127.0.0.1\nTimeout 600\nLogLevel Info\n"
                    "MaxClients 100\nDisableViaHeader Yes\nAllow 127.0.0.1\n"
                    # Without ConnectPort lines every port may be tunnelled to; with
                    # only port 1 (where nothing is), CONNECT is refused (403).
                    + ("" if allow_connect else "ConnectPort 1\n")
                )
            process = LoggedProcess(f"tinyproxy on {chosen}")
            assert TINYPROXY is not None
            process.process = reactor.spawnProcess(  # type: ignore[attr-defined]
                process, TINYPROXY, [TINYPROXY, "-d", "-c", config], env={}, path=self.directory
            )
            self.process = process
            try:
                await process.wait_for(r"Accepting connections", timeout=30)
            except AssertionError:
                await process.stop()
                if not port and "listen" in process.output.lower():
                    continue
                raise
            self.port = chosen
            return
        raise AssertionError("no free port for tinyproxy after 10 tries")

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()

    def requests(self, fragment: str) -> int:
        """How many requests the proxy logged whose line contains C{fragment}."""
        assert self.process is not None
        return sum(
            1 for line in self.process.output.splitlines()
            if "Request (file descriptor" in line and fragment in line
        )


class _Raw(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost.callback(None)


class ForwardProxyTests(TestCase):
    """The agent's transport chain through a proxy that allows only plain HTTP/1.1 requests."""

    skip = _missing()
    timeout = 120

    async def start_edge(self) -> tuple[EdgeService, dict[str, dict[str, Any]]]:
        listen = {"listen": "tcp:0:interface=127.0.0.1"}
        section = EdgeSection(
            public_listen=["tcp:0:interface=127.0.0.1"], transports=CHAIN,
            public_url="http://{host}/", admin_listen="tcp:0:interface=127.0.0.1",
        )
        config = EdgeConfig(section, [], {name: dict(listen) for name in CHAIN}, "(test)", LimitsSection())
        edge = EdgeService(config, transport_options(CHAIN, config.transports, "(test)", edge=True), reactor)
        edge.startService()
        self.addCleanup(edge.stopService)
        await defer.gatherResults([listener.listening for listener in edge.public])
        for transport in edge.transports.values():
            await transport.listening
        ports = {name: edge.transports[name].address.port for name in CHAIN}
        tables: dict[str, dict[str, Any]] = {
            "grpc": {"address": f"127.0.0.1:{ports['grpc']}", "connect_timeout": 5.0},
            "websocket": {"url": f"ws://127.0.0.1:{ports['websocket']}/tunnel",
                          "open_handshake_timeout": 5.0},
            "streamable-http": {"url": f"http://127.0.0.1:{ports['streamable-http']}/tunnel"},
        }
        return edge, tables

    async def start_agent(
        self, tables: dict[str, dict[str, Any]], upstream: int, proxy: str = ""
    ) -> AgentService:
        section = AgentSection(
            id="agent", transports=CHAIN, proxy=proxy, prefer_retry_interval=0.3,
            reconnect_initial=0.05, reconnect_max=0.5,
        )
        config = AgentConfig(
            section,
            [TunnelSection(hostname="app.test", upstream=f"tcp:host=127.0.0.1:port={upstream}")],
            tables, "(test)",
        )
        agent = AgentService(config, transport_options(CHAIN, tables, "(test)", edge=False), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await agent.ready
        return agent

    async def exchange(self, edge: EdgeService, sizes: list[int]) -> None:
        """Echo requests of each size through the edge, the answers checked byte for byte."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = Agent(reactor, pool=pool)
        port = edge.public[0].address.port
        from io import BytesIO

        from twisted.web.client import FileBodyProducer

        for n, size in enumerate(sizes):
            body = bytes((n + i) % 251 for i in range(size))
            response = await client.request(
                b"POST", f"http://127.0.0.1:{port}/echo".encode(),
                Headers({b"host": [b"app.test"]}), FileBodyProducer(BytesIO(body)),
            )
            self.assertEqual((response.code, await readBody(response)), (200, body))

    async def test_chain_ends_on_streamable_http_behind_http11_proxy_and_returns(self) -> None:
        """Behind tinyproxy refusing CONNECT, grpc and websocket fail naming the proxy's refusal and the agent serves over streamable HTTP through it; the proxy letting tunnels through, the agent returns to grpc; with no proxy it starts there."""
        log = EventCollector(self)
        edge, tables = await self.start_edge()
        upstream, _ = await listen_upstream(self)
        proxy = Tinyproxy(self)
        await proxy.start(allow_connect=False)
        # The proxy passes no upgrade either: a WebSocket handshake through it is no 101.
        raw = _Raw()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port).connect(Factory.forProtocol(lambda: raw))
        ws_url = tables["websocket"]["url"]
        raw.transport.write(  # type: ignore[union-attr]
            f"GET {ws_url.replace('ws://', 'http://')} HTTP/1.1\r\nHost: {ws_url.split('/')[2]}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        await eventually(lambda: b"\r\n" in raw.data, "the proxy's answer to an upgrade")
        self.assertFalse(raw.data.startswith(b"HTTP/1.1 101"), raw.data[:200])
        raw.transport.loseConnection()  # type: ignore[union-attr]
        await raw.lost

        agent = await self.start_agent(tables, upstream, proxy=proxy.url)
        assert agent.link is not None
        self.assertEqual(agent.link.transport_name, "streamable-http")
        fallbacks = log.matching(FALLING_BACK)
        self.assertEqual(
            [(e["transport"], e["fallback"]) for e in fallbacks[:2]],
            [("grpc", "websocket"), ("websocket", "streamable-http")],
        )
        for event in fallbacks[:2]:
            self.assertIn(f"the proxy 127.0.0.1:{proxy.port} refused CONNECT", event["error"])
            self.assertIn("403", event["error"])
        await self.exchange(edge, [0, 1, 100, 16384, 65536, 300_000])
        shttp = tables["streamable-http"]["url"]
        self.assertGreaterEqual(proxy.requests(f"POST {shttp} HTTP/1.1"), 2)  # initialise, frames
        self.assertGreaterEqual(proxy.requests(f"GET {shttp} HTTP/1.1"), 1)  # the event stream
        # While tunnels stay refused, the agent's tries at grpc fail and it stays put.
        await eventually(
            lambda: len(log.matching("preferred transport {transport} still unavailable ({error})")) >= 2,
            "two tries to return to grpc",
        )
        self.assertEqual(agent.link.transport_name, "streamable-http")

        # The same proxy, restarted on its port, now allows CONNECT: back to grpc, through it.
        await proxy.stop()
        await proxy.start(allow_connect=True, port=proxy.port)
        await eventually(
            lambda: agent.link is not None and agent.link.transport_name == "grpc"
            and [s.link.transport_name for s in edge.sessions.sessions.values()] == ["grpc"],
            "the agent to return to grpc and the streamable-http session to close",
        )
        (back,) = log.matching(BACK)
        self.assertEqual(back["old"], "streamable-http")
        self.assertEqual(proxy.requests(f"CONNECT 127.0.0.1:{edge.transports['grpc'].address.port}"), 1)
        self.assertEqual(edge.transports["streamable-http"].connections, {})
        await self.exchange(edge, [10, 70_000])
        await agent.stopService()

        # Without a proxy the chain starts on its first choice.
        fds = open_fds()
        direct = await self.start_agent(tables, upstream)
        assert direct.link is not None
        self.assertEqual(direct.link.transport_name, "grpc")
        self.assertEqual(len(log.matching(FALLING_BACK)), len(fallbacks))
        await self.exchange(edge, [5])
        await direct.stopService()
        await eventually(lambda: open_fds() <= fds, "the direct agent's sockets to close")


def mixed_frames(count: int, seed: int = 21) -> list[bytes]:
    """C{count} frames of mixed sizes (mostly small, some up to 60 KiB), text and binary."""
    rng = random.Random(seed)
    frames = []
    for n in range(count):
        roll = rng.random()
        size = rng.randint(0, 200) if roll < 0.7 else rng.randint(201, 8192) if roll < 0.95 else rng.randint(8193, 61440)
        if n % 3 == 0:  # ASCII: sent as a text event
            frames.append(bytes(32 + (n + i) % 95 for i in range(size)))
        else:  # binary: a base64 event
            frames.append(rng.randbytes(size))
    return frames


def digest(frames: Any) -> str:
    """SHA-256 of the frames, each with its length: a lost, extra or reordered frame changes it."""
    h = hashlib.sha256()
    for frame in frames:
        h.update(len(frame).to_bytes(4, "big"))
        h.update(frame)
    return h.hexdigest()


class ResumeTests(TestCase):
    """The agent's event stream dropped again and again: resumed by Last-Event-ID, nothing lost or repeated."""

    skip = _missing()
    timeout = 300

    async def test_dropped_event_streams_lose_and_repeat_no_frame(self) -> None:
        """10,000 frames of mixed sizes from edge to agent while the proxy between them is killed mid-stream and restarted three times and the edge ends every stream after 2 s, then 100 more after such an end: the agent takes each frame once, in order (same hash)."""
        from tests.test_streamable_http import start_endpoint
        from tunneld.interfaces import AgentLinkSetup
        from tunneld.registry import find_transport

        log = EventCollector(self)
        endpoint = await start_endpoint(
            self, heartbeat_interval=0, max_stream_duration=2.0, subscribe_timeout=60,
            stall_timeout=60,
        )
        proxy = Tinyproxy(self)
        await proxy.start(allow_connect=False)
        plugin = find_transport("streamable-http", "(test)", "transports")
        options = plugin.agent_options(
            {"url": endpoint.url, "heartbeat_interval": 0, "resume_initial": 0.02,
             "resume_max": 0.3, "resume_for": 120, "post_retry_for": 120}, "(test)",
        )
        fds = open_fds()
        link = await plugin.connect(options, AgentLinkSetup(reactor=reactor, proxy=("127.0.0.1", proxy.port)))
        wire = link.wire  # type: ignore[attr-defined]

        async def close() -> None:
            link.close(Reason.CANCELLED, "test over")
            await link.when_closed()

        self.addCleanup(close)  # (a second close does nothing)
        (owned,) = endpoint.service.connections.values()

        frames = mixed_frames(10_000)
        received: list[bytes] = []
        waiting: list[tuple[int, defer.Deferred[None]]] = []

        kills = [2_000, 5_000, 8_000]
        restarts: list[defer.Deferred[None]] = []

        async def restart() -> None:
            await proxy.process.ended  # type: ignore[union-attr]
            await proxy.start(allow_connect=False, port=proxy.port)

        def frame_received(frame: Any) -> None:  # where the agent's link would parse it
            received.append(bytes(frame))
            if kills and len(received) == kills[0]:
                # Killed while the agent reads its event stream: cut mid-stream.
                kills.pop(0)
                proxy.process.signal("KILL")  # type: ignore[union-attr]
                restarts.append(defer.ensureDeferred(restart()))
            for waiter in list(waiting):
                if len(received) >= waiter[0]:
                    waiting.remove(waiter)
                    waiter[1].callback(None)

        link.frame_received = frame_received  # type: ignore[attr-defined]

        def until(count: int) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            if len(received) >= count:
                d.callback(None)
            else:
                waiting.append((count, d))
            return d

        window = 200  # frames in flight at most: the replay buffer stays far from its bounds
        for n, frame in enumerate(frames):
            if n >= window:
                await until(n - window)
            owned.send_frame(frame)
        await until(len(frames))
        # And the edge ending a stream (max_stream_duration): the next frames come on the next one.
        clean = [e for e in log.matching(RESUMING) if "ended by the edge" in e["why"]]
        await eventually(
            lambda: len([e for e in log.matching(RESUMING) if "ended by the edge" in e["why"]]) > len(clean),
            "the edge to end an event stream",
        )
        more = mixed_frames(100, seed=22)
        for frame in more:
            owned.send_frame(frame)
        frames += more
        await until(len(frames))
        await defer.gatherResults(restarts)
        self.assertEqual((kills, len(restarts)), ([], 3))
        self.assertEqual(len(received), len(frames))
        self.assertEqual(digest(received), digest(frames))
        self.assertEqual(owned.finishing, False)
        self.assertIs(endpoint.service.connections.get(owned.id), owned)  # one connection throughout
        resumed = log.matching(RESUMING)
        self.assertGreaterEqual(len(resumed), 4)  # three cuts and a clean end at least
        self.assertGreaterEqual(wire.streams_opened, 5)
        # The kills cut streams mid-way (besides the edge's clean ends).
        self.assertTrue([e for e in resumed if "was cut" in e["why"]], [e["why"] for e in resumed])
        await close()
        await eventually(lambda: not endpoint.service.connections, "the connection to close")
        await eventually(lambda: open_fds() <= fds, "the agent's sockets to close")


class _FakeProxy(Protocol):
    """A forward proxy answering CONNECT as the test says (then echoing, once granted)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.head = b""
        self.granted = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.granted:
            self.transport.write(data)  # type: ignore[union-attr]
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        self.factory.requests.append(self.head)  # type: ignore[attr-defined]
        if self.behaviour == "close":
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif self.behaviour == "407":
            self.transport.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")  # type: ignore[union-attr]
        elif self.behaviour == "long":
            self.transport.write(b"HTTP/1.1 200 OK\r\nX: " + b"x" * 20000)  # type: ignore[union-attr]
        else:
            self.granted = True
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\nearly")  # type: ignore[union-attr]


class _Client(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost.callback(None)


class ProxyConnectTests(TestCase):
    """tunneld.proxyconnect on its own, against a proxy on loopback that answers as the test says."""

    async def connect_through(self, behaviour: str) -> tuple[Any, Any]:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        from tunneld.proxyconnect import ProxyConnectEndpoint

        factory = Factory.forProtocol(lambda: _FakeProxy(behaviour))
        factory.requests = []  # type: ignore[attr-defined]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        endpoint = ProxyConnectEndpoint(reactor, ("127.0.0.1", port.getHost().port), "edge.test", 8443, 5)
        client = _Client()
        try:
            result = await endpoint.connect(Factory.forProtocol(lambda: client))
        except Exception as e:
            result = e
        await port.stopListening()  # what it accepted stays
        return result, factory

    async def test_granted_tunnel_carries_bytes_both_ways(self) -> None:
        """CONNECT host:port with its Host header; once granted, bytes sent with the 200 and after reach the protocol, and its writes reach the far end."""
        protocol, factory = await self.connect_through("ok")
        self.assertEqual(factory.requests, [b"CONNECT edge.test:8443 HTTP/1.1\r\nHost: edge.test:8443\r\n\r\n"])
        protocol.transport.write(b" and more")
        await eventually(lambda: protocol.data == b"early and more", "the echo")
        protocol.transport.loseConnection()
        await protocol.lost

    async def test_refusals_name_the_proxy_and_its_answer(self) -> None:
        """A non-200 answer, an answer that never ends and a proxy hanging up each fail the connection with ProxyRefused naming the proxy and what it did; no socket is left."""
        from tunneld.proxyconnect import ProxyRefused

        await self.connect_through("407")  # the resolver's threads and the like, started once
        fds = open_fds()
        for _ in range(3):  # the fault repeated
            for behaviour, expected in (
                ("407", "refused CONNECT edge.test:8443: HTTP/1.1 407 Proxy Authentication Required"),
                ("long", "an answer to CONNECT longer than 16384 bytes"),
                ("close", "closed the connection before answering CONNECT edge.test:8443"),
            ):
                error, _ = await self.connect_through(behaviour)
                self.assertIsInstance(error, ProxyRefused, behaviour)
                self.assertIn("the proxy 127.0.0.1:", str(error))
                self.assertIn(expected, str(error))
        await eventually(lambda: open_fds() <= fds + 2, "the refused tunnels' sockets to close")
