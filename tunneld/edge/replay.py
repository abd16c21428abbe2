# -*- test-case-name: tests.test_sse_replay -*-
"""
The edge's replay of public Server-Sent Events (issue 21), per tunnel opt-in.

A browser's C{EventSource} (or any SSE client) that loses its connection
reconnects with C{Last-Event-ID}; most upstreams cannot resume from it, and
events sent meanwhile are lost without anyone knowing.  With C{sse_replay}
on for a tunnel (C{[limits.tunnels."HOST"]}), the edge does it for them:

 - A public C{GET} whose reply is C{200 text/event-stream} is I{recorded}: its
   events (blocks ending in a blank line, kept byte for byte) go into a ring
   bounded by C{sse_replay_events} and C{sse_replay_bytes}, and from there to
   the client.  The upstream stream is always read (the ring is its bound):
   a client that falls further behind than the ring holds is closed with
   C{saturated}, and resumes.
 - When the client goes, the edge keeps the upstream stream open and
   recording for C{sse_replay_linger} seconds.  A client that comes back with
   a C{Last-Event-ID} the ring holds is sent the events after it and then
   continues live on the same upstream stream: nothing lost, nothing twice,
   and the upstream sees one connection.
 - An id the ring does not hold (older than its oldest event, or never seen)
   is refused, not served with a silent gap: C{410} with
   C{Tunnel-Error: session_gone} and a body naming the id and the oldest one
   held, and a log line.  The client starts over without the id.
 - An upstream stream that ended (or was reset) stays findable for the
   linger: a client behind it is sent what it missed and then the end, and
   its next reconnect (with the last id) opens a new upstream stream, the
   id passed on, so an upstream that can resume does so from exactly there.
 - With no ring for the URL at all (first visit, edge restarted), the request
   goes to the upstream as it came, C{Last-Event-ID} included.

The scope of a ring is one tunnel, one URL (host and target, query
included) and one set of credentials (C{Authorization} and C{Cookie},
hashed): a client is only ever replayed events a request like its own was
sent.  Each scope has one ring at a time, the newest stream's: an older one
still serving a client keeps serving it, unfindable.  A tunnel holds at
most C{sse_replay_streams} rings; past that the one idle longest is let go.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from tunneld.config import LimitsSection
from tunneld.interfaces import IStream, IStreamReceiver
from tunneld.model.messages import Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason

__all__ = [
    "GAP",
    "Feed",
    "Gap",
    "ReplayBook",
    "ReplaySettings",
    "Subscription",
    "last_event_id",
    "scope_of",
]

GAP = (
    "replay gap on {host}{target} for {peer}: Last-Event-ID {last!r} is not held "
    "(oldest held {oldest!r})"
)
_LET_GO = "replay of {host}{target} let go: {why}"
_TOO_BIG = "an event larger than the replay buffer ({limit} bytes)"
_BEHIND = "the client fell behind the replay buffer ({events} events, {size} bytes)"
# One line end of text/event-stream: CRLF, LF or CR.
_LINE_END = re.compile(rb"\r\n|\n|\r")
# Replayed and live events go to a client in writes of about this size.
_WRITE = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    """The replay bounds of one tunnel."""

    events: int
    size: int
    linger: float
    streams: int


@dataclass(frozen=True, slots=True)
class Gap:
    """Why a C{Last-Event-ID} cannot be resumed from: the text the client and the log see."""

    last: str
    oldest: str

    @property
    def text(self) -> str:
        return (
            f"replay gap: Last-Event-ID {self.last!r} is not in this edge's replay buffer "
            f"(oldest id held: {self.oldest!r}); reconnect without Last-Event-ID"
        )


def last_event_id(headers: Headers) -> str | None:
    """The request's C{Last-Event-ID}, or None."""
    for name, value in headers:
        if name == b"last-event-id":
            return value.decode("utf-8", "replace")
    return None


def scope_of(tunnel: str, host: str, target: str, headers: Headers) -> tuple[str, str, str, str]:
    """The scope a ring is kept for: tunnel, URL and a digest of the credentials."""
    digest = hashlib.sha256()
    for name, value in headers:
        if name in (b"authorization", b"cookie"):
            digest.update(name + b"\0" + value + b"\0")
    return (tunnel.lower(), host.lower(), target, digest.hexdigest())


def _event_id(block: bytes) -> str | None:
    """The id an event block sets (its last non-empty C{id} field), or None."""
    found: str | None = None
    for line in _LINE_END.split(block):
        if line.startswith(b"id"):
            name, colon, value = line.partition(b":")
            if name != b"id":
                continue
            if colon and value.startswith(b" "):
                value = value[1:]
            if value and b"\0" not in value:
                found = value.decode("utf-8", "replace")
    return found


def _is_event_stream(reply: ReplyHead) -> bool:
    """A reply the ring can record: 200, text/event-stream, not encoded."""
    if reply.status != 200:
        return False
    kind = False
    for name, value in reply.headers:
        lower = name.lower()
        if lower == b"content-type":
            kind = value.split(b";")[0].strip().lower() == b"text/event-stream"
        elif lower == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return False
    return kind


@implementer(IStreamReceiver)
class Feed:
    """
    One upstream SSE stream, the receiver of its tunnel stream: records its
    events in a bounded ring and feeds them to its subscriptions.  Until
    its reply says C{text/event-stream} (and for a reply that does not) it
    passes everything through to its first subscription, backpressure
    included, as any stream would.
    """

    log = Logger()

    def __init__(
        self, book: ReplayBook, scope: tuple[str, str, str, str], settings: ReplaySettings
    ) -> None:
        self.book = book
        self.scope = scope
        self.settings = settings
        self.source: IStream | None = None
        self.reply: ReplyHead | None = None
        self.recording = False
        self.subscriptions: list[Subscription] = []
        self.events: deque[tuple[str | None, bytes]] = deque()
        self.base = 0  # the sequence number of events[0]
        self.size = 0  # bytes held in events
        self.ids: dict[str, int] = {}  # event id → sequence number of its event
        self._partial = bytearray()  # an event not yet ended
        self._scanned = 0  # where the line scan of _partial resumes
        self._line_start = 0
        # The end: trailers (clean) or a reason and message (reset).
        self.finished = False
        self.trailers: Headers = ()
        self.failure: tuple[Reason, str] | None = None
        self.linger: IDelayedCall | None = None
        self.idle_since = 0.0

    @property
    def next(self) -> int:
        """The sequence number the next event will have."""
        return self.base + len(self.events)

    @property
    def live(self) -> bool:
        return not self.finished

    def oldest_id(self) -> str:
        for event_id, _ in self.events:
            if event_id is not None:
                return event_id
        return ""

    # -- IStreamReceiver (the upstream stream) ------------------------------

    def reply_received(self, reply: ReplyHead) -> None:
        self.reply = reply
        if _is_event_stream(reply):
            self.recording = True
            self.book.adopt(self)
        for subscription in list(self.subscriptions):
            subscription.pump()

    def data_received(self, data: bytes) -> None:
        if not self.recording:
            for subscription in self.subscriptions:
                subscription.passthrough(data)
            return
        if self.finished:
            return
        self._scan(data)
        for subscription in list(self.subscriptions):
            subscription.pump()

    def end_received(self, trailers: Headers) -> None:
        self._finish(trailers, None)

    def reset_received(self, reason: Reason, message: str) -> None:
        self._finish((), (reason, message))

    # -- recording ----------------------------------------------------------

    def _scan(self, data: bytes) -> None:
        """Cut C{data} (after what came before) into whole events, into the ring."""
        partial = self._partial
        partial += data
        settings = self.settings
        position = self._scanned
        line_start = self._line_start
        taken = 0
        while not self.finished:
            match = _LINE_END.search(partial, position)
            if match is None:
                break
            start, end = match.span()
            if end == len(partial) and partial[start] == 0x0D:
                break  # a CR at the end may be the first half of a CRLF: wait
            if start == line_start and start > taken:
                # A blank line (other than a block's first line) ends the event.
                self._record(bytes(partial[taken:end]))
                taken = end
            elif start == line_start == taken:
                # A blank line with nothing before it: part of the next block.
                pass
            position = line_start = end
        if self.finished:
            return
        if taken:
            del partial[:taken]
            position -= taken
            line_start -= taken
        self._scanned, self._line_start = position, line_start
        if len(partial) > settings.size:
            self.book.let_go(self, Reason.SATURATED, _TOO_BIG.format(limit=settings.size))

    def _record(self, block: bytes) -> None:
        settings = self.settings
        if len(block) > settings.size:
            self.book.let_go(self, Reason.SATURATED, _TOO_BIG.format(limit=settings.size))
            return
        event_id = _event_id(block)
        if event_id is not None:
            self.ids[event_id] = self.next
        self.events.append((event_id, block))
        self.size += len(block)
        events, ids = self.events, self.ids
        if len(events) > settings.events or self.size > settings.size:
            # Clients that are reading take what they can before the oldest goes.
            for subscription in list(self.subscriptions):
                subscription.pump()
        while len(events) > settings.events or self.size > settings.size:
            old_id, old = events.popleft()
            if old_id is not None and ids.get(old_id) == self.base:
                del ids[old_id]
            self.base += 1
            self.size -= len(old)

    def after(self, last: str) -> int | None:
        """The sequence number of the event after the one with id C{last}, or None."""
        seq = self.ids.get(last)
        return None if seq is None else seq + 1

    def chunk(self, cursor: int) -> tuple[bytes, int]:
        """Events from C{cursor} on, up to about one write's worth: the bytes and the next cursor."""
        events = self.events
        index = cursor - self.base
        pieces: list[bytes] = []
        size = 0
        while index < len(events) and size < _WRITE:
            block = events[index][1]
            pieces.append(block)
            size += len(block)
            index += 1
        return b"".join(pieces), self.base + index

    # -- the end ------------------------------------------------------------

    def _finish(self, trailers: Headers, failure: tuple[Reason, str] | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.trailers = trailers
        self.failure = failure
        self.source = None
        self._partial = bytearray()  # an event never ended is never sent
        for subscription in list(self.subscriptions):
            subscription.pump()
        self.book.ended(self)

    def close(self, reason: Reason, message: str) -> None:
        """Let the upstream stream go (its subscriptions are sent what they have, then the reason)."""
        source = self.source
        self._finish((), (reason, message))
        if source is not None:
            source.reset(reason, message)

    # -- subscriptions ------------------------------------------------------

    def subscribe(self, receiver: Any, cursor: int | None, replayed: bool) -> Subscription:
        subscription = Subscription(self, receiver, cursor, replayed)
        self.subscriptions.append(subscription)
        self.book.attached(self)
        return subscription

    def unsubscribe(self, subscription: Subscription, reason: Reason, message: str) -> None:
        if subscription in self.subscriptions:
            self.subscriptions.remove(subscription)
        if not self.recording:
            source, self.source = self.source, None
            if source is not None and not self.finished:
                self.finished = True
                source.reset(reason, message)
            return
        if not self.subscriptions:
            self.book.detached(self)


@implementer(IStream, IPushProducer)
class Subscription:
    """
    One public client's view of a L{Feed}: the exchange's stream.  It
    sends the reply head, the events from its cursor on and the end, as
    fast as the client reads them; the client going only detaches it.
    """

    def __init__(self, feed: Feed, receiver: Any, cursor: int | None, replayed: bool) -> None:
        self.feed = feed
        self.receiver = receiver
        self.cursor = cursor  # None: from wherever the feed is when its reply comes
        self.replayed = replayed
        self.started = False
        self.paused = False
        self.head_sent = False
        self.done = False
        self.head = feed.source.head if feed.source is not None else StreamHead(kind="http", tunnel="")

    def start(self) -> None:
        """The exchange holds this as its stream: send what there is."""
        self.started = True
        self.pump()

    def pump(self) -> None:
        if not self.started or self.done:
            return
        feed = self.feed
        receiver = self.receiver
        if not self.head_sent:
            reply = feed.reply
            if reply is None:
                if feed.failure is not None:
                    self._reset(*feed.failure)
                return
            self.head_sent = True
            if self.cursor is None:
                self.cursor = feed.next
            if self.replayed:
                reply = ReplyHead(
                    reply.status, reply.reason,
                    (*reply.headers, (b"tunnel-replay", b"%d events" % (feed.next - self.cursor))),
                )
            receiver.reply_received(reply)
            if self.done or not feed.recording:
                return
        cursor = self.cursor
        assert cursor is not None
        while not self.paused and not self.done and cursor < feed.next:
            if cursor < feed.base:
                self._reset(Reason.SATURATED, _BEHIND.format(
                    events=feed.settings.events, size=feed.settings.size,
                ))
                return
            data, cursor = feed.chunk(cursor)
            self.cursor = cursor
            receiver.data_received(data)
        if self.done or cursor < feed.next or not feed.finished:
            return
        self.done = True
        feed.unsubscribe(self, Reason.CANCELLED, "")
        if feed.failure is None:
            receiver.end_received(feed.trailers)
        else:
            receiver.reset_received(*feed.failure)

    def passthrough(self, data: bytes) -> None:
        """A reply that is not recorded: its bytes as they come."""
        if self.started and not self.done:
            self.receiver.data_received(data)

    def _reset(self, reason: Reason, message: str) -> None:
        self.done = True
        self.feed.unsubscribe(self, reason, message)
        self.receiver.reset_received(reason, message)

    # -- IStream, as the exchange uses it ------------------------------------

    def attach(self, receiver: IStreamReceiver) -> None:
        self.receiver = receiver

    def send_reply(self, reply: ReplyHead) -> None:
        raise NotImplementedError("edge side only")

    def write(self, data: bytes) -> None:
        pass  # a bodyless GET: nothing goes upstream

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        pass

    def unregisterProducer(self) -> None:  # noqa: N802
        pass

    def end(self, trailers: Headers = ()) -> None:
        pass

    def reset(self, reason: Reason, message: str) -> None:
        """The client went (or its exchange failed): detach; the upstream stays, recording."""
        if not self.done:
            self.done = True
            self.feed.unsubscribe(self, reason, message)

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True
        feed = self.feed
        if not feed.recording and feed.source is not None:
            feed.source.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        feed = self.feed
        if not feed.recording and feed.source is not None:
            feed.source.resumeProducing()
        else:
            self.pump()

    def stopProducing(self) -> None:  # noqa: N802
        self.reset(Reason.CANCELLED, "the stream was cancelled")


class ReplayBook:
    """
    The rings of one edge: which tunnels replay and with what bounds, the
    ring of each scope, the lingers.
    """

    log = Logger()

    def __init__(self, reactor: IReactorTime, limits: LimitsSection | None = None) -> None:
        self.reactor = reactor
        self.feeds: dict[tuple[str, str, str, str], Feed] = {}
        self._settings: dict[str, ReplaySettings] = {}
        self.stopped = False
        if limits is not None:
            self.configure(limits)

    def configure(self, limits: LimitsSection) -> None:
        """Which tunnels replay, from C{[limits.tunnels."HOST"]} (rings already kept keep their bounds)."""
        self._settings = {
            name.lower(): ReplaySettings(
                table.sse_replay_events, table.sse_replay_bytes,
                table.sse_replay_linger, table.sse_replay_streams,
            )
            for name, table in limits.tunnels.items()
            if table.sse_replay
        }

    def settings(self, tunnel: str) -> ReplaySettings | None:
        """The tunnel's replay bounds, or None when it does not replay."""
        if not self._settings or self.stopped:
            return None
        return self._settings.get(tunnel.lower())

    def held(self) -> tuple[int, int]:
        """Events and bytes held in every ring (for tests and the admin view)."""
        feeds = self._all()
        return sum(len(f.events) for f in feeds), sum(f.size for f in feeds)

    def describe(self) -> list[dict[str, Any]]:
        """The rings kept now, for the admin API."""
        now = self.reactor.seconds()
        return [
            {
                "tunnel": feed.scope[0], "host": feed.scope[1], "target": feed.scope[2],
                "events": len(feed.events), "bytes": feed.size,
                "oldest_id": feed.oldest_id() or None,
                "clients": len(feed.subscriptions),
                "upstream": "open" if feed.live else "ended",
                "idle_s": None if feed.subscriptions or not feed.live
                else round(now - feed.idle_since, 1),
            }
            for feed in self._all()
        ]

    def _all(self) -> list[Feed]:
        return list(self.feeds.values())

    # -- requests -----------------------------------------------------------

    def resume(self, scope: tuple[str, str, str, str], last: str) -> tuple[Feed, int] | Gap | None:
        """
        Where a client reconnecting with C{last} goes: a feed and the
        cursor after C{last}; a L{Gap}; or None (no ring, or a finished
        one it has all of: a new upstream stream).
        """
        feed = self.feeds.get(scope)
        if feed is None:
            return None
        cursor = feed.after(last)
        if cursor is None:
            return Gap(last, feed.oldest_id())
        if feed.finished and cursor >= feed.next:
            return None
        return feed, cursor

    # -- the feeds' life -----------------------------------------------------

    def adopt(self, feed: Feed) -> None:
        """A feed's reply is an event stream: it becomes its scope's ring."""
        scope = feed.scope
        before = self.feeds.get(scope)
        if before is not None and before is not feed:
            if before.subscriptions and before.live:
                del self.feeds[scope]  # it serves its clients on, unfindable
            else:
                self.let_go(before, Reason.CANCELLED, "a newer stream of the same URL replaces it")
        self.feeds[scope] = feed
        tunnel = scope[0]
        mine = [f for f in self.feeds.values() if f.scope[0] == tunnel]
        if len(mine) > feed.settings.streams:
            idle = [f for f in mine if not f.subscriptions and f is not feed]
            victim = min(idle, key=lambda f: f.idle_since) if idle else None
            if victim is None:
                del self.feeds[scope]  # every ring is in use: this one is not kept for replay
                self._log_let_go(feed, f"the tunnel already keeps {feed.settings.streams} replay buffers")
            else:
                self.let_go(
                    victim, Reason.CANCELLED,
                    f"the tunnel keeps at most {feed.settings.streams} replay buffers",
                )

    def attached(self, feed: Feed) -> None:
        linger, feed.linger = feed.linger, None
        if linger is not None and linger.active():
            linger.cancel()

    def detached(self, feed: Feed) -> None:
        """A feed's last client went: keep it for the linger."""
        if self.feeds.get(feed.scope) is not feed:
            feed.close(Reason.CLIENT_GONE, "the client went away")
            return
        feed.idle_since = self.reactor.seconds()
        if feed.linger is None and not self.stopped:
            feed.linger = self.reactor.callLater(feed.settings.linger, self._lingered, feed)

    def ended(self, feed: Feed) -> None:
        """A feed's upstream stream ended: findable for the linger, then forgotten."""
        if self.feeds.get(feed.scope) is not feed:
            return
        if feed.failure is not None and feed.failure[0] is Reason.SATURATED:
            del self.feeds[feed.scope]
            return
        if feed.linger is not None and feed.linger.active():
            feed.linger.cancel()
        if self.stopped:
            del self.feeds[feed.scope]
            return
        feed.linger = self.reactor.callLater(feed.settings.linger, self._lingered, feed)

    def _lingered(self, feed: Feed) -> None:
        feed.linger = None
        if feed.subscriptions and feed.live:
            return
        if self.feeds.get(feed.scope) is feed:
            del self.feeds[feed.scope]
        if feed.live:
            self._log_let_go(feed, f"no client resumed it within {feed.settings.linger:g}s")
            feed.close(Reason.CLIENT_GONE, "no client resumed the event stream")

    def let_go(self, feed: Feed, reason: Reason, why: str) -> None:
        """Stop keeping C{feed}: forgotten, its upstream stream reset if it still runs."""
        if self.feeds.get(feed.scope) is feed:
            del self.feeds[feed.scope]
        linger, feed.linger = feed.linger, None
        if linger is not None and linger.active():
            linger.cancel()
        self._log_let_go(feed, why)
        if feed.live:
            feed.close(reason, why)

    def _log_let_go(self, feed: Feed, why: str) -> None:
        _, host, target, _ = feed.scope
        self.log.info(_LET_GO, host=host, target=target, why=why)

    def gap(self, host: str, target: str, peer: str, gap: Gap) -> None:
        """A resume refused: logged."""
        self.log.info(GAP, host=host, target=target, peer=peer, last=gap.last, oldest=gap.oldest)

    def shutdown(self, reason: Reason, message: str) -> None:
        """The edge stops: every ring is let go, no linger is left behind."""
        self.stopped = True
        for feed in self._all():
            self.let_go(feed, reason, message)


def open_replayed(
    book: ReplayBook,
    settings: ReplaySettings,
    scope: tuple[str, str, str, str],
    exchange: Any,
    open_upstream: Callable[[IStreamReceiver], IStream],
    resumed: tuple[Feed, int] | None,
) -> Subscription:
    """
    The stream an exchange holds for a recorded GET: a subscription to
    C{resumed} (its feed, from the cursor), or to a new feed on a new
    upstream stream opened by C{open_upstream}.  The caller tells the
    exchange it opened, then L{Subscription.start}s it.
    """
    if resumed is not None:
        feed, cursor = resumed
        return feed.subscribe(exchange, cursor, replayed=True)
    feed = Feed(book, scope, settings)
    subscription = feed.subscribe(exchange, None, replayed=False)
    source = open_upstream(feed)
    if not feed.finished:
        feed.source = source
    subscription.head = source.head
    return subscription
