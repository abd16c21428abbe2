"""
A stock gRPC library (grpcio, in a subprocess) speaks to the edge's gRPC
transport: real gRPC framing, status codes and the TunnelAgent service.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.end_to_end import EventCollector
from tests.harness import TunnelHarness
from tests.stock_agents import (
    HOST,
    MB,
    AgentProcess,
    StockAgentMixin,
    Uploader,
    spawn_agent,
    stubs,
)
from tests.test_grpc_transport import Handler, Receiver, head, start_edge, until
from tunneld.interfaces import IAgentLink
from tunneld.model.messages import Hello
from tunneld.model.reasons import Reason
from tunneld.transports.grpc import EdgeGrpcLink

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "grpc_stock_agent.py")


class StockAgentTests(TestCase):
    """The edge as a gRPC server for a grpcio client."""

    timeout = 90

    async def run_stock(self, mode: str, port: int, *extra: str) -> list[list[str]]:
        """Run the stock client; its printed lines, split into words."""
        generated = await stubs()
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable, [SCRIPT, mode, str(port), generated, *extra], env=dict(os.environ)
        )
        self.assertEqual(code, 0, stderr.decode(errors="replace"))
        return [line.split() for line in stdout.decode().splitlines()]

    async def edge(self) -> tuple[int, list[EdgeGrpcLink], list[Handler]]:
        links: list[EdgeGrpcLink] = []
        handlers: list[Handler] = []

        def on_link(link: IAgentLink) -> None:
            assert isinstance(link, EdgeGrpcLink)
            handler = Handler(link)
            link.set_handler(handler)
            links.append(link)
            handlers.append(handler)

        port = await start_edge(self, on_link)

        async def closed() -> None:
            for link in links:
                link.close(Reason.CANCELLED, "test over")
                await link.when_closed()

        self.addCleanup(lambda: defer.ensureDeferred(closed()))
        return port, links, handlers

    async def test_stock_agent_serves_a_stream(self) -> None:
        """A grpcio agent says hello, gets welcome, takes an Open and answers it."""
        port, links, handlers = await self.edge()
        receiver = Receiver()
        opened: list[Any] = []

        def open_when_welcomed() -> None:
            # Open as soon as the hello arrived: it waits for the agent's Forward call.
            stream = links[0].open_stream(head("/from-the-edge", "GET"), receiver)
            stream.end()
            opened.append(stream)

        running = defer.ensureDeferred(self.run_stock("agent", port))
        await until(lambda: bool(handlers and handlers[0].control), timeout=60)
        hello = handlers[0].control[0]
        assert isinstance(hello, Hello)
        self.assertEqual((hello.agent_id, hello.tunnels[0].hostname), ("stock", "stock.test"))
        open_when_welcomed()
        lines = await running
        # The Welcome says the version, heartbeat and largest message of the edge.
        self.assertEqual(lines[0], ["WELCOME", "welcome", "session-1", "2", "50", str(1 << 20)])
        self.assertEqual(lines[1], ["OPEN", "open", "http", "GET", "/from-the-edge", "False"])
        self.assertEqual(lines[2], ["FORWARD", "end", "OK"])
        await receiver.done
        self.assertIsNone(receiver.reset)
        assert receiver.reply is not None
        self.assertEqual(
            (receiver.reply.status, receiver.reply.reason, tuple(receiver.reply.headers)),
            (201, b"Created", ((b"x-agent", b"stock"),)),
        )
        self.assertEqual(receiver.data, b"hello from a stock grpc agent")
        self.assertEqual(receiver.trailers, ())
        # The agent half-closed Control: the edge ends the link and says so.
        self.assertEqual(lines[3][0], "CONTROL")
        self.assertEqual(lines[3][1], "UNAVAILABLE")
        reason, _ = await handlers[0].got_lost
        self.assertEqual(reason, Reason.AGENT_GONE)

    async def test_unknown_method_is_unimplemented(self) -> None:
        """A method the service does not have gets UNIMPLEMENTED."""
        port, _, _ = await self.edge()
        lines = await self.run_stock("unknown", port)
        self.assertEqual(lines, [["STATUS", "UNIMPLEMENTED"]])

    async def test_garbage_message_is_refused(self) -> None:
        """Bytes that are no Frame end the call with a non-OK status and close the link."""
        port, _, handlers = await self.edge()
        lines = await self.run_stock("garbage", port)
        self.assertIn(lines, ([["STATUS", "INVALID_ARGUMENT"]], [["STATUS", "INTERNAL"]]))
        reason, _ = await handlers[0].got_lost
        self.assertEqual(reason, Reason.PROTOCOL_ERROR)

    # -- version 2's end_stream, as a grpcio agent sends it ------------------

    async def answered(self, mode: str) -> tuple[list[list[str]], Receiver, Handler]:
        port, links, handlers = await self.edge()
        receiver = Receiver()
        running = defer.ensureDeferred(self.run_stock(mode, port))
        await until(lambda: bool(handlers and handlers[0].control), timeout=60)
        # A request without a body: the Open says so itself.
        links[0].open_stream(head("/no-body", "GET"), receiver, end_stream=True)
        lines = await running
        await receiver.done
        return lines, receiver, handlers[0]

    async def test_data_end_stream_then_half_close(self) -> None:
        """Reply + Data(end_stream) and a half-close: a whole response, the call ends OK."""
        lines, receiver, handler = await self.answered("data-end-stream")
        self.assertEqual(lines[1], ["OPEN", "open", "http", "GET", "/no-body", "True"])
        self.assertEqual(lines[2], ["FORWARD", "-", "OK"])
        self.assertIsNone(receiver.reset)
        self.assertEqual(receiver.data, b"hello from a stock grpc agent")
        self.assertEqual(receiver.trailers, ())

    async def test_reply_end_stream_without_half_close(self) -> None:
        """Reply(204, end_stream) alone ends the stream: the edge ends the call with OK."""
        lines, receiver, handler = await self.answered("reply-end-stream")
        self.assertEqual(lines[2], ["FORWARD", "-", "OK"])
        self.assertIsNone(receiver.reset)
        assert receiver.reply is not None
        self.assertEqual((receiver.reply.status, receiver.data, receiver.trailers), (204, b"", ()))


class _RawClient(protocol.Protocol):
    """
    Sends a request once connected and keeps what comes back until the
    connection closes; with C{last}, closes it once what came ends so.
    """

    def __init__(self, request: bytes, last: bytes | None = None) -> None:
        self.request = request
        self.last = last
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        if self.last is not None and self.received.endswith(self.last):
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.closed.callback(self.received)


async def exchange(port: int, request: bytes, last: bytes | None = None) -> bytes:
    """One raw request to the edge's public port; what it answered (see L{_RawClient})."""
    client = _RawClient(request, last)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        protocol.Factory.forProtocol(lambda: client)
    )
    return await client.closed


class EdgeOpenTests(TestCase):
    """What a grpcio agent reads in the Opens of a real edge (in this process)."""

    timeout = 90

    async def test_open_says_when_a_request_has_no_body(self) -> None:
        """Open.end_stream is set for every request without a body, on HTTP/1.0, 1.1 and 2."""
        harness = TunnelHarness(self, "grpc", {"listen": "tcp:0:interface=127.0.0.1"})
        edge = await harness.start_edge(public_h2c_listen=["tcp:0:interface=127.0.0.1"])
        agent = spawn_agent(self, SCRIPT, [
            "opens", str(harness.link_address().port), await stubs(), HOST,
        ])
        await agent.wait_for(r"^WELCOME ")
        public = harness.public_port
        requests = [
            # A plain head (read without h11), then heads h11 reads.
            b"GET /plain HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
            b"GET /http10 HTTP/1.0\r\nHost: app.test\r\n\r\n",
            b"POST /empty HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            b"POST /body HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
            b"hello",
        ]
        answers = [(await exchange(public, request)).partition(b"\r\n")[0] for request in requests]
        # HTTP/2: HEADERS with END_STREAM (curl, prior knowledge).
        h2c = edge.public_h2c[0].address.port
        status, _, _ = await getProcessOutputAndValue(
            "curl", ["-sS", "--max-time", "30", "--http2-prior-knowledge", "-o", "/dev/null",
                     "-w", "HTTP/2 %{http_code}", "-H", "host: app.test", f"http://127.0.0.1:{h2c}/h2"],
            env=dict(os.environ),
        )
        answers.append(status)
        await agent.ended
        opens = [line.split()[1:] for line in agent.output.splitlines() if line.startswith("OPEN ")]
        self.assertEqual(opens, [
            ["GET", "/plain", "True", "0"],
            ["GET", "/http10", "True", "0"],
            ["POST", "/empty", "True", "0"],
            ["POST", "/body", "False", "5"],
            ["GET", "/h2", "True", "0"],
        ])
        self.assertEqual(answers, [
            b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK",
            b"HTTP/2 200",
        ])


class WholeResponseTests(TestCase):
    """A client that closes once it has a whole response, before the agent's End came."""

    timeout = 90

    async def test_no_client_gone_for_a_whole_response(self) -> None:
        """The edge does not log that the client went away: it had the whole response."""
        events = EventCollector(self)
        harness = TunnelHarness(self, "grpc", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge()
        agent = spawn_agent(self, SCRIPT, [
            "hold-end", str(harness.link_address().port), await stubs(), HOST,
        ])
        await agent.wait_for(r"^WELCOME ")
        requests = [
            # Read without h11, then by h11 (a request with a body).
            b"GET /whole HTTP/1.1\r\nHost: app.test\r\n\r\n",
            b"POST /whole HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nabc",
        ]
        for count, request in enumerate(requests, 1):
            answer = await exchange(harness.public_port, request, b"\r\n\r\nhello")
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
            # The edge resets the stream: the agent's End can go nowhere now.
            ended = await agent.wait_for(r"^ENDED (.*)$", count)
            self.assertEqual(ended.group(1).split()[0], "CANCELLED")
        self.assertEqual(events.matching("client {peer} went away during {method} {host}{target}"), [])


class UploadResetTests(TestCase):
    """A Reset of a stream whose request body was still going to a grpcio agent."""

    timeout = 90

    async def test_reset_reaches_an_agent_holding_unread_body(self) -> None:
        """
        The client goes mid-upload while the agent holds body bytes it has not
        read: the call ends for the agent at once (RST_STREAM), not after it
        has read them all.
        """
        harness = TunnelHarness(self, "grpc", {"listen": "tcp:0:interface=127.0.0.1"})
        edge = await harness.start_edge()
        # An 8 MiB window and no BDP probing: room for all the edge sends.
        agent = spawn_agent(self, SCRIPT, [
            "hold-upload", str(harness.link_address().port), await stubs(), HOST, str(8 * MB),
        ])
        await agent.wait_for(r"^WELCOME ")
        client = Uploader(
            b"POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100000000\r\n\r\n", MB
        )
        await TCP4ClientEndpoint(reactor, "127.0.0.1", harness.public_port).connect(
            protocol.Factory.forProtocol(lambda: client)
        )
        await agent.wait_for(r"^OPEN POST /up")
        (session,) = edge.sessions.sessions.values()
        link = session.link
        assert isinstance(link, EdgeGrpcLink)
        (call_id,) = link.streams

        def window() -> int:
            """What the agent's window for the call has left."""
            return link.conn.streams[call_id].outbound_flow_control_window  # type: ignore[no-any-return]

        # The agent reads none of it; the edge sends it all within the window.
        granted = link.conn.remote_settings.initial_window_size
        self.assertEqual(granted, 8 * MB)
        await until(lambda: window() <= granted - MB, timeout=60)
        client.transport.abortConnection()
        await client.closed
        ended = await agent.wait_for(r"^ENDED (\S+)")
        self.assertEqual(ended.group(1), "CANCELLED")


class ExampleAgentTests(StockAgentMixin, TestCase):
    """examples/grpc_agent.py (grpc.aio and aiohttp, no tunneld) through a real edge."""

    transport = "grpc"

    async def spawn(self, harness: TunnelHarness, token: str, upstream_port: int) -> AgentProcess:
        return spawn_agent(self, "grpc_agent.py", [
            "--stubs", await stubs(),
            "--edge", f"127.0.0.1:{harness.link_address().port}",
            "--agent-id", "example", "--token", token,
            "--tunnel", f"{HOST}=http://127.0.0.1:{upstream_port}",
        ])

    def link_sample(self, harness: TunnelHarness) -> Any:
        """The initial window grpcio grants the edge per call (BDP probing would grow it)."""
        assert harness.edge is not None
        (session,) = harness.edge.sessions.sessions.values()
        link = session.link
        assert isinstance(link, EdgeGrpcLink)
        return link.conn.remote_settings.initial_window_size

    # BDP probing off: the agent's window never grows past what it asked for.
    link_samples = {256 * 1024}
