# -*- test-case-name: tests.test_tcp -*-
"""
TCP tunnels on the agent: each stream of kind C{"tcp"} becomes one connection
to the tunnel's upstream endpoint, spliced onto the stream by
L{tunneld.splice.StreamSplice} (backpressure and half-close both ways).

What the edge sends while the connection is being made is held, bounded by
the stream's window: the stream stays paused, so it grants no credit.  An
upstream that refuses the connection resets the stream with
C{upstream_refused}, one that does not answer in time with
C{upstream_timeout}; an upstream that resets an established connection resets
the stream with C{upstream_error}.  Each is logged with its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.agent.dialing import connect_timed_out
from tunneld.interfaces import IStream, IUpstream
from tunneld.model.reasons import Reason
from tunneld.splice import StreamSplice

# Twisted's endpoint parser is untyped; this is its signature.
_client_from_string: Callable[[Any, str], IStreamClientEndpoint] = clientFromString


class UpstreamTCPProtocol(StreamSplice):
    """One connection to the upstream, carrying one tunnel stream."""

    side = "upstream"
    gone_reason = Reason.UPSTREAM_ERROR

    def __init__(self, forwarder: TCPForwarder) -> None:
        super().__init__(forwarder.tunnel)
        self.forwarder = forwarder
        self.peer = forwarder.endpoint
        self.connecting: Deferred[Any] | None = None

    def reset_received(self, reason: Reason, message: str) -> None:
        """IStreamReceiver.reset_received: also give up a connection still being made."""
        super().reset_received(reason, message)
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.forwarder.connections.discard(self)
        super().connectionLost(reason)


class _OneConnection(ClientFactory):
    """Hands the endpoint the protocol already holding the stream."""

    noisy = False

    def __init__(self, protocol: UpstreamTCPProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: IAddress | None) -> UpstreamTCPProtocol:  # noqa: N802
        return self.protocol_instance


@implementer(IUpstream)
class TCPForwarder:
    """The agent's side of one TCP tunnel: streams in, upstream connections out."""

    log = Logger()

    def __init__(self, reactor: Any, tunnel: str, endpoint: str, connect_timeout: float) -> None:
        self.reactor = reactor
        self.tunnel = tunnel
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self._endpoint = _client_from_string(reactor, endpoint)
        self.connections: set[UpstreamTCPProtocol] = set()
        self._connecting: set[Deferred[Any]] = set()

    def forward(self, stream: IStream) -> None:
        """Carry C{stream} to a new upstream connection."""
        if stream.head.kind != "tcp":
            message = f"{self.tunnel} is a tcp tunnel; it takes no {stream.head.kind} streams"
            self.log.warn("refused a stream: {message}", message=message)
            stream.reset(Reason.PROTOCOL_ERROR, message)
            return
        protocol = UpstreamTCPProtocol(self)
        protocol.hold(stream)
        d = self._endpoint.connect(_OneConnection(protocol))
        d.addTimeout(self.connect_timeout, self.reactor, onTimeoutCancel=connect_timed_out)
        self._connecting.add(d)
        protocol.connecting = d
        d.addCallbacks(
            self._connected, self._failed, callbackArgs=(protocol, d), errbackArgs=(protocol, d)
        )

    def _connected(self, _: object, protocol: UpstreamTCPProtocol, d: Deferred[Any]) -> None:
        self._connecting.discard(d)
        protocol.connecting = None
        if protocol._done:  # the stream was reset while connecting
            protocol.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.connections.add(protocol)
        protocol.splice()

    def _failed(self, failure: Failure, protocol: UpstreamTCPProtocol, d: Deferred[Any]) -> None:
        self._connecting.discard(d)
        protocol.connecting = None
        if failure.check(defer.CancelledError, ConnectingCancelledError):
            protocol.reset(Reason.CANCELLED, "the agent is stopping")
        elif failure.check(defer.TimeoutError):
            protocol.reset(
                Reason.UPSTREAM_TIMEOUT,
                f"no connection to {self.endpoint} within {self.connect_timeout:g}s",
            )
        else:
            protocol.reset(
                Reason.UPSTREAM_REFUSED,
                f"cannot connect to {self.endpoint}: {failure.getErrorMessage()}",
            )

    def close(self) -> Deferred[Any]:
        """Stop: give up connecting, reset every connection; fires once all are closed."""
        for d in list(self._connecting):
            d.cancel()
        waits = []
        for protocol in list(self.connections):
            waits.append(protocol.when_lost())
            protocol.reset(Reason.CANCELLED, "the agent is stopping")
        return DeferredList(waits)
