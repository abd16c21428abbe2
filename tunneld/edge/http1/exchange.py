# -*- test-case-name: tests.test_http1 -*-
"""
One public HTTP/1.1 request carried on one tunnel stream.

L{Exchange} is three things for its request: the gateway's exchange (it is
told the stream opened, or the refusal), the stream's receiver (the reply,
body, end or reset, which it passes on to the fast path or to the
connection's h11 writer) and, registered on the public socket, the stream's
stand-in as the socket's producer (pausing the stream while the client
reads slowly).  It is registered instead of the stream so that the socket
closing resets the stream as C{client_gone} rather than C{cancelled}.

L{Upload} is the socket's read side as the producer of the request body:
the stream pauses it when out of credit.  A wrapper rather than the
transport itself so that its pauses are told apart from the connection's
other reasons to stop reading (a pipelined request waiting, an admission
decision to come).

Both talk to the connection through L{Connection}, never to its state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from tunneld.edge.gateway import Client, Refusal
from tunneld.edge.upgraded import UpgradedConnection
from tunneld.interfaces import IStream, IStreamReceiver
from tunneld.model.messages import Headers, ReplyHead
from tunneld.model.reasons import Reason
from tunneld.policy.caps import Releasable

if TYPE_CHECKING:
    from tunneld.edge.http1.deadlines import Deadline

__all__ = ["ADMIT", "PIPELINE", "UPLOAD", "Connection", "Exchange", "FastWriter", "Upload"]

# Why the public socket is paused; each reason is lifted on its own.
UPLOAD = 1  # the stream is out of credit for the request body
PIPELINE = 2  # a pipelined request waits for the current exchange to finish
ADMIT = 4  # the gateway's decision on the current request is still to come


class Connection(TypingProtocol):
    """What an exchange (and the fast path) may ask of its public connection."""

    @property
    def client(self) -> Client: ...

    @property
    def deadline(self) -> Deadline: ...

    def pause_reading(self, why: int) -> None:
        """Stop reading the socket for C{why} (until resumed for it)."""

    def resume_reading(self, why: int) -> None:
        """C{why} no longer holds the socket."""

    def opened(self, exchange: Exchange, stream: IStream) -> None:
        """The gateway opened the exchange's stream."""

    def refused(self, exchange: Exchange, refusal: Refusal) -> None:
        """The gateway refused the exchange: answer."""

    def reply(self, exchange: Exchange, reply: ReplyHead) -> None:
        """The reply head of an exchange read by h11 (or switching protocols)."""

    def send_body(self, exchange: Exchange, data: bytes | memoryview) -> None:
        """Body bytes of a reply written by h11."""

    def reply_end(self, exchange: Exchange, trailers: Headers) -> None:
        """The end of a reply written by h11."""

    def stream_reset(self, exchange: Exchange, reason: Reason, message: str) -> None:
        """The stream was reset: refuse, or cut the reply."""

    def client_gone(self, exchange: Exchange) -> None:
        """The socket is gone under the exchange."""

    def finish(self, exchange: Exchange) -> None:
        """The stream is done with: unhook it from the socket, both ways."""

    def reply_done(self, exchange: Exchange) -> None:
        """The stream will send no more: it stops being the socket's producer."""

    def upload_done(self, exchange: Exchange) -> None:
        """The client will send no more: the socket stops being the stream's producer."""


class FastWriter(TypingProtocol):
    """
    What an exchange read without h11 asks of the fast path
    (L{tunneld.edge.http1.fast.FastPath}): its reply written without h11.
    Named here so that the fast path may import this module, not the reverse.
    """

    def reply(self, exchange: Exchange, reply: ReplyHead) -> None:
        """The reply head."""

    def body(self, exchange: Exchange, data: bytes | memoryview) -> None:
        """Body bytes of the reply."""

    def end(self, exchange: Exchange, trailers: Headers) -> None:
        """The end of the reply."""


@implementer(IPushProducer)
class Upload:
    """The public socket's read side as the producer of one request body."""

    __slots__ = ("_exchange",)

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    def pauseProducing(self) -> None:
        """IPushProducer.pauseProducing: stop reading the request body."""
        exchange = self._exchange
        if exchange.uploading:
            exchange.connection.pause_reading(UPLOAD)

    def resumeProducing(self) -> None:
        """IPushProducer.resumeProducing: read the request body again."""
        exchange = self._exchange
        if exchange.uploading:
            exchange.connection.resume_reading(UPLOAD)

    def stopProducing(self) -> None:
        """IPushProducer.stopProducing: the stream takes no more; stop holding the socket."""
        exchange = self._exchange
        if exchange.uploading:
            exchange.connection.resume_reading(UPLOAD)


@implementer(IStreamReceiver, IPushProducer)
class Exchange:
    """
    One request and its stream.  C{fast} is the connection's fast path when
    the request was read without h11 (its reply is then written without
    h11 too), else None.
    """

    __slots__ = (
        "connection", "fast", "stream", "method", "host", "target",
        "live", "uploading", "producing", "response_started", "response_done",
        "chunked", "bodyless", "slots", "upgrade", "websocket", "upgraded", "sent_whole",
        "left", "affinity",
    )

    def __init__(
        self, connection: Connection, fast: FastWriter | None, method: bytes, target: str
    ) -> None:
        self.connection = connection
        self.fast = fast
        self.stream: IStream | None = None
        self.method = method
        self.host = ""  # set by the gateway once the request names one
        self.target = target
        self.live = True  # neither refused, reset nor finished
        self.uploading = False  # the request body is still going into the stream
        self.sent_whole = False  # opened with end_stream: no request end to pass on
        self.producing = False  # registered as the public socket's producer
        self.response_started = False
        self.response_done = False
        self.chunked = False  # the reply goes out chunked, so trailers can follow it
        self.bodyless = method == b"HEAD"
        self.slots: Releasable | None = None  # the policy's, released when the exchange ends
        self.affinity: Any = None  # the gateway's: told the reply's headers (MCP/ACP sessions)
        self.upgrade = False  # the client asked to switch protocols
        self.websocket = False  # ... to WebSocket
        self.upgraded: UpgradedConnection | None = None  # switched: raw bytes both ways
        # Body bytes of the reply still to go: None when its length is not known.
        self.left: int | None = 0

    # -- the gateway's exchange ----------------------------------------------

    def opened(self, stream: IStream) -> None:
        """PublicExchange.opened"""
        self.connection.opened(self, stream)

    def refused(self, refusal: Refusal) -> None:
        """PublicExchange.refused"""
        self.connection.refused(self, refusal)

    # -- IStreamReceiver ----------------------------------------------------

    def reply_received(self, reply: ReplyHead) -> None:
        """IStreamReceiver.reply_received"""
        if self.live and not self.response_started:
            if self.affinity is not None:
                self.affinity(reply.headers)
            fast = self.fast
            if fast is not None:
                fast.reply(self, reply)
            else:
                self.connection.reply(self, reply)

    # data_received may be handed a view of a frame the link never changes
    # again: the body's bytes are sent or queued as they are (bulkwrite),
    # copied at most once, when the socket's queue is joined for sending.
    borrows_data = True

    def data_received(self, data: bytes | memoryview) -> None:
        """IStreamReceiver.data_received"""
        if self.upgraded is not None:
            self.upgraded.stream_data(bytes(data))
            return
        if not self.live or self.bodyless or not self.response_started:
            return
        fast = self.fast
        if fast is not None:
            fast.body(self, data)
        else:
            self.connection.send_body(self, data)

    def end_received(self, trailers: Headers) -> None:
        """IStreamReceiver.end_received"""
        if self.upgraded is not None:
            self.upgraded.stream_ended()
            return
        if not self.live:
            return
        if not self.response_started:
            self.connection.stream_reset(self, Reason.PROTOCOL_ERROR, "stream ended without a reply")
            return
        fast = self.fast
        if fast is not None:
            fast.end(self, trailers)
        else:
            self.connection.reply_end(self, trailers)

    def reset_received(self, reason: Reason, message: str) -> None:
        """IStreamReceiver.reset_received"""
        if self.upgraded is not None:
            self.upgraded.stream_reset(reason, message)
            return
        if self.live:
            self.connection.stream_reset(self, reason, message)

    # -- after a protocol switch (the owner of an UpgradedConnection) -------

    def finish(self) -> None:
        """The raw phase is over: unhook the stream from the socket, both ways."""
        self.connection.finish(self)

    def unhook_reply(self) -> None:
        """The stream will send no more: it stops being the socket's producer."""
        self.connection.reply_done(self)

    def unhook_upload(self) -> None:
        """The client will send no more: the socket stops being the stream's producer."""
        self.connection.upload_done(self)

    def label(self) -> dict[str, Any]:
        """The log fields naming this request."""
        return {
            "method": self.method.decode("latin-1"), "host": self.host,
            "target": self.target, "peer": self.connection.client.peer,
        }

    def arm(self, delay: float, expire: Callable[[], None]) -> None:
        """The connection's deadline calls C{expire} in C{delay} seconds."""
        self.connection.deadline.arm(delay, expire)

    def disarm(self) -> None:
        """The connection's deadline is cancelled."""
        self.connection.deadline.cancel()

    # -- IPushProducer (the reply towards the public socket) ---------------

    def pauseProducing(self) -> None:
        """IPushProducer.pauseProducing: the client reads slowly; stop granting credit."""
        if self.live and self.stream is not None:
            self.stream.pauseProducing()

    def resumeProducing(self) -> None:
        """IPushProducer.resumeProducing: the client caught up."""
        if self.live and self.stream is not None:
            self.stream.resumeProducing()

    def stopProducing(self) -> None:
        """IPushProducer.stopProducing: the public socket is gone."""
        self.producing = False
        self.connection.client_gone(self)
