"""
Tests for L{tunneld.edge.http1}: the public HTTP/1.1 listener, on real
loopback sockets, against a fake router and a fake agent link whose streams
record what the edge sends and let the test play the agent's part.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunneld.edge.gateway import EdgeGateway
from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPProtocol, PublicHTTPSettings
from tunneld.edge.upgraded import close_text
from tunneld.edge.websocket_frames import ping_frame
from tunneld.interfaces import IAgentLink, IStream, IStreamReceiver
from tunneld.model.messages import Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason

HOST = "app.example.com"


class _Waiters:
    """Lets a test wait, without polling, until a condition on this object holds."""

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def until(self, condition: Callable[[], bool]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append((condition, d))
        self._changed()
        return d

    def _changed(self) -> None:
        # Waiters resume on a later turn: the test must not run inside the
        # edge's own call (as a real agent, which answers later, never does).
        ready = [(c, d) for c, d in self._waiters if c()]
        for entry in ready:
            self._waiters.remove(entry)
            reactor.callLater(0, entry[1].callback, None)


@implementer(IStream)
class FakeStream(_Waiters):
    """A stream that records what the edge sends and lets the test answer as the agent."""

    def __init__(self, head: StreamHead, receiver: IStreamReceiver) -> None:
        super().__init__()
        self.head = head
        self.receiver = receiver
        self.chunks: list[bytes] = []
        self.ended: tuple[tuple[bytes, bytes], ...] | None = None
        self.opened_ended = False  # opened with end_stream (a request without a body)
        self.reset_with: tuple[Reason, str] | None = None
        self.producer: Any = None
        self.paused = False
        self.pauses = 0

    # IStream, as the edge drives it
    def attach(self, receiver: IStreamReceiver) -> None:
        self.receiver = receiver

    def send_reply(self, reply: ReplyHead) -> None:
        raise AssertionError("the edge never sends a reply")

    def write(self, data: bytes) -> None:
        assert type(data) is bytes, type(data)
        self.chunks.append(data)
        self._changed()

    def end(self, trailers: Headers = ()) -> None:
        self.ended = tuple(trailers)
        self._changed()

    def reset(self, reason: Reason, message: str) -> None:
        self.reset_with = (reason, message)
        self._changed()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1
        self._changed()

    def resumeProducing(self) -> None:
        self.paused = False
        self._changed()

    def stopProducing(self) -> None:
        raise AssertionError("the edge resets streams with a reason instead")

    # the agent's part, played by the test
    def reply(self, status: int, headers: Headers = (), reason: bytes = b"") -> None:
        self.receiver.reply_received(ReplyHead(status, reason, tuple(headers)))

    def send(self, data: bytes) -> None:
        self.receiver.data_received(data)

    def finish(self, trailers: Headers = ()) -> None:
        self.receiver.end_received(tuple(trailers))

    def fail(self, reason: Reason, message: str) -> None:
        self.receiver.reset_received(reason, message)

    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.head.headers if n.lower() == name]


@implementer(IAgentLink)
class FakeLink(_Waiters):
    """An agent link whose streams are L{FakeStream}s."""

    transport_name = "fake"
    peer = "agent.test:1"
    peer_certificate = None

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[FakeStream] = []

    def set_handler(self, handler: Any) -> None:
        pass

    def send_control(self, message: Any) -> None:
        pass

    def open_stream(
        self, head: StreamHead, receiver: IStreamReceiver, end_stream: bool = False
    ) -> IStream:
        verifyObject(IStreamReceiver, receiver)
        stream = FakeStream(head, receiver)
        stream.opened_ended = end_stream
        if end_stream:
            stream.end()
        self.streams.append(stream)
        self._changed()
        return stream

    def round_trip_time(self) -> float | None:
        return None

    def active_streams(self) -> int:
        return len(self.streams)

    def close(self, reason: Reason, message: str) -> None:
        for stream in self.streams:
            stream.fail(reason, message)

    def when_closed(self) -> Any:
        return succeed(None)

    async def stream(self, index: int = 0) -> FakeStream:
        await self.until(lambda: len(self.streams) > index)
        return self.streams[index]


@dataclass(frozen=True)
class FakeRoute:
    tunnel: str
    link: IAgentLink


class FakeRouter:
    """A routing table: host → route or reason; anything else is C{no_tunnel}."""

    def __init__(self, table: dict[str, FakeRoute | Reason]) -> None:
        self.table = table
        self.calls: list[tuple[str, str]] = []

    def route(self, host: str, path: str) -> FakeRoute | Reason:
        self.calls.append((host, path))
        return self.table.get(host, Reason.NO_TUNNEL)


@dataclass
class Reply:
    """One HTTP response as the client read it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]
    chunked: bool

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, (name, values)
        return values[0] if values else None


def _parse_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    fields = []
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            fields.append((name.strip().lower(), value.strip()))
    return fields


def parse_one(data: bytes, bodyless: bool = False) -> tuple[Reply, bytes] | None:
    """The first whole response in C{data} and what follows it, or None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line, _, block = data[:end].partition(b"\r\n")
    status = int(status_line.split(b" ")[1])
    headers = _parse_fields(block)
    rest = data[end + 4 :]
    fields = dict(headers)
    if bodyless or status < 200 or status in (204, 304):
        return Reply(status, headers, b"", [], False), rest
    if fields.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            line_end = rest.find(b"\r\n")
            if line_end < 0:
                return None
            size = int(rest[:line_end].split(b";")[0], 16)
            rest = rest[line_end + 2 :]
            if size == 0:
                trailer_end = rest.find(b"\r\n\r\n") if not rest.startswith(b"\r\n") else -2
                if trailer_end == -2:
                    return Reply(status, headers, body, [], True), rest[2:]
                if trailer_end < 0:
                    return None
                trailers = _parse_fields(rest[:trailer_end])
                return Reply(status, headers, body, trailers, True), rest[trailer_end + 4 :]
            if len(rest) < size + 2:
                return None
            body += rest[:size]
            rest = rest[size + 2 :]
    length = int(fields.get(b"content-length", b"-1"))
    if length < 0 or len(rest) < length:
        return None  # close-delimited or incomplete
    return Reply(status, headers, rest[:length], [], False), rest[length:]


def parse_all(data: bytes) -> list[Reply]:
    replies = []
    while True:
        parsed = parse_one(data)
        if parsed is None:
            return replies
        reply, data = parsed
        replies.append(reply)


class RawClient(Protocol, _Waiters):
    """A public client that sends raw bytes and keeps everything it reads."""

    def __init__(self) -> None:
        _Waiters.__init__(self)
        self.received = b""
        self.lost: Failure | None = None
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._changed()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        self.closed.callback(None)
        self._changed()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def replies(self, count: int = 1) -> list[Reply]:
        await self.until(lambda: len(parse_all(self.received)) >= count)
        return parse_all(self.received)


class RecordingFactory(PublicHTTPFactory):
    """Keeps the server-side protocols so each test can wait for them to close."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.protocols: list[PublicHTTPProtocol] = []
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> PublicHTTPProtocol:
        protocol = super().buildProtocol(addr)
        lost: Deferred[None] = Deferred()
        original = protocol.connectionLost

        def connectionLost(reason: Failure) -> None:
            original(reason)
            lost.callback(None)

        protocol.connectionLost = connectionLost  # type: ignore[method-assign]
        self.protocols.append(protocol)
        self.lost.append(lost)
        return protocol


def request(method: str = "GET", target: str = "/", host: str = HOST, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class PublicHTTPTests(unittest.TestCase):
    """The public listener on real loopback sockets."""

    timeout = 15

    def setUp(self) -> None:
        self.clock = Clock()
        self.link = FakeLink()
        self.router = FakeRouter({HOST: FakeRoute(HOST, self.link)})
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    async def serve(self, settings: PublicHTTPSettings | None = None) -> RawClient:
        """Listen on port 0 and connect one raw client; everything is closed at cleanup."""
        self.factory = RecordingFactory(
            EdgeGateway(self.router), settings or PublicHTTPSettings(), self.clock
        )
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(self._close_server_side)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), RawClient()
        )
        self.addCleanup(self._close_client, client)
        return client

    async def _close_client(self, client: RawClient) -> None:
        if client.lost is None:
            assert client.transport is not None
            client.transport.abortConnection()  # type: ignore[attr-defined]
        await client.closed

    async def _close_server_side(self) -> None:
        for protocol in self.factory.protocols:
            if protocol.transport is not None and protocol.transport.connected:  # type: ignore[attr-defined]
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        await gatherResults(self.factory.lost)

    def server_transport(self) -> Any:
        return self.factory.protocols[-1].transport

    def assertLogged(self, fmt: str, **fields: Any) -> None:
        matching = [
            e for e in self.events
            if e.get("log_format") == fmt and all(e.get(k) == v for k, v in fields.items())
        ]
        self.assertTrue(matching, f"no {fmt!r} event with {fields} in {list(self.events)}")

    # -- routing ------------------------------------------------------------

    async def test_routes_by_host_with_forwarding_headers(self) -> None:
        """The stream's head names the tunnel, hop-by-hop headers are gone, X-Forwarded-* and Via are added."""
        client = await self.serve()
        client.send(request(
            "GET", "/path?q=1", "App.Example.com:8080",
            "Connection: keep-alive, X-Hop",
            "X-Hop: secret",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Proxy-Authorization: Basic Zm9vOmJhcg==",
            "Proxy-Connection: keep-alive",
            "X-Forwarded-For: 10.0.0.1",
            "X-Forwarded-Proto: https",
            "Via: 1.0 other",
            "Accept: */*",
        ))
        stream = await self.link.stream()
        self.assertEqual(self.router.calls, [(HOST, "/path")])
        head = stream.head
        self.assertEqual(
            (head.kind, head.tunnel, head.method, head.target, head.scheme),
            ("http", HOST, "GET", "/path?q=1", "http"),
        )
        self.assertEqual(head.peer, f"127.0.0.1:{client.transport.getHost().port}")  # type: ignore[union-attr]
        names = {n for n, _ in head.headers}
        for hop in (b"connection", b"x-hop", b"keep-alive", b"te", b"proxy-authorization",
                    b"proxy-connection", b"transfer-encoding", b"content-length"):
            self.assertNotIn(hop, names)
        self.assertEqual(stream.header(b"host"), [b"App.Example.com:8080"])
        self.assertEqual(stream.header(b"accept"), [b"*/*"])
        # The peer is no trusted proxy: its own X-Forwarded-For is not believed.
        self.assertEqual(stream.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(stream.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(stream.header(b"x-forwarded-host"), [b"App.Example.com:8080"])
        self.assertEqual(stream.header(b"via"), [b"1.0 other, 1.1 tunneld"])
        # A Connection token: h11 reads the head, and still the Open says there is no body.
        self.assertTrue(stream.opened_ended)
        stream.reply(200, [(b"Content-Length", b"2")])
        stream.send(b"ok")
        stream.finish()
        [reply] = await client.replies()
        self.assertEqual((reply.status, reply.body), (200, b"ok"))

    async def test_absolute_form_target_routes_by_its_authority(self) -> None:
        """An absolute-form target is routed by its authority and forwarded in origin form."""
        client = await self.serve()
        client.send(request("GET", f"http://{HOST}/a/b?c", "ignored.example"))
        stream = await self.link.stream()
        self.assertEqual(self.router.calls, [(HOST, "/a/b")])
        self.assertEqual(stream.head.target, "/a/b?c")
        self.assertEqual(stream.header(b"host"), [HOST.encode()])
        stream.fail(Reason.UPSTREAM_REFUSED, "test over")
        await client.replies()

    async def test_unknown_host_is_404_and_keeps_the_connection(self) -> None:
        """An unrouted host gets 404 with Tunnel-Error no_tunnel, is logged, and the connection serves the next request."""
        client = await self.serve()
        client.send(request("POST", "/x", "nope.example", "Content-Length: 5") + b"hello")
        [refused] = await client.replies()
        self.assertEqual(refused.status, 404)
        self.assertEqual(refused.header(b"tunnel-error"), b"no_tunnel")
        self.assertEqual(refused.header(b"content-type"), b"text/plain")
        self.assertEqual(refused.body, Reason.NO_TUNNEL.description.encode() + b"\n")
        self.assertIsNone(refused.header(b"connection"))
        self.assertLogged(
            "refused {method} {host}{target} from {peer}: {reason}",
            method="POST", host="nope.example", target="/x", reason="no_tunnel",
        )
        self.assertEqual(self.link.streams, [])
        client.send(request("GET", "/next"))
        stream = await self.link.stream()
        self.assertEqual(stream.head.target, "/next")
        stream.reply(204)
        stream.finish()
        replies = await client.replies(2)
        self.assertEqual(replies[1].status, 204)
        self.assertIsNone(client.lost)

    async def test_agent_unavailable_is_503(self) -> None:
        """A router reason such as agent_unavailable becomes its HTTP status and Tunnel-Error."""
        self.router.table["down.example"] = Reason.AGENT_UNAVAILABLE
        client = await self.serve()
        client.send(request("GET", "/", "down.example"))
        [reply] = await client.replies()
        self.assertEqual(reply.status, 503)
        self.assertEqual(reply.header(b"tunnel-error"), b"agent_unavailable")
        self.assertEqual(reply.body, Reason.AGENT_UNAVAILABLE.description.encode() + b"\n")

    async def test_missing_host_is_400(self) -> None:
        """An HTTP/1.0 request without Host is refused with 400 bad_request."""
        client = await self.serve()
        client.send(b"GET / HTTP/1.0\r\n\r\n")
        [reply] = await client.replies()
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.header(b"tunnel-error"), b"bad_request")
        self.assertIn(b"Host", reply.body)

    async def test_connect_is_501(self) -> None:
        """A CONNECT request is answered 501 with Tunnel-Error bad_request and opens no stream."""
        client = await self.serve()
        client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        [reply] = await client.replies()
        self.assertEqual(reply.status, 501)
        self.assertEqual(reply.header(b"tunnel-error"), b"bad_request")
        self.assertEqual(self.link.streams, [])

    async def websocket(
        self, *extra: str, settings: PublicHTTPSettings | None = None
    ) -> tuple[RawClient, FakeStream]:
        """A client whose WebSocket upgrade the test (as the agent) accepted; early bytes sent."""
        client = await self.serve(settings)
        client.send(request(
            "GET", "/ws", HOST, "Connection: keep-alive, Upgrade", "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Extensions: permessage-deflate",
            *extra,
        ) + b"early")
        stream = await self.link.stream()
        stream.reply(101, [
            (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            (b"Sec-WebSocket-Protocol", b"chat"), (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
        ])
        await client.until(lambda: b"\r\n\r\n" in client.received)
        return client, stream

    async def test_upgrade_opens_an_upgrade_stream_and_relays_101(self) -> None:
        """An Upgrade opens a stream of kind upgrade keeping Upgrade, Connection: Upgrade and Sec-WebSocket-*; the 101 is relayed with its headers."""
        client, stream = await self.websocket()
        self.assertEqual(stream.head.kind, "upgrade")
        self.assertEqual(stream.header(b"upgrade"), [b"websocket"])
        self.assertEqual(stream.header(b"connection"), [b"Upgrade"])
        self.assertEqual(stream.header(b"sec-websocket-protocol"), [b"chat"])
        self.assertEqual(stream.header(b"sec-websocket-extensions"), [b"permessage-deflate"])
        head = client.received.split(b"\r\n\r\n")[0].lower()
        self.assertTrue(head.startswith(b"http/1.1 101 "), head)
        for line in (b"upgrade: websocket", b"connection: upgrade", b"sec-websocket-protocol: chat",
                     b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="):
            self.assertIn(line, head.split(b"\r\n"))

    async def test_upgraded_connection_is_a_pipe(self) -> None:
        """After the 101, bytes flow raw both ways (early bytes first), and ends map to half-closes."""
        client, stream = await self.websocket()
        await stream.until(lambda: stream.body() == b"early")
        client.send(b"\x00raw bytes, not HTTP\r\n\r\n")
        await stream.until(lambda: stream.body().endswith(b"not HTTP\r\n\r\n"))
        stream.send(b"\x81\x02hi")
        await client.until(lambda: client.received.endswith(b"\x81\x02hi"))
        stream.finish()  # the upstream is done sending: a half-close towards the client
        await client.until(lambda: client.lost is None and client.transport is not None)
        client.transport.loseWriteConnection()
        await stream.until(lambda: stream.ended is not None)
        await client.closed
        self.assertIsNone(stream.reset_with)

    async def test_upgraded_connection_has_backpressure_both_ways(self) -> None:
        """After the switch a stream out of credit stops reading the client, and a slow client pauses the stream."""
        client, stream = await self.websocket()
        await stream.until(lambda: stream.body() == b"early")
        stream.producer.pauseProducing()
        self.assertNotIn(self.server_transport(), reactor.getReaders())
        client.send(b"held")
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(stream.body(), b"early")
        stream.producer.resumeProducing()
        await stream.until(lambda: stream.body() == b"earlyheld")
        size = 1 << 20
        stream.send(b"\x82\x7f" + struct.pack("!Q", size) + b"x" * size)
        self.assertTrue(stream.paused)
        await stream.until(lambda: not stream.paused)
        await client.until(lambda: client.received.endswith(b"x" * 1000))

    async def test_declined_upgrade_is_an_ordinary_response(self) -> None:
        """A non-101 reply to an upgrade is relayed as a normal response and the connection serves the next request."""
        client = await self.serve()
        client.send(request("GET", "/ws", HOST, "Connection: Upgrade", "Upgrade: websocket"))
        stream = await self.link.stream()
        stream.reply(426, [(b"Content-Length", b"4")])
        stream.send(b"nope")
        stream.finish()
        [reply] = await client.replies()
        self.assertEqual((reply.status, reply.body), (426, b"nope"))
        self.assertEqual(stream.ended, ())
        client.send(request("GET", "/next"))
        second = await self.link.stream(1)
        self.assertEqual(second.head.kind, "http")
        second.fail(Reason.UPSTREAM_REFUSED, "test over")
        await client.replies(2)

    async def test_upgrade_to_an_unknown_host_is_refused(self) -> None:
        """An upgrade the router cannot place gets the reason's HTTP status, like any request."""
        client = await self.serve()
        client.send(request("GET", "/ws", "nowhere.example", "Connection: Upgrade", "Upgrade: websocket"))
        [reply] = await client.replies()
        self.assertEqual(reply.status, 404)
        self.assertEqual(reply.header(b"tunnel-error"), b"no_tunnel")
        client.send(request("GET", "/next"))
        stream = await self.link.stream()
        self.assertEqual(stream.head.kind, "http")
        stream.fail(Reason.UPSTREAM_REFUSED, "test over")
        await client.replies(2)

    async def test_upgrade_with_a_body_is_refused(self) -> None:
        """An upgrade request that carries a body is refused with 400 bad_request."""
        client = await self.serve()
        client.send(request(
            "POST", "/ws", HOST, "Connection: Upgrade", "Upgrade: x", "Content-Length: 3",
        ) + b"abc")
        [reply] = await client.replies()
        self.assertEqual(reply.status, 400)
        self.assertEqual(self.link.streams, [])

    async def test_websocket_reset_at_a_frame_boundary_sends_close(self) -> None:
        """A tunnel reset between frames sends a Close frame with the reason's code and text."""
        client, stream = await self.websocket()
        stream.send(b"\x82\x7e\x00\x80" + b"x" * 128)  # one whole 128-byte frame
        stream.fail(Reason.AGENT_GONE, "link lost")
        await client.until(lambda: b"\x88" in client.received.rpartition(b"x")[2])
        tail = client.received.rpartition(b"x")[2]
        text = close_text(Reason.AGENT_GONE).encode()
        self.assertEqual(tail, bytes((0x88, 2 + len(text))) + (1011).to_bytes(2, "big") + text)
        client.send(b"\x88\x82abcd" + bytes(a ^ b for a, b in zip(b"\x03\xf3", b"ab", strict=True)))
        await client.closed  # the client's Close answered, the edge hangs up

    async def test_websocket_reset_mid_frame_cuts_the_connection(self) -> None:
        """A tunnel reset in the middle of a relayed frame aborts the connection: no Close frame."""
        client, stream = await self.websocket()
        stream.send(b"\x82\x7e\x00\x80" + b"x" * 100)  # 28 bytes short
        await client.until(lambda: client.received.endswith(b"x" * 100))
        stream.fail(Reason.SATURATED, "too slow")
        await client.closed
        self.assertTrue(client.received.endswith(b"x" * 100))

    async def test_websocket_ping_only_when_idle_and_between_frames(self) -> None:
        """With a ping interval, an idle client gets a Ping, but never in the middle of a frame."""
        client, stream = await self.websocket(settings=PublicHTTPSettings(websocket_ping_interval=1.0))
        stream.send(b"\x82\x7e\x00\x80" + b"x" * 100)  # 28 bytes short
        await client.until(lambda: client.received.endswith(b"x" * 100))
        self.clock.advance(1.5)  # idle, but mid-frame: no ping yet
        stream.send(b"x" * 28)
        await client.until(lambda: client.received.endswith(b"x" * 28))
        self.clock.advance(1.0)
        ping = ping_frame(b"tunneld")
        await client.until(lambda: client.received.endswith(ping))
        self.assertTrue(client.received.endswith(b"x" * 128 + ping))

    async def test_idle_websocket_runs_on_the_connections_one_timer(self) -> None:
        """An idle WebSocket holds one delayed call (its connection's, re-armed past the header timeout) and gets a Close frame at idle_timeout."""
        client, stream = await self.websocket(settings=PublicHTTPSettings(idle_timeout=60))
        await stream.until(lambda: stream.body() == b"early")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(59)
        self.assertIsNone(stream.reset_with)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)
        self.assertEqual(stream.reset_with[0] if stream.reset_with else None, Reason.IDLE_TIMEOUT)
        text = close_text(Reason.IDLE_TIMEOUT).encode()
        await client.until(lambda: text in client.received)

    async def test_h2c_upgrade_offer_is_ignored(self) -> None:
        """An offer to upgrade to h2c is served as plain HTTP/1.1, without the upgrade headers."""
        client = await self.serve()
        client.send(request(
            "GET", "/", HOST, "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        ))
        stream = await self.link.stream()
        self.assertEqual(stream.header(b"upgrade"), [])
        self.assertEqual(stream.header(b"http2-settings"), [])
        stream.reply(200, [(b"Content-Length", b"2")])
        stream.send(b"ok")
        stream.finish()
        [reply] = await client.replies()
        self.assertEqual((reply.status, reply.body), (200, b"ok"))

    # -- bodies both ways ---------------------------------------------------

    async def test_request_body_streams_in_pieces(self) -> None:
        """The request body reaches the stream as it arrives, before the client has sent all of it."""
        client = await self.serve()
        client.send(request("POST", "/up", HOST, "Content-Length: 10") + b"hello")
        stream = await self.link.stream()
        await stream.until(lambda: stream.body() == b"hello")
        self.assertFalse(stream.opened_ended)
        self.assertIsNone(stream.ended)
        self.assertEqual(stream.header(b"content-length"), [b"10"])
        client.send(b"world")
        await stream.until(lambda: stream.ended is not None)
        self.assertEqual(stream.body(), b"helloworld")
        self.assertEqual(stream.ended, ())
        stream.reply(201, [(b"Content-Length", b"0")])
        stream.finish()
        [reply] = await client.replies()
        self.assertEqual(reply.status, 201)

    async def test_chunked_request_body_and_trailers(self) -> None:
        """A chunked upload arrives as data then an end carrying the trailers, with no framing headers."""
        client = await self.serve()
        client.send(
            request("POST", "/up", HOST, "Transfer-Encoding: chunked")
            + b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n"
        )
        stream = await self.link.stream()
        await stream.until(lambda: stream.ended is not None)
        self.assertEqual(stream.body(), b"abcde")
        self.assertEqual(stream.ended, ((b"x-sum", b"5"),))
        self.assertEqual(stream.header(b"transfer-encoding"), [])
        self.assertEqual(stream.header(b"content-length"), [])
        stream.fail(Reason.UPSTREAM_REFUSED, "test over")
        await client.replies()

    async def test_chunked_reply_with_trailers_reaches_the_client(self) -> None:
        """A reply without Content-Length goes out chunked, hop-by-hop headers stripped, Via added, trailers kept."""
        client = await self.serve()
        client.send(request("GET", "/down"))
        stream = await self.link.stream()
        stream.reply(200, [
            (b"Content-Type", b"text/plain"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"X-Private"),
            (b"X-Private", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Via", b"1.1 upstream"),
        ])
        stream.send(b"ab")
        stream.send(b"cd")
        stream.finish([(b"X-Checksum", b"42")])
        [reply] = await client.replies()
        self.assertEqual(reply.status, 200)
        self.assertTrue(reply.chunked)
        self.assertEqual(reply.body, b"abcd")
        self.assertEqual(reply.trailers, [(b"x-checksum", b"42")])
        self.assertEqual(reply.header(b"via"), b"1.1 upstream, 1.1 tunneld")
        self.assertEqual(reply.header(b"content-type"), b"text/plain")
        self.assertIsNone(reply.header(b"x-private"))
        self.assertIsNone(reply.header(b"keep-alive"))
        self.assertIsNone(reply.header(b"connection"))

    async def test_keep_alive_serves_two_requests_on_one_connection(self) -> None:
        """Two requests in turn on one connection each get their own stream and reply."""
        client = await self.serve()
        for index in range(2):
            client.send(request("GET", f"/{index}"))
            stream = await self.link.stream(index)
            self.assertEqual(stream.head.target, f"/{index}")
            self.assertTrue(stream.opened_ended)  # a plain GET: the Open itself ends the request
            self.assertEqual(stream.ended, ())
            stream.reply(200, [(b"Content-Length", b"1")])
            stream.send(b"%d" % index)
            stream.finish()
            replies = await client.replies(index + 1)
            self.assertEqual(replies[index].body, b"%d" % index)
        self.assertEqual(len(self.factory.protocols), 1)
        self.assertIsNone(client.lost)

    async def test_pipelined_request_waits_for_the_first_reply(self) -> None:
        """A pipelined second request opens its stream only after the first exchange ends; replies keep order."""
        client = await self.serve()
        client.send(request("GET", "/first") + request("GET", "/second"))
        first = await self.link.stream(0)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(self.link.streams), 1)
        first.reply(200, [(b"Content-Length", b"1")])
        first.send(b"1")
        first.finish()
        second = await self.link.stream(1)
        self.assertEqual(second.head.target, "/second")
        second.reply(200, [(b"Content-Length", b"1")])
        second.send(b"2")
        second.finish()
        replies = await client.replies(2)
        self.assertEqual([r.body for r in replies], [b"1", b"2"])

    async def test_http10_client_gets_a_close_delimited_reply(self) -> None:
        """A reply of unknown length to an HTTP/1.0 client is sent unframed and ended by closing."""
        client = await self.serve()
        client.send(f"GET /old HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
        stream = await self.link.stream()
        stream.reply(200, [(b"Content-Type", b"text/plain")])
        stream.send(b"abc")
        stream.finish([(b"X-Dropped", b"1")])
        await client.closed
        head, _, body = client.received.partition(b"\r\n\r\n")
        self.assertEqual(body, b"abc")
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertEqual(stream.reset_with, None)

    async def test_expect_continue_is_answered_by_the_edge(self) -> None:
        """A client expecting 100-continue gets it from the edge once the stream is open; Expect is not forwarded."""
        client = await self.serve()
        client.send(request("PUT", "/f", HOST, "Content-Length: 5", "Expect: 100-continue"))
        stream = await self.link.stream()
        await client.until(lambda: client.received.startswith(b"HTTP/1.1 100 "))
        self.assertEqual(stream.header(b"expect"), [])
        client.send(b"12345")
        await stream.until(lambda: stream.ended is not None)
        self.assertEqual(stream.body(), b"12345")
        stream.reply(200, [(b"Content-Length", b"0")])
        stream.finish()
        await client.until(lambda: b"HTTP/1.1 200 " in client.received)

    async def test_reply_ending_before_the_request_body_cancels_and_drains(self) -> None:
        """A reply that ends before the upload does resets the stream as cancelled; the rest of the body is dropped and the connection kept."""
        client = await self.serve()
        client.send(request("POST", "/up", HOST, "Content-Length: 10") + b"12345")
        stream = await self.link.stream()
        await stream.until(lambda: stream.body() == b"12345")
        stream.reply(413, [(b"Content-Length", b"3")])
        stream.send(b"big")
        stream.finish()
        [reply] = await client.replies()
        self.assertEqual((reply.status, reply.body), (413, b"big"))
        self.assertEqual(stream.reset_with and stream.reset_with[0], Reason.CANCELLED)
        client.send(b"67890" + request("GET", "/next"))
        second = await self.link.stream(1)
        self.assertEqual(second.head.target, "/next")
        self.assertEqual(stream.body(), b"12345")
        second.fail(Reason.UPSTREAM_REFUSED, "test over")
        await client.replies(2)

    async def test_reply_with_an_impossible_status_is_502(self) -> None:
        """A reply head h11 cannot send (a 1xx status) resets the stream upstream_error and answers 502."""
        client = await self.serve()
        client.send(request("GET", "/x"))
        stream = await self.link.stream()
        stream.reply(101, [(b"Upgrade", b"websocket")])
        [reply] = await client.replies()
        self.assertEqual(reply.status, 502)
        self.assertEqual(reply.header(b"tunnel-error"), b"upstream_error")
        self.assertEqual(stream.reset_with and stream.reset_with[0], Reason.UPSTREAM_ERROR)

    async def test_reply_longer_than_its_length_aborts(self) -> None:
        """Reply data beyond the declared Content-Length resets the stream upstream_error and cuts the client off."""
        client = await self.serve()
        client.send(request("GET", "/x"))
        stream = await self.link.stream()
        stream.reply(200, [(b"Content-Length", b"3")])
        stream.send(b"abcdef")
        await client.closed
        self.assertEqual(stream.reset_with and stream.reset_with[0], Reason.UPSTREAM_ERROR)
        self.assertEqual(parse_all(client.received), [])

    # -- backpressure -------------------------------------------------------

    async def test_stream_out_of_credit_stops_reading_the_client(self) -> None:
        """When the stream pauses its producer the public socket stops being read until resumed."""
        client = await self.serve()
        client.send(request("POST", "/up", HOST, "Content-Length: 6") + b"abc")
        stream = await self.link.stream()
        await stream.until(lambda: stream.body() == b"abc")
        stream.producer.pauseProducing()
        self.assertNotIn(self.server_transport(), reactor.getReaders())
        client.send(b"def")
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(stream.body(), b"abc")
        stream.producer.resumeProducing()
        await stream.until(lambda: stream.ended is not None)
        self.assertEqual(stream.body(), b"abcdef")
        stream.fail(Reason.UPSTREAM_REFUSED, "test over")
        await client.replies()

    async def _views(self, length: bool) -> None:
        data = bytes(range(256)) * 2048
        client = await self.serve()
        client.send(request("GET", "/views", HOST))
        stream = await self.link.stream()
        fields = [(b"Content-Length", b"%d" % (2 * len(data)))] if length else []
        stream.reply(200, fields)
        stream.send(memoryview(data))  # type: ignore[arg-type]
        stream.send(memoryview(bytearray(data))[:0])  # type: ignore[arg-type]
        stream.send(memoryview(bytearray(data)))  # type: ignore[arg-type]
        stream.finish()
        [reply] = await client.replies()
        self.assertEqual(reply.body, data + data)

    async def test_body_given_as_views(self) -> None:
        """Body data lent as views of frames (as a link hands it) goes out intact with a Content-Length."""
        await self._views(length=True)

    async def test_chunked_body_given_as_views(self) -> None:
        """... and chunked, where an empty view sends no chunk (it would end the body)."""
        await self._views(length=False)

    async def test_slow_client_pauses_the_stream(self) -> None:
        """A reply bigger than the socket's buffer pauses the stream, which resumes once the client drained it."""
        client = await self.serve()
        client.send(request("GET", "/big"))
        stream = await self.link.stream()
        # Beyond what the kernel's buffers take: a large write is sent at once.
        size = 16 << 20
        stream.reply(200, [(b"Content-Length", b"%d" % size)])
        stream.send(b"x" * size)
        self.assertTrue(stream.paused)
        await stream.until(lambda: not stream.paused)
        stream.finish()
        [reply] = await client.replies()
        self.assertEqual(len(reply.body), size)

    # -- resets and errors ---------------------------------------------------

    async def test_reset_before_reply_is_502_with_the_reason(self) -> None:
        """A stream reset before any reply answers the reason's status with its Tunnel-Error, and is logged."""
        client = await self.serve()
        client.send(request("GET", "/x"))
        stream = await self.link.stream()
        stream.fail(Reason.AGENT_GONE, "link lost")
        [reply] = await client.replies()
        self.assertEqual(reply.status, 502)
        self.assertEqual(reply.header(b"tunnel-error"), b"agent_gone")
        self.assertEqual(reply.body, Reason.AGENT_GONE.description.encode() + b"\n")
        self.assertEqual([e.get("reason") for e in self.events if "reason" in e], ["agent_gone"])

    async def test_reset_mid_reply_aborts_the_connection(self) -> None:
        """A stream reset after the reply started cuts the connection so the body is visibly incomplete."""
        client = await self.serve()
        client.send(request("GET", "/x"))
        stream = await self.link.stream()
        stream.reply(200, [(b"Content-Length", b"100")])
        stream.send(b"0123456789")
        await client.until(lambda: client.received.endswith(b"0123456789"))
        stream.fail(Reason.AGENT_GONE, "link lost")
        await client.closed
        self.assertEqual(parse_all(client.received), [])
        self.assertTrue(client.received.endswith(b"\r\n\r\n0123456789"))
        self.assertLogged(
            "cut {method} {host}{target} from {peer} mid-reply: {reason} ({message})",
            reason="agent_gone",
        )

    async def test_malformed_request_is_400_naming_the_error(self) -> None:
        """A request h11 cannot parse is answered 400 bad_request naming the error, then closed."""
        client = await self.serve()
        client.send(b"NOT HTTP AT ALL\r\n\r\n")
        [reply] = await client.replies()
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.header(b"tunnel-error"), b"bad_request")
        self.assertEqual(reply.header(b"connection"), b"close")
        self.assertTrue(reply.body.startswith(b"malformed request: "), reply.body)
        self.assertIn(b"request line", reply.body)
        self.assertLogged("bad request from {peer}: {error}")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await self.factory.lost[0]

    async def test_oversized_header_is_431(self) -> None:
        """A request head over max_header_bytes is answered 431 bad_request naming the limit."""
        client = await self.serve(PublicHTTPSettings(max_header_bytes=1024))
        client.send(request("GET", "/", HOST, "X-Big: " + "a" * 4000))
        [reply] = await client.replies()
        self.assertEqual(reply.status, 431)
        self.assertEqual(reply.header(b"tunnel-error"), b"bad_request")
        self.assertIn(b"1024 bytes", reply.body)
        self.assertLogged("bad request from {peer}: {error}")
        self.assertEqual(self.link.streams, [])
        self.clock.advance(5)  # the linger after the answer ends
        await client.closed

    async def test_endless_header_is_431(self) -> None:
        """A request head still incomplete past max_header_bytes is answered 431 without waiting for its end."""
        client = await self.serve(PublicHTTPSettings(max_header_bytes=1024))
        client.send(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX-Big: " + b"a" * 4000)
        [reply] = await client.replies()
        self.assertEqual(reply.status, 431)
        self.assertEqual(reply.header(b"tunnel-error"), b"bad_request")
        self.assertEqual(reply.header(b"connection"), b"close")
        self.clock.advance(5)
        await client.closed

    async def test_client_disconnect_mid_upload_resets_client_gone(self) -> None:
        """The client closing during the request body resets the stream with client_gone."""
        client = await self.serve()
        client.send(request("POST", "/up", HOST, "Content-Length: 100") + b"part")
        stream = await self.link.stream()
        await stream.until(lambda: stream.body() == b"part")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await stream.until(lambda: stream.reset_with is not None)
        self.assertEqual(stream.reset_with, (Reason.CLIENT_GONE, "client closed the connection"))

    async def test_client_disconnect_awaiting_reply_resets_client_gone(self) -> None:
        """The client closing while it waits for the reply resets the stream with client_gone."""
        client = await self.serve()
        client.send(request("GET", "/slow"))
        stream = await self.link.stream()
        client.transport.loseConnection()  # type: ignore[union-attr]
        await stream.until(lambda: stream.reset_with is not None)
        self.assertEqual(stream.reset_with, (Reason.CLIENT_GONE, "client closed the connection"))

    # -- timeouts ------------------------------------------------------------

    async def test_slow_request_head_gets_408(self) -> None:
        """A request head not complete within header_timeout is answered 408 and the connection closed."""
        client = await self.serve(PublicHTTPSettings(header_timeout=5))
        client.send(b"GET / HTTP/1.1\r\nHost: ")
        await deferLater(reactor, 0.01, lambda: None)
        self.clock.advance(5)
        [reply] = await client.replies()
        self.assertEqual(reply.status, 408)
        self.assertEqual(reply.header(b"tunnel-error"), b"idle_timeout")
        self.clock.advance(5)
        await client.closed

    async def test_idle_keep_alive_connection_is_closed_quietly(self) -> None:
        """A kept-alive connection with no new request for idle_timeout is closed without an answer."""
        client = await self.serve(PublicHTTPSettings(idle_timeout=60))
        client.send(request("GET", "/"))
        stream = await self.link.stream()
        stream.reply(204)
        stream.finish()
        await client.replies()
        before = client.received
        self.clock.advance(60)
        await client.closed
        self.assertEqual(client.received, before)

    async def test_no_progress_during_an_exchange_resets_the_stream(self) -> None:
        """An exchange with no bytes either way for idle_timeout resets its stream with idle_timeout."""
        client = await self.serve(PublicHTTPSettings(idle_timeout=60))
        client.send(request("GET", "/hang"))
        stream = await self.link.stream()
        self.clock.advance(30)
        self.assertIsNone(stream.reset_with)
        self.clock.advance(30)
        self.assertEqual(stream.reset_with[0] if stream.reset_with else None, Reason.IDLE_TIMEOUT)
        await client.closed

    def test_fakes_provide_the_interfaces(self) -> None:
        """The fake link and stream really provide IAgentLink and IStream."""
        link = FakeLink()
        verifyObject(IAgentLink, link)
        verifyObject(IStream, FakeStream(StreamHead(kind="http", tunnel=HOST), link))  # type: ignore[arg-type]
