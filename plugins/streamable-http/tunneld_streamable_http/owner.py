# -*- test-case-name: tests.test_streamable_http -*-
"""
A connection as the edge that owns it sees it: the L{FrameWire} under the
agent's L{FrameLink}.

Frames to the agent become numbered events, stored in the state backend
before any event stream may send them (so a stream resumed on another edge
finds them) and kept until the agent acknowledges them.  That replay buffer
is the one buffer of this direction, and it has a lid: at half of
C{replay_max_bytes} (or events) the link's streams pause, and if it is ever
full the connection is closed with C{saturated}, saying whether the agent
never opened an event stream or stopped reading one.  Nothing in it is
dropped without that line in the log.

Frames from the agent arrive numbered, from this edge's POSTs or relayed
from other edges', in any order and perhaps twice: they are handed to the
link in order, each once.  Frames that came ahead of a missing one wait, up
to a byte bound and C{reorder_timeout}; then the connection is closed.

The connection also ends when it has had no event stream for
C{subscribe_timeout}, when its agent falls silent (the link's heartbeat),
when the agent DELETEs it, or when the state store fails it for longer than
C{state_timeout}; every end is logged with its reason, leaves a record
saying why (late requests get 410 with it), and frees everything here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.model.reasons import Reason
from tunneld.transports.mux import FrameLink
from tunneld_streamable_http import store
from tunneld_streamable_http.framing import BatchError, decode_batch

if TYPE_CHECKING:
    from tunneld_streamable_http.edge import EdgeEndpoint
    from tunneld_streamable_http.streams import LocalEventStream

# How long the events log and relay log of a connection live after their
# last append (the owner deletes them when the connection ends).
LOG_TTL = 600.0
# How long a connection record lives unless the owner refreshes it.
RECORD_TTL = 30.0
# Relay entries read at once.
_READ = 64
# The events log is trimmed once this much has been acknowledged since the
# last trim (or the agent has acknowledged everything).
_TRIM_BYTES = 256 * 1024
_TRIM_EVENTS = 256


class EventWindow:
    """
    Stored, unacknowledged events, oldest first: numbers one after the
    other, each with the id of its entry in the events log.
    """

    def __init__(self) -> None:
        self._items: deque[tuple[int, int, bytes, int]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def extend(self, events: Sequence[tuple[int, int, bytes]], last_log_id: int) -> None:
        first_id = last_log_id - len(events) + 1
        self._items.extend(
            (number, kind, payload, first_id + i) for i, (number, kind, payload) in enumerate(events)
        )

    def drop_through(self, number: int) -> tuple[int, int, int]:
        """Forget the events up to C{number}: how many, their bytes, the last one's log id."""
        items, count, size, log_id = self._items, 0, 0, 0
        while items and items[0][0] <= number:
            _, _, payload, log_id = items.popleft()
            count += 1
            size += len(payload)
        return count, size, log_id

    def after(self, number: int) -> Iterator[tuple[int, int, bytes]]:
        """The events with numbers above C{number}, in order (safe to extend meanwhile)."""
        items = self._items
        while items:
            index = number + 1 - items[0][0]
            if index >= len(items):
                return
            event = items[max(0, index)]
            number = event[0]
            yield event[:3]  # type: ignore[misc]


class OwnedConnection:
    """The edge end of one agent's streamable-HTTP connection, on the edge that owns it."""

    log = Logger()

    def __init__(
        self, edge: EdgeEndpoint, connection_id: str, peer: str, certificate: Any,
        fingerprint: str,
    ) -> None:
        self.edge = edge
        self.id = connection_id
        self.peer = peer
        self.fingerprint = fingerprint
        options, setup = edge.options, edge.setup
        self.state = edge.state
        self.reactor = setup.reactor
        now = self.reactor.seconds()
        # Edge → agent: numbered events, those waiting for the store, and
        # those stored and not yet acknowledged (EventWindow).
        self.next_event = 1
        self.pending: list[tuple[int, int, bytes]] = []
        self.window = EventWindow()
        self.last_stored = 0
        self.acked = 0
        self.held_events = 0
        self.held_bytes = 0
        self._trim_bytes = 0
        self.paused = False
        self._storing = False
        self._store_failing_since: float | None = None
        self._store_retry: Any = None
        # Agent → edge: the next sequence number due and what came early.
        self.next_seq = 1
        self.early: dict[int, bytes | memoryview] = {}
        self.early_bytes = 0
        self.gap_since: float | None = None
        self.duplicates = 0
        self.max_early_bytes = 4 * edge.max_post_bytes
        # Relayed from other edges.
        self._relay_cursor = "0"
        self._relay_reading = False
        self._relay_again = False
        self._relay_watch: Any = None
        # Event streams: the one on this edge, and leases of those on others.
        self.local: LocalEventStream | None = None
        self.leases: dict[str, float] = {}
        self.ever_subscribed = False
        self.unsubscribed_since: float | None = now
        self.refresh_at = now + RECORD_TTL / 3
        self.closing = False  # an overflow or close is under way: no more caps
        self.close_reason: tuple[Reason, str] = (Reason.AGENT_GONE, "")
        self.finishing = False
        self.finished = False
        self._finish_timer: Any = None
        self.link = FrameLink(
            self,
            transport_name="streamable-http",
            peer=peer,
            reactor=self.reactor,
            is_edge=True,
            initial_window=setup.initial_window,
            max_frame_size=setup.max_frame_size,
            max_streams=setup.max_streams,
            heartbeat_interval=options.heartbeat_interval,
            heartbeat_timeout=options.heartbeat_timeout,
            peer_certificate=certificate,
            codec=setup.codec,
        )

    def start(self) -> None:
        """Listen for what other edges relay (a cluster's POSTs and leases)."""
        self._relay_watch = self.state.watch_log(store.NS_RELAY, self.id, self._read_relayed)

    # -- FrameWire ---------------------------------------------------------

    def send_frame(self, payload: bytes) -> None:
        """FrameWire.send_frame: number it and store it."""
        if self.finishing:
            return
        number = self.next_event
        self.next_event += 1
        self._hold(number, store.FRAME, bytes(payload))

    def close_wire(self, reason: Reason, message: str) -> None:
        """FrameWire.close_wire: the link is closing (its GoAway is already queued)."""
        if self.finishing:
            return
        self.finishing = True
        self.closing = True
        unsent = self.held_events - 1  # the GoAway just queued is the link's own farewell
        if unsent > 0:
            log = self.log.warn if not self.ever_subscribed else self.log.info
            log(
                "streamable-http connection {connection}: {count} events ({size} bytes) the "
                "agent never acknowledged are dropped with the connection: {reason}: {detail}",
                connection=self.id, count=unsent, size=self.held_bytes, reason=reason.value,
                detail=message,
            )
        self.close_reason = (reason, message)
        self.edge.forget(self)
        # The close event reaches the streams once stored; a store that fails
        # does not keep the link from ending.
        self._finish_timer = self.reactor.callLater(
            min(5.0, self.edge.options.state_timeout), self._finish, reason, message
        )
        number = self.next_event
        self.next_event += 1
        self._hold(number, store.CLOSE, store.close_payload(reason.value, message))

    # -- edge → agent ------------------------------------------------------

    def _hold(self, number: int, kind: int, payload: bytes) -> None:
        self.pending.append((number, kind, payload))
        self.held_events += 1
        self.held_bytes += len(payload)
        options = self.edge.options
        if not self.closing and (
            self.held_bytes > options.replay_max_bytes or self.held_events > options.replay_max_events
        ):
            self._overflow()
        elif not self.paused and (
            self.held_bytes > options.replay_max_bytes // 2
            or self.held_events > options.replay_max_events // 2
        ):
            self.paused = True
            self.link.pause_sending()
        self._store()

    def _overflow(self) -> None:
        self.closing = True
        if not self.ever_subscribed:
            problem = (
                f"pre-subscribe buffer overflow: {self.held_events} events ({self.held_bytes} "
                "bytes) waited for an event stream that never came"
            )
        else:
            problem = (
                f"replay buffer full: the agent acknowledged none of {self.held_events} events "
                f"({self.held_bytes} bytes)"
            )
        self.end(Reason.SATURATED, problem)

    def _store(self) -> None:
        if self._storing or not self.pending or self.finished or self._store_retry is not None:
            return
        batch, self.pending = self.pending, []
        self._storing = True
        items = [store.event_entry(number, kind, payload) for number, kind, payload in batch]
        options = self.edge.options
        try:
            d = self.state.extend_log(
                store.NS_EVENTS, self.id, items, 2 * options.replay_max_events, LOG_TTL
            )
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addCallbacks(self._stored, self._store_failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _stored(self, last_id: str, batch: list[tuple[int, int, bytes]]) -> None:
        self._storing = False
        if self._store_failing_since is not None:
            self.log.info(
                "streamable-http connection {connection}: the state store takes its events again",
                connection=self.id,
            )
            self._store_failing_since = None
        if self.finished:
            return
        self.window.extend(batch, int(last_id))
        self.last_stored = batch[-1][0]
        if self.local is not None:
            self.local.pull()
        if batch[-1][1] == store.CLOSE:
            self._finish(*self.close_reason)
            return
        self._store()

    def _store_failed(self, failure: Failure, batch: list[tuple[int, int, bytes]]) -> None:
        self._storing = False
        if self.finished:
            return
        self.pending[:0] = batch
        now = self.reactor.seconds()
        if self._store_failing_since is None:
            self._store_failing_since = now
            self.log.warn(
                "streamable-http connection {connection}: cannot store its events ({error}); "
                "retrying for {timeout}s",
                connection=self.id, error=failure.getErrorMessage(),
                timeout=self.edge.options.state_timeout,
            )
        elif now - self._store_failing_since > self.edge.options.state_timeout:
            if self.finishing:
                self._finish(*self.close_reason)
            else:
                self.end(Reason.AGENT_GONE, f"the state store failed: {failure.getErrorMessage()}")
            return
        self._store_retry = self.reactor.callLater(0.2, self._retry_store)

    def _retry_store(self) -> None:
        self._store_retry = None
        self._store()

    def acknowledged(self, upto: int) -> None:
        """The agent has every event up to C{upto}: they leave the replay buffer."""
        if upto <= self.acked or self.finished:
            return
        if upto > self.last_stored:
            self.end(Reason.PROTOCOL_ERROR, f"acknowledged event {upto}, which was never sent")
            return
        self.acked = upto
        count, size, log_id = self.window.drop_through(upto)
        self.held_events -= count
        self.held_bytes -= size
        # The events log keeps what a stream on any edge may still resume
        # from: nothing the agent has acknowledged.
        self._trim_bytes += size
        if log_id and (self._trim_bytes >= _TRIM_BYTES or count >= _TRIM_EVENTS or not self.window):
            self._trim_bytes = 0
            d = self.state.trim_log(store.NS_EVENTS, self.id, str(log_id))
            d.addErrback(lambda _: None)  # the count bound holds meanwhile; the next trim catches up
        options = self.edge.options
        if self.paused and (
            self.held_bytes <= options.replay_max_bytes // 4
            and self.held_events <= options.replay_max_events // 4
        ):
            self.paused = False
            self.link.resume_sending()

    # -- event streams -----------------------------------------------------

    def subscribe(self, stream: LocalEventStream, after: int) -> str | None:
        """A GET on this edge; None, or why it cannot resume from C{after}."""
        if after > self.last_stored:
            return f"event {after} was never sent on this connection"
        if after < self.acked:
            return f"events after {after} were acknowledged and are gone"
        self.acknowledged(after)
        previous, self.local = self.local, stream
        self.ever_subscribed = True
        self.unsubscribed_since = None
        if previous is not None:
            previous.end("superseded by a newer event stream")
        return None

    def unsubscribed(self, stream: LocalEventStream) -> None:
        if self.local is stream:
            self.local = None
            if not self.leases and not self.finishing:
                self.unsubscribed_since = self.reactor.seconds()

    def events_after(self, number: int) -> Iterator[tuple[int, int, bytes]]:
        return self.window.after(number)

    # -- agent → edge ------------------------------------------------------

    def frames_arrived(self, first_seq: int, frames: Sequence[bytes | memoryview]) -> None:
        """Frames C{first_seq}, C{first_seq + 1}, … from a POST: to the link in order, once each."""
        link = self.link
        for offset, frame in enumerate(frames):
            if self.finishing:
                return
            seq = first_seq + offset
            if seq < self.next_seq or seq in self.early:
                self.duplicates += 1
                continue
            if seq > self.next_seq:
                self.early[seq] = frame
                self.early_bytes += len(frame)
                if self.gap_since is None:
                    self.gap_since = self.reactor.seconds()
                if self.early_bytes > self.max_early_bytes:
                    self.end(
                        Reason.PROTOCOL_ERROR,
                        f"{len(self.early)} frames ({self.early_bytes} bytes) arrived ahead of "
                        f"frame {self.next_seq}, more than the reorder buffer holds",
                    )
                continue
            self.next_seq += 1
            link.frame_received(frame)
            while self.early and self.next_seq in self.early and not self.finishing:
                ahead = self.early.pop(self.next_seq)
                self.early_bytes -= len(ahead)
                self.next_seq += 1
                link.frame_received(ahead)
            if not self.early:
                self.gap_since = None

    def _read_relayed(self) -> None:
        if self.finishing:
            return
        if self._relay_reading:
            self._relay_again = True
            return
        self._relay_reading = True
        self._relay_again = False
        d = self.state.read_log(store.NS_RELAY, self.id, self._relay_cursor, _READ)
        d.addCallbacks(self._relayed, self._relay_failed)

    def _relayed(self, read: Any) -> None:
        self._relay_reading = False
        if self.finishing:
            return
        if not read.complete:
            self.end(
                Reason.PROTOCOL_ERROR,
                "requests relayed by other edges were lost (the store trimmed them unread)",
            )
            return
        for entry in read.entries:
            self._relay_cursor = entry.event_id
            try:
                self._apply(store.read_relayed(entry.data))
            except (ValueError, BatchError) as e:
                self.end(Reason.PROTOCOL_ERROR, f"a relayed entry is malformed: {e}")
                return
            if self.finishing:
                return
        if len(read.entries) == _READ or self._relay_again:
            self._read_relayed()

    def _relay_failed(self, failure: Failure) -> None:
        self._relay_reading = False
        # The next announcement (or the backend's poll while it is down) reads again.
        self.log.info(
            "streamable-http connection {connection}: cannot read relayed requests: {error}",
            connection=self.id, error=failure.getErrorMessage(),
        )

    def _apply(self, relayed: store.Relayed) -> None:
        now = self.reactor.seconds()
        if relayed.kind == "frames":
            if relayed.ack:
                self.acknowledged(relayed.ack)
            frames = decode_batch(relayed.body, self.edge.setup.max_frame_size)
            if not self.finishing:
                self.frames_arrived(relayed.first_seq, frames)
        elif relayed.kind == "lease":
            self.leases[relayed.stream_id] = now + relayed.seconds
            self.ever_subscribed = True
            self.unsubscribed_since = None
            self.acknowledged(min(relayed.ack, self.last_stored))
        elif relayed.kind == "release":
            self.leases.pop(relayed.stream_id, None)
            if not self.leases and self.local is None:
                self.unsubscribed_since = now
        elif relayed.kind == "delete":
            self.log.info(
                "streamable-http connection {connection}: the agent ended it", connection=self.id
            )
            self.end(Reason.AGENT_GONE, "the agent ended the connection")

    # -- upkeep --------------------------------------------------------------

    def tick(self, now: float) -> None:
        """The edge's periodic check: leases, timeouts, the record's lifetime."""
        if self.finishing:
            return
        options = self.edge.options
        if self.leases:
            for stream_id, until in list(self.leases.items()):
                if until <= now:
                    del self.leases[stream_id]
            if not self.leases and self.local is None:
                self.unsubscribed_since = now
        since = self.unsubscribed_since
        if since is not None and now - since >= options.subscribe_timeout:
            what = "never opened an event stream" if not self.ever_subscribed else (
                "has had no event stream"
            )
            self.end(Reason.AGENT_GONE, f"the agent {what} for {now - since:.1f}s")
            return
        if self.gap_since is not None and now - self.gap_since >= options.reorder_timeout:
            self.end(
                Reason.PROTOCOL_ERROR,
                f"frame {self.next_seq} did not arrive within {options.reorder_timeout}s "
                f"({len(self.early)} later frames waited for it)",
            )
            return
        if now >= self.refresh_at:
            self.refresh_at = now + RECORD_TTL / 3
            self.edge.put_record(self.id, self.record(), RECORD_TTL)

    def record(self) -> store.ConnectionRecord:
        return store.ConnectionRecord(self.edge.edge_id, self.fingerprint)

    def end(self, reason: Reason, problem: str) -> None:
        """Close the connection from this side, with the reason in the log and to the agent."""
        if self.finishing:
            return
        self.log.warn(
            "streamable-http connection {connection} from {peer}: {problem}; closing it",
            connection=self.id, peer=self.peer, problem=problem, reason=reason.value,
        )
        self.link.close(reason, problem)

    def _finish(self, reason: Reason, message: str) -> None:
        """Free everything; the link hears the end last."""
        if self.finished:
            return
        self.finished = True
        for timer in (self._finish_timer, self._store_retry):
            if timer is not None and timer.active():
                timer.cancel()
        self._finish_timer = self._store_retry = None
        if self._relay_watch is not None:
            self._relay_watch.cancel()
            self._relay_watch = None
        local, self.local = self.local, None
        if local is not None:
            # What the stream has yet to send (the close event last, if it was
            # stored) goes with it, as fast as its agent reads, stalls bounded.
            local.last_events(list(self.window.after(local.last_sent)))
        self.early.clear()
        self.pending = []
        self.window = EventWindow()
        self.edge.closed(self, reason, message)
        self.link.wire_lost(reason, message)
