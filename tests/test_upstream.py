"""
Tests for L{tunneld.agent.upstream}: real upstreams on loopback port 0, driven
through a fake L{IStream} that records what the agent sends and honours pause
state the way a credit window does.
"""

from __future__ import annotations

import gc
import hashlib
import socket
import weakref
from collections.abc import Callable
from typing import Any

from automat import NoTransition
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunneld.agent import upstream
from tunneld.agent.upstream import UpstreamPool
from tunneld.interfaces import IStream, IStreamReceiver
from tunneld.model.messages import Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason

CHUNK = 64 * 1024
BLOCK = hashlib.sha256(b"tunneld").digest() * (CHUNK // 32)
MB = 1024 * 1024


# -- the fake stream ------------------------------------------------------------


@implementer(IStream)
class FakeStream:
    """
    The agent's view of one stream, with the edge played by the test.

    Request events queued with L{send} and L{send_end} are delivered only
    while the agent has not paused the stream.  L{block} plays a stream out
    of credit: the registered producer is paused until L{unblock}.
    """

    def __init__(self, head: StreamHead, keep: bool = True) -> None:
        self.head = head
        self.keep = keep
        self.receiver: IStreamReceiver | None = None
        self.reply: ReplyHead | None = None
        self.chunks: list[bytes] = []
        self.received = 0
        self.trailers: Headers | None = None
        self.reset_with: tuple[Reason, str] | None = None
        self.finished: Deferred[None] = Deferred()
        self.paused = False
        self.pause_count = 0
        self.producer: IPushProducer | None = None
        self.producer_paused = False
        self.blocked = False
        self.block_after: int | None = None
        self.queue: list[tuple[str, Any]] = []

    # IPushProducer: the incoming (request) direction.

    def pauseProducing(self) -> None:
        self.paused = True
        self.pause_count += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self._deliver()

    def stopProducing(self) -> None:
        self.reset(Reason.CANCELLED, "consumer stopped")

    # IConsumer: the outgoing (response) direction.

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming, "only push producers"
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer
        self.producer_paused = False
        if self.blocked:
            self._pause_producer()

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        assert self.reply is not None, "body before reply"
        assert not self.finished.called, "write after the stream finished"
        # IStream.write: bytes, or a view of bytes (not changed afterwards).
        assert isinstance(data, (bytes, memoryview))
        if self.keep:
            self.chunks.append(bytes(data))
        self.received += len(data)
        if self.block_after is not None and self.received >= self.block_after:
            self.block_after = None
            self.block()

    # IStream.

    def attach(self, receiver: IStreamReceiver) -> None:
        self.receiver = receiver

    def send_reply(self, reply: ReplyHead) -> None:
        assert self.reply is None, "two replies"
        assert not self.finished.called
        self.reply = reply

    def end(self, trailers: Headers = ()) -> None:
        assert self.reply is not None, "end before reply"
        self.trailers = tuple(trailers)
        self._finish()

    def reset(self, reason: Reason, message: str) -> None:
        self.reset_with = (reason, message)
        self._finish()

    def _finish(self) -> None:
        assert not self.finished.called, "stream finished twice"
        self.finished.callback(None)

    # The test's hands.

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def send(self, data: bytes) -> None:
        """The edge sends request body bytes within credit: held while paused."""
        self.queue.append(("data_received", data))
        self._deliver()

    def send_end(self, trailers: Headers = ()) -> None:
        self.queue.append(("end_received", trailers))
        self._deliver()

    def send_now(self, data: bytes) -> None:
        """Bytes already in flight when the agent paused the stream."""
        assert self.receiver is not None
        self.receiver.data_received(data)

    def edge_reset(self, reason: Reason, message: str) -> None:
        assert self.receiver is not None
        self.receiver.reset_received(reason, message)

    def _deliver(self) -> None:
        while self.queue and not self.paused and self.receiver is not None:
            name, arg = self.queue.pop(0)
            getattr(self.receiver, name)(arg)

    def block(self) -> None:
        self.blocked = True
        self._pause_producer()

    def unblock(self) -> None:
        self.blocked = False
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()

    def _pause_producer(self) -> None:
        if self.producer is not None and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()


def http_head(
    method: str = "GET", target: str = "/hello", headers: Headers = (), kind: str = "http"
) -> StreamHead:
    return StreamHead(
        kind=kind,
        tunnel="app.example.com",
        method=method,
        target=target,
        headers=((b"Host", b"app.example.com"), *headers),
        peer="192.0.2.1:5000",
    )


# -- upstreams ------------------------------------------------------------------


class TrackingFactory(WrappingFactory):
    """Wraps a server factory: counts its connections and waits for them to close."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.count = 0
        self._waiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress) -> Any:
        self.count += 1
        return super().buildProtocol(addr)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def all_closed(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter


class BigBody:
    """Writes C{total} bytes as fast as the upstream's transport takes them."""

    def __init__(self, request: server.Request, total: int) -> None:
        self.request = request
        self.left = total
        self.paused = False
        self.pauses = 0
        request.setHeader(b"content-length", b"%d" % total)
        request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left:
            n = min(CHUNK, self.left)
            self.left -= n
            self.request.write(BLOCK[:n])
        if not self.left and not self.request.finished:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.left = 0


class Service(resource.Resource):
    """The upstream web service: C{/hello}, C{/chunked}, C{/big}, C{/hang}; POST echoes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hanging: list[server.Request] = []
        self.big: BigBody | None = None
        self.bodies: list[bytes] = []

    def render_GET(self, request: server.Request) -> Any:
        if request.path == b"/hello":
            request.setHeader(b"x-upstream", b"yes")
            return b"hello"
        if request.path == b"/chunked":
            parts = [b"alpha,", b"beta,", b"gamma"]

            def step() -> None:
                request.write(parts.pop(0))
                if parts:
                    reactor.callLater(0.01, step)  # type: ignore[attr-defined]
                else:
                    request.finish()

            step()
            return server.NOT_DONE_YET
        if request.path == b"/big":
            self.big = BigBody(request, 64 * MB)
            return server.NOT_DONE_YET
        if request.path == b"/hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found"

    def render_POST(self, request: server.Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        self.bodies.append(body)
        if request.path == b"/sha256":
            return b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
        return body


class RawUpstream(Protocol):
    """Reads request heads and answers each with the factory's script."""

    factory: RawFactory

    def __init__(self) -> None:
        self.buffer = b""
        self.requests = 0

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.factory.heads.append(head)
            n, self.requests = self.requests, self.requests + 1
            self.factory.answer(self, n)


@implementer(IHalfCloseableProtocol)
class SwitchingUpstream(Protocol):
    """Answers one request with 101 and early bytes, then echoes; says bye on EOF."""

    def __init__(self) -> None:
        self.buffer: bytes | None = b""

    def dataReceived(self, data: bytes) -> None:
        if self.buffer is None:
            self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            _, _, rest = self.buffer.partition(b"\r\n\r\n")
            self.buffer = None
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n"
                b"\r\nearly"
            )
            if rest:
                self.transport.write(rest)

    def readConnectionLost(self) -> None:
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.callback(None)


class RawFactory(Factory):
    """Serves L{RawUpstream}; C{answer(protocol, n)} handles a connection's n-th request."""

    protocol = RawUpstream

    def __init__(self, answer: Callable[[RawUpstream, int], None]) -> None:
        self.answer = answer
        self.heads: list[bytes] = []


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait, turning the reactor, until C{predicate()} holds."""
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not predicate():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.005, lambda: None)  # type: ignore[arg-type]


class UpstreamPoolTests(TestCase):
    """L{UpstreamPool} against real upstream servers."""

    timeout = 30

    async def listen(self, factory: Any) -> tuple[int, TrackingFactory]:
        tracking = TrackingFactory(factory)
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        port = await endpoint.listen(tracking)
        self.addCleanup(port.stopListening)
        self.addCleanup(tracking.all_closed)
        return port.getHost().port, tracking

    async def site(self) -> tuple[int, TrackingFactory, Service]:
        service = Service()
        site = server.Site(service)
        site.displayTracebacks = False
        port, tracking = await self.listen(site)
        return port, tracking, service

    def pool(self, port: int, **options: Any) -> UpstreamPool:
        pool = UpstreamPool(reactor, f"tcp:host=127.0.0.1:port={port}", **options)
        self.addCleanup(pool.close)
        return pool

    def stream(self, head: StreamHead, keep: bool = True) -> FakeStream:
        stream = FakeStream(head, keep)
        verifyObject(IStream, stream)

        def cleanup() -> None:
            if not stream.finished.called and stream.receiver is not None:
                stream.edge_reset(Reason.CANCELLED, "test over")

        self.addCleanup(cleanup)
        return stream

    def assert_reset(self, stream: FakeStream, reason: Reason, *fragments: str) -> None:
        self.assertIsNotNone(stream.reset_with, "the stream was not reset")
        assert stream.reset_with is not None
        self.assertEqual(stream.reset_with[0], reason)
        for fragment in fragments:
            self.assertIn(fragment, stream.reset_with[1])

    # -- round trips ----------------------------------------------------------

    async def test_get(self) -> None:
        """A GET goes upstream and its reply, body and end come back on the stream."""
        port, _, _ = await self.site()
        stream = self.stream(http_head())
        self.pool(port).forward(stream)
        await stream.finished
        assert stream.receiver is not None
        verifyObject(IStreamReceiver, stream.receiver)
        self.assertIsNone(stream.reset_with)
        assert stream.reply is not None
        self.assertEqual((stream.reply.status, stream.reply.reason), (200, b"OK"))
        self.assertIn((b"X-Upstream", b"yes"), stream.reply.headers)
        self.assertEqual(stream.body, b"hello")
        self.assertEqual(stream.trailers, ())

    async def test_post_streamed(self) -> None:
        """A POST body arriving in pieces, before and after connecting, reaches upstream whole."""
        port, _, service = await self.site()
        stream = self.stream(http_head("POST", "/echo"))
        self.pool(port).forward(stream)
        self.assertTrue(stream.paused, "the stream is held until the upstream connects")
        stream.send_now(b"first ")  # already in flight when the pause took effect
        stream.send(b"second ")  # held by the pause
        await until(lambda: stream.producer is not None and not stream.paused)
        stream.send(b"third ")
        stream.send(b"fourth")
        stream.send_end()
        await stream.finished
        self.assertIsNone(stream.reset_with)
        self.assertEqual(service.bodies, [b"first second third fourth"])
        self.assertEqual(stream.body, b"first second third fourth")

    async def test_post_with_length(self) -> None:
        """A body with a Content-Length, fully held before connecting, is sent with that length."""
        port, _, service = await self.site()
        head = http_head("POST", "/echo", ((b"Content-Length", b"11"),))
        stream = self.stream(head)
        self.pool(port).forward(stream)
        stream.send_now(b"hello ")
        stream.send_now(b"world")
        stream.receiver.end_received(())  # type: ignore[union-attr]
        await stream.finished
        self.assertEqual(service.bodies, [b"hello world"])
        self.assertEqual(stream.body, b"hello world")

    async def test_keep_alive_reuse(self) -> None:
        """A second request reuses the first one's connection."""
        port, tracking, _ = await self.site()
        pool = self.pool(port)
        for _ in range(2):
            stream = self.stream(http_head())
            pool.forward(stream)
            stream.send_end()
            await stream.finished
            self.assertEqual(stream.body, b"hello")
        self.assertEqual(tracking.count, 1)

    async def test_chunked_response(self) -> None:
        """A chunked response written over several turns arrives whole, de-framed."""
        port, _, _ = await self.site()
        stream = self.stream(http_head(target="/chunked"))
        self.pool(port).forward(stream)
        await stream.finished
        assert stream.reply is not None
        names = {name.lower() for name, _ in stream.reply.headers}
        self.assertNotIn(b"transfer-encoding", names)
        self.assertEqual(stream.body, b"alpha,beta,gamma")
        self.assertEqual(stream.trailers, ())

    async def test_trailers_and_hop_by_hop(self) -> None:
        """Chunked trailers end the stream; hop-by-hop response headers are stripped."""
        response = (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
            b"X-Secret: s\r\nTrailer: X-Checksum\r\nTransfer-Encoding: chunked\r\nX-Kept: k\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"
        )
        port, _ = await self.listen(RawFactory(lambda p, n: p.transport.write(response)))
        stream = self.stream(http_head())
        self.pool(port).forward(stream)
        await stream.finished
        assert stream.reply is not None
        self.assertEqual(list(stream.reply.headers), [(b"X-Kept", b"k")])
        self.assertEqual(stream.body, b"hello world")
        self.assertEqual(stream.trailers, ((b"X-Checksum", b"abc"),))

    # -- failures ---------------------------------------------------------------

    async def test_refused(self) -> None:
        """An upstream that is not listening resets the stream with upstream_refused."""
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        number = port.getHost().port
        await port.stopListening()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        stream = self.stream(http_head())
        self.pool(number).forward(stream)
        await stream.finished
        self.assert_reset(stream, Reason.UPSTREAM_REFUSED, f"tcp:host=127.0.0.1:port={number}")
        self.assertIn("upstream {endpoint} refused: {error}", [e.get("log_format") for e in events])

    async def test_connect_timeout(self) -> None:
        """An upstream that never completes the handshake resets the stream with upstream_refused."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            # Fill the accept queue that nobody drains: later handshakes get no answer.
            filler = socket.socket()
            self.addCleanup(filler.close)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        stream = self.stream(http_head())
        self.pool(port, connect_timeout=0.3).forward(stream)
        await stream.finished
        self.assert_reset(
            stream, Reason.UPSTREAM_REFUSED, f"port={port}", "no connection within 0.3s"
        )

    async def test_timeout(self) -> None:
        """An upstream that accepts but never answers resets the stream with upstream_timeout."""
        port, tracking = await self.listen(RawFactory(lambda p, n: None))
        stream = self.stream(http_head())
        self.pool(port, response_timeout=0.5).forward(stream)
        await stream.finished
        self.assert_reset(stream, Reason.UPSTREAM_TIMEOUT, "no response")
        await tracking.all_closed()

    async def test_stalled_body_resets_with_upstream_timeout(self) -> None:
        """A head and part of the body, then silence: each stream is reset with upstream_timeout after the reply began, its connection dropped, no timer left; three times over."""
        port, tracking = await self.listen(RawFactory(
            lambda p, n: p.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
            )
        ))
        pool = self.pool(port, body_timeout=0.3)
        for _ in range(3):
            stream = self.stream(http_head())
            pool.forward(stream)
            await stream.finished
            self.assertEqual(stream.reply.status if stream.reply else None, 200)
            self.assertEqual(stream.body, b"0123456789")
            self.assert_reset(stream, Reason.UPSTREAM_TIMEOUT, "stalled", "0.3s")
        await tracking.all_closed()
        self.assertEqual(
            [c for c in reactor.getDelayedCalls()  # type: ignore[attr-defined]
             if getattr(c.func, "__module__", "").startswith("tunneld")], [],
        )

    async def test_head_then_silence(self) -> None:
        """A head alone, then silence, is a stall too (the head came: the response timeout no longer applies)."""
        port, _ = await self.listen(RawFactory(
            lambda p, n: p.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        ))
        stream = self.stream(http_head())
        self.pool(port, response_timeout=30.0, body_timeout=0.3).forward(stream)
        await stream.finished
        self.assertIsNotNone(stream.reply)
        self.assert_reset(stream, Reason.UPSTREAM_TIMEOUT, "stalled")

    async def test_dribbling_body_is_not_stalled(self) -> None:
        """An upstream sending a byte every 50 ms for a second is slow, not stalled: the body arrives whole."""

        def answer(p: RawUpstream, n: int) -> None:
            p.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
            left = [20]

            def drip() -> None:
                p.transport.write(b"x")
                left[0] -= 1
                if left[0]:
                    reactor.callLater(0.05, drip)  # type: ignore[attr-defined]

            drip()

        port, _ = await self.listen(RawFactory(answer))
        stream = self.stream(http_head())
        self.pool(port, body_timeout=2.0).forward(stream)
        await stream.finished
        self.assertIsNone(stream.reset_with)
        self.assertEqual(stream.body, b"x" * 20)

    async def test_body_timeout_zero_waits(self) -> None:
        """With body_timeout 0 a silent response is left alone (the edge's idle timeout is the limit)."""
        port, _ = await self.listen(RawFactory(
            lambda p, n: p.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n01")
        ))
        stream = self.stream(http_head())
        self.pool(port, response_timeout=0.2, body_timeout=0).forward(stream)
        await until(lambda: stream.received == 2)
        await deferLater(reactor, 0.5, lambda: None)  # type: ignore[arg-type]
        self.assertFalse(stream.finished.called)

    async def test_garbage(self) -> None:
        """An upstream answering with garbage resets the stream with upstream_error."""
        port, _ = await self.listen(
            RawFactory(lambda p, n: p.transport.write(b"this is not http\r\n\r\n"))
        )
        stream = self.stream(http_head())
        self.pool(port).forward(stream)
        await stream.finished
        self.assert_reset(stream, Reason.UPSTREAM_ERROR, "malformed")

    async def test_close_delimited_response(self) -> None:
        """A response whose body ends when the upstream closes comes back whole and ends the stream."""

        def answer(p: RawUpstream, n: int) -> None:
            p.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            p.transport.loseConnection()

        port, _ = await self.listen(RawFactory(answer))
        stream = self.stream(http_head())
        self.pool(port).forward(stream)
        await stream.finished
        self.assertIsNone(stream.reset_with)
        self.assertEqual(stream.body, b"until the end")
        self.assertEqual(stream.trailers, ())

    async def test_answer_before_the_body_ends(self) -> None:
        """An upstream answering before the request body's end: the answer comes back whole, the rest of the body is dropped, the connection is not reused."""

        def answer(p: RawUpstream, n: int) -> None:
            p.transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")

        port, tracking = await self.listen(RawFactory(answer))
        pool = self.pool(port)
        stream = self.stream(http_head("POST", "/upload"))
        pool.forward(stream)
        stream.send(b"first part")
        await stream.finished
        stream.send(b"second part")
        stream.send_end()
        self.assertIsNone(stream.reset_with)
        assert stream.reply is not None
        self.assertEqual((stream.reply.status, stream.body, stream.trailers), (413, b"big!", ()))
        self.assertFalse(stream.paused)
        again = self.stream(http_head())
        pool.forward(again)
        await again.finished
        self.assertEqual(again.body, b"big!")
        self.assertEqual(tracking.count, 2)

    async def test_cut_short(self) -> None:
        """An upstream closing mid-body resets the stream with upstream_error after the reply."""

        def answer(p: RawUpstream, n: int) -> None:
            p.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            p.transport.loseConnection()

        port, _ = await self.listen(RawFactory(answer))
        stream = self.stream(http_head())
        self.pool(port).forward(stream)
        await stream.finished
        self.assertIsNotNone(stream.reply)
        self.assertEqual(stream.body, b"0123456789")
        self.assert_reset(stream, Reason.UPSTREAM_ERROR, "mid-response")

    async def test_upgrade_switches_to_a_pipe(self) -> None:
        """An upgrade stream gets its own connection (its head let go of its header fields once sent); the 101 is relayed, then bytes flow raw and half-closes map to ends."""
        # Not wrapped (a ProtocolWrapper would hide the upstream's half-close support).
        factory = Factory.forProtocol(SwitchingUpstream)
        factory.lost = Deferred()
        listening = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        stream = self.stream(
            http_head(headers=((b"Upgrade", b"echo"), (b"Connection", b"Upgrade")), kind="upgrade")
        )
        pool = self.pool(port)
        pool.forward(stream)
        await until(lambda: stream.reply is not None)
        assert stream.reply is not None
        self.assertEqual(stream.reply.status, 101)
        names = [name.lower() for name, _ in stream.reply.headers]
        self.assertIn(b"upgrade", names)
        self.assertNotIn(b"connection", names)
        self.assertFalse(hasattr(stream.receiver, "_parser"), "the switched relay keeps its parser")
        self.assertEqual(stream.head.headers, (), "the stream keeps the request's header fields")
        stream.send(b"\x00raw\r\n\r\n")
        await until(lambda: stream.body == b"early\x00raw\r\n\r\n")
        stream.send_end()  # the client half-closed: the upstream sees EOF and says bye
        await stream.finished
        self.assertIsNone(stream.reset_with)
        self.assertEqual(stream.body, b"early\x00raw\r\n\r\nbye")
        self.assertIsNone(stream.reset_with)
        self.assertEqual(pool._idle, [])
        await factory.lost

    async def test_upgrade_declined(self) -> None:
        """An upstream that answers an upgrade without switching has its response relayed as is."""
        port, _, _ = await self.site()
        stream = self.stream(
            http_head(headers=((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")), kind="upgrade")
        )
        self.pool(port).forward(stream)
        await stream.finished
        assert stream.reply is not None
        self.assertEqual((stream.reply.status, stream.body), (200, b"hello"))
        self.assertIsNone(stream.reset_with)

    async def test_upgrade_upstream_refused(self) -> None:
        """An upgrade whose upstream cannot be reached is reset with upstream_refused."""
        stream = self.stream(http_head(kind="upgrade"))
        self.pool(1).forward(stream)
        await stream.finished
        self.assert_reset(stream, Reason.UPSTREAM_REFUSED)

    async def test_stale_connection_retried(self) -> None:
        """A pooled connection the upstream closed unanswered is retried once on a new one."""

        def answer(p: RawUpstream, n: int) -> None:
            if n == 0:
                p.transport.write(OK_RESPONSE)
            else:
                p.transport.loseConnection()

        port, tracking = await self.listen(RawFactory(answer))
        pool = self.pool(port)
        first = self.stream(http_head())
        pool.forward(first)
        await first.finished
        second = self.stream(http_head())
        pool.forward(second)
        await second.finished
        self.assertIsNone(second.reset_with)
        self.assertEqual(second.body, b"ok")
        self.assertEqual(tracking.count, 2)

    async def test_stale_connection_after_body(self) -> None:
        """A pooled connection lost after request body bytes went out is not retried."""

        def answer(p: RawUpstream, n: int) -> None:
            if n == 0:
                p.transport.write(OK_RESPONSE)
            else:
                p.transport.loseConnection()

        port, tracking = await self.listen(RawFactory(answer))
        pool = self.pool(port)
        first = self.stream(http_head())
        pool.forward(first)
        await first.finished
        second = self.stream(http_head("POST", "/", ((b"Content-Length", b"5"),)))
        pool.forward(second)
        second.send(b"hello")
        second.send_end()
        await second.finished
        self.assert_reset(second, Reason.UPSTREAM_ERROR, "before responding")
        self.assertEqual(tracking.count, 1)

    async def test_edge_reset_aborts(self) -> None:
        """A stream reset by the edge closes its upstream connection instead of pooling it."""
        port, tracking, service = await self.site()
        pool = self.pool(port)
        stream = self.stream(http_head(target="/hang"))
        pool.forward(stream)
        await until(lambda: bool(service.hanging))
        stream.edge_reset(Reason.CLIENT_GONE, "client left")
        await tracking.all_closed()
        self.assertIsNone(stream.reset_with)
        again = self.stream(http_head())
        pool.forward(again)
        await again.finished
        self.assertEqual(again.body, b"hello")
        self.assertEqual(tracking.count, 2)

    # -- backpressure -------------------------------------------------------------

    async def test_paused_stream_pauses_upstream(self) -> None:
        """A stream out of credit pauses the upstream transport, which holds the server back."""
        port, _, service = await self.site()
        stream = self.stream(http_head(target="/big"), keep=False)
        stream.block_after = 1
        self.pool(port).forward(stream)
        await until(lambda: stream.blocked)
        producer = stream.producer
        assert producer is not None
        # The stream's producer is the upstream connection (it notes the pause).
        transport = producer.sock  # type: ignore[attr-defined]
        self.assertEqual(transport.getPeer().port, port)
        self.assertTrue(stream.producer_paused)
        self.assertNotIn(transport, reactor.getReaders())  # type: ignore[attr-defined]
        at_block = stream.received
        await deferLater(reactor, 0.3, lambda: None)  # type: ignore[arg-type]
        self.assertLess(stream.received - at_block, 4 * CHUNK)
        assert service.big is not None
        self.assertGreater(service.big.left, 0, "the server was never held back")
        self.assertGreater(service.big.pauses, 0)
        stream.unblock()
        await stream.finished
        self.assertIsNone(stream.reset_with)
        self.assertEqual(stream.received, 64 * MB)

    async def test_full_upstream_pauses_stream(self) -> None:
        """A full upstream socket pauses the request body on the stream until it drains."""
        port, _, service = await self.site()
        total = 8 * MB
        head = http_head("POST", "/sha256", ((b"Content-Length", b"%d" % total),))
        stream = self.stream(head)
        self.pool(port).forward(stream)
        await until(lambda: stream.producer is not None and not stream.paused)
        pauses = stream.pause_count
        for _ in range(total // CHUNK):
            stream.send(BLOCK)
        stream.send_end()
        self.assertTrue(stream.paused)
        self.assertGreater(stream.pause_count, pauses)
        self.assertTrue(stream.queue, "the whole body went into the transport's buffer")
        await stream.finished
        expected = hashlib.sha256(BLOCK * (total // CHUNK)).hexdigest().encode()
        self.assertEqual(stream.body, b"%d %s" % (total, expected))


class ExchangeLifecycleTests(SynchronousTestCase):
    """
    The HTTP/1.1 exchange's lifecycle machine: an input its state does not
    expect is an error, never silently ignored; a finished exchange lets go
    of its machine (no reference cycle for the cyclic GC).
    """

    def exchange(self) -> tuple[Any, FakeStream]:
        pool = UpstreamPool(reactor, "tcp:host=127.0.0.1:port=9")  # never dialled here
        stream = FakeStream(http_head())
        exchange = upstream._Exchange(pool, stream)
        stream.attach(exchange)
        return exchange, stream

    def bound(self) -> tuple[Any, FakeStream, Clock, list[bytes]]:
        """An exchange on an idle keep-alive connection over a write-collecting transport, on a fake clock."""
        clock = Clock()
        pool = UpstreamPool(clock, "tcp:host=127.0.0.1:port=9", response_timeout=5)
        written: list[bytes] = []
        transport = StringTransport()
        transport.write = written.append  # type: ignore[method-assign]
        conn = pool._factory.buildProtocol(None)
        conn.makeConnection(transport)
        pool._idle.append(conn)
        stream = FakeStream(http_head())
        pool.forward(stream)
        assert stream.receiver is not None
        return stream.receiver, stream, clock, written

    def test_common_path_runs_no_machine(self) -> None:
        """A request on an idle connection, answered in order, takes its transitions without making a machine."""
        exchange, stream, _, written = self.bound()
        self.assertEqual((exchange._life, exchange._at), (None, "waiting"))
        self.assertTrue(written[0].startswith(b"GET /hello HTTP/1.1\r\n"))
        exchange._conn.dataReceived(OK_RESPONSE)
        self.assertEqual((stream.reply.status, stream.body, stream.trailers), (200, b"ok", ()))
        self.assertIs(exchange._life, upstream._ENDED)

    def test_off_the_common_path_the_machine_takes_over(self) -> None:
        """A timer firing makes the machine in the state reached, which fails the stream for its reason."""
        exchange, stream, clock, _ = self.bound()
        clock.advance(5)
        self.assert_reset_with(stream, Reason.UPSTREAM_TIMEOUT, "no response within 5s")
        self.assertIs(exchange._life, upstream._ENDED)

    def assert_reset_with(self, stream: FakeStream, reason: Reason, fragment: str) -> None:
        assert stream.reset_with is not None
        self.assertEqual(stream.reset_with[0], reason)
        self.assertIn(fragment, stream.reset_with[1])

    def test_unexpected_inputs_raise(self) -> None:
        """A response before any request, or its end, is no transition of an idle exchange."""
        exchange, _ = self.exchange()
        with self.assertRaises(NoTransition):
            exchange.response_head(200, b"OK", ())
        with self.assertRaises(NoTransition):
            exchange.response_end(b"", [], True)
        with self.assertRaises(NoTransition):
            exchange._timed_out()

    def test_reset_while_attaching(self) -> None:
        """An edge reset before the start finishes it: the start does nothing, and a second reset is allowed."""
        exchange, stream = self.exchange()
        stream.edge_reset(Reason.CLIENT_GONE, "client left")
        self.assertIs(exchange._life, upstream._ENDED)
        exchange.start()
        stream.edge_reset(Reason.CLIENT_GONE, "crossed on the wire")
        self.assertIsNone(stream.reset_with)
        self.assertFalse(stream.finished.called)

    def test_fail_after_finishing_raises(self) -> None:
        """Failing a finished exchange is a bug, said as one."""
        exchange, stream = self.exchange()
        exchange._fail(Reason.UPSTREAM_ERROR, "first")
        self.assertEqual(stream.reset_with, (Reason.UPSTREAM_ERROR, "first"))
        self.assertIs(exchange._life, upstream._ENDED)
        with self.assertRaises(NoTransition):
            exchange._fail(Reason.UPSTREAM_ERROR, "second")
        # Late request bytes and ends are dropped, not errors: they were in flight.
        exchange.data_received(b"late")
        exchange.end_received(())


    def test_finished_exchange_leaves_no_cycle(self) -> None:
        """A finished exchange is freed by reference counting alone: no cycle through its machine or handlers."""
        exchange, stream = self.exchange()
        exchange.start()  # dials (port 9, never answered before the reset below)
        stream.edge_reset(Reason.CLIENT_GONE, "client left")
        freed = weakref.ref(exchange)
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        del exchange
        stream.receiver = None
        self.assertIsNone(freed())


class EndToEndHeadersTests(SynchronousTestCase):
    """A response head's hop-by-hop fields are dropped, and the fields its Connection names."""

    def test_hop_by_hop_dropped(self) -> None:
        """Connection, the fields it names and the other hop-by-hop fields go; the rest keep their case."""
        head = (
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"keep-alive, X-Private"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Private", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"ETag", b'"a"'),
        )
        kept = ((b"Content-Type", b"text/plain"), (b"ETag", b'"a"'))
        self.assertEqual(upstream._end_to_end(head), kept)

    def test_connection_tokens(self) -> None:
        """keep-alive names nothing more; close or another token drops the field of that name."""
        self.assertEqual(
            upstream._end_to_end(((b"Connection", b"keep-alive"), (b"X-N", b"1"))), ((b"X-N", b"1"),)
        )
        self.assertEqual(
            upstream._end_to_end(((b"connection", b"Close"), (b"Close", b"x"), (b"X-N", b"1"))),
            ((b"X-N", b"1"),),
        )
        self.assertEqual(
            upstream._end_to_end(((b"X-A", b"1"), (b"Connection", b"x-a , Keep-Alive"), (b"X-N", b"1"))),
            ((b"X-N", b"1"),),
        )


class _StallingH2(Protocol):
    """An h2c upstream that answers every request with a head and 10 bytes, then nothing."""

    def connectionMade(self) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        self.h2 = H2Connection(H2Configuration(client_side=False))
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        from h2 import events

        for event in self.h2.receive_data(data):
            if isinstance(event, events.RequestReceived):
                self.h2.send_headers(event.stream_id, [(":status", "200")])
                self.h2.send_data(event.stream_id, b"0123456789")
        self.transport.write(self.h2.data_to_send())


class H2UpstreamBodyTimeoutTests(TestCase):
    """The h2c upstream pool's body timeout, against a real HTTP/2 server."""

    timeout = 30

    async def test_stalled_h2_body_resets_with_upstream_timeout(self) -> None:
        """An h2c upstream that stalls after its head and some DATA gets the stream reset with upstream_timeout; twice over one connection."""
        from tunneld.agent.upstream_h2 import H2UpstreamPool

        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        port = await endpoint.listen(Factory.forProtocol(_StallingH2))
        self.addCleanup(port.stopListening)
        pool = H2UpstreamPool(
            reactor, f"tcp:host=127.0.0.1:port={port.getHost().port}", body_timeout=0.3  # type: ignore[attr-defined]
        )
        self.addCleanup(pool.close)
        for _ in range(2):
            stream = FakeStream(http_head())
            pool.forward(stream)
            stream.send_end()
            await stream.finished
            self.assertEqual(stream.reply.status if stream.reply else None, 200)
            self.assertEqual(stream.body, b"0123456789")
            assert stream.reset_with is not None
            self.assertEqual(stream.reset_with[0], Reason.UPSTREAM_TIMEOUT)
            self.assertIn("stalled", stream.reset_with[1])
