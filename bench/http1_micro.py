"""
CPU per request of the edge's public HTTP/1.1 path alone, in one process.

A L{PublicHTTPProtocol} over a write-collecting transport, routed by the real
L{Router} and gated by the real L{PublicPolicy} (default limits), to an agent
link that answers each request as nginx answers C{/small}.  No sockets, no
reactor: the figure is the Python the edge spends per keep-alive request, so
an A/B of a change to C{tunneld/edge/http1/} needs no quiet machine.

Usage: python bench/http1_micro.py [REQUESTS] [ROUNDS]   (prints microseconds per request)
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from tunneld.config import LimitsSection
from tunneld.edge.gateway import EdgeGateway
from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPSettings
from tunneld.model.messages import ReplyHead, TunnelSpec
from tunneld.policy.gate import PublicPolicy
from tunneld.router import AgentSession, Router

REQUEST = b"GET /small HTTP/1.1\r\nHost: app.bench.test:8080\r\n\r\n"
REPLY = ReplyHead(200, b"OK", (
    (b"Server", b"nginx/1.22.1"), (b"Date", b"Wed, 25 Nov 2026 19:00:00 GMT"),
    (b"Content-Type", b"application/octet-stream"), (b"Content-Length", b"64"),
    (b"Last-Modified", b"Wed, 25 Nov 2026 18:00:00 GMT"), (b"ETag", b'"6565e0a0-40"'),
    (b"Accept-Ranges", b"bytes"),
))
BODY = b"x" * 64


class Transport:
    """The public socket: counts what is written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writeSequence(self, data: list[bytes]) -> None:
        for piece in data:
            self.written += len(piece)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def setTcpNoDelay(self, enabled: bool) -> None: ...


class Stream:
    def __init__(self, link: Link, receiver: Any) -> None:
        self.link, self.receiver = link, receiver

    def write(self, data: bytes) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...

    def end(self, trailers: Any = ()) -> None:
        self.link.ended.append(self)

    def reset(self, reason: Any, message: str) -> None:
        raise AssertionError(f"reset: {reason} {message}")


class Link:
    def __init__(self) -> None:
        self.ended: list[Stream] = []

    def open_stream(self, head: Any, receiver: Any, end_stream: bool = False) -> Stream:
        stream = Stream(self, receiver)
        if end_stream:  # a request without a body is opened ended
            self.ended.append(stream)
        return stream

    def active_streams(self) -> int:
        return 1


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    clock = Clock()
    router = Router()
    link = Link()
    spec = TunnelSpec(hostname="app.bench.test")
    router.register(AgentSession("s1", "a1", link, []), spec)  # type: ignore[arg-type]
    policy = PublicPolicy(LimitsSection(), clock)
    factory = PublicHTTPFactory(EdgeGateway(router, admission=policy), PublicHTTPSettings(), clock)
    best = []
    for _ in range(rounds):
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        start = time.process_time()
        for _ in range(requests):
            protocol.dataReceived(REQUEST)
            stream = link.ended.pop()
            receiver = stream.receiver
            receiver.reply_received(REPLY)
            receiver.data_received(BODY)
            receiver.end_received(())
        elapsed = time.process_time() - start
        assert transport.written > requests * 200, transport.written
        protocol.connectionLost()
        best.append(elapsed / requests * 1e6)
    best.sort()
    print(f"{best[0]:.1f} us/request (best of {rounds}; median {best[len(best) // 2]:.1f})")


if __name__ == "__main__":
    main()
