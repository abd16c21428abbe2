# -*- test-case-name: tests.test_streamable_http -*-
"""
An agent's event stream (its GET): the SSE response that carries the
connection's events, in order, as fast as the agent's socket takes them.

The stream is a push producer on its request: when the socket is full it is
paused and writes nothing more; the events wait in the connection's replay
buffer, never in a queue of the stream's own.  A stream paused for longer
than C{stall_timeout} is a slow subscriber: it is closed (its connection
aborted) and the agent resumes from the last event it received; it is never
fed past an event it did not get.  A stream also ends cleanly after
C{max_stream_duration}, and carries a comment every C{keepalive_interval}
when it has nothing else to say.

L{LocalEventStream} serves a connection this edge owns, from its window of
stored events; L{RemoteEventStream} one another edge owns, from the events
log in the state backend, woken by L{IStateBackend.watch_log} and holding a
lease on the owner (relayed) so that the owner knows its agent still reads.
"""

from __future__ import annotations

import secrets
from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from zope.interface import implementer

from tunneld_streamable_http import store
from tunneld_streamable_http.framing import OPENING, close_event, frame_event

if TYPE_CHECKING:
    from tunneld_streamable_http.edge import EdgeEndpoint
    from tunneld_streamable_http.owner import OwnedConnection

# Entries of the events log read at once by a remote stream.
_READ = 64
# Entries the relay log keeps: the owner reads them at once; past this many
# unread, it knows that some were lost and closes the connection.
RELAY_MAX_ENTRIES = 256


@implementer(IPushProducer)
class EventStream:
    """What both kinds of stream share: the response, its pacing and its timers."""

    log = Logger()

    def __init__(self, edge: EdgeEndpoint, request: Request, connection_id: str, after: int) -> None:
        self.edge = edge
        self.request = request
        self.connection_id = connection_id
        self.last_sent = after
        self.stream_id = secrets.token_hex(8)
        now = edge.reactor.seconds()
        self.started = now
        self.last_write = now
        self.paused = False
        self.paused_since: float | None = None
        self.done = False

    def open(self) -> None:
        request = self.request
        request.setResponseCode(200)
        for name, value in (
            (b"Content-Type", b"text/event-stream"),
            (b"Cache-Control", b"no-store"),
            (b"X-Accel-Buffering", b"no"),
        ):
            request.setHeader(name, value)
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._gone)
        self.edge.streams.add(self)
        self._write(OPENING)

    def _write(self, data: bytes) -> None:
        self.request.write(data)
        self.last_write = self.edge.reactor.seconds()

    def _event(self, number: int, kind: int, payload: bytes) -> None:
        if kind == store.FRAME:
            self._write(frame_event(number, payload))
            self.last_sent = number
        else:
            reason, message = store.read_close(payload)
            self._write(close_event(number, reason, message))
            self.last_sent = number
            self.end("the connection is closed")

    def pull(self) -> None:
        """Write what is there to write (the subclass knows where it is)."""
        raise NotImplementedError

    # -- IPushProducer ---------------------------------------------------

    def pauseProducing(self) -> None:  # noqa: N802
        """IPushProducer.pauseProducing: the agent's socket is full."""
        if not self.paused:
            self.paused = True
            self.paused_since = self.edge.reactor.seconds()

    def resumeProducing(self) -> None:  # noqa: N802
        """IPushProducer.resumeProducing: it drained; write on."""
        self.paused = False
        self.paused_since = None
        self.pull()

    def stopProducing(self) -> None:  # noqa: N802
        """IPushProducer.stopProducing: the connection is going."""
        self._detach()

    # -- ending ----------------------------------------------------------

    def tick(self, now: float) -> None:
        """The edge's periodic check: stalls, the stream's age, keepalive comments."""
        if self.done:
            return
        options = self.edge.options
        if self.paused_since is not None and now - self.paused_since >= options.stall_timeout:
            self.log.warn(
                "streamable-http connection {connection}: slow subscriber closed after "
                "{stalled:.1f}s without reading; it resumes after event {last}",
                connection=self.connection_id, stalled=now - self.paused_since,
                last=self.last_sent,
            )
            self._detach()
            channel = self.request.channel
            transport: Any = channel.transport if channel is not None else None
            if transport is not None:
                transport.abortConnection()
            return
        if options.max_stream_duration and now - self.started >= options.max_stream_duration:
            self.end(f"the stream reached max_stream_duration ({options.max_stream_duration}s)")
            return
        if not self.paused and now - self.last_write >= options.keepalive_interval:
            self._write(b": keepalive\n\n")

    def end(self, why: str) -> None:
        """Finish the response cleanly (the agent resumes on a new GET unless it was the close)."""
        if self.done:
            return
        self._detach()
        request = self.request
        if not request.finished and not request._disconnected:
            request.unregisterProducer()
            request.finish()

    def _gone(self, result: Any) -> None:
        """The response finished or its connection was lost (a Failure: nothing to report)."""
        self._detach()

    def _detach(self) -> None:
        if self.done:
            return
        self.done = True
        self.edge.streams.discard(self)
        self.detached()

    def detached(self) -> None:
        """The stream no longer writes: tell whoever fed it."""


class LocalEventStream(EventStream):
    """A stream of a connection this edge owns."""

    def __init__(
        self, edge: EdgeEndpoint, request: Request, connection: OwnedConnection, after: int
    ) -> None:
        super().__init__(edge, request, connection.id, after)
        self.connection = connection
        self._last: deque[tuple[int, int, bytes]] | None = None

    def pull(self) -> None:
        if self.done or self.paused:
            return
        if self._last is not None:
            last = self._last
            while last and not (self.done or self.paused):
                self._event(*last.popleft())
            if not last:
                self.end("the connection is closed")
            return
        for number, kind, payload in self.connection.events_after(self.last_sent):
            self._event(number, kind, payload)
            if self.done or self.paused:
                return

    def last_events(self, events: list[tuple[int, int, bytes]]) -> None:
        """The connection is gone: these are the last events to send, then the stream ends."""
        self._last = deque(events)
        self.pull()

    def detached(self) -> None:
        self.connection.unsubscribed(self)


class RemoteEventStream(EventStream):
    """A stream of a connection another edge owns, read from the events log."""

    def __init__(
        self, edge: EdgeEndpoint, request: Request, connection_id: str, after: int,
        cursor: str, first: list[Any],
    ) -> None:
        super().__init__(edge, request, connection_id, after)
        self.state = edge.state
        self.cursor = cursor  # the events log's id of the last entry written or skipped
        self._first = first
        self._reading = False
        self._again = False
        self._watch: Any = None
        self.lease_at = 0.0

    def open(self) -> None:
        super().open()
        self._watch = self.state.watch_log(store.NS_EVENTS, self.connection_id, self.pull)
        self._lease()
        first, self._first = self._first, []
        self._entries(first)
        if not self.done:
            self.pull()

    def _lease(self) -> None:
        options = self.edge.options
        self.lease_at = self.edge.reactor.seconds()
        self.edge.relay(
            self.connection_id,
            store.relayed_lease(self.stream_id, self.last_sent, 3 * options.keepalive_interval),
        )

    def tick(self, now: float) -> None:
        super().tick(now)
        if not self.done and now - self.lease_at >= self.edge.options.keepalive_interval:
            self._lease()

    def pull(self) -> None:
        if self.done or self.paused:
            return
        if self._reading:
            self._again = True
            return
        self._reading = True
        self._again = False
        d = self.state.read_log(store.NS_EVENTS, self.connection_id, self.cursor, _READ)
        d.addCallbacks(self._read, self._read_failed)

    def _read(self, read: Any) -> None:
        self._reading = False
        if self.done:
            return
        self._entries(read.entries)
        if not self.done and (len(read.entries) == _READ or self._again):
            self.pull()

    def _entries(self, entries: list[Any]) -> None:
        for entry in entries:
            if self.done or self.paused:
                return
            number, kind, payload = store.read_event(entry.data)
            if number > self.last_sent + 1:
                self.log.warn(
                    "streamable-http connection {connection}: events {first} to {last} are "
                    "no longer in the replay buffer; ending the event stream",
                    connection=self.connection_id, first=self.last_sent + 1, last=number - 1,
                )
                self._write(close_event(
                    number, "protocol_error", f"events after {self.last_sent} were lost",
                ))
                self.end("events were lost")
                return
            self.cursor = entry.event_id
            if number <= self.last_sent:
                continue  # written twice to the log (a store retry)
            self._event(number, kind, payload)

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        # The next announcement, or the backend's poll while it is down, reads again.

    def detached(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.edge.relay(self.connection_id, store.relayed_release(self.stream_id))

