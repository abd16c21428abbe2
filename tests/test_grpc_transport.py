"""
The gRPC transport driven directly: an edge and an agent end on real loopback
sockets, each with a small test handler, no edge or agent core in between.
"""

from __future__ import annotations

import hashlib
from typing import Any
from unittest import skipIf

from h2 import events as h2events
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.exceptions import TooManyStreamsError
from h2.settings import SettingCodes
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.switches import unavailable
from tunneld.errors import ConfigError
from tunneld.interfaces import (
    AgentLinkSetup,
    EdgeLinkSetup,
    IAgentLink,
    ILinkHandler,
    IStream,
    IStreamReceiver,
    ITransportPlugin,
)
from tunneld.model.messages import ControlMessage, Hello, ReplyHead, StreamHead, TunnelSpec, Welcome
from tunneld.model.reasons import Reason
from tunneld.registry import available_transports
from tunneld.speedups.lean_h2 import DataArrived, LeanH2Connection
from tunneld.transports import grpc as grpc_transport
from tunneld.transports.grpc import (
    AgentGrpcLink,
    EdgeGrpcLink,
    GrpcStatus,
    GrpcStream,
    GrpcTransport,
    data_message,
    grpc_message,
    reason_from_status,
    status_message,
)
from tunneld.wire import codec

MB = 1024 * 1024
CHUNK = 64 * 1024


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def until(predicate: Any, timeout: float = 10.0, step: float = 0.01) -> None:
    """Wait until C{predicate()} is true (or fail after C{timeout} seconds)."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await sleep(step)
        waited += step


def pattern(total: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
    return (block * (total // len(block) + 1))[:total]


@implementer(IStreamReceiver)
class Receiver:
    """Records what arrives on a stream."""

    def __init__(self) -> None:
        self.reply: ReplyHead | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.trailers: Any = None
        self.reset: tuple[Reason, str] | None = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.on_data: Any = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def reply_received(self, reply: ReplyHead) -> None:
        self.reply = reply

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.on_data is not None:
            self.on_data(data)

    def end_received(self, trailers: Any) -> None:
        self.trailers = tuple(trailers)
        self.done.callback(None)

    def reset_received(self, reason: Reason, message: str) -> None:
        self.reset = (reason, message)
        if not self.done.called:
            self.done.callback(None)


@implementer(IPushProducer)
class BytesProducer:
    """Writes C{data} into a stream 64 KiB at a time, honouring pause/resume; then ends."""

    def __init__(self, stream: IStream, data: bytes, end: bool = True) -> None:
        self.stream = stream
        self.data = data
        self.offset = 0
        self.paused = False
        self.end = end
        self.stopped = False
        self.pauses = 0
        stream.registerProducer(self, True)
        reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        while not self.paused and not self.stopped and self.offset < len(self.data):
            chunk = self.data[self.offset : self.offset + CHUNK]
            self.offset += len(chunk)
            self.stream.write(chunk)
        if self.offset >= len(self.data) and not self.stopped:
            self.stopped = True
            self.stream.unregisterProducer()
            if self.end:
                self.stream.end()

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:  # noqa: N802
        if self.paused:
            self.paused = False
            reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True


@implementer(IPushProducer)
class Producer:
    """Counts pauses."""

    def __init__(self) -> None:
        self.pauses = 0

    def pauseProducing(self) -> None:  # noqa: N802
        self.pauses += 1

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


@implementer(IStreamReceiver)
class EchoReceiver:
    """
    The agent's test upstream: replies 200 and echoes the body back; C{/big/N}
    answers N pattern bytes instead; C{/hold} answers and then waits.
    """

    def __init__(self, stream: IStream) -> None:
        self.stream = stream
        self.reset: tuple[Reason, str] | None = None
        self.received = 0
        target = stream.head.target
        stream.send_reply(ReplyHead(200, b"OK", ((b"x-target", target.encode()),)))
        self.sender: BytesProducer | None = None
        if target.startswith("/big/"):
            self.sender = BytesProducer(stream, pattern(int(target.split("/")[2])))
        else:
            # Our outgoing congestion pauses our incoming side: backpressure end to end.
            stream.registerProducer(stream, True)

    def reply_received(self, reply: ReplyHead) -> None:
        raise AssertionError("the agent never receives a reply")

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.sender is None:
            self.stream.write(data)

    def end_received(self, trailers: Any) -> None:
        if self.stream.head.target == "/hold":
            return
        if self.sender is None:
            self.stream.unregisterProducer()
            self.stream.end(((b"x-echoed", str(self.received).encode()),))

    def reset_received(self, reason: Reason, message: str) -> None:
        self.reset = (reason, message)


@implementer(ILinkHandler)
class Handler:
    """A test link handler for either end."""

    def __init__(self, link: IAgentLink | None = None, welcome: bool = True) -> None:
        self.link = link
        self.welcome = welcome
        self.control: list[ControlMessage] = []
        self.streams: list[IStream] = []
        self.echoes: list[EchoReceiver] = []
        self.lost: list[tuple[Reason, str]] = []
        self.got_control: defer.Deferred[ControlMessage] = defer.Deferred()
        self.got_lost: defer.Deferred[tuple[Reason, str]] = defer.Deferred()

    def control_received(self, message: ControlMessage) -> None:
        self.control.append(message)
        if isinstance(message, Hello) and self.welcome and self.link is not None:
            self.link.send_control(
                Welcome(session_id="session-1", public_urls=("http://app.test/",), heartbeat_ms=50)
            )
        if not self.got_control.called:
            self.got_control.callback(message)

    def stream_opened(self, stream: IStream) -> None:
        self.streams.append(stream)
        echo = EchoReceiver(stream)
        self.echoes.append(echo)
        stream.attach(echo)

    def link_lost(self, reason: Reason, message: str) -> None:
        self.lost.append((reason, message))
        if not self.got_lost.called:
            self.got_lost.callback((reason, message))


class Pair:
    """An edge listener and one agent link to it."""

    edge: EdgeGrpcLink
    agent: AgentGrpcLink
    edge_handler: Handler
    agent_handler: Handler


async def start_edge(case: TestCase, on_link: Any, **edge: Any) -> int:
    plugin = GrpcTransport()
    options = plugin.edge_options({"listen": "tcp:0:interface=127.0.0.1", **edge}, "(test)")
    service = plugin.edge_service(options, EdgeLinkSetup(on_link=on_link, reactor=reactor))
    service.startService()
    case.addCleanup(service.stopService)
    port = await service.listening
    return port.getHost().port  # type: ignore[no-any-return]


async def link_pair(
    case: TestCase, edge: dict[str, Any] | None = None, agent: dict[str, Any] | None = None,
    agent_frame_size: int = 1 << 20,
) -> Pair:
    """Listen, dial, hello, welcome: a ready edge/agent link pair, cleaned up after the test."""
    pair = Pair()
    edge_links: list[EdgeGrpcLink] = []

    def on_link(link: IAgentLink) -> None:
        assert isinstance(link, EdgeGrpcLink)
        handler = Handler(link)
        pair.edge_handler = handler
        link.set_handler(handler)
        edge_links.append(link)

    port = await start_edge(case, on_link, **(edge or {}))
    plugin = GrpcTransport()
    options = plugin.agent_options({"address": f"127.0.0.1:{port}", **(agent or {})}, "(test)")
    link = await plugin.connect(
        options, AgentLinkSetup(reactor=reactor, max_frame_size=agent_frame_size)
    )
    pair.agent = link

    async def cleanup() -> None:
        link.close(Reason.CANCELLED, "test over")
        await link.when_closed()
        for edge_link in edge_links:
            await edge_link.when_closed()

    case.addCleanup(lambda: defer.ensureDeferred(cleanup()))
    pair.agent_handler = Handler(link)
    link.set_handler(pair.agent_handler)
    link.send_control(
        Hello(agent_id="agent-1", tunnels=(TunnelSpec("app.test"),), token="t", software="test")
    )
    await pair.agent_handler.got_control
    pair.edge = edge_links[0]
    return pair


def head(target: str = "/", method: str = "POST") -> StreamHead:
    return StreamHead(
        kind="http", tunnel="app.test", method=method, target=target,
        headers=((b"host", b"app.test"), (b"x-n", target.encode())), peer="127.0.0.1:5555",
    )


class GrpcWireTests(TestCase):
    """Pieces of the transport that need no socket."""

    def test_data_message_matches_codec(self) -> None:
        """The hand-built Data message is byte-identical to the generated encoder's."""
        for size in (1, 127, 128, 16383, 16384, 300_000):
            payload = b"x" * size
            self.assertEqual(
                b"".join(data_message(payload)),
                grpc_message(codec.encode_data(0, payload)),
            )

    def test_status_message_round_trip(self) -> None:
        """A reason and text survive grpc-message percent-encoding."""
        encoded = status_message(Reason.UNAUTHORIZED, "wrong token for 'a' — 100%")
        self.assertTrue(all(0x20 <= b < 0x7F for b in encoded))
        self.assertEqual(
            reason_from_status(GrpcStatus.UNAUTHENTICATED, encoded),
            (Reason.UNAUTHORIZED, "wrong token for 'a' — 100%"),
        )
        self.assertEqual(
            reason_from_status(GrpcStatus.UNAUTHENTICATED, b"no label")[0], Reason.UNAUTHORIZED
        )

    @skipIf(unavailable("lean_h2"), unavailable("lean_h2"))
    def test_open_stream_count_is_exact_at_the_limit(self) -> None:
        """The cheap open-stream count still enforces MAX_CONCURRENT_STREAMS and forgets closed streams."""
        client = LeanH2Connection(H2Configuration(client_side=True, header_encoding=None))
        server = LeanH2Connection(H2Configuration(client_side=False, header_encoding=None))
        client.initiate_connection()
        server.initiate_connection()
        server.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        for _ in range(3):
            server.receive_data(client.data_to_send())
            client.receive_data(server.data_to_send())
        request = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a")]

        def open_one() -> int:
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, request)
            server.receive_data(client.data_to_send())
            return sid

        # Open and reset 1,000 streams: what h2 keeps stays bounded.
        for _ in range(1000):
            sid = open_one()
            client.reset_stream(sid)
            server.receive_data(client.data_to_send())
        self.assertLess(len(client.streams), 200)
        self.assertLess(len(server.streams), 200)
        # 100 open streams are allowed, the 101st is not.
        for _ in range(100):
            open_one()
        self.assertEqual(client.open_outbound_streams, 100)
        self.assertEqual(server.open_inbound_streams, 100)
        with self.assertRaises(TooManyStreamsError):
            client.send_headers(client.get_next_available_stream_id(), request)

    @skipIf(unavailable("lean_h2"), unavailable("lean_h2"))
    def test_received_data_frame_repr_is_short(self) -> None:
        """A received DATA frame's repr names its size instead of hex-encoding the payload."""
        client = LeanH2Connection(H2Configuration(client_side=True, header_encoding=None))
        server = LeanH2Connection(H2Configuration(client_side=False, header_encoding=None))
        client.initiate_connection()
        server.receive_data(client.data_to_send())
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a")])
        client.send_data(sid, b"\xab" * 1000)
        server.incoming_buffer.add_data(client.data_to_send())
        frames = list(server.incoming_buffer)
        self.assertEqual([type(f).__name__ for f in frames], ["HeadersFrame", "DataFrame"])
        self.assertIn("<1000 bytes>", repr(frames[-1]))
        self.assertNotIn("abab", repr(frames[-1]))

    def test_plugin_found_and_options_checked(self) -> None:
        """The grpc plugin is found by name, verifies, and rejects bad agent options."""
        plugin = available_transports()["grpc"]
        verifyObject(ITransportPlugin, plugin)
        options = plugin.agent_options({}, "agent.toml")
        self.assertEqual((options.address, options.tls), ("127.0.0.1:8082", False))
        self.assertEqual((options.min_idle_forwards, options.max_idle_forwards), (2, 256))
        self.assertEqual(plugin.edge_options({}, "edge.toml").listen, "tcp:8082:interface=127.0.0.1")
        with self.assertRaises(ConfigError) as raised:
            plugin.agent_options({"address": "nowhere"}, "agent.toml")
        self.assertIn("transports.grpc.address", str(raised.exception))
        with self.assertRaises(ConfigError):
            plugin.agent_options({"min_idle_forwards": 5, "max_idle_forwards": 2}, "agent.toml")
        with self.assertRaises(ConfigError):
            plugin.edge_options({"stream_window": 10}, "edge.toml")


class GrpcTransportTests(TestCase):
    """Edge and agent ends of the transport over loopback."""

    timeout = 60

    async def test_hello_welcome(self) -> None:
        """Hello travels agent → edge on Control and Welcome comes back."""
        pair = await link_pair(self)
        verifyObject(IAgentLink, pair.edge)
        verifyObject(IAgentLink, pair.agent)
        (hello,) = pair.edge_handler.control
        assert isinstance(hello, Hello)
        self.assertEqual((hello.agent_id, hello.tunnels, hello.token), ("agent-1", (TunnelSpec("app.test"),), "t"))
        (welcome,) = pair.agent_handler.control
        assert isinstance(welcome, Welcome)
        self.assertEqual((welcome.session_id, welcome.public_urls), ("session-1", ("http://app.test/",)))
        self.assertEqual(pair.edge.transport_name, "grpc")
        self.assertTrue(pair.edge.peer.startswith("127.0.0.1:"))
        self.assertIsNone(pair.edge.peer_certificate)
        # After the welcome the agent keeps its pool of idle Forward calls open.
        await until(lambda: len(pair.edge.idle) == 2)

    async def test_stream_round_trip(self) -> None:
        """A stream carries head, reply, data and end (with trailers) both ways."""
        pair = await link_pair(self)
        receiver = Receiver()
        stream = pair.edge.open_stream(head("/echo"), receiver)
        verifyObject(IStream, stream)
        stream.write(b"hello, ")
        stream.write(b"agent")
        stream.end()
        await receiver.done
        self.assertIsNone(receiver.reset)
        assert receiver.reply is not None
        self.assertEqual((receiver.reply.status, receiver.reply.reason), (200, b"OK"))
        self.assertEqual(receiver.reply.headers, ((b"x-target", b"/echo"),))
        self.assertEqual(receiver.data, b"hello, agent")
        self.assertEqual(receiver.trailers, ((b"x-echoed", b"12"),))
        (agent_stream,) = pair.agent_handler.streams
        self.assertEqual(agent_stream.head, head("/echo"))
        await until(lambda: pair.edge.active_streams() == 0 and pair.agent.active_streams() == 0)
        await until(lambda: len(pair.edge.calls) == 1 + len(pair.edge.idle))

    async def test_link_sockets_have_no_delay(self) -> None:
        """Both ends of the link turn Nagle's algorithm off (TCP_NODELAY)."""
        pair = await link_pair(self)
        self.assertTrue(pair.edge.transport.getTcpNoDelay())
        self.assertTrue(pair.agent.transport.getTcpNoDelay())

    async def test_messages_of_one_turn_share_a_data_frame(self) -> None:
        """Data and End written in one turn reach the edge as one DATA frame; the source is not paused."""
        pair = await link_pair(self)
        receiver = Receiver()
        pair.edge.open_stream(head("/hold"), receiver).end()
        await until(lambda: receiver.reply is not None)
        (agent_stream,) = pair.agent_handler.streams
        assert agent_stream.call is not None
        call_id = agent_stream.call.stream_id
        agent_stream.unregisterProducer()
        producer = Producer()
        agent_stream.registerProducer(producer, True)
        seen: list[h2events.Event | DataArrived] = []
        receive_frames = pair.edge.conn.receive_frames

        def recording(data: bytes) -> list[h2events.Event | DataArrived]:
            events = receive_frames(data)
            seen.extend(events)
            return events

        pair.edge.conn.receive_frames = recording  # type: ignore[method-assign]
        agent_stream.write(b"first ")
        agent_stream.write(b"second")
        agent_stream.end(((b"x-done", b"1"),))
        await receiver.done
        self.assertEqual(receiver.data, b"first second")
        self.assertEqual(receiver.trailers, ((b"x-done", b"1"),))
        # A DATA frame arrives as DataArrived (the short path) or as h2's event.
        mine = [
            "DATA" if isinstance(e, (tuple, h2events.DataReceived)) else type(e).__name__
            for e in seen
            if (e[0] if isinstance(e, tuple) else getattr(e, "stream_id", None)) == call_id
        ]
        self.assertEqual(mine, ["DATA"])
        self.assertEqual(producer.pauses, 0)

    async def test_forward_call_carries_one_stream_after_another(self) -> None:
        """Agreed reuse: streams that end cleanly leave their call open for the next; a reset ends it."""
        pair = await link_pair(self)
        await until(lambda: len(pair.edge.idle) == 2)
        calls = set()
        for i in range(6):
            receiver = Receiver()
            stream = pair.edge.open_stream(head(f"/echo/{i}"), receiver)
            assert isinstance(stream, GrpcStream) and stream.call is not None
            calls.add(stream.call.stream_id)
            stream.write(b"body %d" % i)
            stream.end()
            await receiver.done
            self.assertIsNone(receiver.reset)
            self.assertEqual(receiver.data, b"body %d" % i)
            await until(lambda: len(pair.edge.idle) == 2 and len(pair.agent.idle) == 2)
        # Six streams, one after another, on the pool's two calls.
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(pair.edge.calls), 3)  # Control and two Forward calls
        receiver = Receiver()
        stream = pair.edge.open_stream(head("/hold"), receiver)
        assert isinstance(stream, GrpcStream) and stream.call is not None
        call_id = stream.call.stream_id
        await until(lambda: receiver.reply is not None)
        stream.reset(Reason.CLIENT_GONE, "client hung up")
        await until(lambda: call_id not in pair.edge.calls and call_id not in pair.agent.calls)
        self.assertEqual(pair.agent_handler.echoes[-1].reset, (Reason.CLIENT_GONE, "client hung up"))

    async def test_without_reuse_each_stream_ends_its_call(self) -> None:
        """Ends that do not ask for reuse (like a stock agent) get one call per stream, ended by trailers."""
        self.patch(grpc_transport.edge, "_REUSE", ())
        self.patch(grpc_transport.agent, "_REUSE", ())
        pair = await link_pair(self)
        await until(lambda: len(pair.edge.idle) == 2)
        receiver = Receiver()
        stream = pair.edge.open_stream(head("/echo"), receiver)
        assert isinstance(stream, GrpcStream) and stream.call is not None
        call_id = stream.call.stream_id
        stream.end()
        await receiver.done
        self.assertIsNone(receiver.reset)
        await until(lambda: call_id not in pair.edge.calls and call_id not in pair.agent.calls)

    async def test_fifty_concurrent_streams(self) -> None:
        """50 streams at once each get their own echo back, intact."""
        pair = await link_pair(self)
        receivers = []
        for i in range(50):
            receiver = Receiver()
            stream = pair.edge.open_stream(head(f"/echo/{i}"), receiver)
            stream.write(f"stream {i} ".encode() * (i * 50 + 1))
            stream.end()
            receivers.append(receiver)
        await defer.gatherResults([r.done for r in receivers])
        for i, receiver in enumerate(receivers):
            self.assertIsNone(receiver.reset)
            self.assertEqual(receiver.data, f"stream {i} ".encode() * (i * 50 + 1))
        # The pool ran dry under the burst and grew.
        self.assertGreater(pair.agent.target, 2)

    async def test_five_megabytes_each_way(self) -> None:
        """5 MB up and 5 MB back arrive intact, with backpressure instead of buffering."""
        pair = await link_pair(self)
        body = pattern(5 * MB, seed=3)
        receiver = Receiver()
        stream = pair.edge.open_stream(head("/echo"), receiver)
        producer = BytesProducer(stream, body)
        await receiver.done
        self.assertIsNone(receiver.reset)
        self.assertEqual(receiver.size, len(body))
        self.assertEqual(hashlib.sha256(receiver.data).digest(), hashlib.sha256(body).digest())
        self.assertGreater(producer.pauses, 0)

        download = Receiver()
        pair.edge.open_stream(head(f"/big/{5 * MB}", "GET"), download).end()
        await download.done
        self.assertIsNone(download.reset)
        self.assertEqual(download.data, pattern(5 * MB))

    async def test_messages_fit_the_smaller_frame_limit(self) -> None:
        """An agent that accepts only 128 KiB messages (Hello says so) gets none larger; 1 MB crosses."""
        pair = await link_pair(self, agent_frame_size=128 * 1024)
        (hello,) = pair.edge_handler.control
        assert isinstance(hello, Hello)
        self.assertEqual(hello.max_frame_size, 128 * 1024)
        body = pattern(MB, seed=5)
        receiver = Receiver()
        stream = pair.edge.open_stream(head("/echo"), receiver)
        stream.write(body)  # one write, larger than the agent's limit
        stream.end()
        await receiver.done
        self.assertIsNone(receiver.reset)
        self.assertEqual(receiver.data, body)

    async def test_paused_receiver_stalls_only_its_stream(self) -> None:
        """A consumer that pauses one stream holds back its window; another stream completes."""
        pair = await link_pair(self)
        total = 8 * MB
        slow = Receiver()
        slow_stream = pair.edge.open_stream(head(f"/big/{total}", "GET"), slow)
        slow.on_data = lambda data: slow_stream.pauseProducing()
        slow_stream.end()
        await until(lambda: slow.size > 0)
        await sleep(0.3)
        stalled_at = slow.size
        self.assertLess(stalled_at, 3 * MB)

        fast = Receiver()
        fast_stream = pair.edge.open_stream(head("/big/3000000", "GET"), fast)
        fast_stream.end()
        await fast.done
        self.assertIsNone(fast.reset)
        self.assertEqual(fast.size, 3_000_000)
        self.assertEqual(slow.size, stalled_at)
        self.assertFalse(slow.done.called)

        slow.on_data = None
        slow_stream.resumeProducing()
        await slow.done
        self.assertIsNone(slow.reset)
        self.assertEqual(slow.data, pattern(total))

    async def test_link_close_resets_every_stream(self) -> None:
        """When the agent's link goes, every stream on both ends is reset; edge sees agent_gone."""
        pair = await link_pair(self)
        receivers = [Receiver() for _ in range(3)]
        for receiver in receivers:
            pair.edge.open_stream(head("/hold"), receiver).end()
        await until(lambda: len(pair.agent_handler.streams) == 3)
        await until(lambda: all(r.reply is not None for r in receivers))
        pair.agent.close(Reason.AGENT_GONE, "agent killed by the test")
        await defer.gatherResults([r.done for r in receivers])
        for receiver in receivers:
            assert receiver.reset is not None
            self.assertEqual(receiver.reset[0], Reason.AGENT_GONE)
        reason, _ = await pair.edge_handler.got_lost
        self.assertEqual(reason, Reason.AGENT_GONE)
        self.assertEqual([e.reset[0] for e in pair.agent_handler.echoes if e.reset], [Reason.AGENT_GONE] * 3)
        self.assertEqual(pair.edge.active_streams(), 0)
        # A stream opened on a closed link is reset at once.
        late = Receiver()
        pair.edge.open_stream(head("/late"), late)
        await late.done
        self.assertEqual(late.reset, (Reason.AGENT_GONE, "agent link closed"))

    async def test_edge_close_tells_agent_why(self) -> None:
        """An edge refusing the agent ends Control with UNAUTHENTICATED; the agent learns the reason."""
        pair = await link_pair(self)
        receiver = Receiver()
        pair.edge.open_stream(head("/hold"), receiver).end()
        await until(lambda: receiver.reply is not None)
        pair.edge.close(Reason.UNAUTHORIZED, "wrong token for agent 'a'")
        self.assertEqual(receiver.reset, (Reason.UNAUTHORIZED, "wrong token for agent 'a'"))
        reason, message = await pair.agent_handler.got_lost
        self.assertEqual((reason, message), (Reason.UNAUTHORIZED, "wrong token for agent 'a'"))
        self.assertEqual(pair.agent_handler.echoes[0].reset, (Reason.UNAUTHORIZED, "wrong token for agent 'a'"))

    async def test_stream_reset_both_ways(self) -> None:
        """A reset from either end reaches the other with its reason, and only that stream."""
        pair = await link_pair(self)
        first, second = Receiver(), Receiver()
        one = pair.edge.open_stream(head("/hold"), first)
        pair.edge.open_stream(head("/hold"), second)
        await until(lambda: len(pair.agent_handler.streams) == 2)
        one.reset(Reason.CLIENT_GONE, "client hung up")
        await until(lambda: pair.agent_handler.echoes[0].reset is not None)
        self.assertEqual(pair.agent_handler.echoes[0].reset, (Reason.CLIENT_GONE, "client hung up"))
        pair.agent_handler.streams[1].reset(Reason.UPSTREAM_REFUSED, "connection refused")
        await second.done
        self.assertEqual(second.reset, (Reason.UPSTREAM_REFUSED, "connection refused"))
        self.assertIsNone(first.reset)
        await until(lambda: pair.edge.active_streams() == 0 and pair.agent.active_streams() == 0)

    async def test_malformed_message_ends_only_its_call(self) -> None:
        """An undecodable message on a Forward call resets that stream; the link lives on."""
        pair = await link_pair(self)
        receiver = Receiver()
        pair.edge.open_stream(head("/hold"), receiver)
        await until(lambda: len(pair.agent_handler.streams) == 1)
        agent_stream = pair.agent_handler.streams[0]
        assert agent_stream.call is not None
        pair.agent.enqueue(agent_stream.call, [grpc_message(b"\xff\xff\xff not a frame")])
        await receiver.done
        assert receiver.reset is not None
        self.assertEqual(receiver.reset[0], Reason.PROTOCOL_ERROR)
        await until(lambda: pair.agent_handler.echoes[0].reset is not None)
        self.assertEqual(pair.agent_handler.echoes[0].reset[0], Reason.PROTOCOL_ERROR)
        self.assertEqual(pair.edge_handler.lost, [])
        again = Receiver()
        stream = pair.edge.open_stream(head("/echo"), again)
        stream.write(b"still up")
        stream.end()
        await again.done
        self.assertEqual(again.data, b"still up")

    async def test_writer_ignoring_backpressure_is_saturated(self) -> None:
        """A writer that ignores pauses overruns the bounded buffer: reset with saturated."""
        pair = await link_pair(self)
        receiver = Receiver()
        stream = pair.edge.open_stream(head("/hold"), receiver)
        await until(lambda: len(pair.agent_handler.streams) == 1)
        for _ in range(80):
            stream.write(b"x" * CHUNK)  # 5 MB with no producer registered
        await until(lambda: pair.agent_handler.echoes[0].reset is not None)
        self.assertEqual(pair.agent_handler.echoes[0].reset[0], Reason.SATURATED)
        self.assertEqual(pair.edge.active_streams(), 0)
        self.assertEqual(pair.edge_handler.lost, [])

    async def test_heartbeat_measures_round_trip(self) -> None:
        """HTTP/2 PINGs give both ends a round-trip time."""
        pair = await link_pair(
            self, edge={"heartbeat_interval": 0.05}, agent={"heartbeat_interval": 0.05}
        )
        self.assertIsNone(pair.edge.round_trip_time())
        await until(lambda: pair.edge.round_trip_time() is not None)
        await until(lambda: pair.agent.round_trip_time() is not None)
        rtt = pair.edge.round_trip_time()
        assert rtt is not None
        self.assertGreaterEqual(rtt, 0.0)
        self.assertLess(rtt, 1.0)

    async def test_heartbeat_timeout_closes_link(self) -> None:
        """An agent that goes silent is declared gone after heartbeat_timeout."""
        pair = await link_pair(
            self,
            edge={"heartbeat_interval": 0.05, "heartbeat_timeout": 0.3},
            agent={"heartbeat_interval": 0},
        )
        receiver = Receiver()
        pair.edge.open_stream(head("/hold"), receiver).end()
        await until(lambda: receiver.reply is not None)
        pair.agent.transport.pauseProducing()  # the agent stops reading: no PING ACKs
        self.addCleanup(pair.agent.transport.resumeProducing)
        reason, message = await pair.edge_handler.got_lost
        self.assertEqual(reason, Reason.AGENT_GONE)
        self.assertIn("heartbeat timeout", message)
        self.assertEqual(receiver.reset and receiver.reset[0], Reason.AGENT_GONE)

    async def test_opens_queue_until_the_agent_opens_calls(self) -> None:
        """With no idle Forward call, opens wait for the agent (bounded), then proceed."""
        pair = await link_pair(self, edge={"max_queued_opens": 20}, agent={"min_idle_forwards": 1})
        receivers = [Receiver() for _ in range(20)]
        for i, receiver in enumerate(receivers):
            stream = pair.edge.open_stream(head(f"/q/{i}"), receiver)
            stream.write(b"q%d" % i)
            stream.end()
        self.assertGreater(len(pair.edge.queue), 0)
        refused = Receiver()
        pair.edge.open_stream(head("/too-many"), refused)
        await defer.gatherResults([r.done for r in receivers + [refused]])
        self.assertEqual([r.data for r in receivers], [b"q%d" % i for i in range(20)])
        assert refused.reset is not None
        self.assertEqual(refused.reset[0], Reason.SATURATED)

    async def test_open_crossing_a_retired_call_is_replayed(self) -> None:
        """An Open sent on a call the agent just retired is replayed on another call."""
        pair = await link_pair(self)
        await until(lambda: len(pair.edge.idle) == 2)
        for call in list(pair.agent.idle.values()):
            call.retiring = True
            pair.agent.end_request(call)
        pair.agent.idle.clear()
        pair.agent.top_up()
        receiver = Receiver()
        stream = pair.edge.open_stream(head("/echo"), receiver)  # crosses the retirement
        stream.write(b"replayed body")
        stream.end()
        await receiver.done
        self.assertIsNone(receiver.reset)
        self.assertEqual(receiver.data, b"replayed body")
        self.assertEqual(len(pair.agent_handler.streams), 1)

    async def assert_served(self, pair: Pair) -> None:
        """A new stream on C{pair} finds a call and is echoed back whole."""
        receiver = Receiver()
        stream = pair.edge.open_stream(head("/after"), receiver)
        stream.write(b"still served")
        stream.end()
        await receiver.done
        self.assertIsNone(receiver.reset)
        self.assertEqual(receiver.data, b"still served")

    async def test_reset_crossing_the_agents_end_leaves_the_pool_whole(self) -> None:
        """
        A public client that leaves as its response ends: the edge's Reset
        crosses the agent's End, reaching a call already back in the agent's
        pool.  That call ends (a Reset ends the call) and the pool is refilled,
        so the next stream finds a call instead of waiting for one in vain.
        """
        pair = await link_pair(self, edge={"queued_open_timeout": 2.0})
        await until(lambda: len(pair.edge.idle) == 2 and len(pair.agent.idle) == 2)
        for i in range(3):  # more than the pool holds
            receiver = Receiver()
            stream = pair.edge.open_stream(head(f"/gone/{i}", "GET"), receiver, end_stream=True)
            assert isinstance(stream, GrpcStream) and stream.call is not None
            call_id = stream.call.stream_id
            pair.edge.transport.pauseProducing()  # the agent's answer is not read yet
            await until(lambda n=i + 1: len(pair.agent_handler.streams) == n)
            await until(lambda c=call_id: c in pair.agent.idle)  # done on the agent's side
            stream.reset(Reason.CLIENT_GONE, "client hung up")
            pair.edge.transport.resumeProducing()
            await until(lambda c=call_id: c not in pair.edge.calls and c not in pair.agent.calls)
            await until(lambda: len(pair.agent.idle) == 2 and len(pair.edge.idle) == 2)
        self.assertEqual([echo.reset for echo in pair.agent_handler.echoes], [None] * 3)
        await self.assert_served(pair)

    async def test_agent_reset_after_its_end_does_not_hit_the_next_stream(self) -> None:
        """
        The agent resets a stream after its own End, while the edge (which has
        ended too) already put the next stream's Open on the same call: the
        reset must not land on that next stream, which is served elsewhere.
        """
        pair = await link_pair(self)
        await until(lambda: len(pair.edge.idle) == 2 and len(pair.agent.idle) == 2)
        first = Receiver()
        stream = pair.edge.open_stream(head("/hold"), first)
        assert isinstance(stream, GrpcStream) and stream.call is not None
        call = stream.call
        await until(lambda: len(pair.agent_handler.streams) == 1)
        agent_stream = pair.agent_handler.streams[0]
        agent_stream.unregisterProducer()
        agent_stream.end()
        await until(lambda: first.trailers is not None)
        pair.agent.transport.pauseProducing()  # the edge's End and next Open wait
        stream.end()  # done on the edge: the call takes the next stream
        self.assertIn(call, pair.edge.idle)
        pair.edge.idle.remove(call)
        pair.edge.idle.appendleft(call)
        second = Receiver()
        following = pair.edge.open_stream(head("/next"), second)
        assert isinstance(following, GrpcStream)
        self.assertIs(following.call, call)
        following.write(b"next body")
        following.end()
        agent_stream.reset(Reason.UPSTREAM_ERROR, "upstream went away")
        pair.agent.transport.resumeProducing()
        await second.done
        self.assertIsNone(second.reset)
        self.assertEqual(second.data, b"next body")

    async def test_pool_refills_after_its_calls_are_reset(self) -> None:
        """Idle calls the edge resets (an error: not replaced at once) come back by the next pool tick."""
        pair = await link_pair(self, agent={"pool_shrink_interval": 0.2})
        await until(lambda: len(pair.edge.idle) == 2 and len(pair.agent.idle) == 2)
        lost = [call.stream_id for call in pair.edge.idle]
        for call in list(pair.edge.idle):
            pair.edge.idle.remove(call)
            pair.edge.rst(call, ErrorCodes.REFUSED_STREAM)
        await until(lambda: not set(lost) & set(pair.agent.calls))
        await until(lambda: len(pair.agent.idle) == 2 and len(pair.edge.idle) == 2)
        await self.assert_served(pair)

    async def test_pool_shrinks_when_idle(self) -> None:
        """After a burst grows the pool, it shrinks back towards min_idle_forwards."""
        pair = await link_pair(self, agent={"pool_shrink_interval": 0.1})
        receivers = [Receiver() for _ in range(30)]
        for receiver in receivers:
            pair.edge.open_stream(head("/echo"), receiver).end()
        await defer.gatherResults([r.done for r in receivers])
        grown = pair.agent.target
        self.assertGreater(grown, 2)
        await until(lambda: pair.agent.target == 2 and len(pair.edge.idle) == 2)
        await until(lambda: len(pair.edge.calls) == 3)


def _certificate(common_name: str, issuer: Any = None, ip: str | None = None) -> tuple[Any, Any]:
    """A key and certificate (self-signed, or signed by C{issuer}=(key, cert))."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_key, signer_cert = issuer if issuer else (key, None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_cert.subject if signer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False
        )
    return key, builder.sign(signer_key, hashes.SHA256())


def _pem(key: Any, cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class GrpcTlsTests(TestCase):
    """The transport over TLS with client certificates and ALPN h2."""

    timeout = 30

    async def test_mutual_tls_with_alpn(self) -> None:
        """Agent and edge negotiate h2 by ALPN; the edge sees the agent's verified certificate."""
        from cryptography.hazmat.primitives import serialization
        from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

        ca = _certificate("test CA")
        ca_cert = Certificate.loadPEM(ca[1].public_bytes(serialization.Encoding.PEM))
        edge_cert = PrivateCertificate.loadPEM(_pem(*_certificate("edge", ca, ip="127.0.0.1")))
        agent_cert = PrivateCertificate.loadPEM(_pem(*_certificate("agent.test", ca)))
        server_tls = edge_cert.options(ca_cert)  # requires a client certificate from the CA

        links: list[EdgeGrpcLink] = []

        def on_link(link: IAgentLink) -> None:
            assert isinstance(link, EdgeGrpcLink)
            link.set_handler(Handler(link))
            links.append(link)

        plugin = GrpcTransport()
        options = plugin.edge_options({"listen": "tcp:0:interface=127.0.0.1"}, "(test)")
        service = plugin.edge_service(
            options, EdgeLinkSetup(on_link=on_link, reactor=reactor, tls=server_tls)
        )
        service.startService()
        self.addCleanup(service.stopService)
        port = (await service.listening).getHost().port

        agent_options = plugin.agent_options(
            {"address": f"127.0.0.1:{port}", "tls": True}, "(test)"
        )
        setup = AgentLinkSetup(
            reactor=reactor,
            tls_for=lambda host: optionsForClientTLS(
                host, trustRoot=ca_cert, clientCertificate=agent_cert
            ),
        )
        link = await plugin.connect(agent_options, setup)

        async def cleanup() -> None:
            link.close(Reason.CANCELLED, "test over")
            await link.when_closed()
            for edge_link in links:
                await edge_link.when_closed()

        self.addCleanup(lambda: defer.ensureDeferred(cleanup()))
        handler = Handler(link)
        link.set_handler(handler)
        link.send_control(Hello(agent_id="agent-1", tunnels=()))
        await handler.got_control
        self.assertEqual(link.transport.negotiatedProtocol, b"h2")
        self.assertEqual(links[0].transport.negotiatedProtocol, b"h2")
        peer = links[0].peer_certificate
        self.assertIsNotNone(peer)
        self.assertEqual(peer.get_subject().commonName, "agent.test")

        receiver = Receiver()
        pair_stream = links[0].open_stream(head("/echo"), receiver)
        pair_stream.write(b"over tls")
        pair_stream.end()
        await receiver.done
        self.assertEqual(receiver.data, b"over tls")
