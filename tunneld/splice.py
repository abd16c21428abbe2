# -*- test-case-name: tests.test_tcp -*-
"""
One TCP connection spliced onto one tunnel stream: raw bytes both ways.

The edge splices a public client's connection onto the stream it opens; the
agent splices the stream onto its connection to the upstream.  Both ends use
L{StreamSplice}, so a TCP tunnel behaves like one long cable:

  - backpressure crosses it both ways: the socket is the stream's push
    producer (no credit, no reading) and the stream is the socket's (a full
    socket buffer stops granting credit);
  - half-close is honoured both ways: the peer's C{shutdown(SHUT_WR)} ends
    the stream, and the stream's end shuts our socket's write side, while the
    other direction goes on until it ends too;
  - a failure is a TCP reset (C{abortConnection}, which Twisted sends as an
    RST) on this side, a stream reset with a L{Reason} on the other, and a
    log event naming the reason either way.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.interfaces import IStream, IStreamReceiver
from tunneld.model.messages import Headers, ReplyHead
from tunneld.model.reasons import Reason
from tunneld.speedups.readsize import ReadSize


@implementer(IHalfCloseableProtocol, IStreamReceiver)
class StreamSplice(Protocol):
    """
    Carries bytes between its transport and an L{IStream}.

    The stream may come before the connection (the agent attaches it while
    still connecting upstream: what arrives meanwhile is held, and bounded,
    because the stream is paused and so grants no credit) or with it (the
    edge opens the stream in C{connectionMade}).  Subclasses say who the
    socket's peer is (C{side}) and which reason a lost socket means
    (C{gone_reason}).
    """

    log = Logger()

    side = "peer"
    gone_reason = Reason.CLIENT_GONE

    def __init__(self, tunnel: str) -> None:
        self.tunnel = tunnel
        self.stream: IStream | None = None
        self.peer = ""
        self.bytes_in = 0  # from our socket into the stream
        self.bytes_out = 0  # from the stream out of our socket
        self._held: list[bytes] | None = None  # stream data before the socket is up
        self._end_held = False
        self._connected = False
        self._read_closed = False  # our peer shut its write side: the stream is ended
        self._write_closed = False  # the far end ended: our write side is shut
        self._done = False  # reset or lost: nothing more happens
        self._lost = False
        self._lost_waiters: list[Deferred[None]] = []

    # -- wiring ------------------------------------------------------------

    def hold(self, stream: IStream) -> None:
        """Take C{stream} before the socket is connected: pause it and hold what comes."""
        self.stream = stream
        self._held = []
        stream.pauseProducing()
        stream.attach(self)

    def splice(self) -> None:
        """The socket and the stream both exist: join them, both ways."""
        stream = cast(IStream, self.stream)
        held, self._held = self._held, None
        for data in held or ():
            self.bytes_out += len(data)
            self.transport.write(data)  # type: ignore[union-attr]
        stream.registerProducer(cast(IPushProducer, self.transport), True)
        self.transport.registerProducer(stream, True)  # type: ignore[union-attr]
        if held is not None:
            stream.resumeProducing()
        if self._end_held:
            self.end_received(())

    def connectionMade(self) -> None:  # noqa: N802
        self._connected = True
        transport = self.transport
        self._read_size = ReadSize(transport)
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
            peer = transport.getPeer()
            self.peer = f"{peer.host}:{peer.port}"

    def reset(self, reason: Reason, message: str) -> None:
        """End both ways abnormally: reset the socket and the stream, and log why."""
        if self._done:
            return
        self._done = True
        self._log_reset(reason, message)
        if self.stream is not None:
            self.stream.reset(reason, message)
        if self._connected:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _log_reset(self, reason: Reason, message: str) -> None:
        self.log.info(
            "tcp tunnel {tunnel} {side} {peer} reset: {reason} ({message})",
            tunnel=self.tunnel, side=self.side, peer=self.peer, reason=reason.value,
            message=message, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
        )

    # -- our socket -> the stream ------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._done or self.stream is None:
            return
        self._read_size.read(len(data))
        self.bytes_in += len(data)
        self.stream.write(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        """IHalfCloseableProtocol.readConnectionLost: the peer will send no more."""
        self._read_closed = True
        if self._done or self.stream is None:
            return
        # The socket reads no more: it must not be resumed by the stream.
        self.stream.unregisterProducer()
        self.stream.end()
        self._maybe_close()

    def writeConnectionLost(self) -> None:  # noqa: N802
        """IHalfCloseableProtocol.writeConnectionLost: our FIN is sent."""
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._read_closed and self._write_closed and not self._done:
            self._done = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once the socket is closed (at once if it never opened)."""
        if self._lost or not self._connected:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._lost = True
        waiters, self._lost_waiters = self._lost_waiters, []
        try:
            self._connection_lost(reason)
        finally:
            for waiter in waiters:
                waiter.callback(None)

    def _connection_lost(self, reason: Failure) -> None:
        if self._done:
            if self._read_closed and self._write_closed:
                self.log.info(
                    "tcp tunnel {tunnel} {side} {peer} closed ({bytes_in} bytes in, "
                    "{bytes_out} out)",
                    tunnel=self.tunnel, side=self.side, peer=self.peer,
                    bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                )
            return
        self._connected = False
        self.reset(self.gone_reason, f"{self.side} connection lost: {reason.getErrorMessage()}")

    # -- the stream -> our socket (IStreamReceiver) -------------------------

    def reply_received(self, reply: ReplyHead) -> None:
        """IStreamReceiver.reply_received: a TCP stream has no reply head."""
        self.reset(Reason.PROTOCOL_ERROR, "a reply head on a tcp stream")

    def data_received(self, data: bytes) -> None:
        """IStreamReceiver.data_received"""
        if self._done:
            return
        if self._held is not None:
            self._held.append(data)
            return
        self.bytes_out += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def end_received(self, trailers: Headers) -> None:
        """IStreamReceiver.end_received: the far end sends no more; shut our write side."""
        if self._done:
            return
        if self._held is not None:
            self._end_held = True
            return
        self._write_closed = True
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.loseWriteConnection()

    def reset_received(self, reason: Reason, message: str) -> None:
        """IStreamReceiver.reset_received: the tunnel failed; reset our socket."""
        if self._done:
            return
        self._done = True
        self._log_reset(reason, message)
        if self._connected:
            self.transport.abortConnection()  # type: ignore[union-attr]
