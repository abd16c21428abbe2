"""
The streamable-HTTP transport (plugins/streamable-http, installed as a wheel
by scripts/setup-tests): the whole end-to-end suite over it, and what its
review checklist guards, each with real edges and agents on loopback.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zipfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from tests.end_to_end import EndToEndMixin, EventCollector
from tests.harness import (
    TunnelHarness,
    eventually,
    listen_upstream,
    open_fds,
    sleep,
    tunneld_timers,
)
from tunneld.interfaces import AgentLinkSetup, EdgeLinkSetup, StateUnavailable
from tunneld.model.reasons import Reason
from tunneld.registry import find_transport
from tunneld.state.memory import MemoryStateBackend
from tunneld.wire import codec

try:
    from tunneld_streamable_http import framing, store
    from tunneld_streamable_http.edge import Refused
except ImportError:  # pragma: no cover - scripts/setup-tests installs it
    framing = None  # type: ignore[assignment]

MISSING = None if framing is not None else "tunneld-streamable-http is not installed (scripts/setup-tests)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "plugins", "streamable-http")


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:  # noqa: N802
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


@implementer(IPolicyForHTTPS)
class _ClientCertificates:
    """TLS as an agent makes it (tunneld.tls.client_tls_for), for a hand-written agent."""

    def __init__(self, tls_for: Any) -> None:
        self.tls_for = tls_for

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:  # noqa: N802
        return self.tls_for(hostname.decode())


class RawAgent:
    """An agent written by hand with twisted.web's client: each request of the wire shape, as a test wants it."""

    def __init__(self, case: TestCase, url: str, tls_for: Any = None) -> None:
        self.url = url.encode()
        # A connection per request: nothing is left cached (with a timer) when the test ends.
        pool = HTTPConnectionPool(reactor, persistent=False)
        if tls_for is None:
            self.http = Agent(reactor, pool=pool)
        else:
            self.http = Agent(reactor, contextFactory=_ClientCertificates(tls_for), pool=pool)
        self.connection_id = b""

    async def request(
        self, method: bytes, headers: dict[bytes, bytes] | None = None, body: bytes | None = None
    ) -> Any:
        all_headers = Headers({k: [v] for k, v in (headers or {}).items()})
        if self.connection_id:
            all_headers.setRawHeaders(framing.CONNECTION_ID, [self.connection_id])
        return await self.http.request(
            method, self.url, all_headers, _Body(body) if body is not None else None
        )

    async def initialise(self) -> Any:
        from twisted.web.client import readBody

        response = await self.request(b"POST", {b"Content-Type": framing.FRAMES_TYPE}, b"")
        await readBody(response)
        (self.connection_id,) = response.headers.getRawHeaders(framing.CONNECTION_ID)
        return response


class StreamableHTTPEndToEnd(EndToEndMixin, TestCase):
    """Every end-to-end behaviour over the streamable-http transport."""

    skip = MISSING
    transport = "streamable-http"
    link_sockets = 5  # the listener, and both ends of the agent's event stream and of its POSTs

    def agent_table(self, address: Any) -> dict[str, Any]:
        return {"url": f"http://127.0.0.1:{address.port}/tunnel"}

    async def send_malformed_frame(self, address: Any) -> None:
        from twisted.web.client import readBody

        agent = RawAgent(self, f"http://127.0.0.1:{address.port}/tunnel")
        await agent.initialise()
        events = await agent.request(b"GET", {b"Accept": b"text/event-stream"})
        reader = _Events()
        events.deliverBody(reader)
        response = await agent.request(
            b"POST", {framing.SEQ: b"1"}, framing.encode_batch([b"\xff\xfe not a frame"])
        )
        await readBody(response)
        closed = await reader.closed
        self.assertIn(Reason.PROTOCOL_ERROR.value, closed)


class _Events(Protocol):
    """An event stream read by a test: every event, and how it ended."""

    def __init__(self) -> None:
        self.parser = framing.EventParser(1 << 22)
        self.events: list[Any] = []
        self.closed: defer.Deferred[str] = defer.Deferred()
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        for event in self.parser.feed(data):
            self.events.append(event)
            if event.kind == "close" and not self.closed.called:
                self.closed.callback(event.data.decode())
        for waiter in list(self._waiting):
            if len(self.events) >= waiter[0]:
                self._waiting.remove(waiter)
                waiter[1].callback(None)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.reason = reason
        self.ended.callback(None)

    def count(self, n: int) -> defer.Deferred[None]:
        """Fires once C{n} events have arrived."""
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.events) >= n:
            d.callback(None)
        else:
            self._waiting.append((n, d))
        return d


class PackagingTests(TestCase):
    """The transport ships as a distribution of its own, as a third party would ship it."""

    timeout = 300

    def test_wheel_is_a_dropin_found_without_changing_tunneld(self) -> None:
        """Its wheel carries its package and the drop-in (no part of tunneld, no cache); installed beside tunneld, the plugin is found by name."""
        build = os.path.abspath(self.mktemp())
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
             "--wheel-dir", build, PLUGIN],
            check=True, capture_output=True, timeout=240,
        )
        (wheel,) = [f for f in os.listdir(build) if f.endswith(".whl")]
        names = zipfile.ZipFile(os.path.join(build, wheel)).namelist()
        self.assertIn("tunneld/plugins/tunneld_streamable_http_dropin.py", names)
        self.assertIn("tunneld_streamable_http/edge.py", names)
        self.assertIn("tunneld_streamable_http/py.typed", names)
        self.assertEqual([n for n in names if n.startswith("tunneld/")],
                         ["tunneld/plugins/tunneld_streamable_http_dropin.py"])
        self.assertFalse([n for n in names if n.endswith("dropin.cache")])
        target = os.path.abspath(self.mktemp())
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
             os.path.join(build, wheel)],
            check=True, capture_output=True, timeout=240,
        )
        # tunneld from the checkout, the transport from the target only.
        script = (
            "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p];"
            f"sys.path[:0] = [{ROOT!r}, {target!r}];"
            "sys.path.append([p for p in __import__('site').getsitepackages()][0]);"
            "from tunneld.registry import available_transports;"
            "plugins = available_transports();"
            "print(sorted(plugins), sys.modules['tunneld.plugins.tunneld_streamable_http_dropin'].__file__,"
            " sys.modules['tunneld_streamable_http'].__file__)"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=target,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        found, dropin, package = result.stdout.rsplit(" ", 2)
        self.assertIn("'streamable-http'", found)
        self.assertTrue(dropin.startswith(target), dropin)
        self.assertTrue(package.strip().startswith(target), package)


# -- the review checklist (issue 21): one test per item, named after it ----------


class _Handler:
    """The edge core's side of a link, for an endpoint tested on its own: it records."""

    def __init__(self) -> None:
        self.lost: list[tuple[Reason, str]] = []
        self.controls: list[Any] = []

    def control_received(self, message: Any) -> None:
        self.controls.append(message)

    def stream_opened(self, stream: Any) -> None:
        stream.reset(Reason.AGENT_UNAVAILABLE, "not in this test")

    def link_lost(self, reason: Reason, message: str) -> None:
        self.lost.append((reason, message))


class Endpoint:
    """An edge's streamable-HTTP endpoint without the rest of the edge, and the links it made."""

    def __init__(self, service: Any, state: Any) -> None:
        self.service = service
        self.state = state
        self.links: list[Any] = []
        self.handlers: list[_Handler] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.address.port}/tunnel"

    @property
    def port(self) -> int:
        return self.service.address.port  # type: ignore[no-any-return]

    def owned(self, agent: RawAgent) -> Any:
        return self.service.connections[agent.connection_id.decode()]


async def start_endpoint(case: TestCase, state: Any = None, **table: Any) -> Endpoint:
    """An endpoint on loopback port 0 with a memory state backend, stopped at cleanup."""
    plugin = find_transport("streamable-http", "(test)", "transports")
    options = plugin.edge_options({"listen": "tcp:0:interface=127.0.0.1", **table}, "(test)")
    state = state or MemoryStateBackend(reactor)
    endpoint: Endpoint

    def on_link(link: Any) -> None:
        handler = _Handler()
        link.set_handler(handler)
        endpoint.links.append(link)
        endpoint.handlers.append(handler)

    service = plugin.edge_service(options, EdgeLinkSetup(on_link=on_link, reactor=reactor, state=state))
    endpoint = Endpoint(service, state)
    service.startService()
    case.addCleanup(service.stopService)
    await service.listening
    return endpoint


async def answer(response: Any) -> tuple[int, str, str]:
    """A response's status, Tunnel-Error and body text."""
    body = (await readBody(response)).decode()
    error = response.headers.getRawHeaders(b"tunnel-error", [b""])[0].decode()
    return response.code, error, body


def ping(opaque: int) -> bytes:
    return codec.encode_ping(opaque).SerializeToString()  # type: ignore[no-any-return]


def pongs(events: list[Any]) -> list[int]:
    """The opaque numbers of the Pong frames among events."""
    found = []
    for event in events:
        if event.kind != "message":
            continue
        _, kind, body, _ = codec.read(framing.decode_data(event.data))
        if kind == codec.PONG:
            found.append(body)
    return found


class _RawSubscriber(Protocol):
    """A GET over a plain socket whose reading the test controls (a slow subscriber)."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost.callback(None)

    def events(self) -> list[Any]:
        """The complete events received (the body is chunked: undone here)."""
        head, _, rest = self.data.partition(b"\r\n\r\n")
        body = b""
        while rest:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep or not size_line:
                break
            size = int(size_line, 16)
            if size == 0 or len(rest) < size:
                body += rest[:size]
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        return list(framing.EventParser(1 << 24).feed(body))


async def raw_connection(case: TestCase, port: int, protocol_: Protocol) -> Any:
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: protocol_))

    def close() -> Any:
        if protocol_.transport is not None and not protocol_.lost.called:  # type: ignore[attr-defined]
            protocol_.transport.abortConnection()
            return protocol_.lost  # type: ignore[attr-defined]
        return None

    case.addCleanup(close)
    return protocol_


CLOSING = "streamable-http connection {connection} from {peer}: {problem}; closing it"
CLOSED = "streamable-http connection {connection} closed: {reason}: {detail}"
REFUSED = "streamable-http {method} from {peer} refused: {status} {detail}"
RESUMING = "streamable-http {connection}: {why}; resuming after event {last} in {delay:.2f}s"


class _Gate(Resource):
    """Something in front of an edge that wants credentials the agent does not have."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="gateway"')
        return b"credentials required"


class ReviewChecklistTests(TestCase):
    """What the review of an ACP streamable-HTTP transport found going wrong, each guarded by a test named after it."""

    skip = MISSING
    timeout = 60

    def setUp(self) -> None:
        self.log = EventCollector(self)

    async def subscribe(self, agent: RawAgent, after: int | None = None) -> tuple[Any, _Events]:
        headers = {b"Accept": b"text/event-stream"}
        if after is not None:
            headers[b"Last-Event-ID"] = b"%d" % after
        response = await agent.request(b"GET", headers)
        reader = _Events()
        if response.code == 200:
            response.deliverBody(reader)
        return response, reader

    async def post(self, agent: RawAgent, seq: int, frames: list[bytes], ack: int = 0) -> tuple[int, str, str]:
        response = await agent.request(
            b"POST", {framing.SEQ: b"%d" % seq, framing.ACK: b"%d" % ack}, framing.encode_batch(frames)
        )
        return await answer(response)

    def logged(self, fragment: str) -> list[dict[str, Any]]:
        from twisted.logger import formatEvent

        return [e for e in self.log.events if fragment in formatEvent(e)]

    async def test_slow_subscriber_is_closed_not_skipped(self) -> None:
        """An event stream that stops reading is closed after stall_timeout, never fed past what it missed: resumed after its last complete event, it gets every later event, in order, once."""
        endpoint = await start_endpoint(
            self, stall_timeout=0.5, replay_max_bytes=256 << 20, replay_max_events=100000,
            heartbeat_interval=0,
        )
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        owned = endpoint.owned(agent)
        slow = await raw_connection(self, endpoint.port, _RawSubscriber())
        slow.transport.getHandle().setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
        slow.transport.pauseProducing()  # it reads nothing from here on
        slow.transport.write(
            b"GET /tunnel HTTP/1.1\r\nHost: edge\r\nAccept: text/event-stream\r\n"
            b"Tunnel-Connection-Id: " + agent.connection_id + b"\r\n\r\n"
        )
        await eventually(lambda: owned.local is not None, "the slow stream to subscribe")
        payloads = [bytes([i % 251]) * (1 + (i * 7919) % 65536) for i in range(400)]
        for payload in payloads:
            owned.send_frame(payload)
        await eventually(lambda: self.logged("slow subscriber closed"), "the slow subscriber to be closed")
        slow.transport.resumeProducing()
        await eventually(lambda: slow.lost.called, "the slow stream's connection to end")
        received = [e for e in slow.events() if e.kind == "message"]
        self.assertTrue(received, "the slow stream got nothing before it stalled")
        self.assertLess(len(received), len(payloads))
        self.assertEqual([int(e.event_id) for e in received], list(range(1, len(received) + 1)))
        last = len(received)
        (stalled,) = self.logged("slow subscriber closed")
        self.assertGreaterEqual(stalled["last"], last)
        # The agent resumes after the last event it has: everything after it comes, in order, once.
        response, reader = await self.subscribe(agent, after=last)
        self.assertEqual(response.code, 200)
        await eventually(
            lambda: len(reader.events) >= len(payloads) - last,
            f"events {last + 1} to {len(payloads)} on the resumed stream",
        )
        resumed = [e for e in reader.events if e.kind == "message"]
        self.assertEqual([int(e.event_id) for e in resumed], list(range(last + 1, len(payloads) + 1)))
        got = [framing.decode_data(e.data) for e in received + resumed]
        self.assertEqual(got, payloads)

    async def test_pre_subscribe_events_wait_for_the_stream(self) -> None:
        """Events produced before the agent's first GET are kept and delivered on it, first to last."""
        endpoint = await start_endpoint(self, heartbeat_interval=0)
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        owned = endpoint.owned(agent)
        for i in range(1, 11):
            owned.link.send(ping(i))  # the link's own way of sending a frame
        response, reader = await self.subscribe(agent)
        await reader.count(10)
        self.assertEqual([int(e.event_id) for e in reader.events], list(range(1, 11)))
        self.assertEqual(
            [codec.read(framing.decode_data(e.data))[2] for e in reader.events], list(range(1, 11))
        )

    async def test_pre_subscribe_buffer_overflow_is_named(self) -> None:
        """Past its bound, the buffer of a connection nobody reads closes it with saturated and a log line naming the pre-subscribe overflow and what was dropped; a late GET is told why."""
        endpoint = await start_endpoint(self, replay_max_events=64, heartbeat_interval=0)
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        owned = endpoint.owned(agent)
        for i in range(1, 100):
            owned.send_frame(ping(i))
            if owned.finishing:
                break
        self.assertEqual(i, 65)
        (handler,) = endpoint.handlers
        ((reason, message),) = handler.lost
        self.assertEqual(reason, Reason.SATURATED)
        self.assertIn("pre-subscribe buffer overflow: 65 events", message)
        self.assertIn("waited for an event stream that never came", message)
        (closing,) = self.log.matching(CLOSING)
        self.assertIn("pre-subscribe buffer overflow", closing["problem"])
        self.assertEqual(closing["connection"], agent.connection_id.decode())
        self.assertTrue(self.logged("events ("), "the dropped events are not counted in the log")
        response, _ = await self.subscribe(agent)
        code, error, text = await answer(response)
        self.assertEqual((code, error), (410, "saturated"))
        self.assertIn("pre-subscribe buffer overflow", text)

    async def test_connection_without_event_stream_is_removed(self) -> None:
        """A connection whose agent never opens its event stream is removed after subscribe_timeout, saying so; a late request hears why."""
        endpoint = await start_endpoint(self, subscribe_timeout=0.5, heartbeat_interval=0)
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        await eventually(lambda: not endpoint.service.connections, "the connection to be removed")
        (closing,) = self.log.matching(CLOSING)
        self.assertIn("the agent never opened an event stream for", closing["problem"])
        self.assertEqual(endpoint.handlers[0].lost[0][0], Reason.AGENT_GONE)
        code, error, text = await self.post(agent, 1, [ping(1)])
        self.assertEqual((code, error), (410, "agent_gone"))
        self.assertIn("never opened an event stream", text)

    async def test_stream_state_is_cleaned_when_it_ends(self) -> None:
        """An event stream's state goes with it (the connection then counts the time without one), and a connection's with the connection: no stream, lease, log, record or timer is left."""
        endpoint = await start_endpoint(self, subscribe_timeout=30, closed_ttl=0.5, heartbeat_interval=0)
        service, state = endpoint.service, endpoint.state
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        owned = endpoint.owned(agent)
        response, reader = await self.subscribe(agent)
        owned.link.send(ping(1))
        await reader.count(1)
        self.assertEqual(len(service.streams), 1)
        self.assertIsNotNone(owned.local)
        self.assertIsNone(owned.unsubscribed_since)
        reader.transport.stopProducing()  # the agent drops its stream
        await reader.ended
        await eventually(lambda: not service.streams, "the stream to be forgotten")
        self.assertIsNone(owned.local)
        self.assertIsNotNone(owned.unsubscribed_since)
        code, _, _ = await answer(await agent.request(b"DELETE"))
        self.assertEqual(code, 204)
        self.assertEqual(service.connections, {})
        self.assertTrue(owned.finished)
        self.assertEqual((owned.pending, len(owned.window), owned.early), ([], 0, {}))
        self.assertTrue(self.log.matching("streamable-http connection {connection}: the agent ended it"))
        # Its logs and (once closed_ttl has passed) its record go; the upkeep timer stops.
        await eventually(lambda: not list(state._logs), "the connection's logs to go")
        await eventually(lambda: not service._ticker.running, "the upkeep timer to stop")
        # (the record says why it closed, for closed_ttl; expiry is no event: polled)
        await eventually(
            lambda: state.get_record("shttp-conn", agent.connection_id.decode()).result is None,
            "the closed connection's record to expire",
        )

    async def test_orphaned_early_frames_are_evicted(self) -> None:
        """Frames that arrived ahead of one that never comes wait reorder_timeout at most: then the connection closes with protocol_error, naming the missing frame, and the map is emptied."""
        endpoint = await start_endpoint(self, reorder_timeout=0.5, heartbeat_interval=0)
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        owned = endpoint.owned(agent)
        await self.subscribe(agent)
        code, _, _ = await self.post(agent, 3, [ping(3), ping(4)])
        self.assertEqual(code, 202)
        self.assertEqual(sorted(owned.early), [3, 4])
        await eventually(lambda: owned.finished, "the connection to close")
        self.assertEqual(owned.early, {})
        (closing,) = self.log.matching(CLOSING)
        self.assertEqual(
            closing["problem"], "frame 1 did not arrive within 0.5s (2 later frames waited for it)"
        )
        self.assertEqual(endpoint.handlers[0].lost[0][0], Reason.PROTOCOL_ERROR)

    async def test_reordered_and_repeated_frames_reach_the_link_once_in_order(self) -> None:
        """POSTs that arrive out of order or twice (retries, two connections) hand each frame to the link once, in sequence order."""
        endpoint = await start_endpoint(self, heartbeat_interval=0)
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        owned = endpoint.owned(agent)
        response, reader = await self.subscribe(agent)
        for seq, frames in ((3, [ping(3)]), (1, [ping(1)]), (1, [ping(1), ping(2)]), (3, [ping(3)])):
            code, _, _ = await self.post(agent, seq, frames)
            self.assertEqual(code, 202)
        await reader.count(3)
        self.assertEqual(pongs(reader.events), [1, 2, 3])
        self.assertEqual(owned.duplicates, 2)
        self.assertEqual((owned.next_seq, owned.early), (4, {}))

    async def test_initialise_refused_past_cap(self) -> None:
        """Past max_connections an initialise is refused with 503 and Tunnel-Error: cap_reached, a body naming the cap and a log line; a freed slot is taken again."""
        endpoint = await start_endpoint(self, max_connections=2, heartbeat_interval=0)
        agents = [RawAgent(self, endpoint.url) for _ in range(3)]
        for agent in agents[:2]:
            await agent.initialise()
        response = await agents[2].request(b"POST", {b"Content-Type": framing.FRAMES_TYPE}, b"")
        code, error, text = await answer(response)
        self.assertEqual((code, error), (503, "cap_reached"))
        self.assertIn("maximum of 2 agent connections (max_connections)", text)
        (refused,) = self.log.matching(
            "streamable-http initialise from {peer} refused: {reason}: {detail}"
        )
        self.assertEqual(refused["reason"], "cap_reached")
        self.assertEqual(len(endpoint.service.connections), 2)
        await answer(await agents[0].request(b"DELETE"))
        agents[2].connection_id = b""
        await agents[2].initialise()
        self.assertEqual(len(endpoint.service.connections), 2)

    async def test_request_that_never_arrives_whole_is_cut(self) -> None:
        """A request head or body that trickles is answered 408 and its connection closed after request_timeout, however slowly the bytes keep coming."""
        endpoint = await start_endpoint(self, request_timeout=0.5)
        for start in (b"GET /tun", b"POST /tunnel HTTP/1.1\r\nHost: e\r\nContent-Length: 100\r\n\r\nab"):
            client = await raw_connection(self, endpoint.port, _RawSubscriber())
            client.transport.write(start)
            for _ in range(3):  # a byte now and then resets no idle timer that matters
                await sleep(0.2)
                if client.lost.called:
                    break
                client.transport.write(b"x")
            await client.lost
            self.assertTrue(client.data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), client.data)
            self.assertIn(b"did not arrive within 0.5s", client.data)

    async def test_oversized_post_is_refused(self) -> None:
        """A body over max_post_bytes is refused with 413 from its Content-Length, before it is read."""
        endpoint = await start_endpoint(self, max_post_bytes=65536)
        limit = endpoint.service.max_post_bytes
        client = await raw_connection(self, endpoint.port, _RawSubscriber())
        client.transport.write(
            b"POST /tunnel HTTP/1.1\r\nHost: e\r\nContent-Length: %d\r\n\r\n" % (limit + 1)
        )
        await client.lost
        self.assertTrue(client.data.startswith(b"HTTP/1.1 413 Payload Too Large\r\n"), client.data)
        self.assertIn(b"exceeds max_post_bytes (%d)" % limit, client.data)

    async def test_idle_connection_is_closed(self) -> None:
        """A keep-alive connection idle between requests is closed after idle_timeout."""
        endpoint = await start_endpoint(self, idle_timeout=0.5)
        client = await raw_connection(self, endpoint.port, _RawSubscriber())
        client.transport.write(b"POST /tunnel HTTP/1.1\r\nHost: e\r\nContent-Length: 0\r\n\r\n")
        await eventually(lambda: b"\r\n\r\n" in client.data, "the initialise to be answered")
        self.assertTrue(client.data.startswith(b"HTTP/1.1 201 Created\r\n"), client.data)
        await client.lost  # nothing more was sent

    async def test_event_stream_keepalive_and_clean_end(self) -> None:
        """An idle event stream carries a comment every keepalive_interval, and ends cleanly after max_stream_duration; the next one resumes after the last event."""
        endpoint = await start_endpoint(
            self, keepalive_interval=0.2, max_stream_duration=1.0, heartbeat_interval=0,
        )
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        owned = endpoint.owned(agent)
        response = await agent.request(b"GET", {b"Accept": b"text/event-stream"})
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        body = await readBody(response)  # the whole stream, until its clean end
        self.assertGreaterEqual(body.count(b": keepalive\n\n"), 2)
        owned.link.send(ping(1))
        response, reader = await self.subscribe(agent, after=0)
        await reader.count(1)
        self.assertEqual([e.event_id for e in reader.events], ["1"])

    # -- with a real edge and agent ---------------------------------------------

    async def tunnel(
        self, edge: dict[str, Any] | None = None, agent: dict[str, Any] | None = None, **settings: Any
    ) -> tuple[TunnelHarness, Any]:
        harness = TunnelHarness(
            self, "streamable-http", {"listen": "tcp:0:interface=127.0.0.1", **(edge or {})}
        )
        await harness.start_edge()
        port, upstream = await listen_upstream(self)
        url = f"http://127.0.0.1:{harness.link_address().port}/tunnel"
        await harness.start_agent({"url": url, **(agent or {})}, [("app.test", port)], **settings)
        return harness, upstream

    async def test_silent_agent_connection_is_removed(self) -> None:
        """An agent that falls silent (its POSTs stop, its event stream stays open) is declared gone by the heartbeat: its connection, session and record are removed, nothing lingers, and the agent, told on its stream, comes back on a new one."""
        harness, _ = await self.tunnel(
            {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}, reconnect_initial=0.05,
        )
        assert harness.edge is not None
        endpoint = harness.edge.transports["streamable-http"]
        agent = harness.agents[0]
        old = agent.link
        (connection_id,) = endpoint.connections
        fds = open_fds()
        old.wire._send = lambda post: None  # nothing the agent sends arrives any more
        await eventually(lambda: connection_id not in endpoint.connections, "the silent connection to go")
        self.assertTrue(self.log.matching("{transport} link {peer} silent for {silent:.1f}s: closing"))
        (closed,) = [e for e in self.log.matching(CLOSED) if e["connection"] == connection_id]
        self.assertEqual(closed["reason"], "agent_gone")
        self.assertIn("heartbeat timeout", closed["detail"])
        record = store.ConnectionRecord.decode(
            await endpoint.setup.state.get_record("shttp-conn", connection_id)
        )
        self.assertEqual((record.owner, record.closed_reason), ("", "agent_gone"))
        await eventually(
            lambda: agent.link is not None and agent.link is not old and bool(agent.public_urls)
            and len(endpoint.connections) == 1,
            "the agent to come back on a new connection",
        )
        code, _, body = await harness.request("app.test", "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))
        self.assertEqual(len(harness.edge.sessions.sessions), 1)
        await eventually(lambda: open_fds() <= fds + 2, "the old connection's sockets to close")

    async def test_backoff_resets_after_healthy_stream(self) -> None:
        """Resuming a lost event stream backs off (jittered, doubling) while it fails, and starts over from resume_initial after a stream that lasted healthy_after; the link stays up throughout."""
        harness, _ = await self.tunnel(
            {"max_stream_duration": 1.0, "heartbeat_interval": 0},
            {"resume_initial": 0.05, "resume_max": 2.0, "healthy_after": 0.5, "heartbeat_interval": 0},
        )
        assert harness.edge is not None
        endpoint = harness.edge.transports["streamable-http"]
        agent = harness.agents[0]
        link = agent.link
        refusals = [3]
        real = endpoint._events

        async def refusing(request: Any, connection_id: str) -> None:
            if refusals[0]:
                refusals[0] -= 1
                raise Refused(503, None, "not now (a test's fault)")
            await real(request, connection_id)

        endpoint._events = refusing
        await eventually(lambda: len(self.log.matching(RESUMING)) >= 5, "five resumes", timeout=30)
        resumes = self.log.matching(RESUMING)[:5]
        ceilings = [0.05, 0.1, 0.2, 0.4, 0.05]  # healthy end, three refusals, healthy end
        for n, (event, ceiling) in enumerate(zip(resumes, ceilings, strict=True)):
            self.assertGreaterEqual(event["delay"], ceiling / 2, (n, event["why"]))
            self.assertLessEqual(event["delay"], ceiling, (n, event["why"]))
        self.assertIn("ended by the edge", resumes[0]["why"])
        self.assertIn("503", resumes[1]["why"])
        self.assertIn("ended by the edge", resumes[4]["why"])
        self.assertIs(agent.link, link)
        code, _, _ = await harness.request("app.test", "/hello")
        self.assertEqual(code, 200)

    async def test_clean_eof_reconnects(self) -> None:
        """The edge ending event streams cleanly (max_stream_duration) is no failure: the agent resumes each, its link and every exchange carry on, nothing is lost or repeated."""
        harness, _ = await self.tunnel({"max_stream_duration": 0.3}, {"resume_initial": 0.02})
        agent = harness.agents[0]
        link = agent.link
        wire = link.wire
        i = 0
        deadline = reactor.seconds() + 30  # type: ignore[attr-defined]
        while wire.streams_opened < 4 or i < 10:
            self.assertLess(reactor.seconds(), deadline, "too few resumed streams")  # type: ignore[attr-defined]
            payload = b"%d " % i * (1 + i % 300)
            code, _, body = await harness.request("app.test", "/echo", b"POST", payload)
            self.assertEqual((code, body), (200, payload))
            i += 1
        self.assertIs(agent.link, link)
        self.assertEqual(wire.duplicates, 0)
        self.assertFalse(self.logged("link down"))

    async def test_permanent_refusal_stops_after_bound(self) -> None:
        """An initialise answered 404 (a wrong URL) or 401 (a gateway wanting credentials) fails the dial for good: after three such rounds the agent stops with an error naming the refusal, instead of dialling forever."""
        harness = TunnelHarness(self, "streamable-http", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge()
        port, _ = await listen_upstream(self)
        gate = Site(_Gate())
        gate_port = reactor.listenTCP(0, gate, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(gate_port.stopListening)
        urls = {
            "404": f"http://127.0.0.1:{harness.link_address().port}/not-the-tunnel",
            "401": f"http://127.0.0.1:{gate_port.getHost().port}/tunnel",
        }
        for status, url in urls.items():
            before = self.log.formats().count("connecting to the edge over {transport}")
            agent = await harness.start_agent(
                {"url": url}, [("app.test", port)], wait=False, reconnect_initial=0.05,
                reconnect_max=0.1,
            )
            message = await agent.gave_up
            self.assertIn("every transport was refused for good, 3 times in a row", message)
            self.assertIn(f": {status}: ", message)
            dials = self.log.formats().count("connecting to the edge over {transport}") - before
            self.assertEqual(dials, 3)
            self.assertFalse(agent.ready.called)
            self.assertEqual(
                {k: v for k, v in tunneld_timers().items() if k.startswith("AgentService")}, {}
            )
        stopped = self.log.matching("{refusal}. Retrying cannot change this, so the agent stops: {hint}.")
        self.assertEqual(len(stopped), 2)
        self.assertIn("admits this agent", stopped[0]["hint"])

    async def test_errors_do_not_leak_internals(self) -> None:
        """An unexpected error is a 500 with an incident number and the state store's outage a 503 with a plain sentence: the agent sees neither the exception nor an address, the log has both with context."""

        class Failing(MemoryStateBackend):
            def get_record(self, namespace: str, key: str) -> Any:
                if key == "boom":
                    raise RuntimeError("SECRET redis://:hunter2@10.9.8.7 /srv/tunneld/state.py")
                if key == "down":
                    return defer.fail(StateUnavailable("no connection to redis://10.9.8.7:6379/0"))
                return super().get_record(namespace, key)

        endpoint = await start_endpoint(self, state=Failing(reactor))
        agent = RawAgent(self, endpoint.url)
        agent.connection_id = b"boom"
        response = await agent.request(b"POST", {framing.SEQ: b"1"}, b"")
        code, error, text = await answer(response)
        self.assertEqual(code, 500)
        self.assertRegex(text, r"^internal error \(incident [0-9a-f]{8}\)\n$")
        incident = text.split("incident ")[1][:8]
        for header in (b"server", b"x-powered-by"):
            self.assertIsNone(response.headers.getRawHeaders(header))
        (failure,) = [e for e in self.log.events if e.get("incident") == incident]
        self.assertIn("SECRET", str(failure["log_failure"].value))
        self.assertEqual(failure["peer"].split(":")[0], "127.0.0.1")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        agent.connection_id = b"down"
        code, error, text = await answer(await agent.request(b"GET"))
        self.assertEqual((code, text), (503, "the edge cannot reach its shared state now; try again\n"))
        (outage,) = self.log.matching(
            "streamable-http {method} from {peer}: the state store is unreachable: {error}"
        )
        self.assertIn("10.9.8.7", outage["error"])

    async def test_every_refusal_names_its_reason(self) -> None:
        """Each way a request can be wrong gets its own status, reason header and sentence, and a log line with the peer."""
        endpoint = await start_endpoint(self, heartbeat_interval=0)
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        known = agent.connection_id
        other = RawAgent(self, endpoint.url.replace("/tunnel", "/elsewhere"))
        cases: list[tuple[Any, tuple[int, str, str]]] = [
            (other.request(b"POST", {}, b""), (404, "", "no agent endpoint at this path")),
            (agent.request(b"PUT", {}, b""), (405, "bad_request", "takes GET, POST and DELETE")),
            (agent.request(b"POST", {}, b""), (400, "bad_request", "Tunnel-Seq is missing")),
            (agent.request(b"POST", {framing.SEQ: b"x1"}, b""), (400, "bad_request", "not a number")),
            (agent.request(b"POST", {framing.SEQ: b"1"}, b"\x00\x00\x00\x09abc"),
             (400, "protocol_error", "malformed batch of frames: frame 0 truncated")),
            (agent.request(b"GET", {b"Last-Event-ID": b"99"}),
             (410, "", "cannot resume: event 99 was never sent")),
        ]
        for request, expected in cases:
            code, error, text = await answer(await request)
            self.assertEqual((code, error), expected[:2], text)
            self.assertIn(expected[2], text)
        agent.connection_id = b"no-such-connection"
        code, _, text = await answer(await agent.request(b"GET"))
        self.assertEqual(code, 404)
        self.assertIn("no such connection", text)
        agent.connection_id = b""
        code, error, text = await answer(await agent.request(b"GET"))
        self.assertEqual((code, error), (400, "bad_request"))
        self.assertIn("Tunnel-Connection-Id is missing", text)
        agent.connection_id = known
        await answer(await agent.request(b"DELETE"))
        code, error, text = await answer(await agent.request(b"GET"))
        self.assertEqual((code, error), (410, "agent_gone"))
        self.assertIn("the connection is closed: agent_gone: the agent ended the connection", text)
        refused = self.log.matching(REFUSED)
        self.assertEqual(len(refused), len(cases) + 3)
        self.assertTrue(all(e["peer"].startswith("127.0.0.1:") for e in refused))

    async def test_event_gap_ends_the_link_never_skips(self) -> None:
        """Events must come numbered one after another: one seen already is dropped, and a gap ends the link with protocol_error instead of carrying on past the lost events."""
        edge = _StubEdge([framing.frame_event(n, ping(n)) for n in (1, 2, 2, 3, 5, 6)])
        link, handler = await self.stub_link(edge)
        await eventually(lambda: handler.lost, "the link to end")
        ((reason, message),) = handler.lost
        self.assertEqual(reason, Reason.PROTOCOL_ERROR)
        self.assertIn("event 5 came after 3: events were lost", message)
        self.assertEqual(link.wire.duplicates, 1)
        await link.when_closed()  # its last batch (the pongs and its GoAway) posted, then DELETE
        self.assertEqual(pongs_posted(edge), [1, 2, 3])  # each answered once, none after the gap

    async def test_unacknowledged_replay_is_bounded(self) -> None:
        """An agent that reads its events but never acknowledges them fills the replay buffer, which pauses the link's streams at half and closes the connection with saturated, named, when full."""
        endpoint = await start_endpoint(self, replay_max_bytes=1 << 20, heartbeat_interval=0)
        agent = RawAgent(self, endpoint.url)
        await agent.initialise()
        owned = endpoint.owned(agent)
        response, reader = await self.subscribe(agent)
        paused = []
        owned.link.pause_sending = lambda: paused.append(True)  # type: ignore[method-assign]
        chunk = b"x" * 65536
        sent = 0
        while not owned.finishing and sent < 40:
            owned.send_frame(chunk)
            sent += 1
        self.assertEqual(paused, [True])  # once, at half
        self.assertEqual(sent, 17)  # the 17th 64 KiB event overflows 1 MiB
        closed = await reader.closed
        self.assertTrue(closed.startswith("saturated replay buffer full: the agent acknowledged none of 17 events"), closed)
        *data, farewell = [e for e in reader.events if e.kind == "message"]
        self.assertEqual(len(data), 17)  # every event sent is delivered, then the link's GoAway
        goaway = codec.control_from(codec.decode(framing.decode_data(farewell.data)))
        self.assertEqual(goaway.reason, Reason.SATURATED)

    async def test_agent_pending_frames_are_bounded(self) -> None:
        """Frames an edge does not take pile up on the agent only to max_pending_bytes: streams pause at half, and a full buffer closes the link with saturated, naming it."""
        edge = _StubEdge([], answer_posts=False)
        link, handler = await self.stub_link(edge, max_pending_bytes=1 << 20)
        paused = []
        link.pause_sending = lambda: paused.append(True)
        for _ in range(40):
            link.send(ping(1) + b"\x00" * 65536)
            if handler.lost:
                break
        self.assertEqual(paused, [True])
        ((reason, message),) = handler.lost
        self.assertEqual(reason, Reason.SATURATED)
        self.assertIn("the edge took none of", message)
        self.assertIn("(max_pending_bytes)", message)

    async def stub_link(self, edge: _StubEdge, **table: Any) -> tuple[Any, _Handler]:
        site = reactor.listenTCP(0, Site(edge), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(site.stopListening)
        plugin = find_transport("streamable-http", "(test)", "transports")
        options = plugin.agent_options(
            {"url": f"http://127.0.0.1:{site.getHost().port}/tunnel", "heartbeat_interval": 0,
             **table}, "(test)",
        )
        link = await plugin.connect(options, AgentLinkSetup(reactor=reactor))
        handler = _Handler()
        link.set_handler(handler)

        async def close() -> None:
            link.close(Reason.CANCELLED, "test over")
            await link.when_closed()

        self.addCleanup(close)
        return link, handler

    async def test_mutual_tls_binds_a_connection_to_its_certificate(self) -> None:
        """Over TLS with client certificates an agent is welcomed by its certificate's identity; another valid certificate cannot use its connection (403 naming the mismatch), and no certificate fails the handshake."""
        from tests.test_identity import HANDSHAKE_REFUSED, PKI
        from tunneld.tls import client_tls_for

        pki = PKI(self)
        harness = TunnelHarness(self, "streamable-http", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge(agent_tls=pki.edge_tls(), open_loopback_registration=False)
        port, _ = await listen_upstream(self)
        url = f"https://127.0.0.1:{harness.link_address().port}/tunnel"
        agent = await harness.start_agent(
            {"url": url}, [("a.example", port), ("b.example", port)], agent_id="alpha",
            tls=pki.agent_tls(pki.agent("alpha", ["a.example"])),
        )
        welcome = agent.ready.result
        self.assertEqual(welcome.public_urls, ("http://a.example/",))
        self.assertEqual([r.tunnel.hostname for r in welcome.refused], ["b.example"])
        code, _, body = await harness.request("a.example", "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))
        assert harness.edge is not None
        (connection_id,) = harness.edge.transports["streamable-http"].connections
        cert, key = pki.agent("beta", ["b.example"])
        intruder = RawAgent(self, url, client_tls_for(pki.ca_path, cert, key, "localhost"))
        intruder.connection_id = connection_id.encode()
        for request in (intruder.request(b"GET"), intruder.request(b"POST", {framing.SEQ: b"9"}, b"")):
            code, error, text = await answer(await request)
            self.assertEqual((code, error), (403, "unauthorized"))
            self.assertIn("opened with another client certificate", text)
        anonymous = RawAgent(self, url, client_tls_for(pki.ca_path, "", "", "localhost"))
        from twisted.web.client import ResponseNeverReceived

        with self.assertRaises(ResponseNeverReceived):
            await anonymous.request(b"POST", {}, b"")
        await eventually(lambda: self.log.matching(HANDSHAKE_REFUSED), "the handshake refusal")
        self.assertEqual(self.log.matching(HANDSHAKE_REFUSED)[0]["check"], "no client certificate")

    async def test_draining_edge_refuses_new_connections_keeps_old(self) -> None:
        """A draining edge refuses initialises with 503 draining while the connections it has keep their event streams and POSTs."""
        harness, _ = await self.tunnel({"max_stream_duration": 0.3})
        assert harness.edge is not None
        endpoint = harness.edge.transports["streamable-http"]
        await endpoint.stop_accepting()
        newcomer = RawAgent(self, f"http://127.0.0.1:{harness.link_address().port}/tunnel")
        code, error, _ = await answer(await newcomer.request(b"POST", {}, b""))
        self.assertEqual((code, error), (503, "draining"))
        wire = harness.agents[0].link.wire
        opened = wire.streams_opened
        i = 0
        deadline = reactor.seconds() + 30  # type: ignore[attr-defined]
        while wire.streams_opened < opened + 2:  # resumed, twice, while draining
            self.assertLess(reactor.seconds(), deadline, "no resumed stream")  # type: ignore[attr-defined]
            code, _, body = await harness.request("app.test", "/echo", b"POST", b"still here %d" % i)
            self.assertEqual((code, body), (200, b"still here %d" % i))
            i += 1

    async def test_agent_stop_ends_its_connection_at_once(self) -> None:
        """A stopping agent DELETEs its connection: the edge removes it at once, not after a timeout."""
        harness, _ = await self.tunnel()
        assert harness.edge is not None
        endpoint = harness.edge.transports["streamable-http"]
        (connection_id,) = endpoint.connections
        await harness.agents[0].stopService()
        self.assertEqual(endpoint.connections, {})
        (closed,) = self.log.matching(CLOSED)
        self.assertEqual(closed["connection"], connection_id)
        # Its GoAway (the edge retires the session) or its DELETE, whichever came first.
        self.assertIn(closed["detail"], ("agent is going away: agent stopping",
                                         "the agent ended the connection"))
        self.assertEqual(harness.edge.sessions.sessions, {})


class _StubEdge(Resource):
    """An edge that answers as the test says: a connection id, then the events given, verbatim."""

    isLeaf = True

    def __init__(self, events: list[bytes], answer_posts: bool = True) -> None:
        super().__init__()
        self.events = events
        self.answer_posts = answer_posts
        self.posted: list[bytes] = []
        self.streams: list[Any] = []

    def render_POST(self, request: Any) -> bytes:  # noqa: N802
        if not request.getHeader(b"tunnel-connection-id"):
            request.setResponseCode(201)
            request.setHeader(b"Tunnel-Connection-Id", b"stub")
            return b""
        self.posted.extend(bytes(f) for f in framing.decode_batch(request.content.read(), 1 << 20))
        if not self.answer_posts:
            from twisted.web.server import NOT_DONE_YET

            return NOT_DONE_YET  # type: ignore[no-any-return]
        request.setResponseCode(202)
        return b""

    def render_GET(self, request: Any) -> Any:  # noqa: N802
        from twisted.web.server import NOT_DONE_YET

        request.setHeader(b"Content-Type", b"text/event-stream")
        request.write(b": stub\n\n")
        for event in self.events:
            request.write(event)
        self.streams.append(request)
        return NOT_DONE_YET

    def render_DELETE(self, request: Any) -> bytes:  # noqa: N802
        request.setResponseCode(204)
        return b""


def pongs_posted(edge: _StubEdge) -> list[int]:
    found = []
    for frame in edge.posted:
        _, kind, body, _ = codec.read(frame)
        if kind == codec.PONG:
            found.append(body)
    return found


class FramingTests(SynchronousTestCase):
    """The wire format on its own: batches, both event encodings, the event parser."""

    skip = MISSING

    @given(st.lists(st.binary(max_size=300), max_size=20), st.data())
    @settings(max_examples=200, deadline=None)
    def test_frames_cross_events_whole_whatever_the_reads(self, frames: list[bytes], data: Any) -> None:
        """Any frames, as events read in any pieces (LF or CRLF lines), come out as they went in, in order."""
        stream = b"".join(framing.frame_event(n, frame) for n, frame in enumerate(frames, 1))
        if data.draw(st.booleans()):
            stream = stream.replace(b"\n", b"\r\n")
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        parser = framing.EventParser(1 << 16)
        events = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            events.extend(parser.feed(stream[start:end]))
        self.assertEqual([framing.decode_data(e.data) for e in events], frames)
        self.assertEqual([e.event_id for e in events], [str(n) for n in range(1, len(frames) + 1)])
        body = framing.encode_batch(frames)
        self.assertEqual([bytes(f) for f in framing.decode_batch(body, 300)], frames)

    def test_text_for_ascii_payloads_base64_for_the_rest(self) -> None:
        """A frame whose payload is ASCII crosses as text (LF and CR escaped), any other as base64."""
        text = b"\x08\x01" + b'{"ok": true}\r\n' * 20
        self.assertTrue(framing.encode_data(text).startswith(b"t"))
        self.assertNotIn(b"\n", framing.encode_data(text))
        self.assertTrue(framing.encode_data(bytes(range(256))).startswith(b"b"))
        with self.assertRaises(ValueError):
            framing.decode_data(b"x123")
        with self.assertRaises(ValueError):
            framing.decode_data(b"b!!!")

    def test_bad_batches_and_long_lines_are_refused(self) -> None:
        """A truncated or oversized batch record, and an event line past the parser's bound, are errors that say what is wrong."""
        for body, problem in (
            (b"\x00\x00", "2 stray bytes after frame 0"),
            (b"\x00\x00\x00\x05abc", "frame 0 truncated: 3 of 5 bytes"),
            (b"\x00\x01\x00\x00", "frame 0 of 65536 bytes exceeds 1024"),
        ):
            with self.assertRaises(framing.BatchError) as raised:
                framing.decode_batch(body, 1024)
            self.assertIn(problem, str(raised.exception))
        parser = framing.EventParser(100)
        with self.assertRaises(ValueError):
            list(parser.feed(b"data: " + b"x" * 200))

    def test_backoff_doubles_with_jitter_and_starts_over(self) -> None:
        """The resume backoff: 50-100 % of a ceiling that doubles to the maximum, back to the first after a reset."""
        from tunneld_streamable_http.agent import Backoff

        backoff = Backoff(0.1, 1.0, random.Random(7))
        delays = [backoff.next_delay() for _ in range(6)]
        for delay, ceiling in zip(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0], strict=True):
            self.assertTrue(ceiling / 2 <= delay <= ceiling, (delay, ceiling))
        backoff.reset()
        self.assertLessEqual(backoff.next_delay(), 0.1)


class SessionTableTests(TestCase):
    """The edge's table of streamable-HTTP connections, in the admin API and `tunneld status`."""

    skip = MISSING
    timeout = 90

    async def test_admin_api_and_status_show_the_connection_table(self) -> None:
        """
        GET /api/transports lists the agent's connection (owned here, its
        event stream here, the agent's session, frames numbered and
        acknowledged) and the event stream this edge holds; `tunneld status`
        prints the same rows; once the agent stops, the table is empty.
        """
        import json

        from twisted.internet.utils import getProcessOutputAndValue

        harness = TunnelHarness(self, "streamable-http", {"listen": "tcp:0:interface=127.0.0.1"})
        edge = await harness.start_edge()
        port, _ = await listen_upstream(self)
        url = f"http://127.0.0.1:{harness.link_address().port}/tunnel"
        agent = await harness.start_agent({"url": url}, [("app.test", port)], agent_id="shttp-agent")
        code, _, body = await harness.request("app.test", "/hello")
        self.assertEqual(code, 200)
        assert edge.observe.admin is not None
        admin = f"http://127.0.0.1:{edge.observe.admin.address.port}"

        async def table() -> dict[str, Any]:
            response = await harness.client.request(b"GET", f"{admin}/api/transports".encode())
            return json.loads(await readBody(response))  # type: ignore[no-any-return]

        await eventually(lambda: edge.transports["streamable-http"].connections, "the connection")
        body = await table()
        shttp = body["transports"]["streamable-http"]
        [row] = shttp["connections"]
        [session] = edge.sessions.sessions.values()
        self.assertEqual(
            (row["agent"], row["session"], row["event_stream"], row["closing"]),
            ("shttp-agent", session.session_id, "here", False),
        )
        self.assertGreater(row["next_event"], 1)
        self.assertLessEqual(row["acked"], row["next_event"])
        self.assertEqual(
            [(s["connection"], s["owned_here"]) for s in shttp["event_streams"]],
            [(row["connection"], True)],
        )
        self.assertEqual(body["sse_replay"], [])
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tunneld.cli", "status", "--admin", admin],
            env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT,
        )
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("streamable-http connections owned by this edge", text)
        [line] = [ln for ln in text.splitlines() if ln.startswith(row["connection"][:12])][:1]
        self.assertIn("shttp-agent", line)
        self.assertIn(" here ", line)
        await agent.stopService()
        await eventually(lambda: not edge.transports["streamable-http"].connections, "no connection")
        body = await table()
        self.assertEqual(body["transports"]["streamable-http"]["connections"], [])
