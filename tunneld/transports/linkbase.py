# -*- test-case-name: tests.test_mux,tests.test_grpc_transport -*-
"""
What every built-in agent link shares, whatever its wire: L{LinkBase} for
the link (the handler and the control messages it has not taken yet, the
limits a Hello or Welcome says, the heartbeat, the socket's congestion
pausing every stream's source, teardown that resets every stream and fires
C{when_closed}) and L{StreamBase} for a stream (events held until a
receiver attaches, the source registered on it paused and resumed, the
consumer's pause, both ends' ends, a reset from the peer).

L{tunneld.transports.mux.FrameLink} (frames with per-stream credit) and
L{tunneld.transports.grpc.link.GrpcLink} (gRPC calls on HTTP/2) build on
them; the wire, its stream ids and its flow control stay in each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProducer, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from tunneld.interfaces import ILinkHandler, IStream, IStreamReceiver
from tunneld.model.messages import (
    END_STREAM_VERSION,
    MIN_FRAME_SIZE,
    ControlMessage,
    Headers,
    Hello,
    StreamHead,
    Welcome,
    saying_limits,
)
from tunneld.model.reasons import Reason
from tunneld.wire.codec import Codec
from tunneld.wire.heartbeat import Heartbeat

__all__ = ["LINK_OVERHEAD", "Congestible", "LinkBase", "SocketCongestion", "StreamBase", "StreamLink"]

# Room in a frame (or a gRPC message) for everything but a Data payload.
LINK_OVERHEAD = 32


class Congestible(Protocol):
    """A link whose senders pause while its socket is full."""

    def pause_sending(self) -> None:
        """The socket's send buffer is full."""

    def resume_sending(self) -> None:
        """The socket's send buffer drained."""


@implementer(IPushProducer)
class SocketCongestion:
    """
    Registered as the producer on a link's socket, so that the socket's own
    flow control (its write buffer filling and draining) pauses and resumes
    every stream's source on the link.
    """

    def __init__(self, link: Congestible) -> None:
        self.link = link

    def pauseProducing(self) -> None:  # noqa: N802
        """IPushProducer.pauseProducing"""
        self.link.pause_sending()

    def resumeProducing(self) -> None:  # noqa: N802
        """IPushProducer.resumeProducing"""
        self.link.resume_sending()

    def stopProducing(self) -> None:  # noqa: N802
        """IPushProducer.stopProducing: the socket's own connectionLost tells the link."""


class StreamLink(Protocol):
    """What a L{StreamBase} needs of its link."""

    reactor: Any
    sending_paused: bool


class StreamBase:
    """
    One stream on a link: an L{IStream} (its outgoing half, an C{IConsumer}
    with the source registered on it) and the C{IPushProducer} of what
    arrives.  Subclasses send (L{reset} and the rest of L{IStream}), say
    when a write must wait (L{blocked}, L{pending}), return window or credit
    (C{resumeProducing}) and let go of their buffers (L{_drop}).
    """

    __slots__ = (
        "link", "head", "receiver", "_early", "_producer", "_producer_paused",
        "consumer_paused", "local_ended", "remote_ended", "closed",
    )

    def __init__(self, link: StreamLink, head: StreamHead) -> None:
        self.link = link
        self.head = head
        self.receiver: IStreamReceiver | None = None
        # What arrives before a receiver attaches (a stream the agent has not taken yet).
        self._early: list[tuple[str, tuple[Any, ...]]] | None = []
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        self.consumer_paused = False
        self.local_ended = False
        self.remote_ended = False
        self.closed = False

    # -- the subclass's part -------------------------------------------------

    def reset(self, reason: Reason, message: str) -> None:
        """IStream.reset"""
        raise NotImplementedError

    def pending(self) -> int:
        """Outgoing bytes held here, not yet on the wire."""
        raise NotImplementedError

    def blocked(self) -> bool:
        """Whether what is written now must wait (the source is paused meanwhile)."""
        raise NotImplementedError

    def _drop(self) -> None:
        """The stream is closed: drop what it holds, and tell the link to forget it."""
        raise NotImplementedError

    # -- IStream, outgoing -------------------------------------------------

    def attach(self, receiver: IStreamReceiver) -> None:
        """IStream.attach"""
        early, self._early = self._early, None
        self.receiver = receiver
        for name, args in early or ():
            getattr(receiver, name)(*args)
        if self.closed:
            self.receiver = None  # it heard the last event (see _close)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:  # noqa: N802
        """IConsumer.registerProducer: only push producers (all of ours are)."""
        self._producer = cast(IPushProducer, producer)
        self._producer_paused = False
        if self.blocked():
            self._pause_producer()

    def unregisterProducer(self) -> None:  # noqa: N802
        """IConsumer.unregisterProducer"""
        self._producer = None

    def _pause_producer(self) -> None:
        if self._producer is not None and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()

    def pause_source(self) -> None:
        """Pause the source registered on this stream (the link's window or socket is full)."""
        self._pause_producer()

    def resume_source(self) -> None:
        """Resume the source, once nothing waits here and the socket takes more."""
        if (
            self._producer is not None
            and self._producer_paused
            and not self.pending()
            and not self.link.sending_paused
        ):
            self._producer_paused = False
            self._producer.resumeProducing()

    # -- IPushProducer, incoming ------------------------------------------

    def pauseProducing(self) -> None:  # noqa: N802
        """IPushProducer.pauseProducing: return no more window or credit until resumed."""
        self.consumer_paused = True

    def stopProducing(self) -> None:  # noqa: N802
        """
        IPushProducer.stopProducing: the consumer is gone.  The reset waits a
        turn so the consumer's own connectionLost can give a better reason.
        """
        if not self.closed:
            self.link.reactor.callLater(0, self.reset, Reason.CANCELLED, "consumer stopped")

    # -- from the link -----------------------------------------------------

    def deliver(self, name: str, *args: Any) -> None:
        """Call C{name} on the receiver, or hold it until one attaches."""
        if self.receiver is not None:
            getattr(self.receiver, name)(*args)
        elif self._early is not None:
            self._early.append((name, args))

    def remote_end(self, trailers: Headers) -> None:
        """The peer ended its direction; the stream closes if ours is ended too."""
        self.remote_ended = True
        receiver = self.receiver
        if receiver is not None:
            receiver.end_received(trailers)
        else:
            self.deliver("end_received", trailers)
        if self.local_ended and not self.closed:
            self._close()

    def remote_reset(self, reason: Reason, message: str) -> None:
        """The peer (or the link going away) reset the stream."""
        if self.closed:
            return
        receiver = self.receiver
        self._close()
        self._tell_reset(receiver, reason, message)

    def _tell_reset(self, receiver: IStreamReceiver | None, reason: Reason, message: str) -> None:
        """The reset, to the receiver the stream had before it closed."""
        if receiver is not None:
            receiver.reset_received(reason, message)
        else:
            self.deliver("reset_received", reason, message)

    def _close(self) -> None:
        self.closed = True
        self._producer = None
        # The receiver (which holds this stream) hears nothing more: dropping
        # it breaks the cycle, so the pair is freed now by reference counting
        # rather than piling up for the cyclic GC, whose pauses make the tail.
        self.receiver = None
        self._drop()


S = TypeVar("S", bound=StreamBase)


class LinkBase(Generic[S]):
    """
    The part of an L{IAgentLink} that does not depend on the wire.  A
    subclass sends (L{send_control_message}, L{_ping}, C{close}), opens and
    accepts streams, and may add timers (L{stop_timers}) and streams not in
    L{streams} yet (L{orphans}) that teardown must reach.
    """

    log = Logger()
    transport_name = "?"
    peer = "?"

    def __init__(
        self,
        *,
        reactor: Any,
        max_frame_size: int,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        send_ping: Callable[[int], None] | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.reactor = reactor
        # The frame codec (the edge's or the agent's, shared by its links).
        self.codec = codec if codec is not None else Codec()
        self.max_frame_size = max_frame_size
        # Data stays small enough for any peer's limit, until the peer says
        # its own in Hello or Welcome (L{_peer_frame_limit}).
        self.max_data = min(max_frame_size, MIN_FRAME_SIZE) - LINK_OVERHEAD
        # Whether the version agreed in Hello/Welcome lets messages carry end_stream.
        self.end_stream = False
        self.streams: dict[int, S] = {}
        self.handler: ILinkHandler | None = None
        self._early_control: list[ControlMessage] = []
        self.sending_paused = False
        self.closed = False
        self.disconnected = False
        self._closed_waiters: list[Deferred[None]] = []
        self.heartbeat = Heartbeat(
            reactor, heartbeat_interval, heartbeat_timeout, send_ping or self._ping, self._silent
        )

    # -- the subclass's part -------------------------------------------------

    def send_control_message(self, message: ControlMessage) -> None:
        """Put a control message on the wire (its limits already said)."""
        raise NotImplementedError

    def _ping(self, opaque: int) -> None:
        raise NotImplementedError

    def close(self, reason: Reason, message: str) -> None:
        """IAgentLink.close"""
        raise NotImplementedError

    def stop_timers(self) -> None:
        """Subclasses cancel their own timers here."""

    def orphans(self) -> list[S]:
        """Streams not in L{streams} (queued opens) that teardown must reset too."""
        return []

    def sending_resumed(self) -> None:
        """The socket drained, before the sources resume: move on what waits."""

    # -- IAgentLink ---------------------------------------------------------

    def set_handler(self, handler: ILinkHandler) -> None:
        """IAgentLink.set_handler: it hears the control messages that came before it, first."""
        self.handler = handler
        early, self._early_control = self._early_control, []
        for message in early:
            handler.control_received(message)

    def send_control(self, message: ControlMessage) -> None:
        """
        IAgentLink.send_control; a Hello or Welcome says the largest frame
        this end accepts, a Welcome the heartbeat interval (unless its
        sender said them).
        """
        if self.closed:
            return
        if isinstance(message, Welcome):
            self.end_stream = message.version >= END_STREAM_VERSION
        self.send_control_message(
            saying_limits(message, self.max_frame_size, self.heartbeat.interval)
        )

    def round_trip_time(self) -> float | None:
        """IAgentLink.round_trip_time"""
        return self.heartbeat.rtt

    def active_streams(self) -> int:
        """IAgentLink.active_streams"""
        return len(self.streams)

    def when_closed(self) -> Deferred[None]:
        """IAgentLink.when_closed"""
        if self.disconnected:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def hand_over(self, stream: S, end_stream: bool) -> None:
        """
        A stream the peer opened, to the handler (or reset: no handler yet).
        With C{end_stream} (a request without a body) its receiver hears the
        end as it attaches, before it starts on the request.
        """
        if self.handler is None:
            stream.reset(Reason.AGENT_UNAVAILABLE, "agent is not ready")
            return
        if end_stream:
            stream.remote_end(())
        self.handler.stream_opened(cast(IStream, stream))  # each subclass is one

    # -- control messages -------------------------------------------------------

    def control_received(self, message: ControlMessage) -> None:
        """A control message from the peer: note the limits it says, pass it on."""
        if isinstance(message, (Hello, Welcome)):
            self._peer_frame_limit(message.max_frame_size)
            if isinstance(message, Welcome):
                self.end_stream = message.version >= END_STREAM_VERSION
        if self.handler is not None:
            self.handler.control_received(message)
        else:
            self._early_control.append(message)

    def _peer_frame_limit(self, limit: int) -> None:
        """
        The peer accepts frames up to C{limit} bytes (0: not said, the
        protocol's minimum): Data grows up to that or our own limit,
        whichever is smaller (fewer, larger frames cost less per byte at both
        ends).  A limit below the minimum counts as the minimum.
        """
        limit = min(max(limit, MIN_FRAME_SIZE), self.max_frame_size)
        self.max_data = limit - LINK_OVERHEAD

    # -- the socket ---------------------------------------------------------------

    def pause_sending(self) -> None:
        """The socket's send buffer is full: pause every stream's source."""
        self.sending_paused = True
        for stream in list(self.streams.values()):
            stream.pause_source()

    def resume_sending(self) -> None:
        """The socket drained: move queued bytes on and resume the sources."""
        self.sending_paused = False
        self.sending_resumed()
        for stream in list(self.streams.values()):
            stream.resume_source()

    # -- teardown -----------------------------------------------------------------

    def protocol_error(self, message: str) -> None:
        """The peer broke the protocol: say so, and close the link for it."""
        self.log.warn(
            "{transport} link from {peer} broke the protocol: {error}",
            transport=self.transport_name, peer=self.peer, error=message,
        )
        self.close(Reason.PROTOCOL_ERROR, message)

    def shut(self, reason: Reason, message: str) -> None:
        """
        The link is closed: reset every stream, tell the handler.  Safe to
        call more than once.
        """
        if self.closed:
            return
        self.closed = True
        self.heartbeat.stop()
        self.stop_timers()
        streams, self.streams = self.streams, {}
        for stream in list(streams.values()):
            stream.remote_reset(reason, message)
        for stream in self.orphans():
            stream.remote_reset(reason, message)
        if self.handler is not None:
            self.handler.link_lost(reason, message)

    def fire_closed(self) -> None:
        """The connection is gone for good: fire L{when_closed}."""
        self.disconnected = True
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- heartbeat -------------------------------------------------------------

    def _silent(self, silent: float) -> None:
        self.log.warn(
            "{transport} link {peer} silent for {silent:.1f}s: closing",
            transport=self.transport_name, peer=self.peer, silent=silent,
        )
        self.close(Reason.AGENT_GONE, f"heartbeat timeout after {silent:.1f}s")
