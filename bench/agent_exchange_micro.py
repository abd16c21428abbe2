"""
CPU per request of the agent's HTTP/1.1 upstream path alone, in one process.

An L{UpstreamPool} with one keep-alive upstream connection over a
write-collecting transport; each request is a tunnel stream (a small GET, or
a POST whose 4 KiB body comes with its end) forwarded to it, answered as
nginx answers C{/small}, and released back to the pool.  No sockets, no
reactor: the figure is the Python the agent spends per request (the
exchange's lifecycle included), so an A/B of a change to
C{tunneld/agent/upstream.py} needs no quiet machine.

Usage: python bench/agent_exchange_micro.py [REQUESTS] [ROUNDS]   (prints microseconds per request)
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twisted.internet.task import Clock
from zope.interface import implementer

from tunneld.agent.upstream import UpstreamPool
from tunneld.interfaces import IStream
from tunneld.model.messages import Headers, ReplyHead, StreamHead

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 19:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 64\r\n"
    b"Last-Modified: Wed, 25 Nov 2026 18:00:00 GMT\r\nETag: \"6565e0a0-40\"\r\n"
    b"Accept-Ranges: bytes\r\n\r\n" + b"x" * 64
)
GET = StreamHead(
    kind="http", tunnel="app.bench.test", method="GET", target="/small",
    headers=((b"Host", b"app.bench.test"), (b"User-Agent", b"wrk")), peer="127.0.0.1:5000",
)
POST = StreamHead(
    kind="http", tunnel="app.bench.test", method="POST", target="/post",
    headers=((b"Host", b"app.bench.test"), (b"Content-Length", b"4096")), peer="127.0.0.1:5000",
)
BODY = b"p" * 4096


class Transport:
    """The upstream socket: counts what is written."""

    def __init__(self) -> None:
        self.written = 0
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        self.written += sum(map(len, data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def loseConnection(self) -> None:  # noqa: N802
        raise AssertionError("the upstream connection should be kept alive")

    abortConnection = loseConnection


@implementer(IStream)
class Stream:
    """The agent's side of one tunnel stream: takes the response, counts it."""

    def __init__(self, head: StreamHead) -> None:
        self.head = head
        self.received = 0
        self.ended = False
        self.receiver: Any = None

    def attach(self, receiver: Any) -> None:
        self.receiver = receiver

    def send_reply(self, reply: ReplyHead) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.received += len(data)

    def end(self, trailers: Headers = ()) -> None:
        self.ended = True

    def reset(self, reason: Any, message: str) -> None:
        raise AssertionError(f"reset: {reason} {message}")

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        pass

    def unregisterProducer(self) -> None:  # noqa: N802
        pass

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


def run(requests: int) -> float:
    """Microseconds per request over C{requests} exchanges (GET and POST alternately)."""
    pool = UpstreamPool(Clock(), "tcp:host=127.0.0.1:port=9")
    conn = pool._factory.buildProtocol(None)
    conn.makeConnection(Transport())  # type: ignore[arg-type]
    pool._idle.append(conn)
    start = time.process_time()
    for n in range(requests):
        if n & 1:
            stream = Stream(POST)
            pool.forward(stream)
            stream.receiver.data_received(BODY)
            stream.receiver.end_received(())
        else:
            stream = Stream(GET)
            pool.forward(stream)
        conn.dataReceived(RESPONSE)
        assert stream.ended
    return (time.process_time() - start) / requests * 1e6


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    run(1000)  # warm up
    print(" ".join(f"{run(requests):.1f}" for _ in range(rounds)), "us/request")


if __name__ == "__main__":
    main()
