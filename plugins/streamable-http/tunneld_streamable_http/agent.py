# -*- test-case-name: tests.test_streamable_http -*-
"""
The agent end of a streamable-HTTP connection: the L{FrameWire} under the
agent's L{FrameLink}, made of plain HTTP/1.1 requests.

  - L{AgentConnection.open} initialises (C{POST}), opens the event stream
    (C{GET}) and only then hands the link over, so a proxy that refuses
    either makes the dial fail and the agent fall back to its next
    transport.  An answer of 401, 403 or 404 to the initialise fails with
    L{LinkRefused}: the agent stops after a bound instead of dialling forever.
  - Frames to the edge are numbered and sent in batches (C{POST}, at most
    C{max_posts_in_flight} at once); a batch is kept until the edge has
    answered 202, and retried with the same numbers after a transient
    failure, for up to C{post_retry_for}.  What waits has a lid: streams
    pause at half of C{max_pending_bytes}; a full buffer closes the link
    with C{saturated}.
  - Events from the edge must come numbered one after the other: one seen
    already is dropped, a gap ends the link (nothing is skipped silently).
    Each POST acknowledges the last event received; when there is nothing
    to send, a POST of its own does after C{ack_delay}.
  - An event stream that ends (the edge's clean end after
    C{max_stream_duration}, a proxy cut, silence past C{idle_timeout}) is
    resumed after its last event with a jittered backoff that starts over
    after a stream that lasted C{healthy_after}; a connection the edge no
    longer knows (404, 410) or C{resume_for} of failures end the link, and
    the agent dials again.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ProxyAgent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from tunneld.interfaces import AgentLinkSetup, IAgentLink, LinkRefused
from tunneld.model.messages import GoAway
from tunneld.model.reasons import Reason
from tunneld.proxyconnect import ProxyConnectEndpoint, proxy_text
from tunneld.transports.mux import FrameLink
from tunneld.wire import codec
from tunneld_streamable_http.framing import (
    ACK,
    CONNECTION_ID,
    ERROR,
    EVENTS_TYPE,
    FRAMES_TYPE,
    LAST_EVENT_ID,
    MAX_POST,
    SEQ,
    EventParser,
    decode_data,
    encode_batch,
)
from tunneld_streamable_http.options import StreamableHTTPAgentOptions

# Bodies of answers the agent reads only to report them.
_ANSWER_LIMIT = 4096
# Received bytes after which the agent acknowledges at once.
_ACK_BYTES = 256 * 1024
# How long a closing link may spend delivering its last frames and its DELETE.
_CLOSE_TIMEOUT = 2.0


class Backoff:
    """Jittered exponential delays that start over after a healthy spell."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** min(self.failures, 32)))
        self.failures += 1
        return ceiling * (0.5 + self._rng.random() / 2)

    def reset(self) -> None:
        self.failures = 0


class StreamRefused(Exception):
    """The edge (or a proxy) answered a request with something other than success."""

    def __init__(self, what: str, code: int, reason: str, text: str) -> None:
        super().__init__(f"{what} refused: {code}{' ' + reason if reason else ''}: {text}")
        self.code = code
        self.reason = reason


@implementer(IBodyProducer)
class _Body:
    """A request body that is already whole."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:  # noqa: N802
        if self.data:
            consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


class _Answer(Protocol):
    """Reads an answer's body, keeping at most C{_ANSWER_LIMIT} bytes of it."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if len(self.data) < _ANSWER_LIMIT:
            self.data += data[: _ANSWER_LIMIT - len(self.data)]

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.done.callback(self.data)


def describe(failure: Failure) -> str:
    """A failure in words: twisted.web's client wraps the real causes in a list."""
    reasons = getattr(failure.value, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(
            r.getErrorMessage() if isinstance(r, Failure) else str(r) for r in reasons
        )
    return failure.getErrorMessage()


def read_answer(response: Any) -> Deferred[bytes]:
    reader = _Answer()
    response.deliverBody(reader)
    return reader.done


def _header(response: Any, name: bytes) -> str:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else ""


class _Connections:
    """Every TCP connection the agent's HTTP client made, so that closing can wait for them."""

    def __init__(self) -> None:
        self.live: set[Any] = set()
        self._empty: list[Deferred[None]] = []

    def add(self, protocol: Any) -> None:
        self.live.add(protocol)
        lost = protocol.connectionLost

        def connection_lost(reason: Failure) -> Any:
            try:
                return lost(reason)
            finally:
                self.live.discard(protocol)
                if not self.live:
                    waiting, self._empty = self._empty, []
                    for d in waiting:
                        d.callback(None)

        protocol.connectionLost = connection_lost

    def abort_all(self) -> Deferred[None]:
        for protocol in list(self.live):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
        if not self.live:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._empty.append(d)
        return d


class _TrackingFactory(Factory):
    def __init__(self, inner: Any, connections: _Connections) -> None:
        self.inner = inner
        self.connections = connections

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        protocol = self.inner.buildProtocol(addr)
        if protocol is not None:
            self.connections.add(protocol)
        return protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Endpoint:
    def __init__(self, inner: Any, connections: _Connections) -> None:
        self.inner = inner
        self.connections = connections

    def connect(self, factory: Any) -> Deferred[Any]:
        return self.inner.connect(_TrackingFactory(factory, self.connections))  # type: ignore[no-any-return]


class _Endpoints:
    """Where the agent's HTTP client connects: the edge, over TLS for https (with the agent's certificate)."""

    def __init__(self, setup: AgentLinkSetup, timeout: float, connections: _Connections) -> None:
        self.setup = setup
        self.timeout = timeout
        self.connections = connections

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802
        host = uri.host.decode("idna")
        endpoint: Any
        if self.setup.proxy is not None:  # https through a forward proxy: its CONNECT tunnel
            endpoint = ProxyConnectEndpoint(
                self.setup.reactor, self.setup.proxy, host, uri.port, self.timeout
            )
        else:
            endpoint = HostnameEndpoint(self.setup.reactor, host, uri.port, timeout=self.timeout)
        if uri.scheme == b"https":
            from twisted.internet.ssl import optionsForClientTLS

            creator = self.setup.tls_for(host) if self.setup.tls_for else optionsForClientTLS(host)
            endpoint = wrapClientTLS(creator, endpoint)
        return _Endpoint(endpoint, self.connections)


class _EventReader(Protocol):
    """The body of one event-stream response, handed to the connection as it arrives."""

    def __init__(self, owner: AgentConnection) -> None:
        self.owner = owner

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.owner._stream_data(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.owner._stream_lost(self, reason or Failure(ConnectionError("lost")))

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


class _Post:
    """One batch of frames (or only an acknowledgement) until the edge takes it."""

    def __init__(self, seq: int, frames: list[bytes]) -> None:
        self.seq = seq
        self.body = encode_batch(frames)
        self.size = sum(len(frame) for frame in frames)
        self.failing_since: float | None = None
        self.request: Deferred[Any] | None = None
        self.retry: Any = None


class AgentConnection:
    """The agent end of one connection; see the module docstring."""

    log = Logger()

    def __init__(self, options: StreamableHTTPAgentOptions, setup: AgentLinkSetup) -> None:
        self.options = options
        self.setup = setup
        self.reactor = setup.reactor
        self.url = options.url.encode()
        self.peer = urlsplit(options.url).netloc
        self.connections = _Connections()
        self.pool = HTTPConnectionPool(self.reactor, persistent=True)
        self.pool.maxPersistentPerHost = options.max_posts_in_flight + 1
        self.pool.retryAutomatically = False
        self.http: Any
        if setup.proxy is not None and urlsplit(options.url).scheme == "http":
            # Through a forward proxy: plain requests in absolute form, the
            # one thing an HTTP/1.1-only proxy surely passes.
            proxy = HostnameEndpoint(
                self.reactor, setup.proxy[0], setup.proxy[1], timeout=options.connect_timeout
            )
            # A connection per request: a proxy may close its side after each
            # answer without saying so (tinyproxy does), and a request sent on
            # such a connection would be lost with it.
            self.pool.persistent = False
            self.http = ProxyAgent(_Endpoint(proxy, self.connections), self.reactor, pool=self.pool)
            self.peer = f"{self.peer} (through the proxy {proxy_text(setup.proxy)})"
        else:
            self.http = Agent.usingEndpointFactory(
                self.reactor, _Endpoints(setup, options.connect_timeout, self.connections),
                pool=self.pool,
            )
        self.connection_id = b""
        self.max_post = 1 << 20
        self.link: FrameLink | None = None
        # agent → edge
        self.next_seq = 1
        self.queue: deque[bytes] = deque()
        self.held_bytes = 0  # queued and in flight
        self.paused = False
        self.in_flight: set[_Post] = set()
        self._flush_call: Any = None
        # edge → agent
        self.received = 0  # the last event taken
        self.ack_sent = 0
        self.unacked_bytes = 0
        self.duplicates = 0
        self._ack_call: Any = None
        self._ack_wanted = False
        self.parser = EventParser(2 * setup.max_frame_size + 64)
        self.reader: _EventReader | None = None
        self.stream_opened_at = 0.0
        self.stream_heard_at = 0.0
        self.streams_opened = 0
        self.resume_backoff = Backoff(options.resume_initial, options.resume_max)
        self._resume_call: Any = None
        self._resume_failing_since: float | None = None
        self._idle = LoopingCall(self._check_idle)
        self._idle.clock = self.reactor
        self.closing = False
        self._failing = False
        self.ended = False
        self._drained: list[Deferred[None]] = []
        self._requests: set[Deferred[Any]] = set()

    # -- opening -----------------------------------------------------------

    async def open(self) -> FrameLink:
        """Initialise, open the event stream, then hand over the link."""
        try:
            response = await self._request(
                b"POST", {b"Content-Type": FRAMES_TYPE}, b"", self.options.connect_timeout
            )
            text = (await read_answer(response)).decode("utf-8", "replace").strip()
            if response.code not in (200, 201):
                named = _header(response, ERROR)
                if named in Reason._value2member_map_:
                    # The edge turned the link away, saying why: the agent
                    # hears it as it would on any transport, a GoAway before
                    # any Welcome.
                    await self._drop()
                    return self._refused_link(Reason(named), text.partition(": ")[2] or text)
                refusal = f"initialise refused by {self.peer}: {response.code}: {text[:200]}"
                if response.code in (401, 403, 404):
                    raise LinkRefused(refusal)
                raise ConnectionError(refusal)
            connection_id = _header(response, CONNECTION_ID)
            if not connection_id:
                raise ConnectionError(f"{self.peer} answered the initialise without a connection id")
            self.connection_id = connection_id.encode()
            advertised = _header(response, MAX_POST)
            if advertised.isdigit():
                self.max_post = int(advertised)
            link = self.link = self._make_link()
            await self._open_stream()
        except BaseException as e:
            if self.link is not None:
                self.link.heartbeat.stop()
            await self._drop()
            if isinstance(getattr(e, "reasons", None), list):  # twisted.web's wrapped causes
                raise ConnectionError(f"{self.peer}: {describe(Failure(e))}") from e
            raise
        self._idle.start(max(0.05, self.options.idle_timeout / 4), now=False)
        return link

    def _refused_link(self, reason: Reason, message: str) -> FrameLink:
        """A link that only hears the edge's refusal (once its owner is listening), then ends."""
        self.ended = True
        link = self.link = self._make_link()
        goaway = codec.encode_control(GoAway(reason, message[:200])).SerializeToString()

        def refuse() -> None:
            link.frame_received(goaway)
            if not link.closed:
                link.close(reason, message)
            link.wire_lost(reason, message)

        self.reactor.callLater(0, refuse)
        return link

    def _make_link(self) -> FrameLink:
        options = self.options
        return FrameLink(
            self,
            transport_name="streamable-http",
            peer=self.peer,
            reactor=self.reactor,
            is_edge=False,
            initial_window=self.setup.initial_window,
            max_frame_size=self.setup.max_frame_size,
            heartbeat_interval=options.heartbeat_interval,
            heartbeat_timeout=options.heartbeat_timeout,
            codec=self.setup.codec,
        )

    def _request(
        self, method: bytes, headers: dict[bytes, bytes], body: bytes | None, timeout: float
    ) -> Deferred[Any]:
        all_headers = Headers({name: [value] for name, value in headers.items()})
        if self.connection_id:
            all_headers.setRawHeaders(CONNECTION_ID, [self.connection_id])
        d = self.http.request(method, self.url, all_headers, _Body(body) if body is not None else None)
        d.addTimeout(timeout, self.reactor)
        # Until answered, a request is this connection's to cancel when it ends.
        self._requests.add(d)
        return d.addBoth(self._answered_request, d)

    def _answered_request(self, result: Any, d: Deferred[Any]) -> Any:
        self._requests.discard(d)
        if self.ended and not isinstance(result, Failure):
            # Answered after the end: nobody reads it; its connection goes.
            reader = _EventReader(self)
            result.deliverBody(reader)
            reader.abort()
            raise ConnectionError("the connection has ended")
        return result

    async def _open_stream(self) -> None:
        headers = {b"Accept": EVENTS_TYPE}
        if self.received:
            headers[LAST_EVENT_ID] = b"%d" % self.received
        response = await self._request(b"GET", headers, None, self.options.connect_timeout)
        kind = _header(response, b"Content-Type")
        if response.code != 200 or not kind.startswith(EVENTS_TYPE.decode()):
            text = (await read_answer(response)).decode("utf-8", "replace").strip()
            raise StreamRefused("event stream", response.code, _header(response, ERROR), text[:200])
        reader = _EventReader(self)
        self.reader = reader
        self.parser = EventParser(2 * self.setup.max_frame_size + 64)
        now = self.reactor.seconds()
        self.stream_opened_at = self.stream_heard_at = now
        self.streams_opened += 1
        response.deliverBody(reader)

    # -- edge → agent ------------------------------------------------------

    def _stream_data(self, reader: _EventReader, data: bytes) -> None:
        if reader is not self.reader or self.ended:
            return
        self.stream_heard_at = self.reactor.seconds()
        try:
            for event in self.parser.feed(data):
                self._event(event.event_id, event.kind, event.data)
                if self.ended or reader is not self.reader:
                    return
        except ValueError as e:
            self._fail(Reason.PROTOCOL_ERROR, f"the event stream is malformed: {e}")

    def _event(self, event_id: str | None, kind: str, data: bytes) -> None:
        if event_id is None or not event_id.isdigit():
            raise ValueError(f"an event without a proper id ({event_id!r})")
        number = int(event_id)
        if number <= self.received:
            self.duplicates += 1
            return
        if number != self.received + 1:
            raise ValueError(f"event {number} came after {self.received}: events were lost")
        self.received = number
        if kind == "close":
            reason, _, message = data.decode("utf-8", "replace").partition(" ")
            self._shut(Reason(reason) if reason in Reason._value2member_map_ else Reason.AGENT_GONE,
                       f"the edge closed the connection: {message}")
            return
        frame = decode_data(data)
        self.unacked_bytes += len(frame)
        assert self.link is not None
        self.link.frame_received(frame)
        self._ack_soon()

    def _ack_soon(self) -> None:
        if self.received <= self.ack_sent or self.ended:
            return
        if self.unacked_bytes >= _ACK_BYTES:
            self._ack_wanted = True
            self._flush_soon()
        elif self._ack_call is None:
            self._ack_call = self.reactor.callLater(self.options.ack_delay, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_call = None
        if self.received > self.ack_sent:
            self._ack_wanted = True
            self._flush_soon()

    def _stream_lost(self, reader: _EventReader, reason: Failure) -> None:
        if reader is not self.reader:
            return
        self.reader = None
        if self.ended or self.closing:
            return
        now = self.reactor.seconds()
        lasted = now - self.stream_opened_at
        if lasted >= self.options.healthy_after:
            self.resume_backoff.reset()
        why = "ended by the edge" if reason.check(ResponseDone) else f"was cut ({describe(reason)})"
        self._resume_later(f"the event stream {why} after {lasted:.1f}s")

    def _resume_later(self, why: str) -> None:
        now = self.reactor.seconds()
        if self._resume_failing_since is None:
            self._resume_failing_since = now
        elif now - self._resume_failing_since >= self.options.resume_for:
            self._fail(
                Reason.AGENT_GONE,
                f"the event stream could not be resumed for {self.options.resume_for}s ({why})",
            )
            return
        delay = self.resume_backoff.next_delay()
        self.log.info(
            "streamable-http {connection}: {why}; resuming after event {last} in {delay:.2f}s",
            connection=self.connection_id.decode(), why=why, last=self.received, delay=delay,
        )
        self._resume_call = self.reactor.callLater(delay, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        if self.ended or self.closing:
            return
        d = ensureDeferred(self._open_stream())
        d.addCallbacks(self._resumed, self._resume_failed)

    def _resumed(self, _: Any) -> None:
        self._resume_failing_since = None

    def _resume_failed(self, failure: Failure) -> None:
        if self.ended or self.closing:
            return
        error = failure.value
        if isinstance(error, StreamRefused) and error.code in (401, 403, 404, 410):
            reason = Reason(error.reason) if error.reason in Reason._value2member_map_ else Reason.AGENT_GONE
            self._fail(reason, f"the edge no longer serves this connection ({error})")
            return
        self._resume_later(f"resuming failed ({describe(failure)})")

    def _check_idle(self) -> None:
        reader = self.reader
        if reader is None or self.ended:
            return
        silent = self.reactor.seconds() - self.stream_heard_at
        if silent >= self.options.idle_timeout:
            self.log.info(
                "streamable-http {connection}: the event stream was silent for {silent:.1f}s; "
                "dropping it", connection=self.connection_id.decode(), silent=silent,
            )
            reader.abort()

    # -- agent → edge ------------------------------------------------------

    def send_frame(self, payload: bytes) -> None:
        """FrameWire.send_frame: queue it for the next POST."""
        if self.ended:
            return
        self.queue.append(payload)
        self.held_bytes += len(payload)
        limit = self.options.max_pending_bytes
        if self.held_bytes > limit and not (self.closing or self._failing):
            self._fail(
                Reason.SATURATED,
                f"the edge took none of {self.held_bytes} bytes of frames (max_pending_bytes)",
            )
            return
        if not self.paused and self.held_bytes > limit // 2 and self.link is not None:
            self.paused = True
            self.link.pause_sending()
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_call is None and not self.ended:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        while not self.ended and len(self.in_flight) < self.options.max_posts_in_flight:
            frames: list[bytes] = []
            size = 0
            while self.queue and (not frames or size + len(self.queue[0]) + 4 <= self.max_post):
                frame = self.queue.popleft()
                frames.append(frame)
                size += len(frame) + 4
            if not frames and not (self._ack_wanted and self.received > self.ack_sent):
                break
            post = _Post(self.next_seq, frames)
            self.next_seq += len(frames)
            self.in_flight.add(post)
            self._send(post)
        if not self.queue and not self.in_flight:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def _send(self, post: _Post) -> None:
        post.retry = None
        if self.ended:
            return
        self._ack_wanted = False
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        self.ack_sent = max(self.ack_sent, self.received)
        self.unacked_bytes = 0
        headers = {
            b"Content-Type": FRAMES_TYPE, SEQ: b"%d" % post.seq, ACK: b"%d" % self.received,
        }
        d = self._request(b"POST", headers, post.body, self.options.request_timeout)
        post.request = d
        d.addCallback(self._posted, post)
        d.addErrback(self._post_failed, post)

    async def _answered(self, response: Any) -> tuple[int, str, str]:
        text = (await read_answer(response)).decode("utf-8", "replace").strip()
        return response.code, _header(response, ERROR), text

    def _posted(self, response: Any, post: _Post) -> Deferred[Any]:
        d = ensureDeferred(self._answered(response))
        d.addCallback(self._post_answered, post)
        return d

    def _post_answered(self, answer: tuple[int, str, str], post: _Post) -> None:
        post.request = None
        if self.ended:
            return
        code, reason, text = answer
        if code in (200, 201, 202, 204):
            self.in_flight.discard(post)
            self.held_bytes -= post.size
            if self.paused and self.held_bytes <= self.options.max_pending_bytes // 4:
                self.paused = False
                if self.link is not None:
                    self.link.resume_sending()
            self._flush()
            return
        if code in (404, 410):
            self._fail(
                Reason(reason) if reason in Reason._value2member_map_ else Reason.AGENT_GONE,
                f"the edge no longer serves this connection ({code}: {text[:200]})",
            )
            return
        if code >= 500 or code in (408, 429):
            self._retry(post, f"{code} {text[:200]}")
            return
        self._fail(Reason.PROTOCOL_ERROR, f"the edge refused a batch of frames ({code}: {text[:200]})")

    def _post_failed(self, failure: Failure, post: _Post) -> None:
        post.request = None
        if self.ended:
            return
        self._retry(post, describe(failure))

    def _retry(self, post: _Post, why: str) -> None:
        now = self.reactor.seconds()
        if post.failing_since is None:
            post.failing_since = now
        elif now - post.failing_since >= self.options.post_retry_for:
            self._fail(
                Reason.AGENT_GONE,
                f"frames could not be delivered for {self.options.post_retry_for}s ({why})",
            )
            return
        if self.closing:
            self.in_flight.discard(post)
            self._flush()
            return
        delay = min(1.0, 0.05 * 2 ** min(8, int(now - post.failing_since) + 1))
        self.log.info(
            "streamable-http {connection}: a batch of frames from {seq} failed ({why}); "
            "retrying in {delay:.2f}s",
            connection=self.connection_id.decode(), seq=post.seq, why=why, delay=delay,
        )
        post.retry = self.reactor.callLater(delay, self._send, post)

    # -- closing -----------------------------------------------------------

    def close_wire(self, reason: Reason, message: str) -> None:
        """FrameWire.close_wire: deliver the GoAway queued, end the connection, then drop."""
        if self.closing or self.ended:
            return
        self.closing = True
        ensureDeferred(self._close(reason, message))

    async def _close(self, reason: Reason, message: str) -> None:
        try:
            if self.queue or self.in_flight:
                drained: Deferred[None] = Deferred()
                self._drained.append(drained)
                self._flush_soon()
                await drained.addTimeout(_CLOSE_TIMEOUT, self.reactor)
            response = await self._request(b"DELETE", {}, None, _CLOSE_TIMEOUT)
            await read_answer(response)
        except Exception:
            pass  # the edge learns of the end from silence instead
        finally:
            self._shut(reason, message)

    def _fail(self, reason: Reason, message: str) -> None:
        """End the link from this side, telling the edge if it can."""
        if self.ended or self.closing or self._failing:
            return
        self._failing = True  # the link's farewell (a GoAway) is sent past any bound
        self.log.warn(
            "streamable-http {connection} to {peer}: {problem}",
            connection=self.connection_id.decode(), peer=self.peer, problem=message,
        )
        if self.link is not None:
            self.link.close(reason, message)
        else:
            self._shut(reason, message)

    def _shut(self, reason: Reason, message: str) -> None:
        """Stop everything; the link hears last, once every connection is closed."""
        if self.ended:
            return
        self.ended = True
        for call in (self._flush_call, self._ack_call, self._resume_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._ack_call = self._resume_call = None
        for post in self.in_flight:
            if post.retry is not None and post.retry.active():
                post.retry.cancel()
            if post.request is not None:
                post.request.cancel()
        self.in_flight.clear()
        self.queue.clear()
        if self._idle.running:
            self._idle.stop()
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)
        link = self.link
        ensureDeferred(self._drop()).addCallback(
            lambda _: link.wire_lost(reason, message) if link is not None else None
        )

    async def _drop(self) -> None:
        self.ended = True
        for request in list(self._requests):
            request.cancel()
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.abort()
        await self.connections.abort_all()
        # A connection handed back to the pool as it was aborted is cached
        # with a timer until this.
        await self.pool.closeCachedConnections()


def connect(options: StreamableHTTPAgentOptions, setup: AgentLinkSetup) -> Deferred[IAgentLink]:
    """ITransportPlugin.connect, for the plugin."""

    async def opened() -> IAgentLink:
        return await AgentConnection(options, setup).open()

    return ensureDeferred(opened())


__all__: list[str] = ["AgentConnection", "Backoff", "connect"]
