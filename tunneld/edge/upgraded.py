# -*- test-case-name: tests.test_http1 -*-
"""
A public connection after its protocol switch: raw bytes both ways.

Once the upstream answered C{101 Switching Protocols}, the edge stops
speaking HTTP on that connection.  L{UpgradedConnection} pipes the client
socket and the stream into each other (the producer/consumer wiring is left
as it was set up for the request: a stream out of credit pauses the socket,
a slow client pauses the stream) and maps the ends: the stream's end is a
TCP half-close towards the client, the client's half-close ends the stream.

When the tunnel, not the client or the upstream, ends a WebSocket (the agent
went away, the stream saturated, the edge drains or the connection idled),
the client gets a Close frame with the L{Reason}'s WebSocket code and text,
provided the edge is between two relayed frames; otherwise it is cut off.
An upstream that drops its connection is mirrored: the client's is dropped.
Optional keepalive pings go to a client that has been idle, also only
between frames.  The client's Pong goes on to the upstream like any other
frame: RFC 6455 section 5.5.3 allows unsolicited Pongs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from tunneld.edge.websocket_frames import FrameTracker, close_frame, ping_frame
from tunneld.interfaces import IStream
from tunneld.model.reasons import Reason

__all__ = ["UpgradedConnection", "close_text"]

# Reasons that say the upstream itself broke the connection: the client sees
# the same cut it would see without the tunnel, not a Close made up for it.
_MIRRORED = frozenset({Reason.UPSTREAM_ERROR})

# After sending a Close, how long the client has to answer with its own
# before the edge closes anyway (and as long again before it aborts).
CLOSE_LINGER = 2.0


def close_text(reason: Reason) -> str:
    """The text of a Close frame the tunnel sends for C{reason}."""
    return f"{reason.value}: {reason.description}"


class _Socket(TypingProtocol):
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def resumeProducing(self) -> None: ...


class _Owner(TypingProtocol):
    """
    What the connection was before its switch (the HTTP exchange), called
    back as the raw phase ends.  One reference rather than three closures
    and a dict: a connection can be held idle for hours, by the ten thousand.
    """

    def finish(self) -> None:
        """Unhook the stream from the socket (both producer registrations),
        mark it done; called once the stream is over."""

    def unhook_reply(self) -> None:
        """The stream will send no more: stop it being the socket's producer."""

    def unhook_upload(self) -> None:
        """The client will send no more: stop the socket being the stream's producer."""

    def label(self) -> dict[str, Any]:
        """The log fields naming the request (method, host, target, peer)."""
        ...

    def arm(self, delay: float, expire: Callable[[], None]) -> None:
        """Call C{expire} in C{delay} seconds, instead of whatever was armed:
        the connection's one timer, from before the switch, serves on."""

    def disarm(self) -> None:
        """Cancel whatever was armed."""


class UpgradedConnection:
    """
    The raw phase of one public connection.

    @param owner: the exchange that switched, told as the phase ends.
    """

    __slots__ = (
        "_socket", "_stream", "_clock", "_idle_timeout", "_ping_interval", "_owner",
        "frames", "_answer", "live", "read_done", "write_done", "closing",
        "_last_activity",
    )

    log = Logger()

    def __init__(
        self,
        *,
        socket: _Socket,
        stream: IStream,
        websocket: bool,
        clock: IReactorTime,
        idle_timeout: float,
        ping_interval: float,
        owner: _Owner,
    ) -> None:
        self._socket = socket
        self._stream = stream
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._ping_interval = ping_interval if websocket else 0.0
        self._owner = owner
        # The upstream-to-client direction, to know where frames may go in.
        self.frames: FrameTracker | None = FrameTracker() if websocket else None
        # After our own Close: the client-to-edge direction, to see its Close.
        self._answer: FrameTracker | None = None
        self.live = True  # the stream is neither reset nor ended both ways
        self.read_done = False  # the client half-closed
        self.write_done = False  # the stream ended: half-closed towards the client
        self.closing = False  # the tunnel ended it; waiting for the socket to go
        self._last_activity = clock.seconds()
        self._schedule()

    # -- from the client ------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """Bytes from the client: on to the stream."""
        if self.closing:
            answer = self._answer
            if answer is not None:
                answer.feed(data)
                if answer.close_seen:
                    self._answer = None
                    self._socket.loseConnection()
            return
        if self.live and not self.read_done:
            self._last_activity = self._clock.seconds()
            self._stream.write(data)

    def client_ended(self) -> None:
        """The client half-closed: end the stream's outgoing direction."""
        if self.read_done:
            return
        self.read_done = True
        if self.closing or not self.live:
            self._socket.loseConnection()
            return
        self._owner.unhook_upload()
        self._stream.end()
        if self.write_done:
            self._done()

    # -- from the stream ------------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        """Bytes from the upstream: on to the client."""
        if not self.live or self.write_done:
            return
        frames = self.frames
        if frames is not None:
            frames.feed(data)
        self._last_activity = self._clock.seconds()
        self._socket.write(data)

    def stream_ended(self) -> None:
        """The upstream finished sending: half-close towards the client."""
        if not self.live or self.write_done:
            return
        self.write_done = True
        self._owner.unhook_reply()
        self._socket.loseWriteConnection()
        if self.read_done:
            self._done()

    def stream_reset(self, reason: Reason, message: str) -> None:
        """The stream was reset by the agent or the link."""
        if self.live:
            self._end_by_tunnel(reason, message, tell_agent=False)

    def connection_lost(self) -> None:
        """The public socket is gone; the caller resets the stream if it is live."""
        self.closing = True
        self._cancel_timer()

    # -- ended by the tunnel --------------------------------------------------

    def shutdown(self, reason: Reason, message: str) -> None:
        """
        End the connection from the edge (drain, policy): reset the stream
        with C{reason} and tell the client, with a Close frame if possible.
        """
        if self.live:
            self._end_by_tunnel(reason, message, tell_agent=True)
        elif not self.closing:
            self.closing = True
            self._cancel_timer()
            self._socket.loseConnection()

    def _end_by_tunnel(self, reason: Reason, message: str, tell_agent: bool) -> None:
        self.live = False
        self.closing = True
        self._cancel_timer()
        self._owner.finish()
        if tell_agent:
            self._stream.reset(reason, message)
        frames = self.frames
        polite = (
            frames is not None
            and reason not in _MIRRORED
            and frames.at_boundary
            and not frames.close_seen
            and not self.write_done
        )
        self.log.info(
            "closing upgraded connection {method} {host}{target} from {peer}: "
            "{reason} ({message})",
            reason=reason.value, message=message, close_frame=polite, **self._owner.label(),
        )
        if not polite:
            if self.write_done:
                # The client has everything the upstream sent, in order.
                self._socket.loseConnection()
            else:
                # A cut-off frame (or a non-WebSocket protocol) must not look
                # like an orderly end.
                self._socket.abortConnection()
            return
        self._socket.write(close_frame(reason.websocket_close_code, close_text(reason)))
        if self.read_done:
            self._socket.loseConnection()
            return
        # Wait (a little) for the client's Close before closing: the server
        # closes the TCP connection first once both Close frames are out.
        self._answer = FrameTracker()
        self._socket.resumeProducing()
        self._owner.arm(CLOSE_LINGER, self._linger_over)

    def _linger_over(self) -> None:
        self._answer = None
        self._socket.loseConnection()
        self._owner.arm(CLOSE_LINGER, self._socket.abortConnection)

    def _done(self) -> None:
        """Both directions ended in order."""
        self.live = False
        self.closing = True
        self._cancel_timer()
        self._owner.finish()
        self._socket.loseConnection()

    # -- timers ---------------------------------------------------------------

    def _schedule(self) -> None:
        """Wake up at the next ping or idle deadline."""
        now = self._clock.seconds()
        deadline = self._last_activity + self._idle_timeout
        if self._ping_interval:
            deadline = min(deadline, self._last_activity + self._ping_interval)
            deadline = max(deadline, now + self._ping_interval / 10)
        self._owner.arm(max(0.0, deadline - now), self._tick)

    def _tick(self) -> None:
        if not self.live:
            return
        idle = self._clock.seconds() - self._last_activity
        if idle >= self._idle_timeout:
            self._end_by_tunnel(
                Reason.IDLE_TIMEOUT, f"no traffic for {self._idle_timeout:g}s", tell_agent=True
            )
            return
        frames = self.frames
        if (
            self._ping_interval
            and idle >= self._ping_interval
            and frames is not None
            and frames.at_boundary
            and not frames.close_seen
            and not self.write_done
        ):
            self._socket.write(ping_frame(b"tunneld"))
            # The client's Pong counts as traffic; until then, ping again
            # one interval later.
            self._owner.arm(self._ping_interval, self._tick)
            return
        self._schedule()

    def _cancel_timer(self) -> None:
        self._owner.disarm()
