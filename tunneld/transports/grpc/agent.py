# -*- test-case-name: tests.test_grpc_transport,tests.test_grpc_calls,tests.test_grpc_e2e -*-
"""
The agent end of the gRPC transport: the C{TunnelAgent} client, which opens
the C{Control} call and keeps a pool of idle C{Forward} calls for the edge
to answer with an C{Open}.  The pool grows (doubling, up to
C{max_idle_forwards}) when the edge says it ran dry, shrinks by half after a
C{pool_shrink_interval} without that, and replaces calls that ended without
carrying a stream.  L{dial} connects (TCP, an HTTP CONNECT proxy, TLS with
ALPN C{h2}).
"""

from __future__ import annotations

from typing import Any

from h2 import events as h2events
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocolNegotiationFactory,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.interfaces import AgentLinkSetup
from tunneld.model.messages import ControlMessage, GoAway, Headers, Welcome
from tunneld.model.reasons import Reason
from tunneld.proxyconnect import ProxyConnectEndpoint
from tunneld.transports.grpc.framing import (
    _REUSE,
    CONTROL_PATH,
    FORWARD_PATH,
    GRPC_CONTENT_TYPE,
    IDLE_HEADER,
    REUSE_HEADER,
)
from tunneld.transports.grpc.link import GrpcLink
from tunneld.transports.grpc.options import GrpcAgentOptions, split_address
from tunneld.transports.grpc.status import GrpcStatus, reason_from_status, rst_code
from tunneld.transports.grpc.stream import GrpcStream, _Call
from tunneld.wire import codec
from tunneld.wire.codec import FrameError

__all__ = ["AgentGrpcFactory", "AgentGrpcLink", "dial"]


class AgentGrpcLink(GrpcLink):
    """The agent end: the gRPC client, with its pool of idle Forward calls."""

    is_edge = False

    def __init__(
        self, options: GrpcAgentOptions, setup: AgentLinkSetup, authority: str,
        opened: Deferred[AgentGrpcLink],
    ) -> None:
        super().__init__(options, setup)
        self.options = options
        self.setup = setup
        self.authority = authority.encode("ascii", "replace")
        self._forward_headers = self._request_headers(FORWARD_PATH) + _REUSE
        self.opened: Deferred[AgentGrpcLink] | None = opened
        self.idle: dict[int, _Call] = {}
        self.target = options.min_idle_forwards
        self.welcomed = False
        self.draining = False
        self._last_dry = setup.reactor.seconds()
        self._pool_timer: Any = None

    def local_settings(self) -> dict[SettingCodes | int, int]:
        settings = super().local_settings()
        settings[SettingCodes.ENABLE_PUSH] = 0
        return settings

    def _request_headers(self, path: bytes) -> tuple[tuple[bytes, bytes], ...]:
        return (
            (b":method", b"POST"),
            (b":scheme", b"https" if self.options.tls else b"http"),
            (b":path", path),
            (b":authority", self.authority),
            (b"content-type", GRPC_CONTENT_TYPE),
            (b"te", b"trailers"),
            (b"user-agent", b"tunneld-agent grpc/h2"),
        )

    def connection_started(self) -> None:
        sid = self.conn.get_next_available_stream_id()
        call = _Call(sid, "control")
        self.calls[sid] = call
        self.control = call
        self.send_headers(call, self._request_headers(CONTROL_PATH), False)
        self._pool_timer = self.reactor.callLater(self.options.pool_shrink_interval, self._tend_pool)

    def stop_timers(self) -> None:
        if self._pool_timer is not None and self._pool_timer.active():
            self._pool_timer.cancel()
        self._pool_timer = None

    def wire_lost(self, reason: Reason, message: str) -> None:
        opened, self.opened = self.opened, None
        if opened is not None and not opened.called:
            opened.errback(Failure(ConnectionError(f"gRPC link failed: {reason.value}: {message}")))
        super().wire_lost(reason, message)

    def _on_settings_changed(self, event: h2events.RemoteSettingsChanged) -> None:
        super()._on_settings_changed(event)
        opened, self.opened = self.opened, None
        if opened is not None:
            opened.callback(self)

    # -- the pool of idle Forward calls ----------------------------------------------

    def _open_forward(self) -> bool:
        conn = self.conn
        if conn.open_outbound_streams >= conn.remote_settings.max_concurrent_streams:
            return False
        try:
            sid = conn.get_next_available_stream_id()
        except H2ProtocolError:
            return False
        call = _Call(sid, "forward")
        call.headers_sent = True
        self.calls[sid] = call
        self.idle[sid] = call
        self.send_headers(call, self._forward_headers, False)
        return True

    def top_up(self) -> None:
        """Open idle Forward calls until the pool has its target size."""
        if self.closed or not self.welcomed or self.draining:
            return
        while len(self.idle) < self.target:
            if not self._open_forward():
                break
        self.flush()

    def _tend_pool(self) -> None:
        """
        Every C{pool_shrink_interval}: halve a target the edge has not needed
        lately, retire the calls beyond it, and replace calls lost since (a
        backstop: the edge can ask for calls only in a call's first headers,
        so a pool that emptied without Opens would otherwise stay empty).
        """
        self._pool_timer = None
        if self.closed:
            return
        now = self.reactor.seconds()
        interval = self.options.pool_shrink_interval
        if now - self._last_dry >= interval and self.target > self.options.min_idle_forwards:
            self.target = max(self.options.min_idle_forwards, self.target // 2)
        while len(self.idle) > self.target:
            sid = next(reversed(self.idle))
            call = self.idle.pop(sid)
            call.retiring = True
            self.end_request(call)
        self.top_up()
        self._pool_timer = self.reactor.callLater(interval, self._tend_pool)

    def _lost_idle(self, call: _Call, replace: bool) -> None:
        """
        An idle call ended without carrying an Open: replace it now if it
        ended cleanly (C{replace}); after an error the next L{_tend_pool}
        does, so that an edge refusing every call is not asked in a loop.
        """
        if self.idle.pop(call.stream_id, None) is not None and replace and not call.retiring:
            self.top_up()

    def _ran_dry(self) -> None:
        """The edge used its last idle call: grow the pool (up to max_idle_forwards)."""
        self._last_dry = self.reactor.seconds()
        self.target = min(self.options.max_idle_forwards, self.target * 2)

    def _took_idle(self, call: _Call) -> None:
        self.idle.pop(call.stream_id, None)
        if call.reuse:
            # Reused calls come back to the pool when their stream ends, so
            # new ones are opened only when the pool runs low; and the edge
            # says it ran dry only in a call's first response headers.
            if not self.idle:
                self._ran_dry()
            if len(self.idle) >= max(1, self.target // 2):
                return
        self.top_up()

    # -- responses from the edge ----------------------------------------------------

    def _on_response(self, event: h2events.ResponseReceived) -> None:
        call = self.calls.get(event.stream_id)
        if call is None:
            return
        headers = dict(event.headers)
        status = headers.get(b":status")
        if status != b"200" or not headers.get(b"content-type", b"").startswith(GRPC_CONTENT_TYPE):
            what = f"HTTP {status.decode('ascii', 'replace') if status else '?'}"
            if call.kind == "control":
                self.protocol_error(f"the edge answered Control with {what}")
            else:
                self._call_ended(call, GrpcStatus.UNKNOWN, what.encode())
            return
        if b"grpc-status" in headers:
            self._trailers(call, headers)
            return
        if call.kind == "forward":
            call.reuse = headers.get(REUSE_HEADER) == b"1"
            if headers.get(IDLE_HEADER) == b"0":
                self._ran_dry()

    def _on_trailers(self, event: h2events.TrailersReceived) -> None:
        call = self.calls.get(event.stream_id)
        if call is not None:
            self._trailers(call, dict(event.headers))

    def _trailers(self, call: _Call, headers: dict[bytes, bytes]) -> None:
        try:
            status = int(headers.get(b"grpc-status", b"2"))
        except ValueError:
            status = GrpcStatus.UNKNOWN
        self._call_ended(call, status, headers.get(b"grpc-message", b""))

    def _call_ended(self, call: _Call, status: int, message: bytes) -> None:
        """The edge finished a call (trailers, possibly trailers-only)."""
        if call.kind == "control":
            if status == GrpcStatus.OK:
                reason, text = Reason.AGENT_GONE, "the edge ended the Control call"
            else:
                reason, text = reason_from_status(status, message)
            self.log.info(
                "edge {peer} ended the link: {reason}: {message}",
                peer=self.peer, reason=reason.value, message=text,
            )
            self.close(reason, text)
            return
        self._lost_idle(call, replace=status == GrpcStatus.OK)
        stream = call.stream
        if stream is not None and not stream.closed:
            if status == GrpcStatus.OK:
                stream.remote_reset(Reason.PROTOCOL_ERROR, "the edge ended the call without End")
            else:
                stream.remote_reset(*reason_from_status(status, message))
        elif stream is None and status != GrpcStatus.OK and not call.retiring:
            reason, text = reason_from_status(status, message)
            self.log.warn(
                "edge {peer} refused a Forward call: {reason}: {message}",
                peer=self.peer, reason=reason.value, message=text,
            )
        if not call.local_closed:
            call.drop_outbox()
            self.end_request(call)

    def _on_stream_ended(self, event: h2events.StreamEnded) -> None:
        call = self.calls.get(event.stream_id)
        if call is None:
            return
        call.remote_closed = True
        if not call.local_closed:
            call.drop_outbox()
            self.end_request(call)
        self.maybe_forget_call(call)

    def call_reset(self, call: _Call, code: int) -> None:
        self._lost_idle(call, replace=False)
        if call.kind == "control":
            self._lost_reason = (Reason.AGENT_GONE, "the edge reset the Control call")
            self.close(Reason.AGENT_GONE, "the edge reset the Control call")
            return
        super().call_reset(call, code)

    # -- messages ------------------------------------------------------------------

    def control_received(self, message: ControlMessage) -> None:
        if isinstance(message, Welcome) and not self.welcomed:
            self.welcomed = True
            super().control_received(message)
            self.top_up()
            return
        if isinstance(message, GoAway):
            self.draining = True
        super().control_received(message)

    def forward_data(self, call: _Call, data: bytes | memoryview) -> None:
        stream = call.stream
        if stream is None:
            if call.retiring:
                return  # the edge replays the stream elsewhere
            raise FrameError("data on a Forward call before Open")
        if stream.closed:
            return
        if stream.remote_ended:
            raise FrameError("a message after End")
        stream.deliver("data_received", data)

    def forward_frame(self, call: _Call, frame: tuple[int, int, Any, bool]) -> None:
        stream = call.stream
        _, kind, body, end_stream = frame
        if stream is None:
            if call.retiring:
                return  # the edge replays it elsewhere
            if kind == codec.RESET and call.reuse:
                # The edge reset the last stream as it ended here (they
                # crossed): nothing to reset, but a Reset ends the call.
                self._lost_idle(call, replace=True)
                call.retiring = True
                self.end_request(call)
                return
            if kind != codec.OPEN:
                raise FrameError(f"{codec.KIND_NAMES[kind]} on a Forward call before Open")
            head = body
            stream = GrpcStream(self, head, call)
            call.stream = stream
            self.streams[call.stream_id] = stream
            self._took_idle(call)
            self.hand_over(stream, end_stream)
            return
        if stream.closed:
            return
        if kind == codec.RESET:
            # Also after End: the edge's client may go away mid-response.
            reason, message = body
            stream.remote_reset(reason, message)
            call.drop_outbox()
            self.end_request(call)
            return
        if stream.remote_ended:
            raise FrameError("a message after End")
        if kind == codec.DATA:
            stream.deliver("data_received", body)
            if end_stream and not stream.closed:
                self._remote_end(call, stream, ())
        elif kind == codec.END:
            self._remote_end(call, stream, body)
        else:
            raise FrameError(f"the edge may not send {codec.KIND_NAMES[kind]} on a Forward call")

    def forward_end(self, call: _Call, trailers: Headers) -> None:
        stream = call.stream
        if stream is None:
            if call.retiring:
                return  # the edge replays it elsewhere
            raise FrameError("end on a Forward call before Open")
        if stream.closed:
            return
        if stream.remote_ended:
            raise FrameError("a message after End")
        self._remote_end(call, stream, trailers)

    def _remote_end(self, call: _Call, stream: GrpcStream, trailers: Headers) -> None:
        stream.remote_end(trailers)
        if call.reuse and stream.local_ended:
            self._stream_done(call, stream)

    def refuse_call(self, call: _Call, status: GrpcStatus, message: str) -> None:
        self._lost_idle(call, replace=True)
        self.rst(call, ErrorCodes.PROTOCOL_ERROR)

    def stream_local_end(self, stream: GrpcStream) -> None:
        call = stream.call
        if call is not None and not call.reuse:
            self.end_request(call)
        stream.maybe_done()
        if call is not None and call.reuse and stream.remote_ended:
            self._stream_done(call, stream)

    def _stream_done(self, call: _Call, stream: GrpcStream) -> None:
        """End both ways on a reusable call: it goes back to the pool (or is half-closed)."""
        if self.release(call, stream):
            self.idle[call.stream_id] = call
        else:
            self.end_request(call)

    def stream_local_reset(self, stream: GrpcStream, reason: Reason, message: str) -> None:
        call = stream.call
        if call is None:
            return
        if call.reuse and stream.local_ended:
            # After our End the edge may count the stream done and have put
            # the next one's Open on this call already: a Reset message
            # would read as that stream's.  RST_STREAM is unambiguous (the
            # edge replays an Open not yet answered).
            self.rst(call, rst_code(reason))
            return
        if self.send_reset(call, reason, message):
            self.end_request(call)


@implementer(IOpenSSLClientConnectionCreator)
class _OfferingH2:
    """
    A client TLS connection creator whose connections offer ALPN C{h2}.

    Twisted before 26.4 applies a factory's C{acceptableProtocols} to the
    context after the connection is made from it, which OpenSSL ignores: the
    agent then offered no ALPN, and the edge negotiated none.  Setting it on
    each connection (pyOpenSSL's public C{set_alpn_protos}) works on every
    Twisted in range.
    """

    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        self._creator = creator

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:  # noqa: N802, N803
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        connection.set_alpn_protos([b"h2"])
        return connection


@implementer(IProtocolNegotiationFactory)
class AgentGrpcFactory(Factory):
    """Makes the one L{AgentGrpcLink} of a dial; offers ALPN C{h2}."""

    noisy = False  # the agent logs each dial itself

    def __init__(
        self, options: GrpcAgentOptions, setup: AgentLinkSetup, authority: str,
        opened: Deferred[AgentGrpcLink],
    ) -> None:
        self.options = options
        self.setup = setup
        self.authority = authority
        self.opened = opened

    def acceptableProtocols(self) -> list[bytes]:  # noqa: N802
        """IProtocolNegotiationFactory.acceptableProtocols"""
        return [b"h2"]

    def buildProtocol(self, addr: Any) -> AgentGrpcLink:  # noqa: N802
        link = AgentGrpcLink(self.options, self.setup, self.authority, self.opened)
        link.factory = self
        return link


def _endpoint_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def dial(options: GrpcAgentOptions, setup: AgentLinkSetup) -> Deferred[AgentGrpcLink]:
    """Dial the edge: fires with the link once HTTP/2 is up and Control is open."""
    address = split_address(options.address)
    if address is None:
        raise ValueError(f"bad gRPC address {options.address!r}")
    host, port = address
    timeout = max(1, int(options.connect_timeout + 0.999))
    endpoint: Any
    if setup.proxy is not None:
        endpoint = ProxyConnectEndpoint(setup.reactor, setup.proxy, host, port, timeout)
    else:
        endpoint = clientFromString(
            setup.reactor, f"tcp:host={_endpoint_escape(host)}:port={port}:timeout={timeout}"
        )
    if options.tls:
        from twisted.internet.ssl import optionsForClientTLS

        creator = setup.tls_for(host) if setup.tls_for else optionsForClientTLS(host)
        endpoint = wrapClientTLS(_OfferingH2(creator), endpoint)
    opened: Deferred[AgentGrpcLink] = Deferred()
    factory = AgentGrpcFactory(options, setup, options.address, opened)
    connected: list[Any] = []

    def too_slow() -> None:
        if not opened.called:
            opened.errback(
                Failure(TimeoutError(f"no HTTP/2 connection to {options.address} in time"))
            )
            for protocol in connected:
                if protocol.transport is not None:
                    protocol.transport.abortConnection()

    timer = setup.reactor.callLater(options.connect_timeout, too_slow)

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    opened.addBoth(done)

    def failed(failure: Failure) -> None:
        if not opened.called:
            opened.errback(failure)

    connecting = endpoint.connect(factory)
    connecting.addCallbacks(connected.append, failed)
    return opened
