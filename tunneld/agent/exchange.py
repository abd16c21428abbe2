# -*- test-case-name: tests.test_upstream,tests.test_public_h2 -*-
"""
What every kind of upstream exchange on the agent shares: one tunnel stream
served by the local upstream, whether as an HTTP/1.1 exchange
(L{tunneld.agent.upstream}), an upgrade relay (L{tunneld.agent.upgrade}) or
an HTTP/2 call (L{tunneld.agent.upstream_h2}).

Written once here so that the kinds cannot drift: dialling with a deadline,
the response-head and body-progress timers, the reasons an exchange fails
for (each worded the same in the log and in the stream's reset, whatever the
kind), tearing the exchange down, and the connection protocol that tells its
owner, and anyone waiting, when it is lost.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IAddress,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.agent.dialing import connect_error, connect_timed_out
from tunneld.interfaces import IStream
from tunneld.model.reasons import Reason

__all__ = [
    "HOP_BY_HOP",
    "UpstreamConnection",
    "UpstreamExchange",
    "UpstreamFactory",
    "UpstreamSettings",
    "UpstreamTransport",
]

# Hop-by-hop fields (RFC 9110 section 7.6.1), plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


# Twisted's endpoint parser is untyped; this is its signature.
_client_from_string: Callable[[Any, str], IStreamClientEndpoint] = clientFromString


class UpstreamSettings:
    """
    One upstream as its exchanges see it: where it is (a Twisted client
    endpoint string, such as C{"tcp:host=127.0.0.1:port=8000"}), how its
    connections are made, and the deadlines (in seconds) an exchange keeps:
    for a connection, for the response head, for each pause in the body
    (0 = none).  Every timer runs on C{reactor}'s clock.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        build: Callable[[], Protocol],
        connect_timeout: float,
        response_timeout: float,
        body_timeout: float,
    ) -> None:
        self._reactor = reactor
        self.endpoint = endpoint
        self._endpoint = _client_from_string(reactor, endpoint)
        self._factory = UpstreamFactory(build)
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.body_timeout = body_timeout


class UpstreamTransport(typing.Protocol):
    """What the agent uses of an upstream connection's transport."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: list[bytes]) -> None: ...  # noqa: N802
    def loseConnection(self) -> None: ...  # noqa: N802
    def loseWriteConnection(self) -> None: ...  # noqa: N802
    def abortConnection(self) -> None: ...  # noqa: N802
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...  # noqa: N802
    def unregisterProducer(self) -> None: ...  # noqa: N802
    def pauseProducing(self) -> None: ...  # noqa: N802
    def resumeProducing(self) -> None: ...  # noqa: N802
    def stopProducing(self) -> None: ...  # noqa: N802


class UpstreamFactory(ClientFactory):
    """Makes an upstream connection with C{build()}; quiet, as there is one per dial."""

    noisy = False

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: IAddress | None) -> Protocol:  # noqa: N802
        return self._build()


class UpstreamConnection(Protocol):
    """
    A connection to the upstream: no Nagle delay, and the news of its loss
    passed to L{upstream_closed} and to every L{when_lost} waiter.
    """

    lost = False

    def __init__(self) -> None:
        self._lost_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:  # noqa: N802
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.upstream_made()

    def upstream_made(self) -> None:
        """The connection is up (after TCP_NODELAY is set)."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.lost = True
        self.upstream_closed(reason)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def upstream_closed(self, reason: Failure) -> None:
        """The connection is gone: tell whatever it served."""

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once this connection is closed."""
        if self.lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter


class UpstreamExchange:
    """
    One tunnel stream served by the upstream: the part of its life every
    kind shares.

    A kind says how it ends once (L{_fail}), how it lets go of its upstream
    side (L{_drop_upstream}), what a fresh connection is for (L{_connected})
    and what its timer means when it fires (L{_timed_out}).
    """

    __slots__ = ("_pool", "_stream", "_connecting", "_timer", "last_read")

    log = Logger()

    def __init__(self, pool: UpstreamSettings, stream: IStream) -> None:
        self._pool = pool
        self._stream = stream
        self._connecting: Deferred[Any] | None = None
        # One timer: for the response head, then for the body's progress.
        self._timer: Any = None
        # When response bytes last came (or the stream last let them be read).
        self.last_read = 0.0

    # -- what each kind says ------------------------------------------------

    def _fail(self, reason: Reason, message: str) -> None:
        """End the stream with C{reason} (once) and drop the upstream side."""
        raise NotImplementedError

    def _drop_upstream(self) -> None:
        """Let go of the upstream side at once (abort, cancel)."""

    def _connected(self, conn: Any) -> None:
        """A connection L{_dial} asked for is up."""

    def _timed_out(self) -> None:
        """The timer fired."""

    # -- dialling ------------------------------------------------------------

    def _dial(self, factory: IProtocolFactory) -> None:
        """Connect to the upstream within its connect timeout."""
        pool = self._pool
        connecting: Deferred[Any] = pool._endpoint.connect(factory)
        connecting.addTimeout(pool.connect_timeout, pool._reactor, connect_timed_out)
        self._connecting = connecting
        connecting.addCallbacks(self._dialled, self._dial_failed)

    def _dialled(self, conn: Any) -> None:
        self._connecting = None
        self._connected(conn)

    def _dial_failed(self, failure: Failure) -> None:
        self._connecting = None
        if not failure.check(CancelledError, ConnectingCancelledError):  # (cancelled: torn down)
            self._refused(connect_error(failure, self._pool.connect_timeout))

    # -- ending ---------------------------------------------------------------

    def _teardown(self) -> None:
        """Stop the timer and any connection attempt; let go of both sides' producers."""
        self._cancel_timer()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        self._stream.unregisterProducer()
        self._drop_upstream()

    def _reset(self, reason: Reason, message: str) -> None:
        """Tear down, then reset the stream with C{reason}."""
        self._teardown()
        self._stream.reset(reason, message)

    # -- the reasons, worded once ----------------------------------------------

    def _refused(self, error: str) -> None:
        endpoint = self._pool.endpoint
        self.log.warn("upstream {endpoint} refused: {error}", endpoint=endpoint, error=error)
        self._fail(Reason.UPSTREAM_REFUSED, f"upstream {endpoint} refused: {error}")

    def _bad_request(self, error: object) -> None:
        self.log.info(
            "request cannot be sent to upstream {endpoint}: {error}",
            endpoint=self._pool.endpoint, error=str(error),
        )
        self._fail(Reason.BAD_REQUEST, f"request cannot be sent upstream: {error}")

    def _no_response(self) -> None:
        endpoint, timeout = self._pool.endpoint, self._pool.response_timeout
        self.log.warn(
            "upstream {endpoint} sent no response within {timeout}s",
            endpoint=endpoint, timeout=timeout,
        )
        self._fail(
            Reason.UPSTREAM_TIMEOUT, f"upstream {endpoint} sent no response within {timeout:g}s"
        )

    def _stalled(self) -> None:
        endpoint, timeout = self._pool.endpoint, self._pool.body_timeout
        self.log.warn(
            "upstream {endpoint} stalled: nothing more of its response for {timeout}s",
            endpoint=endpoint, timeout=timeout,
        )
        self._fail(
            Reason.UPSTREAM_TIMEOUT,
            f"upstream {endpoint} stalled: nothing more of its response for {timeout:g}s",
        )

    def _malformed(self, error: object) -> None:
        endpoint = self._pool.endpoint
        self.log.warn(
            "upstream {endpoint} sent a malformed response: {error}",
            endpoint=endpoint, error=str(error),
        )
        self._fail(
            Reason.UPSTREAM_ERROR, f"upstream {endpoint} sent a malformed response: {error}"
        )

    def _closed_early(self, when: str, detail: str) -> None:
        """The upstream closed the connection C{when} ("mid-response", "before responding")."""
        endpoint = self._pool.endpoint
        self.log.warn(
            "upstream {endpoint} closed the connection {when}: {error}",
            endpoint=endpoint, when=when, error=detail,
        )
        self._fail(
            Reason.UPSTREAM_ERROR,
            f"upstream {endpoint} closed the connection {when}: {detail}",
        )

    def _log_edge_reset(self, reason: Reason, message: str) -> None:
        self.log.debug(
            "stream to upstream {endpoint} reset by the edge ({reason}): {message}",
            endpoint=self._pool.endpoint, reason=reason.value, message=message,
        )

    # -- the timer -------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        self._timer = self._pool._reactor.callLater(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._timed_out()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _body_timer(self) -> None:
        """The response head is here: the timer now watches the body's progress (or stops)."""
        timeout = self._pool.body_timeout
        timer = self._timer
        if timeout <= 0:
            self._cancel_timer()
        elif timer is None:
            self._arm_timer(timeout)
        else:
            # Later only (the usual case) is a cheap reset: no new timer.
            timer.reset(timeout)

    def _watch_body(self, waiting: bool) -> None:
        """
        The body timer fired: the stream failed as stalled, or the timer set
        again.  C{waiting}: the client holds the stream, or still sends its
        request (which the upstream may be waiting for).
        """
        timeout = self._pool.body_timeout
        if timeout <= 0:
            return
        idle = self._pool._reactor.seconds() - self.last_read
        if waiting or idle + 1e-6 < timeout:
            # Held, or bytes came since: wait again.
            self._arm_timer(timeout if waiting else timeout - idle)
            return
        self._stalled()
