"""
The example agents (examples/grpc_agent.py, examples/websocket_agent.py) as
a user runs them: a subprocess with stock client libraries only, serving a
real upstream through a real in-process edge (loopback, port 0).

L{StockAgentMixin} holds the behaviour every example agent must show,
written once; each transport's test module says how to start its agent.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web import server

from tests.end_to_end import EventCollector
from tests.harness import TunnelHarness, Upstream, listen_upstream, pattern_digest
from tests.test_grpc_transport import until
from tunneld.config import AgentGrant

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples")
MB = 1024 * 1024
HOST = "app.test"
TOKEN = "example-token"

_stubs: list[str] = []


async def stubs() -> str:
    """
    Python stubs of proto/tunnel.proto made by grpc_tools, as a user makes
    them: once per test process, in a temporary directory.
    """
    if _stubs:
        return _stubs[0]
    out = tempfile.mkdtemp(prefix="tunnel-stubs-")
    atexit.register(shutil.rmtree, out, True)
    _, stderr, code = await getProcessOutputAndValue(
        sys.executable,
        [
            "-m", "grpc_tools.protoc", "-I", os.path.join(ROOT, "proto"),
            f"--python_out={out}", f"--grpc_python_out={out}", "tunnel.proto",
        ],
        env=dict(os.environ),
    )
    if code != 0:
        raise AssertionError(f"grpc_tools.protoc failed: {stderr.decode(errors='replace')}")
    _stubs.append(out)
    return out


class AgentProcess(protocol.ProcessProtocol):
    """An example agent in a subprocess: the lines it prints, its memory, its end."""

    def __init__(self) -> None:
        self.output = ""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._waiters: list[tuple[re.Pattern[str], int, defer.Deferred[re.Match[str]]]] = []
        self.pid = 0

    def connectionMade(self) -> None:  # noqa: N802
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data.decode(errors="replace")
        lines = self.output[: self.output.rfind("\n") + 1]  # whole lines only
        for waiter in list(self._waiters):
            pattern, count, d = waiter
            matches = list(pattern.finditer(lines))
            if len(matches) >= count:
                self._waiters.remove(waiter)
                d.callback(matches[count - 1])

    errReceived = outReceived  # noqa: N815

    def wait_for(self, regex: str, count: int = 1) -> defer.Deferred[re.Match[str]]:
        """The C{count}th line matching C{regex}, once the agent has printed it."""
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        self._waiters.append((re.compile(regex, re.M), count, d))
        self.outReceived(b"")
        return d

    def rss(self) -> int:
        """The agent's resident memory now, in bytes (from /proc)."""
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        for _, _, d in self._waiters:
            d.errback(AssertionError(f"the agent ended before the expected line:\n{self.output}"))
        self._waiters = []
        self.end_reason = reason
        self.ended.callback(None)


def spawn_agent(case: Any, script: str, args: list[str]) -> AgentProcess:
    """
    Start C{script} (a path relative to C{examples/}, or absolute) with C{args}; it is
    stopped (SIGTERM, then KILL) after the test.
    """
    proto = AgentProcess()
    argv = [sys.executable, os.path.join(EXAMPLES, script), *args]
    # Nothing of tunneld's on its path: the example stands on its own.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = reactor.spawnProcess(proto, sys.executable, argv, env=env, path=EXAMPLES)

    async def stop() -> None:
        if proto.ended.called:
            return
        process.signalProcess("TERM")
        timer = reactor.callLater(15, lambda: proto.ended.called or process.signalProcess("KILL"))
        await proto.ended
        if timer.active():
            timer.cancel()

    case.addCleanup(lambda: defer.ensureDeferred(stop()))
    proto.process = process
    return proto


class ExampleUpstream(Upstream):
    """L{Upstream}, plus C{/status/N} (an empty answer) and C{/chunked} (a body of unknown length)."""

    def render(self, request: server.Request) -> Any:
        path = request.path
        if path.startswith(b"/status/"):
            self.requests += 1
            request.setResponseCode(int(path.split(b"/")[2]))
            return b""
        if path == b"/chunked":
            self.requests += 1
            for i in range(5):
                request.write(b"piece %d\n" % i)
            request.finish()
            return server.NOT_DONE_YET
        return super().render(request)


class SlowSink(protocol.Protocol):
    """
    An upstream that reads a request body slowly (C{rate} bytes a second at
    most, in pauses of C{step}) and answers with its SHA-256.  Only enough
    HTTP/1.1 for one request with a Content-Length.
    """

    rate = 16 * MB
    step = 256 * 1024

    def connectionMade(self) -> None:  # noqa: N802
        self.head = b""
        self.left: int | None = None
        self.hash = hashlib.sha256()
        self.since_pause = 0
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.left is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            assert length is not None, head
            self.left = int(length.group(1))
        self.left -= len(data)
        self.hash.update(data)
        self.factory.received += len(data)
        self.since_pause += len(data)
        if self.left <= 0:
            digest = self.hash.hexdigest().encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(digest), digest)
            )
            self.factory.answered += 1
            self.head, self.left, self.hash = b"", None, hashlib.sha256()  # keep-alive
            return
        if self.since_pause >= self.step:
            self.since_pause = 0
            self.transport.pauseProducing()
            reactor.callLater(self.step / self.rate, self.transport.resumeProducing)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.factory.lost.append(self.left)
        if self.factory.on_lost is not None:
            self.factory.on_lost()


class SlowSinkFactory(protocol.Factory):
    protocol = SlowSink

    def __init__(self) -> None:
        self.connections: list[SlowSink] = []
        self.received = 0
        self.answered = 0
        self.lost: list[int | None] = []
        self.on_lost: Any = None


async def listen_slow_sink(case: Any) -> tuple[int, SlowSinkFactory]:
    factory = SlowSinkFactory()
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    case.addCleanup(port.stopListening)
    return port.getHost().port, factory


class Uploader(protocol.Protocol):
    """Sends a request head and C{size} bytes of its (longer) body, then waits."""

    def __init__(self, head: bytes, size: int) -> None:
        self.head = head
        self.size = size
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.head + b"x" * self.size)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.closed.callback(None)


class StockAgentMixin:
    """
    What every example agent must do through a real edge; a subclass says
    which transport and how to start the agent (L{start_agent}).
    """

    transport: str
    timeout = 240

    def edge_table(self) -> dict[str, Any]:
        return {"listen": "tcp:0:interface=127.0.0.1"}

    async def spawn(self, harness: TunnelHarness, token: str, upstream_port: int) -> AgentProcess:
        """Start the example agent for C{HOST} with C{token}, serving C{upstream_port}."""
        raise NotImplementedError

    async def start_agent(self, harness: TunnelHarness, upstream_port: int) -> AgentProcess:
        """Start the example agent for C{HOST}, serving C{upstream_port}; return once welcomed."""
        agent = await self.spawn(harness, TOKEN, upstream_port)
        await agent.wait_for(r"^WELCOME ")
        return agent

    async def edge(self, **edge: Any) -> TunnelHarness:
        self.events = EventCollector(self)
        harness = TunnelHarness(self, self.transport, self.edge_table())
        grants = [AgentGrant(id="example", token=TOKEN, hostnames=[HOST])]
        await harness.start_edge(grants, **edge)
        return harness

    async def served(self) -> tuple[TunnelHarness, ExampleUpstream, AgentProcess]:
        harness = await self.edge()
        port, upstream = await listen_upstream(self, ExampleUpstream())
        agent = await self.start_agent(harness, port)
        return harness, upstream, agent  # type: ignore[return-value]

    async def get(self, harness: TunnelHarness, path: str, **kwargs: Any) -> Any:
        return await harness.request(HOST, path, **kwargs)

    def assert_clean(self) -> None:
        """The edge cut no response, saw no client go early and no broken protocol."""
        noise = [
            e["log_format"] for e in self.events.events
            if any(word in e.get("log_format", "") for word in (
                "mid-reply", "went away", "broke the protocol", "saturated",
            ))
        ]
        self.assertEqual(noise, [])

    # -- the tests ----------------------------------------------------------

    async def test_get(self) -> None:
        """A GET comes back whole, with the upstream's headers."""
        harness, _, _ = await self.served()
        code, headers, body = await self.get(harness, "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assert_clean()

    async def test_five_megabyte_get(self) -> None:
        """5 MB streamed down arrive whole (hash compared)."""
        harness, _, _ = await self.served()
        response, body = await harness.stream(HOST, f"/bytes/{5 * MB}")
        ended = await body.done
        self.assertEqual(response.code, 200)
        self.assertTrue(body.complete(ended.reason), ended)
        self.assertEqual(body.hash.hexdigest(), pattern_digest(5 * MB))
        self.assert_clean()

    async def test_one_megabyte_post(self) -> None:
        """A 1 MB request body reaches the upstream whole (hash compared both ways)."""
        harness, _, _ = await self.served()
        response, body = await harness.stream(HOST, "/sha256", method=b"POST", upload=MB)
        await body.done
        self.assertEqual(response.code, 200)
        self.assertEqual(body.start.decode(), pattern_digest(MB))
        echo = bytes(range(256)) * 4096
        code, _, echoed = await self.get(harness, "/echo", method=b"POST", body=echo)
        self.assertEqual((code, hashlib.sha256(echoed).hexdigest()),
                         (200, hashlib.sha256(echo).hexdigest()))
        self.assert_clean()

    async def test_no_content(self) -> None:
        """A 204 and the answer to a HEAD complete, with no body."""
        harness, _, _ = await self.served()
        code, _, body = await self.get(harness, "/status/204")
        self.assertEqual((code, body), (204, b""))
        code, headers, body = await self.get(harness, "/hello", method=b"HEAD")
        self.assertEqual((code, body), (200, b""))
        self.assert_clean()

    async def test_chunked_response(self) -> None:
        """A body of unknown length arrives whole, chunked."""
        harness, _, _ = await self.served()
        code, headers, body = await self.get(harness, "/chunked")
        self.assertEqual(code, 200)
        self.assertEqual(body, b"".join(b"piece %d\n" % i for i in range(5)))
        self.assertIsNone(headers.getRawHeaders(b"content-length"))
        self.assert_clean()

    async def test_fifty_concurrent_requests(self) -> None:
        """Fifty requests at once, small and 256 KiB, each answered whole."""
        harness, upstream, _ = await self.served()
        size = 256 * 1024

        async def one(i: int) -> None:
            if i % 2:
                code, _, body = await self.get(harness, "/hello")
                self.assertEqual((code, body), (200, b"hello from upstream"))
            else:
                response, hashing = await harness.stream(HOST, f"/bytes/{size}")
                await hashing.done
                self.assertEqual(hashing.hash.hexdigest(), pattern_digest(size))

        await defer.gatherResults(
            [defer.ensureDeferred(one(i)) for i in range(50)], consumeErrors=True
        )
        self.assertEqual(upstream.requests, 50)
        self.assert_clean()

    async def test_drain(self) -> None:
        """
        A drained session: the agent dials a new link at once, new requests go
        there, the one in flight finishes whole on the old link, which the
        agent then closes.
        """
        harness, upstream, agent = await self.served()
        assert harness.edge is not None
        sessions = harness.edge.sessions.sessions
        (old,) = sessions
        response = defer.ensureDeferred(self.get(harness, "/hang"))
        await until(lambda: bool(upstream.hanging), timeout=60)
        harness.edge.sessions.drain(old, "moving you")
        await agent.wait_for(r"^GOAWAY 9 moving you")
        await agent.wait_for(r"^WELCOME ", 2)
        await until(lambda: len(sessions) == 2, timeout=60)
        for _ in range(3):
            code, _, body = await self.get(harness, "/hello")
            self.assertEqual((code, body), (200, b"hello from upstream"))
        self.assertEqual(sessions[old].link.active_streams(), 1)  # only the one in flight
        (request,) = upstream.hanging
        request.write(b"finished after the drain")
        request.finish()
        code, _, body = await response
        self.assertEqual((code, body), (200, b"finished after the drain"))
        await agent.wait_for(r"^LEFT")
        await until(lambda: old not in sessions, timeout=60)
        self.assertEqual(len(sessions), 1)
        self.assert_clean()

    async def test_wrong_token(self) -> None:
        """A refused agent reads why (the reason's label and the check that failed) and stops."""
        harness = await self.edge()
        agent = await self.spawn(harness, "wrong", 9)
        refused = await agent.wait_for(r"^UNAUTHORIZED (.*)$")
        self.assertEqual(refused.group(1), "unauthorized: wrong token for agent 'example'")
        await agent.ended
        self.assertEqual(agent.end_reason.value.exitCode, 2)

    async def slow_upload(self) -> tuple[TunnelHarness, SlowSinkFactory, AgentProcess]:
        """An agent serving an upstream slower than the link, warmed up."""
        harness = await self.edge()
        port, sink = await listen_slow_sink(self)
        agent = await self.start_agent(harness, port)
        # Warm up (imports, buffers, the allocator's pools, the upstream connection).
        response, body = await harness.stream(HOST, "/warm-up", method=b"POST", upload=16 * MB)
        await body.done
        self.assertEqual(body.start.decode(), pattern_digest(16 * MB))
        return harness, sink, agent

    async def test_hundred_megabyte_upload_to_a_slow_upstream(self) -> None:
        """
        100 MB up to an upstream slower than the link arrive whole, and the
        agent's memory stays flat: it holds at most its window of the body.
        """
        harness, sink, agent = await self.slow_upload()
        baseline = peak = agent.rss()
        samples: set[Any] = set()

        def sample() -> None:
            nonlocal peak
            peak = max(peak, agent.rss())
            samples.add(self.link_sample(harness))

        sampler = LoopingCall(sample)
        sampler.start(0.05)
        try:
            response, body = await harness.stream(HOST, "/upload", method=b"POST", upload=100 * MB)
            await body.done
        finally:
            sampler.stop()
        sample()
        self.assertEqual(response.code, 200)
        self.assertEqual(body.start.decode(), pattern_digest(100 * MB))
        self.assertEqual(samples, self.link_samples)
        self.assertLess(peak - baseline, 10 * MB)
        self.assert_clean()

    async def test_client_gone_mid_upload(self) -> None:
        """
        An uploading client that goes is noticed by the edge, the agent hears
        of it and drops its upstream request before the body is through.
        """
        harness, sink, agent = await self.slow_upload()
        client = Uploader(
            b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 104857600\r\n\r\n",
            100 * MB,
        )
        await TCP4ClientEndpoint(reactor, "127.0.0.1", harness.public_port).connect(
            protocol.Factory.forProtocol(lambda: client)
        )
        await until(lambda: sink.received >= 16 * MB + 8 * MB, timeout=120)
        client.transport.abortConnection()
        went = "client {peer} went away during {method} {host}{target}"
        await until(lambda: bool(self.events.matching(went)), timeout=120)
        # The edge reset the call: RST_STREAM (the agent may still hold body
        # bytes), after the Reset message (client_gone) an agent may read first.
        await agent.wait_for(r"^RESET (CANCELLED|14) ")
        await until(lambda: len(sink.lost) == 1, timeout=120)
        self.assertEqual(sink.answered, 1)  # the warm-up only
        self.assertLess(sink.received, 16 * MB + 100 * MB)

    def link_sample(self, harness: TunnelHarness) -> Any:
        """What the test samples of the edge's link during the upload."""
        return None

    link_samples: set[Any] = {None}
