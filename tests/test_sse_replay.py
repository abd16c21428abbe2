"""
The edge's replay of public Server-Sent Events (issue 21): a client that
drops mid-stream and reconnects with Last-Event-ID is sent exactly what it
missed, then the live events, over real twistd processes and curl; an id
older than the buffer is refused by name; the buffer stays at its bounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from twisted.web.client import readBody

from tests.harness import TunnelHarness, eventually, listen_upstream, open_fds, sleep
from tests.test_processes import ROOT, TWISTD, spawn
from tunneld.config import LimitsSection, TunnelLimits
from tunneld.edge.replay import Feed, ReplayBook, ReplaySettings, Subscription
from tunneld.model.messages import ReplyHead
from tunneld.model.reasons import Reason

CURL = shutil.which("curl")
HOST = "demo.localhost"


def event(n: int) -> bytes:
    """Event C{n}: an id and a payload of a size that varies (1 to 1,500 bytes)."""
    size = 1 + (n * 379) % 1500
    payload = hashlib.sha256(b"%d" % n).hexdigest().encode() * (size // 64 + 1)
    return b"id: %d\ndata: %s\n\n" % (n, payload[:size])


def events_in(text: bytes) -> list[bytes]:
    """The whole events of a text/event-stream body (not a cut-off last one, nor comments)."""
    blocks = text.split(b"\n\n")
    return [block + b"\n\n" for block in blocks[:-1] if block and not block.startswith(b":")]


def ids_of(events: list[bytes]) -> list[int]:
    return [int(re.match(rb"id: (\d+)", block).group(1)) for block in events]  # type: ignore[union-attr]


def shipped(case: TestCase, name: str, replacements: dict[str, str]) -> str:
    """etc/NAME with C{replacements} made (each must be there), in a file of the test's."""
    with open(os.path.join(ROOT, "etc", name)) as f:
        text = f.read()
    for old, new in replacements.items():
        case.assertIn(old, text)
        text = text.replace(old, new)
    path = os.path.abspath(case.mktemp())
    with open(path, "w") as f:
        f.write(text)
    return path


class Broadcast(resource.Resource):
    """An upstream SSE endpoint: every event emitted goes to every GET open at the time."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.open: list[server.Request] = []
        self.gets: list[bytes | None] = []  # the Last-Event-ID of each GET
        self.emitted = 0
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def render_GET(self, request: server.Request) -> Any:  # noqa: N802
        self.gets.append(request.getHeader(b"last-event-id"))
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b": hello\n\n")
        self.open.append(request)
        request.notifyFinish().addBoth(lambda _: self.open.remove(request))
        for count, d in list(self._waiting):
            if len(self.gets) >= count:
                self._waiting.remove((count, d))
                d.callback(None)
        return server.NOT_DONE_YET

    def connected(self, count: int) -> defer.Deferred[None]:
        """Fires once C{count} GETs have come."""
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.gets) >= count:
            d.callback(None)
        else:
            self._waiting.append((count, d))
        return d

    def emit(self, upto: int) -> None:
        while self.emitted < upto:
            self.emitted += 1
            data = event(self.emitted)
            for request in self.open:
                request.write(data)

    def finish_all(self) -> None:
        for request in list(self.open):
            request.finish()


class Curl:
    """curl -N as a user runs it, its body and headers kept."""

    def __init__(
        self, case: TestCase, port: int, last: int | None = None, http2: bool = False
    ) -> None:
        self.headers = os.path.abspath(case.mktemp())
        argv = [
            CURL or "curl", "-sSN", "--http2-prior-knowledge" if http2 else "--http1.1",
            "-D", self.headers, "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}/events",
        ]
        if last is not None:
            argv[1:1] = ["-H", f"Last-Event-ID: {last}"]
        self.process = spawn(case, argv)

    @property
    def body(self) -> bytes:
        return self.process.output.encode()

    async def sees(self, n: int) -> None:
        await self.process.wait_for(rf"id: {n}\ndata: [^\n]*\n\n")

    async def kill(self) -> None:
        if not self.process.ended.called:
            self.process.process.signalProcess(signal.SIGKILL)
        await self.process.ended

    def header_text(self) -> str:
        with open(self.headers) as f:
            return f.read()


class ReplayProcessTests(TestCase):
    """twistd edge and agent from etc/, a broadcasting upstream, curl as the client."""

    timeout = 180

    def setUp(self) -> None:
        if CURL is None:
            raise self.skipTest("curl is not installed")

    async def start(self, table: str) -> tuple[Any, Broadcast, int, int]:
        upstream = Broadcast()
        upstream_port, _ = await listen_upstream(self, upstream)
        path = shipped(self, "tunneld.toml", {
            'public_listen = ["tcp:8080:interface=127.0.0.1"]':
                'public_listen = ["tcp:0:interface=127.0.0.1"]',
            'listen = "tcp:8081:interface=127.0.0.1"': 'listen = "tcp:0:interface=127.0.0.1"',
            'admin_listen = "tcp:8090:interface=127.0.0.1"':
                'admin_listen = "tcp:0:interface=127.0.0.1"',
            "public_h2c_listen = []": 'public_h2c_listen = ["tcp:0:interface=127.0.0.1"]',
        })
        with open(path, "a") as f:
            f.write(f'\n[limits.tunnels."{HOST}"]\n{table}\n')
        argv = ["--nodaemon", "--pidfile="]
        edge = spawn(self, [*TWISTD, *argv, "tunneld", "--config", path])
        public = await edge.wait_for(r"public HTTP listening on 127\.0\.0\.1:(\d+)")
        h2c = await edge.wait_for(r"public HTTP/2 \(h2c\) listening on 127\.0\.0\.1:(\d+)")
        link = await edge.wait_for(r"websocket agent link listening on 127\.0\.0\.1:(\d+)")
        agent_path = shipped(self, "agent.toml", {
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "ws://127.0.0.1:{link.group(1)}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
        })
        agent = spawn(self, [*TWISTD, *argv, "tunneld-agent", "--config", agent_path])
        await agent.wait_for(r"tunnel ready: http://demo\.localhost:8080/")
        return edge, upstream, int(public.group(1)), int(h2c.group(1))

    async def test_dropped_client_resumes_with_nothing_lost_or_twice(self) -> None:
        """
        curl dropped mid-stream (SIGKILL) while events flow, 100 more sent
        while it is away, a new curl with Last-Event-ID; three times: every
        event once, in order, byte for byte (hashed); the upstream saw one
        GET; the edge's fds are back where they were.  Then an id older than
        the buffer is refused by name (410, session_gone, the log); over
        HTTP/2 alike; and after the upstream ends its stream the next
        reconnect reaches the upstream with the last id.
        """
        edge, upstream, port, h2c_port = await self.start(
            "sse_replay = true\nsse_replay_events = 500\nsse_replay_bytes = 1048576\n"
        )
        fds = open_fds(edge.process.pid)
        client = Curl(self, port)
        await upstream.connected(1)
        got: list[bytes] = []
        upto = 0
        resumed_with = []
        for _ in range(3):
            # Events flow in small batches; the client is killed in the middle.
            for step in range(upto + 10, upto + 151, 10):
                upstream.emit(step)
                await sleep(0.01)
                if step == upto + 100:
                    await client.sees(upto + 60)
                    await client.kill()
            upto += 150
            got += events_in(client.body)
            last = ids_of(got)[-1]
            upto += 100
            upstream.emit(upto)  # while the client is away (the edge records them)
            client = Curl(self, port, last=last)
            await client.sees(upto)
            resumed_with.append((last, client))
        upto += 50
        upstream.emit(upto)  # live again
        await client.sees(upto)
        await client.kill()
        got += events_in(client.body)
        self.assertEqual(upto, 800)
        self.assertEqual(ids_of(got), list(range(1, 801)))
        expected = hashlib.sha256(b"".join(event(n) for n in range(1, 801))).hexdigest()
        self.assertEqual(hashlib.sha256(b"".join(got)).hexdigest(), expected)
        self.assertEqual(upstream.gets, [None], "the edge held the one upstream stream")
        for n, (last, resumed) in enumerate(resumed_with):
            replayed = 250 * (n + 1) - last
            self.assertIn(f"tunnel-replay: {replayed} events", resumed.header_text().lower())
        await eventually(
            lambda: open_fds(edge.process.pid) <= fds, "the edge's client sockets closed"
        )

        # The buffer holds the last 500 (301..800): id 100 is gone, by name.
        old = Curl(self, port, last=100)
        await old.process.ended
        self.assertIn(" 410 ", old.header_text().splitlines()[0])
        self.assertIn("tunnel-error: session_gone", old.header_text().lower())
        self.assertIn("Last-Event-ID '100' is not in this edge's replay buffer", old.process.output)
        self.assertIn("(oldest id held: '301')", old.process.output)
        await edge.wait_for(r"replay gap on demo\.localhost/events for .*'100' is not held")

        # Over HTTP/2 alike.  The upstream ends its stream: a client behind
        # is sent the rest and the end; the next reconnect goes upstream
        # with the last id.
        behind = Curl(self, h2c_port, last=790, http2=True)
        await behind.sees(800)
        self.assertRegex(behind.header_text(), r"^HTTP/2 200")
        self.assertIn("tunnel-replay: 10 events", behind.header_text())
        upstream.finish_all()
        await behind.process.ended
        self.assertEqual(behind.process.end_reason.value.exitCode, 0)
        self.assertEqual(ids_of(events_in(behind.body)), list(range(791, 801)))
        again = Curl(self, port, last=800)
        await upstream.connected(2)
        self.assertEqual(upstream.gets, [None, b"800"])
        upstream.emit(805)
        await again.sees(805)
        await again.kill()
        self.assertEqual(
            ids_of(events_in(again.body)),
            list(range(801, 806)),
        )


class ReplayBoundsTests(TestCase):
    """A real edge, agent and upstream in this process, so the buffer can be looked at."""

    timeout = 120

    async def test_flood_keeps_the_buffer_at_its_bounds(self) -> None:
        """
        10,000 events of up to 1.5 KiB into a buffer of 50 events / 16 KiB,
        with a client reading and then with none: it never holds more; once
        the linger is over the upstream stream is let go and nothing is held.
        """
        upstream = Broadcast()
        upstream_port, _ = await listen_upstream(self, upstream)
        harness = TunnelHarness(self, "websocket", {})
        limits = LimitsSection(tunnels={HOST: TunnelLimits(
            sse_replay=True, sse_replay_events=50, sse_replay_bytes=16384, sse_replay_linger=2.0,
        )})
        edge = await harness.start_edge(limits=limits)
        await harness.start_agent({"url": f"ws://127.0.0.1:{harness.link_address().port}/tunnel"},
                                  [(HOST, upstream_port)])
        response, body = await harness.stream(HOST, "/events")
        self.assertEqual(response.code, 200)
        await upstream.connected(1)
        peak = (0, 0)
        for batch in range(1, 101):
            upstream.emit(batch * 50)
            await sleep(0)
            held = edge.replay.held()
            peak = (max(peak[0], held[0]), max(peak[1], held[1]))
        self.assertLessEqual(peak[0], 50)
        self.assertLessEqual(peak[1], 16384)
        # The admin API shows the buffer (while the client may still read it).
        assert edge.observe.admin is not None
        admin = f"http://127.0.0.1:{edge.observe.admin.address.port}/api/transports"
        listed = json.loads(await readBody(await harness.client.request(b"GET", admin.encode())))
        [row] = listed["sse_replay"]
        self.assertEqual((row["tunnel"], row["host"], row["target"]), (HOST, HOST, "/events"))
        self.assertLessEqual(row["events"], 50)
        self.assertLessEqual(row["bytes"], 16384)
        self.assertEqual(row["upstream"], "open")
        # The client goes (if it has not been closed for falling behind);
        # the flood goes on into the buffer alone.
        if not body.done.called:
            body.transport.stopProducing()  # type: ignore[union-attr]
        await body.done
        for batch in range(101, 201):
            upstream.emit(batch * 50)
            await sleep(0)
            held = edge.replay.held()
            self.assertLessEqual(held[0], 50)
            self.assertLessEqual(held[1], 16384)
        # No one resumes: after the linger the upstream stream is let go.
        while upstream.open:
            await sleep(0.05)
        self.assertEqual(edge.replay.held(), (0, 0))
        self.assertEqual(edge.replay.feeds, {})


class _Receiver:
    def __init__(self) -> None:
        self.reply: ReplyHead | None = None
        self.data = b""
        self.end: Any = None

    def reply_received(self, reply: ReplyHead) -> None:
        self.reply = reply

    def data_received(self, data: bytes) -> None:
        self.data += data

    def end_received(self, trailers: Any) -> None:
        self.end = ("end", trailers)

    def reset_received(self, reason: Reason, message: str) -> None:
        self.end = (reason, message)


class _Source:
    head = None
    reset_with: Any = None

    def reset(self, reason: Reason, message: str) -> None:
        self.reset_with = reason


class FeedTests(SynchronousTestCase):
    """The ring alone: events cut at blank lines whatever the line ends, ids, bounds."""

    def feed(self, events: int = 10, size: int = 1000) -> tuple[Feed, Subscription, _Receiver]:
        book = ReplayBook(Clock())
        feed = Feed(book, ("t", "h", "/", ""), ReplaySettings(events, size, 1.0, 10))
        receiver = _Receiver()
        subscription = feed.subscribe(receiver, None, replayed=False)
        feed.source = _Source()  # type: ignore[assignment]
        subscription.start()
        feed.reply_received(ReplyHead(200, b"OK", ((b"content-type", b"text/event-stream"),)))
        return feed, subscription, receiver

    def test_events_cut_at_blank_lines_in_every_line_end(self) -> None:
        feed, _, receiver = self.feed()
        stream = b"id: 1\r\ndata: a\r\n\r\nid:2\rdata: b\r\rid: 3\ndata: c\n\n: note\n\n"
        for i in range(len(stream)):  # one byte at a time: CRLF split anywhere
            feed.data_received(stream[i:i + 1])
        self.assertEqual(receiver.data, stream)
        self.assertEqual([i for i, _ in feed.events], ["1", "2", "3", None])
        self.assertEqual(feed.after("2"), 2)

    def test_an_event_is_sent_only_whole(self) -> None:
        feed, _, receiver = self.feed()
        feed.data_received(b"id: 1\ndata: par")
        self.assertEqual(receiver.data, b"")
        feed.data_received(b"tial\n\n")
        self.assertEqual(receiver.data, b"id: 1\ndata: partial\n\n")

    def test_bounds_by_count_and_bytes(self) -> None:
        feed, _, _ = self.feed(events=3, size=100)
        for n in range(10):
            feed.data_received(b"id: %d\ndata: x\n\n" % n)
        self.assertEqual([i for i, _ in feed.events], ["7", "8", "9"])
        self.assertIsNone(feed.after("5"))
        feed.data_received(b"id: big\ndata: " + b"y" * 60 + b"\n\n")
        self.assertLessEqual(feed.size, 100)

    def test_an_event_larger_than_the_buffer_lets_the_stream_go(self) -> None:
        feed, _, receiver = self.feed(size=100)
        feed.data_received(b"data: " + b"z" * 200)
        self.assertEqual(receiver.end[0], Reason.SATURATED)
        self.assertIs(feed.source, None)

    def test_a_paused_client_behind_the_buffer_is_closed_saturated(self) -> None:
        feed, subscription, receiver = self.feed(events=3)
        subscription.pauseProducing()
        for n in range(5):
            feed.data_received(b"id: %d\ndata: x\n\n" % n)
        subscription.resumeProducing()
        self.assertEqual(receiver.end[0], Reason.SATURATED)
