"""
How many calls an agent may hold on the gRPC link, and what one idle call
costs: the edge's SETTINGS_MAX_CONCURRENT_STREAMS and the refusal at it; what
an idle tunneled stream keeps in memory.
"""

from __future__ import annotations

from h2.settings import SettingCodes
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from tests.test_grpc_transport import Receiver, head, link_pair, until
from tests.test_http1 import FakeRouter
from tunneld.edge.gateway import EdgeGateway
from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPSettings
from tunneld.interfaces import EdgeLinkSetup
from tunneld.model.messages import StreamHead
from tunneld.model.reasons import Reason
from tunneld.transports.grpc import EdgeGrpcLink, GrpcStream, GrpcTransport
from tunneld.wire import codec


class MaxConcurrentCallsTests(TestCase):
    """The edge's cap on an agent's calls."""

    def _advertised(self, table: dict[str, object], max_streams: int) -> int:
        options = GrpcTransport().edge_options(table, "(test)")
        link = EdgeGrpcLink(options, EdgeLinkSetup(on_link=print, reactor=reactor, max_streams=max_streams))
        return link.local_settings()[SettingCodes.MAX_CONCURRENT_STREAMS]

    def test_default_leaves_room_beyond_the_stream_cap(self) -> None:
        """By default the edge allows max_streams_per_agent calls plus room for Control and idle calls."""
        self.assertEqual(self._advertised({}, 10_000), 10_000 + 1024)
        self.assertEqual(self._advertised({}, 50), 50 + 1024)

    def test_a_set_value_is_used_as_is(self) -> None:
        """A configured max_concurrent_calls is what the edge advertises."""
        self.assertEqual(self._advertised({"max_concurrent_calls": 7}, 10_000), 7)

    async def test_a_stream_beyond_the_cap_is_refused_with_its_reason(self) -> None:
        """With every call the link allows busy, a new stream is refused as cap_reached, naming the setting."""
        pair = await link_pair(
            self,
            edge={"max_concurrent_calls": 3, "queued_open_timeout": 0.2},
            agent={"min_idle_forwards": 2},
        )
        await until(lambda: len(pair.edge.idle) == 2)
        held = [Receiver(), Receiver()]
        for receiver in held:
            pair.edge.open_stream(head("/hold"), receiver)
        await until(lambda: all(r.reply is not None for r in held))
        refused = Receiver()
        pair.edge.open_stream(head("/hold"), refused)
        await refused.done
        assert refused.reset is not None
        self.assertEqual(refused.reset[0], Reason.CAP_REACHED)
        self.assertIn("max_concurrent_calls", refused.reset[1])
        self.assertEqual([r.reset for r in held], [None, None])
        self.assertEqual(len(pair.agent_handler.streams), 2)


class IdleStreamMemoryTests(TestCase):
    """What an idle tunneled stream holds on to."""

    async def test_idle_calls_keep_no_outbox(self) -> None:
        """Once a call's bytes are sent it keeps no send queue, on either end; its stream no dict."""
        pair = await link_pair(self)
        held = [Receiver() for _ in range(3)]
        for receiver in held:
            pair.edge.open_stream(head("/hold"), receiver).write(b"hello")
        await until(lambda: all(r.reply is not None for r in held))
        await until(lambda: len(pair.agent_handler.streams) == 3)
        for link in (pair.edge, pair.agent):
            self.assertEqual(len(link.streams), 3)
            self.assertEqual([c.outbox for c in link.calls.values()], [None] * len(link.calls))
        stream = next(iter(pair.edge.streams.values()))
        self.assertIsInstance(stream, GrpcStream)
        self.assertFalse(hasattr(stream, "__dict__"))

    def test_decoded_heads_share_header_names(self) -> None:
        """Two heads decoded by one Codec hold the same header-name objects; what it keeps stays bounded."""
        remembering = codec.Codec()
        sent = StreamHead(
            kind="upgrade", tunnel="app.test", method="GET", target="/ws",
            headers=((b"host", b"app.test"), (b"x-test-shared", b"1")), peer="127.0.0.1:1",
        )
        wire = codec.encode_open(1, sent).SerializeToString()
        first, second = (remembering.head_from(codec.decode(wire)) for _ in range(2))
        self.assertEqual(first, sent)
        for (a, _), (b, _) in zip(first.headers, second.headers, strict=True):
            self.assertIs(a, b)
        self.assertIs(first.tunnel, second.tunnel)
        for n in range(2 * codec._MAX_NAMES):
            many = StreamHead("http", "app.test", "GET", "/", ((b"x-%d" % n, b"v"),), "127.0.0.1:1")
            remembering.head_from(codec.decode(codec.encode_open(1, many).SerializeToString()))
        self.assertLessEqual(len(remembering.names), codec._MAX_NAMES)

    def test_public_connection_attributes_are_slots(self) -> None:
        """A public HTTP/1.1 connection keeps its own state in slots: its dict holds Protocol's few."""
        protocol = PublicHTTPFactory(EdgeGateway(FakeRouter({})), PublicHTTPSettings(), Clock()).buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
        self.assertLessEqual(set(vars(protocol)), {"factory", "connected", "transport"})
