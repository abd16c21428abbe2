# -*- test-case-name: tests.test_streamable_http -*-
"""
The edge's agent endpoint: one HTTP/1.1 listener, one path, four requests.

  - C{POST} without a connection id initialises: the edge becomes the
    connection's owner (it holds the link; see L{owner}), answers 201 with
    C{Tunnel-Connection-Id}, or refuses with a named reason (503 and
    C{Tunnel-Error: cap_reached} past C{max_connections}, 503 draining);
  - C{GET} with the id is the event stream (L{streams}), resumed after
    C{Last-Event-ID};
  - C{POST} with the id carries a batch of frames (202);
  - C{DELETE} with the id ends the connection.

A request for a connection another edge owns (behind a load balancer without
stickiness) is served here through the state backend: its frames are
relayed to the owner, its event stream is read from the events log.

Every request has C{request_timeout} to arrive whole, bodies are capped at
C{max_post_bytes}, and an idle keep-alive connection is closed after
C{idle_timeout}.  Refusals name their reason to the agent (status,
C{Tunnel-Error}, a one-line body) and to the log with context; an internal
error gets 500 and an incident number, its details go to the log only.
"""

from __future__ import annotations

import hashlib
import io
import secrets
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import http

from tunneld.interfaces import EdgeLinkSetup, IStateBackend, StateUnavailable
from tunneld.listening import ConnectionTracker, ListeningService, address_text
from tunneld.model.reasons import Reason
from tunneld_streamable_http import store
from tunneld_streamable_http.framing import (
    ACK,
    CONNECTION_ID,
    ERROR,
    LAST_EVENT_ID,
    MAX_POST,
    SEQ,
    BatchError,
    decode_batch,
)
from tunneld_streamable_http.options import StreamableHTTPEdgeOptions
from tunneld_streamable_http.owner import LOG_TTL, RECORD_TTL, OwnedConnection
from tunneld_streamable_http.streams import (
    RELAY_MAX_ENTRIES,
    EventStream,
    LocalEventStream,
    RemoteEventStream,
)

# Statuses for a connection refused as it initialises, by the link's reason.
_INIT_STATUS = {Reason.PROTOCOL_ERROR: 400, Reason.BAD_REQUEST: 400}


class Refused(Exception):
    """A request the endpoint turns away: what the agent is told, and what the log adds."""

    def __init__(self, status: int, reason: Reason | None, text: str, detail: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.text = text
        self.detail = detail or text


def _number(request: http.Request, name: bytes, default: int | None) -> int:
    raw = request.getHeader(name)
    if raw is None:
        if default is None:
            raise Refused(400, Reason.BAD_REQUEST, f"{name.decode()} is missing")
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise Refused(400, Reason.BAD_REQUEST, f"{name.decode()} is not a number: {raw[:40]!r}")
    return int(raw)


class TunnelRequest(http.Request):
    """One request on the agent endpoint: a capped body, then the endpoint's handler."""

    channel: TunnelChannel
    content: io.BytesIO

    def __init__(self, channel: Any, queued: Any = http._QUEUED_SENTINEL) -> None:
        super().__init__(channel, queued)
        self.size = 0
        self.refused = False
        self.gone = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        """Request.gotLength: bodies stay in memory, under C{max_post_bytes}."""
        self.content = io.BytesIO()
        if length is not None and length > self.channel.endpoint.max_post_bytes:
            self._too_large(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self.refused:
            return
        self.size += len(data)
        if self.size > self.channel.endpoint.max_post_bytes:
            self._too_large(self.size)
            return
        self.content.write(data)

    def _too_large(self, size: int) -> None:
        self.refused = True
        limit = self.channel.endpoint.max_post_bytes
        self.channel.refuse_raw(
            413, "Payload Too Large", f"a body of {size} bytes exceeds max_post_bytes ({limit})"
        )

    def process(self) -> None:
        """Request.process: the whole request is here."""
        self.channel.request_complete()
        if self.refused:
            return
        self.notifyFinish().addErrback(self._lost)
        self.channel.endpoint.handle(self)

    def _lost(self, failure: Failure) -> None:
        self.gone = True

    @property
    def answerable(self) -> bool:
        return not self.finished and not self.gone


class TunnelChannel(http.HTTPChannel):
    """
    HTTP/1.1 for agents: twisted.web's parser, plus a deadline for each
    request to arrive whole (the idle timeout alone is reset by every byte
    of a slow sender).
    """

    factory: TunnelHTTPFactory
    endpoint: EdgeEndpoint
    transport: Any
    _deadline: Any = None
    _receiving = False

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self.factory.tracker.add(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self._receiving and data:
            self._receiving = True
            self._deadline = self.endpoint.reactor.callLater(
                self.endpoint.options.request_timeout, self._too_slow
            )
        super().dataReceived(data)

    def request_complete(self) -> None:
        self._receiving = False
        self._cancel_deadline()

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self) -> None:
        self._deadline = None
        timeout = self.endpoint.options.request_timeout
        self.endpoint.log.info(
            "streamable-http request from {peer} did not arrive whole within {timeout}s",
            peer=address_text(self.transport.getPeer()), timeout=timeout,
        )
        self.refuse_raw(408, "Request Timeout", f"the request did not arrive within {timeout}s")

    def refuse_raw(self, status: int, phrase: str, text: str) -> None:
        """Answer a request that never reached the handler, and close the connection."""
        body = (text + "\n").encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Tunnel-Error: bad_request\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, phrase.encode(), len(body), body)
        )
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._cancel_deadline()
        super().connectionLost(reason)
        self.factory.tracker.remove(self)

    def shutdown(self, reason: Reason, message: str) -> None:
        """Closable.shutdown: the edge is stopping."""
        self.transport.loseConnection()


class TunnelHTTPFactory(Factory):
    """Makes the endpoint's channels and tracks them (stopping the listener closes them)."""

    noisy = False

    def __init__(self, endpoint: EdgeEndpoint) -> None:
        self.endpoint = endpoint
        self.tracker = ConnectionTracker()

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        channel = TunnelChannel()
        channel.factory = self
        channel.endpoint = self.endpoint
        channel.requestFactory = TunnelRequest  # type: ignore[assignment]
        channel.timeOut = self.endpoint.options.idle_timeout  # type: ignore[assignment]
        return channel

    def log(self, request: Any) -> None:
        """HTTPChannel's access-log hook: the endpoint logs what matters itself."""


def _peer(request: http.Request) -> str:
    return address_text(request.getClientAddress())


def _certificate(request: http.Request) -> Any:
    get = getattr(request.channel.transport, "getPeerCertificate", None)
    return get() if get is not None else None


def fingerprint(certificate: Any) -> str:
    """SHA-256 of a certificate's DER form, hex ('' for none)."""
    if certificate is None:
        return ""
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(certificate.to_cryptography().public_bytes(Encoding.DER)).hexdigest()


class EdgeEndpoint(ListeningService):
    """The streamable-HTTP transport's edge service; see the module docstring."""

    log = Logger()

    def __init__(self, options: StreamableHTTPEdgeOptions, setup: EdgeLinkSetup) -> None:
        if setup.state is None:
            raise ValueError(
                "the streamable-http transport needs the edge's state backend (EdgeLinkSetup.state)"
            )
        self.options = options
        self.setup = setup
        self.state: IStateBackend = setup.state
        self.edge_id = secrets.token_hex(8)
        self.max_post_bytes = max(options.max_post_bytes, setup.max_frame_size + 64)
        self.connections: dict[str, OwnedConnection] = {}
        self.streams: set[EventStream] = set()
        self.accepting = True
        self._expiring: list[tuple[float, str]] = []
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = setup.reactor
        self.tick_interval = min(
            0.5, options.keepalive_interval / 4, options.stall_timeout / 4,
            options.subscribe_timeout / 4, options.reorder_timeout / 4,
        )
        factory: Any = TunnelHTTPFactory(self)
        if setup.tls is not None:
            factory = TLSMemoryBIOFactory(setup.tls, False, factory)
        super().__init__(setup.reactor, options.listen, factory, "streamable-http agent link")
        self.setName("transport:streamable-http")

    # -- requests ----------------------------------------------------------

    def handle(self, request: TunnelRequest) -> None:
        d = ensureDeferred(self._handle(request))
        d.addErrback(self._request_failed, request)

    async def _handle(self, request: TunnelRequest) -> None:
        try:
            if request.path != self.options.path.encode():
                raise Refused(404, None, "no agent endpoint at this path")
            connection_id = request.getHeader(CONNECTION_ID)
            method = request.method
            if method == b"POST":
                if connection_id is None:
                    await self._initialise(request)
                else:
                    await self._frames(request, connection_id.decode("ascii", "replace"))
            elif connection_id is None:
                raise Refused(400, Reason.BAD_REQUEST, f"{CONNECTION_ID.decode()} is missing")
            elif method == b"GET":
                await self._events(request, connection_id.decode("ascii", "replace"))
            elif method == b"DELETE":
                await self._delete(request, connection_id.decode("ascii", "replace"))
            else:
                request.setHeader(b"Allow", b"GET, POST, DELETE")
                raise Refused(405, Reason.BAD_REQUEST, "this endpoint takes GET, POST and DELETE")
        except Refused as refused:
            self.refuse(request, refused)
        except StateUnavailable as e:
            self.log.warn(
                "streamable-http {method} from {peer}: the state store is unreachable: {error}",
                method=request.method.decode("ascii", "replace"), peer=_peer(request), error=str(e),
            )
            self.refuse(request, Refused(
                503, None, "the edge cannot reach its shared state now; try again"
            ), logged=True)

    def refuse(self, request: TunnelRequest, refused: Refused, logged: bool = False) -> None:
        if not logged:
            self.log.info(
                "streamable-http {method} from {peer} refused: {status} {detail}",
                method=request.method.decode("ascii", "replace"), peer=_peer(request),
                status=refused.status, detail=refused.detail,
                reason=refused.reason.value if refused.reason else "",
            )
        self.answer(request, refused.status, (refused.text + "\n").encode(), refused.reason)

    def answer(
        self, request: TunnelRequest, status: int, body: bytes = b"", reason: Reason | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        if not request.answerable:
            return
        request.setResponseCode(status)
        request.setHeader(b"Cache-Control", b"no-store")
        if body:
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if reason is not None:
            request.setHeader(ERROR, reason.value.encode())
        for name, value in headers:
            request.setHeader(name, value)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _request_failed(self, failure: Failure, request: TunnelRequest) -> None:
        """An error nobody expected: its details to the log, an incident number to the agent."""
        incident = secrets.token_hex(4)
        self.log.failure(
            "streamable-http {method} {path} from {peer} failed (incident {incident})",
            failure, method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"), peer=_peer(request), incident=incident,
        )
        self.answer(request, 500, f"internal error (incident {incident})\n".encode())

    async def _initialise(self, request: TunnelRequest) -> None:
        peer = _peer(request)
        if not self.accepting:
            raise Refused(503, Reason.DRAINING, "the edge is shutting down")
        options = self.options
        if len(self.connections) >= options.max_connections:
            detail = (
                f"this edge holds its maximum of {options.max_connections} agent connections "
                "(max_connections)"
            )
            self.log.warn(
                "streamable-http initialise from {peer} refused: {reason}: {detail}",
                peer=peer, reason=Reason.CAP_REACHED.value, detail=detail,
            )
            self.answer(request, 503, (detail + "\n").encode(), Reason.CAP_REACHED)
            return
        first_seq = _number(request, SEQ, 1)
        frames = self._batch(request)
        certificate = _certificate(request)
        prints = fingerprint(certificate)
        connection_id = secrets.token_urlsafe(18)
        record = store.ConnectionRecord(self.edge_id, prints)
        granted = await self.state.put_record(
            store.NS_CONNECTION, connection_id, record.encode(), RECORD_TTL, True
        )
        if not granted:  # 144 random bits collided: never; but never trust never
            raise Refused(503, None, "try again")
        connection = OwnedConnection(self, connection_id, peer, certificate, prints)
        self.connections[connection_id] = connection
        connection.start()
        self._tick_soon()
        self.log.info(
            "streamable-http connection {connection} opened from {peer}",
            connection=connection_id, peer=peer,
        )
        self.setup.on_link(connection.link)
        if frames and not connection.finishing:
            connection.frames_arrived(first_seq, frames)
        if connection.finishing:
            reason, message = connection.close_reason
            self.answer(
                request, _INIT_STATUS.get(reason, reason.http_status),
                f"{reason.value}: {message}\n".encode(), reason,
            )
            return
        self.answer(request, 201, headers=[
            (CONNECTION_ID, connection_id.encode()), (MAX_POST, b"%d" % self.max_post_bytes),
        ])

    def _batch(self, request: TunnelRequest) -> list[memoryview]:
        try:
            return decode_batch(request.content.getvalue(), self.setup.max_frame_size)
        except BatchError as e:
            raise Refused(400, Reason.PROTOCOL_ERROR, f"malformed batch of frames: {e}") from None

    def _local(self, request: TunnelRequest, connection_id: str) -> OwnedConnection | None:
        connection = self.connections.get(connection_id)
        if connection is not None and connection.fingerprint != fingerprint(_certificate(request)):
            raise Refused(
                403, Reason.UNAUTHORIZED,
                "this connection was opened with another client certificate",
            )
        return connection

    async def _record(self, request: TunnelRequest, connection_id: str) -> store.ConnectionRecord:
        """The record of a connection another edge owns, or the refusal for it."""
        if len(connection_id) > 64:
            raise Refused(404, None, "no such connection")
        raw = await self.state.get_record(store.NS_CONNECTION, connection_id)
        if raw is None:
            raise Refused(404, None, "no such connection (it ended long ago, or never existed)")
        try:
            record = store.ConnectionRecord.decode(raw)
        except ValueError:
            raise Refused(404, None, "no such connection") from None
        if record.closed:
            reason = Reason(record.closed_reason) if record.closed_reason in Reason._value2member_map_ else None
            raise Refused(
                410, reason, f"the connection is closed: {record.closed_reason}: {record.closed_message}"
            )
        if record.fingerprint != fingerprint(_certificate(request)):
            raise Refused(
                403, Reason.UNAUTHORIZED,
                "this connection was opened with another client certificate",
            )
        return record

    async def _frames(self, request: TunnelRequest, connection_id: str) -> None:
        first_seq = _number(request, SEQ, None)
        ack = _number(request, ACK, 0)
        frames = self._batch(request)
        connection = self._local(request, connection_id)
        if connection is not None:
            connection.acknowledged(ack)
            if frames:
                connection.frames_arrived(first_seq, frames)
            if connection.finishing:
                reason, message = connection.close_reason
                raise Refused(410, reason, f"the connection is closed: {reason.value}: {message}")
            self.answer(request, 202)
            return
        await self._record(request, connection_id)
        await self.state.append_log(
            store.NS_RELAY, connection_id,
            store.relayed_frames(first_seq, ack, request.content.getvalue()),
            RELAY_MAX_ENTRIES, LOG_TTL,
        )
        self.answer(request, 202)

    async def _events(self, request: TunnelRequest, connection_id: str) -> None:
        after = _number(request, LAST_EVENT_ID, 0)
        connection = self._local(request, connection_id)
        stream: EventStream
        if connection is not None:
            if connection.finishing:
                reason, message = connection.close_reason
                raise Refused(410, reason, f"the connection is closed: {reason.value}: {message}")
            stream = LocalEventStream(self, request, connection, after)
            problem = connection.subscribe(stream, after)
            if problem is not None:
                raise Refused(410, None, f"cannot resume: {problem}")
            self._tick_soon()
            stream.open()
            stream.pull()
            return
        await self._record(request, connection_id)
        read = await self.state.read_log(store.NS_EVENTS, connection_id, str(after), 64)
        fresh = [store.read_event(entry.data)[0] for entry in read.entries]
        fresh = [number for number in fresh if number > after]
        if (fresh and fresh[0] != after + 1) or (not read.complete and not read.entries):
            raise Refused(410, None, f"cannot resume after event {after}: it is no longer kept")
        if not request.answerable:
            return
        stream = RemoteEventStream(self, request, connection_id, after, str(after), list(read.entries))
        self._tick_soon()
        stream.open()

    async def _delete(self, request: TunnelRequest, connection_id: str) -> None:
        connection = self._local(request, connection_id)
        if connection is not None:
            if not connection.finishing:
                connection._apply(store.Relayed("delete"))
            self.answer(request, 204)
            return
        await self._record(request, connection_id)
        await self.state.append_log(
            store.NS_RELAY, connection_id, store.RELAYED_DELETE, RELAY_MAX_ENTRIES, LOG_TTL
        )
        self.answer(request, 202)

    # -- what connections and streams ask of the edge -----------------------

    def relay(self, connection_id: str, entry: bytes) -> None:
        """Tell the owner of C{connection_id} something (a stream's lease), best effort."""
        d = self.state.append_log(
            store.NS_RELAY, connection_id, entry, RELAY_MAX_ENTRIES, LOG_TTL
        )
        d.addErrback(lambda f: self.log.info(
            "streamable-http connection {connection}: cannot reach its owner: {error}",
            connection=connection_id, error=f.getErrorMessage(),
        ))

    def put_record(self, connection_id: str, record: store.ConnectionRecord, ttl: float) -> None:
        d = self.state.put_record(store.NS_CONNECTION, connection_id, record.encode(), ttl)
        d.addErrback(lambda f: self.log.info(
            "streamable-http connection {connection}: cannot refresh its record: {error}",
            connection=connection_id, error=f.getErrorMessage(),
        ))

    def forget(self, connection: OwnedConnection) -> None:
        """The connection is closing: no new request may reach it here."""
        if self.connections.get(connection.id) is connection:
            del self.connections[connection.id]

    def closed(self, connection: OwnedConnection, reason: Reason, message: str) -> None:
        """The connection is gone: its record says why for a while, its logs go."""
        self.forget(connection)
        self.log.info(
            "streamable-http connection {connection} closed: {reason}: {detail}",
            connection=connection.id, reason=reason.value, detail=message,
        )
        record = store.ConnectionRecord("", connection.fingerprint, reason.value, message)
        self.put_record(connection.id, record, self.options.closed_ttl)
        state = self.state
        state.delete_log(store.NS_RELAY, connection.id).addErrback(lambda _: None)
        # Streams on other edges may still be reading the close event.
        self._expiring.append((self.reactor.seconds() + self.options.closed_ttl, connection.id))
        self._tick_soon()

    # -- upkeep --------------------------------------------------------------

    def _tick_soon(self) -> None:
        if not self._ticker.running and self.running:
            self._ticker.start(self.tick_interval, now=False)

    def _tick(self) -> None:
        now = self.reactor.seconds()
        for connection in list(self.connections.values()):
            connection.tick(now)
        for stream in list(self.streams):
            stream.tick(now)
        while self._expiring and self._expiring[0][0] <= now:
            _, connection_id = self._expiring.pop(0)
            self.state.delete_log(store.NS_EVENTS, connection_id).addErrback(lambda _: None)
        if not (self.connections or self.streams or self._expiring) and self._ticker.running:
            self._ticker.stop()

    # -- lifecycle ---------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """
        This edge's table of the transport, for the admin API
        (C{/api/transports}) and C{tunneld status}: the connections it owns
        (where their frames are numbered, held and acknowledged) and the
        event streams it holds (a GET may land on any edge of a cluster).
        """
        now = self.reactor.seconds()
        connections = []
        for connection in self.connections.values():
            local = connection.local
            connections.append({
                "connection": connection.id,
                "peer": connection.peer,
                "edge": self.edge_id,
                "event_stream": "here" if local is not None and not local.done else (
                    f"{len(connection.leases)} elsewhere" if connection.leases else "none"
                ),
                "unsubscribed_s": None if connection.unsubscribed_since is None
                else round(now - connection.unsubscribed_since, 1),
                "next_event": connection.next_event,
                "acked": connection.acked,
                "held_events": connection.held_events,
                "held_bytes": connection.held_bytes,
                "early_bytes": connection.early_bytes,
                "duplicates": connection.duplicates,
                "closing": connection.closing,
                "streams": connection.link.active_streams(),
            })
        streams = [
            {
                "connection": stream.connection_id,
                "stream": stream.stream_id,
                "owned_here": stream.connection_id in self.connections,
                "last_sent": stream.last_sent,
                "age_s": round(now - stream.started, 1),
                "paused": stream.paused,
            }
            for stream in self.streams if not stream.done
        ]
        return {"edge": self.edge_id, "connections": connections, "event_streams": streams}

    def stop_accepting(self) -> Deferred[None]:
        """
        The edge drains: new connections are refused with draining; the
        listener stays, for the connections already up (their event
        streams and POSTs arrive on new HTTP connections).
        """
        self.accepting = False
        return succeed(None)

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        self.accepting = False
        for connection in list(self.connections.values()):
            connection.link.close(Reason.DRAINING, "the edge is stopping")
        for stream in list(self.streams):
            stream.end("the edge is stopping")
        stopped = super().stopService()

        def cleaned(result: Any) -> Any:
            if self._ticker.running:
                self._ticker.stop()
            expiring, self._expiring = self._expiring, []
            for _, connection_id in expiring:
                self.state.delete_log(store.NS_EVENTS, connection_id).addErrback(
                    lambda _: None
                )
            return result

        return stopped.addBoth(cleaned)
