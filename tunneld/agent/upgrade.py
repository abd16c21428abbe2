# -*- test-case-name: tests.test_upstream -*-
"""
The agent's side of a protocol switch (WebSocket or any HTTP/1.1 C{Upgrade}).

A stream of kind C{"upgrade"} gets a dedicated upstream connection, never
pooled.  The request goes out framed by C{h11}; the upstream's answer comes
back through C{h11} too.  A C{101 Switching Protocols} is relayed as the
stream's reply and from then on the connection is a pipe: raw bytes both
ways, each side the other's push producer, and an end is a TCP half-close.
Any other answer is relayed as an ordinary HTTP response and ends the
stream.  Subprotocols and extensions (permessage-deflate) are whatever the
client and the upstream agree in their headers: nothing here reads them.
"""

from __future__ import annotations

import functools
from typing import cast

import h11
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.agent.exchange import (
    HOP_BY_HOP,
    UpstreamConnection,
    UpstreamExchange,
    UpstreamFactory,
    UpstreamSettings,
    UpstreamTransport,
)
from tunneld.interfaces import IStream, IStreamReceiver, IUpstream
from tunneld.model.messages import Headers, ReplyHead
from tunneld.model.reasons import Reason

__all__ = ["UpgradeRelays"]

# Hop-by-hop response fields that do not describe the switch itself.
_HOP_BY_HOP = HOP_BY_HOP - {b"upgrade"}


def _reply_headers(response: h11.Response | h11.InformationalResponse) -> list[tuple[bytes, bytes]]:
    """The upstream's answer headers, hop-by-hop ones (but C{Upgrade}) removed."""
    drop = set(_HOP_BY_HOP)
    for name, value in response.headers:
        if name == b"connection":
            drop |= {t.strip().lower() for t in value.split(b",") if t.strip()} - {b"upgrade"}
    return [(n, v) for n, v in response.headers.raw_items() if n.lower() not in drop]


@implementer(IHalfCloseableProtocol)
class _UpgradeConnection(UpstreamConnection):
    """The dedicated upstream connection of one relay; it only passes events on."""

    def __init__(self, relay: _UpgradeRelay) -> None:
        super().__init__()
        self.relay = relay

    def dataReceived(self, data: bytes) -> None:
        self.relay.upstream_data(data)

    def readConnectionLost(self) -> None:
        """IHalfCloseableProtocol.readConnectionLost"""
        self.relay.upstream_ended()

    def writeConnectionLost(self) -> None:
        """IHalfCloseableProtocol.writeConnectionLost"""

    def upstream_closed(self, reason: Failure) -> None:
        self.relay.upstream_lost(reason)


@implementer(IStreamReceiver, IPushProducer)
class _UpgradeRelay(UpstreamExchange):
    """
    One upgrade stream and its upstream connection.

    The receiver of the stream (client bytes arrive here) and the producer
    registered on the upstream socket (a full socket pauses the stream).
    """

    # One per tunneled WebSocket the agent holds, often for hours.
    __slots__ = (
        "_parser", "_conn", "_sock", "_request",
        "_pending", "_client_ended", "_switched", "_declined", "_upstream_ended", "_done",
    )

    def __init__(self, pool: UpstreamSettings, stream: IStream) -> None:
        super().__init__(pool, stream)
        self._parser = h11.Connection(h11.CLIENT)
        self._conn: _UpgradeConnection | None = None
        self._sock: UpstreamTransport | None = None
        self._request: list[bytes] = []  # the request head, until connected
        self._pending: list[bytes] = []  # client bytes before the connection exists
        self._client_ended = False
        self._switched = False  # the 101 was relayed: raw bytes
        self._declined = False  # an ordinary response is being relayed
        self._upstream_ended = False
        self._done = False

    # -- starting ---------------------------------------------------------

    def start(self) -> None:
        if self._done:
            return
        head = self._stream.head
        headers = list(head.headers)
        if not any(name.lower() == b"host" for name, _ in headers):
            headers.insert(0, (b"Host", head.tunnel.partition("/")[0].encode("ascii")))
        try:
            request = h11.Request(
                method=head.method.encode("ascii"), target=head.target.encode("ascii"),
                headers=headers,
            )
            pieces = list(self._parser.send_with_data_passthrough(request) or ())
            pieces += self._parser.send_with_data_passthrough(h11.EndOfMessage()) or ()
        except (h11.LocalProtocolError, UnicodeError) as error:
            self._bad_request(error)
            return
        self._request = pieces
        # The request is built: a WebSocket held open for hours need not
        # keep its header fields (about 1 KiB) all that time.
        self._stream.head = head.without_headers()
        # Hold the client's bytes at the edge until the upstream is there.
        self._stream.pauseProducing()
        self._dial(UpstreamFactory(functools.partial(_UpgradeConnection, self)))

    def _connected(self, conn: _UpgradeConnection) -> None:
        if self._done:
            conn.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._conn = conn
        sock = self._sock = cast(UpstreamTransport, conn.transport)
        request, self._request = self._request, []
        sock.writeSequence(request)
        pending, self._pending = self._pending, []
        if pending:
            sock.writeSequence(pending)
        if self._client_ended:
            sock.loseWriteConnection()
        else:
            sock.registerProducer(self, True)
        self._stream.registerProducer(cast(IPushProducer, sock), True)
        self._stream.resumeProducing()
        self._arm_timer(self._pool.response_timeout)

    def _timed_out(self) -> None:
        self._no_response()

    # -- IStreamReceiver: from the client ----------------------------------

    def reply_received(self, reply: ReplyHead) -> None:
        """L{IStreamReceiver}: never sent to the agent side; ignored."""

    def data_received(self, data: bytes) -> None:
        """L{IStreamReceiver}: client bytes, passed on raw."""
        if self._done or self._client_ended:
            return
        sock = self._sock
        if sock is None:
            self._pending.append(data)
        elif not self._declined:
            sock.write(data)

    def end_received(self, trailers: Headers) -> None:
        """L{IStreamReceiver}: the client half-closed."""
        if self._done or self._client_ended:
            return
        self._client_ended = True
        sock = self._sock
        if sock is None or self._declined:
            return
        sock.unregisterProducer()
        sock.loseWriteConnection()
        if self._upstream_ended:
            self._finish()

    def reset_received(self, reason: Reason, message: str) -> None:
        """L{IStreamReceiver}: the edge gave up; drop the upstream connection."""
        if self._done:
            return
        self._log_edge_reset(reason, message)
        self._done = True
        self._teardown()

    # -- IPushProducer: the upstream socket's view of the client bytes ------

    def pauseProducing(self) -> None:
        """L{IPushProducer}: the upstream socket is full; pause the stream."""
        if not self._done:
            self._stream.pauseProducing()

    def resumeProducing(self) -> None:
        """L{IPushProducer}: the upstream socket drained; resume the stream."""
        if not self._done:
            self._stream.resumeProducing()

    def stopProducing(self) -> None:
        """L{IPushProducer}: the socket is closing; its connectionLost says why."""

    # -- from the upstream --------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        if self._done:
            return
        if self._switched:
            self._stream.write(data)
            return
        parser = self._parser
        try:
            parser.receive_data(data)
            self._pump()
        except h11.RemoteProtocolError as error:
            self._malformed(error)

    def _pump(self) -> None:
        parser = self._parser
        stream = self._stream
        while not self._done and not self._switched:
            event = parser.next_event()
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._switch(event)
                # 100 Continue and the like are not forwarded.
            elif isinstance(event, h11.Response):
                self._decline(event)
            elif isinstance(event, h11.Data):
                stream.write(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                self._teardown()
                trailers = event.headers
                stream.end(trailers.raw_items() if trailers else ())
            else:
                return  # NEED_DATA, PAUSED

    def _switch(self, event: h11.InformationalResponse) -> None:
        self._cancel_timer()
        self._switched = True
        self._stream.send_reply(ReplyHead(101, event.reason, _reply_headers(event)))
        early, _ = self._parser.trailing_data
        # From here on bytes are relayed as they come: the parser's state
        # (0.6 KiB for each upgraded connection held) is not needed again.
        del self._parser
        if early:
            self._stream.write(bytes(early))

    def _decline(self, response: h11.Response) -> None:
        """The upstream answered without switching: relay it as an ordinary response."""
        self._cancel_timer()
        self._declined = True
        sock = self._sock
        if sock is not None and not self._client_ended:
            sock.unregisterProducer()
        self._stream.send_reply(
            ReplyHead(response.status_code, response.reason, _reply_headers(response))
        )

    def upstream_ended(self) -> None:
        """The upstream half-closed."""
        if self._done or self._upstream_ended:
            return
        self._upstream_ended = True
        if not self._switched:
            self._lost_before_switch(connectionDone)
            return
        self._stream.end()
        if self._client_ended:
            self._finish()

    def upstream_lost(self, reason: Failure) -> None:
        if self._done:
            return
        if not self._switched:
            self._lost_before_switch(reason)
            return
        if reason.check(ConnectionDone) and self._upstream_ended:
            # Closed in order after its half-close: the stream already ended.
            self._done = True
            self._teardown()
            return
        self._done = True
        self._teardown()
        if reason.check(ConnectionDone):
            self._stream.end()
            return
        self.log.info(
            "upstream {endpoint} dropped an upgraded connection: {error}",
            endpoint=self._pool.endpoint, error=reason.getErrorMessage(),
        )
        self._stream.reset(
            Reason.UPSTREAM_ERROR,
            f"upstream {self._pool.endpoint} dropped the connection: {reason.getErrorMessage()}",
        )

    def _lost_before_switch(self, reason: Failure) -> None:
        """The upstream closed before a 101: end of a close-delimited answer, or an error."""
        parser = self._parser
        try:
            parser.receive_data(b"")
            self._pump()
        except h11.RemoteProtocolError as error:
            detail = str(error)
        else:
            detail = reason.getErrorMessage()
        if self._done:
            return
        self._closed_early("mid-response" if self._declined else "before responding", detail)

    # -- ending -------------------------------------------------------------

    def _finish(self) -> None:
        """Both directions ended in order: close the upstream connection."""
        self._done = True
        self._cancel_timer()
        self._stream.unregisterProducer()
        sock = self._sock
        if sock is not None:
            sock.loseConnection()

    def _fail(self, reason: Reason, message: str) -> None:
        if not self._done:
            self._done = True
            self._reset(reason, message)

    def _drop_upstream(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.abortConnection()


@implementer(IUpstream)
class UpgradeRelays:
    """
    The upgrade streams of one HTTP/1.1 upstream: each on a connection of
    its own, never pooled.  Nothing is pooled, so closing has nothing to
    wait for: a relay's connection lasts as long as its stream.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings

    def forward(self, stream: IStream) -> None:
        """L{IUpstream}: carry one upgrade stream to the upstream."""
        relay = _UpgradeRelay(self._settings, stream)
        stream.attach(relay)
        relay.start()

    def close(self) -> Deferred[None]:
        """L{IUpstream}: nothing idle to close."""
        return succeed(None)
