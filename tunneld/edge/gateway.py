# -*- test-case-name: tests.test_gateway -*-
"""
The one admission path of the edge's public side.

Every public protocol (HTTP/1.1, HTTP/2, the upgrades HTTP/1.1 carries, TCP
tunnels) parses its own wire format and hands L{EdgeGateway} a request in
neutral terms: method, authority, target, headers, body or not, upgrade.
The gateway decides, in this order and nowhere else: is the request well
formed enough to route (a host, no userinfo, no C{CONNECT}, no body on an
upgrade), is the connection over a cap, which tunnel and agent link serve
it (L{Routes}), may it start now (L{Admission}: draining, rate limits,
caps).  Then it builds the headers the upstream sees (C{X-Forwarded-*},
C{Forwarded}, C{X-Real-IP}, C{Via}, hop-by-hop fields dropped; see
L{tunneld.edge.forwarding}) and opens the stream, or refuses.  Either way
it tells the protocol's exchange: L{PublicExchange.opened} with the stream,
or L{PublicExchange.refused} with a L{Refusal} (reason, text, retry-after,
whether the connection should close) that the protocol renders in its own
wire form: an HTTP status with C{Tunnel-Error}, or a TCP reset.

The log events and the metrics of a public exchange are written here too
(refused, bad request, cut mid-reply, bad reply, client gone), so they read
the same whichever protocol the request came in on.

Decisions may come later.  A routing step (L{RemoteRoutes}: a tunnel held
by another edge, found in the state backend) or an admission step (a token
bucket shared in Redis) may answer with a L{Deferred}; the gateway then
returns C{False} from L{EdgeGateway.request} and calls the exchange back
when the answer comes, after checking the exchange is still C{live}.  The
common case, every step answering at once, allocates no Deferred and calls
the exchange back before C{request} returns C{True}.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.edge.forwarding import (
    HOP_BY_HOP,
    USERINFO_REFUSAL,
    forwarded_headers,
    host_of,
    mcp_method,
    peer_of,
    session_affinity,
)
from tunneld.edge.replay import (
    ReplayBook,
    ReplaySettings,
    last_event_id,
    open_replayed,
    scope_of,
)
from tunneld.interfaces import IAgentLink, IStream, IStreamReceiver
from tunneld.model.messages import Headers, StreamHead
from tunneld.model.reasons import Reason
from tunneld.observe.stats import EdgeStats
from tunneld.policy.caps import Releasable, Slots
from tunneld.policy.gate import Refused

__all__ = [
    "Admission",
    "Client",
    "EdgeGateway",
    "PublicExchange",
    "Refusal",
    "Releasable",
    "RemoteRoutes",
    "RouteLike",
    "Routes",
    "BAD_REPLY",
    "BAD_REQUEST",
    "CLIENT_GONE",
    "CUT",
    "HEAD_TIMEOUT",
    "REFUSED",
    "REFUSED_BY_STREAM",
]

# The log events of a public exchange (their format strings are their names).
REFUSED = "refused {method} {host}{target} from {peer}: {reason}"
REFUSED_BY_STREAM = "refused {method} {host}{target} from {peer}: {reason} ({message})"
BAD_REQUEST = "bad request from {peer}: {error}"
CUT = "cut {method} {host}{target} from {peer} mid-reply: {reason} ({message})"
BAD_REPLY = "bad reply for {method} {host}{target} from {peer}: {error}"
CLIENT_GONE = "client {peer} went away during {method} {host}{target}"
HEAD_TIMEOUT = "no whole request head from {peer} within {timeout}s"
_CLIENT_DONE = "client {peer} closed after the whole response to {method} {host}{target}"

CONNECT_REFUSAL = "CONNECT is not supported"
UPGRADE_BODY_REFUSAL = "an upgrade request may not carry a body"
_NO_HOST = "missing or repeated Host"
_ADMISSION_FAILED = "the edge could not decide whether to admit this request"
_ROUTING_FAILED = "the edge could not find where this tunnel is served"

# What a local routing miss may still find on another edge.
# Local answers after which the gateway asks its remote routes: no session
# here, none usable here, or every one draining (its agent moving to another
# edge, which may hold the tunnel already).
_ELSEWHERE = frozenset({Reason.NO_TUNNEL, Reason.AGENT_UNAVAILABLE, Reason.DRAINING})


class RouteLike(TypingProtocol):
    """Where a request goes: the tunnel (hostname pattern) that matched and its link."""

    @property
    def tunnel(self) -> str: ...

    @property
    def link(self) -> IAgentLink: ...


class Routes(TypingProtocol):
    """The routing table as the gateway uses it (L{tunneld.router.Router})."""

    def route(self, host: str, path: str) -> RouteLike | Reason: ...


class PortRoutes(Routes, TypingProtocol):
    """A routing table that also routes TCP tunnels by edge port."""

    def route_port(self, port: int) -> RouteLike | Reason: ...


def _unless_reason(
    found: RouteLike | Reason | Deferred[RouteLike | Reason], local: Reason
) -> RouteLike | Reason | Deferred[RouteLike | Reason]:
    """A remote answer, with C{local} in place of a reason it gives."""
    if isinstance(found, Deferred):
        return found.addCallback(lambda r: local if isinstance(r, Reason) else r)
    return local if isinstance(found, Reason) else found


class RemoteRoutes(TypingProtocol):
    """
    The routing seam for several edges: where a tunnel no local session
    serves is served instead.

    The gateway routes in two steps: the local table (L{Routes}) first, and
    only when it answers C{no_tunnel}, C{agent_unavailable} or C{draining}
    (every local session moving away; a remote answer that is a reason then
    yields to C{draining}, the more telling), this.  A remote route's link
    carries many agents' streams: it is not counted as one agent session
    (the implementation caps it, and the far edge caps the agent).  Issue
    20 (the state backend) plugs in here and nowhere else: an implementation
    looks the tunnel up in the backend and answers a route whose link is a
    relay link to the edge holding it (an L{IAgentLink} like any other), or
    a L{Reason}; it is passed to L{EdgeGateway} as C{remote}.  No protocol
    changes: they already carry a request whose answer comes later (a
    L{Deferred} here; see L{EdgeGateway.request}).  TCP tunnels are routed
    by port: an implementation with a C{route_port(port)} method (answering
    at once) is asked for a port no local session serves.
    """

    def route(self, host: str, path: str) -> RouteLike | Reason | Deferred[RouteLike | Reason]: ...


class Admission(TypingProtocol):
    """The policy as the gateway uses it (L{tunneld.policy.gate.PublicPolicy})."""

    def connection_opened(self, peer_host: str) -> Releasable | Refused: ...

    def trusts(self, peer_host: str) -> bool: ...

    def client_of(self, peer_host: str, forwarded_for: Iterable[bytes]) -> str: ...

    def admit(
        self, tunnel: str, client: str, session_streams: int, method: str = ""
    ) -> Releasable | Refused | Deferred[Releasable | Refused]: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """
    Why a public request is not served, for its protocol to render: an HTTP
    C{status} (the reason's unless given) with C{Tunnel-Error: reason} and
    C{text}, C{Retry-After} when known, and whether the connection should
    take no further request (C{close}: HTTP/1.1 closes, HTTP/2 sends GOAWAY).
    """

    reason: Reason
    text: str
    retry_after: int | None = None
    close: bool = False
    status: int = 0

    @property
    def http_status(self) -> int:
        return self.status or self.reason.http_status


class Client:
    """
    One public connection as the gateway sees it: who the peer is, whether
    it is a trusted proxy, the listener's scheme and C{Via}, and the policy's
    connection slots (or why the connection is over a cap: its first request
    is refused with that, and the connection closed).
    """

    __slots__ = ("peer", "client_ip", "peer_host", "trusted", "scheme", "via", "_slots", "refused")

    def __init__(
        self, peer: str, client_ip: bytes, peer_host: str, scheme: str, via: bytes
    ) -> None:
        self.peer = peer  # as logs name it (host:port)
        self.client_ip = client_ip  # as X-Forwarded-For carries it
        self.peer_host = peer_host  # as the policy keys it
        self.scheme = scheme
        self.via = via
        self.trusted = False  # a trusted proxy: its X-Forwarded-For etc. are believed
        self._slots: Releasable | None = None
        self.refused: Refused | None = None

    def close(self) -> None:
        """The connection is gone: give its slots back (idempotent)."""
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.release()


class PublicExchange(TypingProtocol):
    """
    What the gateway needs of a protocol's exchange (one request, one
    stream).  It is also the stream's L{IStreamReceiver}.  C{method} and
    C{target} are set by the protocol, C{host} by the gateway once known.
    """

    method: bytes
    host: str
    target: str
    live: bool  # False once the client went away or the exchange is over
    slots: Releasable | None  # the policy's, released by the protocol when the exchange ends

    def opened(self, stream: IStream) -> None:
        """The stream is open (and may already have been reset while opening)."""

    def refused(self, refusal: Refusal) -> None:
        """Not served: render C{refusal} (already logged and counted)."""


class _Held:
    """A request waiting for an answer that comes later (the uncommon case)."""

    __slots__ = ("authority", "headers", "hop", "upgrade", "bodyless", "trailers")

    def __init__(
        self, authority: bytes, headers: Headers, hop: frozenset[bytes] | None,
        upgrade: bool, bodyless: bool, trailers: bool,
    ) -> None:
        self.authority = authority
        self.headers = headers
        self.hop = hop
        self.upgrade = upgrade
        self.bodyless = bodyless
        self.trailers = trailers


class EdgeGateway:
    """
    Route, admit, open or refuse, for every public protocol of one edge;
    and the log events and metrics of every public exchange.

    @param routes: the local routing table.
    @param stats: the edge's counters (a fresh one if None).
    @param admission: the policy gate; None admits everything.
    @param remote: where tunnels no local session serves may be found.
    """

    log = Logger()

    def __init__(
        self,
        routes: Routes,
        stats: EdgeStats | None = None,
        admission: Admission | None = None,
        remote: RemoteRoutes | None = None,
        replay: ReplayBook | None = None,
    ) -> None:
        self.routes = routes
        # A routing table that keeps MCP/ACP sessions (L{tunneld.router.Router}).
        self._binds = hasattr(routes, "bind")
        self.stats = stats if stats is not None else EdgeStats()
        self.admission = admission
        self.remote = remote
        # The replay of public Server-Sent Events, for tunnels that ask for it.
        self.replay = replay

    # -- connections ----------------------------------------------------------

    def connect(self, address: object, scheme: str, via: bytes) -> Client:
        """
        A public connection from C{address} arrived on a listener of
        C{scheme}: its L{Client}, holding the policy's connection slots or the
        refusal its first request will hear.
        """
        peer, client_ip, host = peer_of(address)
        client = Client(peer, client_ip, host or peer, scheme, via)
        admission = self.admission
        if admission is not None:
            client.trusted = admission.trusts(client.peer_host)
            admitted = admission.connection_opened(client.peer_host)
            if isinstance(admitted, Refused):
                client.refused = admitted
            else:
                client._slots = admitted
        return client

    # -- requests -------------------------------------------------------------

    def request(
        self,
        client: Client,
        exchange: PublicExchange,
        authority: bytes | None,
        headers: Headers,
        hop: frozenset[bytes] | None = None,
        upgrade: bool = False,
        bodyless: bool = True,
        trailers: bool = False,
    ) -> bool:
        """
        Route, admit and open an HTTP request, or refuse it.

        @param authority: the host (and port) the request names, from its
            target, Host or C{:authority}; None when missing or repeated.
        @param headers: the request's fields, names lower-cased.
        @param hop: field names that are hop-by-hop for this request besides
            the standard ones (C{Connection} tokens; C{content-length} when
            the body is re-framed), or None.
        @param upgrade: the request asks to switch protocols (it keeps its
            C{Upgrade} field and opens a stream of kind C{"upgrade"}).
        @param bodyless: the request has no body: the stream opens ended.
        @param trailers: the client takes trailers (HTTP/2 C{te: trailers}),
            passed on as C{te: trailers}.
        @return: True when the exchange was told (opened or refused) before
            returning; False when the answer comes later.
        """
        if authority is None:
            self._refuse(client, exchange, Reason.BAD_REQUEST, _NO_HOST)
            return True
        host = host_of(authority)
        if host is None:
            if b"@" in authority:
                self._bad_request(client, exchange, USERINFO_REFUSAL)
            else:
                self._refuse(
                    client, exchange, Reason.BAD_REQUEST,
                    f"invalid Host {authority.decode('latin-1')!r}",
                )
            return True
        exchange.host = host
        refused = client.refused
        if refused is not None:  # this connection is over a cap: say so, and close
            self._refuse(
                client, exchange, refused.reason, refused.text, refused.retry_after, close=True
            )
            return True
        if exchange.method == b"CONNECT":
            self._refuse(client, exchange, Reason.BAD_REQUEST, CONNECT_REFUSAL, status=501)
            return True
        if upgrade and not bodyless:
            self._refuse(client, exchange, Reason.BAD_REQUEST, UPGRADE_BODY_REFUSAL)
            return True
        target = exchange.target
        path = target.partition("?")[0] or "/" if target != "*" else "/"
        # A request naming an MCP/ACP session goes where the session lives.
        affinity = session_affinity(headers) if self._binds else ""
        route = self.routes.route(host, path, affinity) if affinity else self.routes.route(host, path)  # type: ignore[call-arg]
        if isinstance(route, Reason):
            remote = self.remote
            if remote is None or route not in _ELSEWHERE:
                self._refuse(client, exchange, route, route.description)
                return True
            found = remote.route(host, path)
            if route is Reason.DRAINING:
                found = _unless_reason(found, route)
            if isinstance(found, Deferred):
                held = _Held(authority, headers, hop, upgrade, bodyless, trailers)
                found.addCallbacks(
                    self._routed, self._failed,
                    callbackArgs=(client, exchange, held),
                    errbackArgs=(client, exchange, _ROUTING_FAILED),
                ).addErrback(self._broken)
                return False
            if isinstance(found, Reason):
                self._refuse(client, exchange, found, found.description)
                return True
            route = found
            relayed = True
        else:
            relayed = False
        admission = self.admission
        slots: Releasable | None = None
        if admission is not None:
            if client.trusted:
                who = admission.client_of(
                    client.peer_host,
                    [value for name, value in headers if name == b"x-forwarded-for"],
                )
            else:
                who = client.peer_host
            method = mcp_method(headers)  # per-method limits (MCP's Mcp-Method)
            # A relay link is not one agent session (RemoteRoutes): 0 streams here.
            streams = 0 if relayed else route.link.active_streams()
            if method:
                admitted = admission.admit(route.tunnel, who, streams, method)
            else:
                admitted = admission.admit(route.tunnel, who, streams)
            if isinstance(admitted, Refused):
                self._refused(client, exchange, admitted)
                return True
            # (Slots first: a Deferred is an ABC, so isinstance() of one costs two calls.)
            if not isinstance(admitted, Slots) and isinstance(admitted, Deferred):
                held = _Held(authority, headers, hop, upgrade, bodyless, trailers)
                admitted.addCallbacks(
                    self._admitted, self._failed,
                    callbackArgs=(client, exchange, route, held),
                    errbackArgs=(client, exchange, _ADMISSION_FAILED),
                ).addErrback(self._broken)
                return False
            slots = admitted
        self._open(
            client, exchange, route, slots, authority, headers, hop, upgrade, bodyless, trailers
        )
        return True

    def _open(
        self, client: Client, exchange: PublicExchange, route: RouteLike,
        slots: Releasable | None, authority: bytes, headers: Headers,
        hop: frozenset[bytes] | None, upgrade: bool, bodyless: bool, trailers: bool,
    ) -> None:
        """Build the forwarded head and open the stream on the route's link."""
        drop = HOP_BY_HOP | hop if hop else HOP_BY_HOP
        if upgrade:
            drop = drop - {b"upgrade"}
        # Host comes first, once, from the authority actually routed.
        forwarded = forwarded_headers(
            headers, drop, authority, client.client_ip, client.scheme, client.via, client.trusted
        )
        if upgrade:
            forwarded.append((b"connection", b"Upgrade"))
        if trailers:
            # The one TE value that passes: the client takes trailers (gRPC).
            forwarded.append((b"te", b"trailers"))
        head = StreamHead(
            kind="upgrade" if upgrade else "http",
            tunnel=route.tunnel,
            method=exchange.method.decode("latin-1"),
            target=exchange.target,
            headers=tuple(forwarded),
            peer=client.peer,
            scheme=client.scheme,
        )
        replay = self.replay
        if replay is not None and bodyless and not upgrade and head.method == "GET":
            settings = replay.settings(route.tunnel)
            if settings is not None:
                self._open_replayed(client, exchange, route, slots, head, headers, replay, settings)
                return
        self._open_stream(client, exchange, route, slots, head, bodyless and not upgrade)

    def _open_replayed(
        self, client: Client, exchange: PublicExchange, route: RouteLike,
        slots: Releasable | None, head: StreamHead, headers: Headers,
        replay: ReplayBook, settings: ReplaySettings,
    ) -> None:
        """
        A GET on a tunnel that replays its event streams: resumed from the
        edge's buffer, refused with the gap, or opened and recorded
        (L{tunneld.edge.replay}).
        """
        scope = scope_of(route.tunnel, exchange.host, exchange.target, headers)
        last = last_event_id(headers)
        resumed = None
        if last is not None:
            found = replay.resume(scope, last)
            if found is not None and not isinstance(found, tuple):
                if slots is not None:
                    slots.release()
                replay.gap(exchange.host, exchange.target, client.peer, found)
                self._refuse(client, exchange, Reason.SESSION_GONE, found.text, status=410)
                return
            resumed = found
        exchange.slots = slots
        if (
            resumed is None and self._binds and getattr(route, "session", None) is not None
            and hasattr(exchange, "affinity")
        ):
            exchange.affinity = partial(self._bind, route)  # type: ignore[attr-defined]

        def open_upstream(receiver: IStreamReceiver) -> IStream:
            return route.link.open_stream(head, receiver, end_stream=True)

        try:
            stream = open_replayed(replay, settings, scope, exchange, open_upstream, resumed)
        except Exception:
            self.log.failure(
                "opening a stream for {method} {host}{target} failed",
                method=head.method, host=exchange.host, target=exchange.target,
            )
            exchange.slots = None
            if slots is not None:
                slots.release()
            reason = Reason.AGENT_UNAVAILABLE
            self._refuse(client, exchange, reason, reason.description)
            return
        if resumed is None:
            self.stats.streams_opened += 1
        exchange.opened(stream)
        stream.start()

    def _open_stream(
        self, client: Client, exchange: PublicExchange, route: RouteLike,
        slots: Releasable | None, head: StreamHead, ended: bool,
    ) -> None:
        exchange.slots = slots
        if self._binds and getattr(route, "session", None) is not None and hasattr(exchange, "affinity"):
            # Told the reply's headers: a response naming an MCP/ACP session binds it.
            exchange.affinity = partial(self._bind, route)  # type: ignore[attr-defined]
        try:
            stream = route.link.open_stream(head, cast(IStreamReceiver, exchange), end_stream=ended)
        except Exception:
            self.log.failure(
                "opening a stream for {method} {host}{target} failed",
                method=head.method, host=exchange.host, target=exchange.target,
            )
            exchange.slots = None
            if slots is not None:
                slots.release()
            reason = Reason.AGENT_UNAVAILABLE
            self._refuse(client, exchange, reason, reason.description)
            return
        self.stats.streams_opened += 1
        exchange.opened(stream)

    def _bind(self, route: Any, headers: Headers) -> None:
        """A reply naming an MCP/ACP session: its later requests go where this one went."""
        affinity = session_affinity(headers)
        if affinity:
            self.routes.bind(route.tunnel, affinity, route.session)  # type: ignore[attr-defined]

    # -- decisions that came later ---------------------------------------------

    def _routed(
        self, route: RouteLike | Reason, client: Client, exchange: PublicExchange, held: _Held
    ) -> None:
        if not exchange.live:
            return  # the client went away meanwhile
        if isinstance(route, Reason):
            self._refuse(client, exchange, route, route.description)
            return
        admission = self.admission
        if admission is None:
            self._open_held(client, exchange, route, None, held)
            return
        who = client.peer_host
        if client.trusted:
            who = admission.client_of(
                who, [value for name, value in held.headers if name == b"x-forwarded-for"]
            )
        method = mcp_method(held.headers)
        # Only remote routes come here: a relay link is not one agent session (RemoteRoutes).
        if method:
            admitted = admission.admit(route.tunnel, who, 0, method)
        else:
            admitted = admission.admit(route.tunnel, who, 0)
        if isinstance(admitted, Deferred):
            admitted.addCallbacks(
                self._admitted, self._failed,
                callbackArgs=(client, exchange, route, held),
                errbackArgs=(client, exchange, _ADMISSION_FAILED),
            ).addErrback(self._broken)
            return
        self._admitted(admitted, client, exchange, route, held)

    def _admitted(
        self, admitted: Releasable | Refused, client: Client, exchange: PublicExchange,
        route: RouteLike, held: _Held,
    ) -> None:
        if isinstance(admitted, Refused):
            if exchange.live:
                self._refused(client, exchange, admitted)
            return
        if not exchange.live:
            admitted.release()  # the client went away meanwhile
            return
        self._open_held(client, exchange, route, admitted, held)

    def _open_held(
        self, client: Client, exchange: PublicExchange, route: RouteLike,
        slots: Releasable | None, held: _Held,
    ) -> None:
        self._open(
            client, exchange, route, slots, held.authority, held.headers, held.hop,
            held.upgrade, held.bodyless, held.trailers,
        )

    def _failed(self, failure: Failure, client: Client, exchange: PublicExchange, text: str) -> None:
        self.log.failure(
            "deciding on {method} {host}{target} from {peer} failed", failure,
            method=exchange.method.decode("latin-1"), host=exchange.host,
            target=exchange.target, peer=client.peer,
        )
        if exchange.live:
            self._refuse(client, exchange, Reason.AGENT_UNAVAILABLE, text)

    def _broken(self, failure: Failure) -> None:
        """A bug while acting on a late decision: logged, never left in a Deferred."""
        self.log.failure("acting on a late admission decision failed", failure)

    # -- TCP tunnels ----------------------------------------------------------

    def connect_tcp(self, client: Client, exchange: PublicExchange, port: int) -> bool:
        """
        Route, admit and open a public TCP connection to edge port C{port},
        or refuse it; as L{request}.  A connection over a cap is refused at
        once (a TCP connection has no first request to answer first).
        """
        refused = client.refused
        if refused is not None:
            self._refuse(client, exchange, refused.reason, refused.text, refused.retry_after, True)
            return True
        route = cast(PortRoutes, self.routes).route_port(port)
        relayed = False
        if isinstance(route, Reason):
            remote = self.remote
            found: RouteLike | Reason = route
            if remote is not None and route in _ELSEWHERE and hasattr(remote, "route_port"):
                found = remote.route_port(port)
                if isinstance(found, Reason) and route is Reason.DRAINING:
                    found = route
            if isinstance(found, Reason):
                self._refuse(client, exchange, found, found.description, close=True)
                return True
            route, relayed = found, True
        exchange.host = route.tunnel
        head = StreamHead(kind="tcp", tunnel=route.tunnel, peer=client.peer, scheme="tcp")
        admission = self.admission
        if admission is None:
            self._open_stream(client, exchange, route, None, head, False)
            return True
        streams = 0 if relayed else route.link.active_streams()  # a relay link is not one agent
        admitted = admission.admit(route.tunnel, client.peer_host, streams)
        if not isinstance(admitted, Slots) and isinstance(admitted, Deferred):
            admitted.addCallbacks(
                self._tcp_admitted, self._failed,
                callbackArgs=(client, exchange, route, head),
                errbackArgs=(client, exchange, _ADMISSION_FAILED),
            ).addErrback(self._broken)
            return False
        self._tcp_admitted(admitted, client, exchange, route, head)
        return True

    def _tcp_admitted(
        self, admitted: Releasable | Refused, client: Client, exchange: PublicExchange,
        route: RouteLike, head: StreamHead,
    ) -> None:
        if isinstance(admitted, Refused):
            if exchange.live:
                self._refused(client, exchange, admitted, close=True)
            return
        if not exchange.live:
            admitted.release()
            return
        self._open_stream(client, exchange, route, admitted, head, False)

    # -- refusals -------------------------------------------------------------

    def _refused(
        self, client: Client, exchange: PublicExchange, refused: Refused, close: bool = False
    ) -> None:
        """The policy said no; draining also closes the connection."""
        self._refuse(
            client, exchange, refused.reason, refused.text, refused.retry_after,
            close=close or refused.reason is Reason.DRAINING,
        )

    def _refuse(
        self, client: Client, exchange: PublicExchange, reason: Reason, text: str,
        retry_after: int | None = None, close: bool = False, status: int = 0,
    ) -> None:
        exchange.live = False
        self.log.info(
            REFUSED,
            method=exchange.method.decode("latin-1"), host=exchange.host,
            target=exchange.target, peer=client.peer, reason=reason.value,
        )
        self.stats.refused(
            reason, host=exchange.host, target=exchange.target, peer=client.peer, message=text
        )
        exchange.refused(Refusal(reason, text, retry_after, close, status))

    def _bad_request(self, client: Client, exchange: PublicExchange, text: str) -> None:
        exchange.live = False
        self.bad_request(client, text)
        exchange.refused(Refusal(Reason.BAD_REQUEST, text, close=True))

    # -- reports from the protocols ---------------------------------------------
    # What happens to an exchange after the gateway let it go is still
    # logged and counted here, so that it reads the same on every protocol.

    def bad_request(self, client: Client, text: str) -> None:
        """A client sent what its protocol forbids (the protocol answers 4xx/5xx and closes)."""
        self.log.info(BAD_REQUEST, peer=client.peer, error=text)
        self.stats.refused(Reason.BAD_REQUEST, peer=client.peer, message=text)

    def head_timed_out(self, client: Client, timeout: float) -> str:
        """No whole request head came within C{timeout} seconds: logged, counted; the text to answer."""
        self.log.info(HEAD_TIMEOUT, peer=client.peer, timeout=timeout)
        text = f"no whole request head within {timeout:g}s"
        self.stats.refused(Reason.IDLE_TIMEOUT, peer=client.peer, message=text)
        return text

    def reset_before_reply(
        self, client: Client, exchange: PublicExchange, reason: Reason, message: str
    ) -> None:
        """The stream was reset before its reply: the client hears C{reason}'s status."""
        self.log.info(
            REFUSED_BY_STREAM,
            method=exchange.method.decode("latin-1"), host=exchange.host,
            target=exchange.target, peer=client.peer, reason=reason.value, message=message,
        )
        self.stats.refused(
            reason, host=exchange.host, target=exchange.target, peer=client.peer, message=message
        )

    def cut(self, client: Client, exchange: PublicExchange, reason: Reason, message: str) -> None:
        """The stream was reset after its reply started: the client sees a cut, never a whole body."""
        self.log.info(
            CUT,
            method=exchange.method.decode("latin-1"), host=exchange.host,
            target=exchange.target, peer=client.peer, reason=reason.value, message=message,
        )
        self.stats.cut(reason)

    def bad_reply(
        self, client: Client, exchange: PublicExchange, error: str, answered: bool
    ) -> None:
        """
        The upstream's reply cannot go to the client as it is: C{answered}
        with a 502 instead (counted as a refusal), or cut (counted as a cut).
        """
        self.log.info(
            BAD_REPLY,
            method=exchange.method.decode("latin-1"), host=exchange.host,
            target=exchange.target, peer=client.peer, error=error,
        )
        reason = Reason.UPSTREAM_ERROR
        if answered:
            self.stats.refused(
                reason, host=exchange.host, target=exchange.target, peer=client.peer,
                message=error,
            )
        else:
            self.stats.cut(reason)

    def client_gone(self, client: Client, exchange: PublicExchange, whole: bool = False) -> None:
        """
        The client went away during an exchange; C{whole}: after its whole
        response had gone out (nothing was lost: only a debug event).
        """
        fields: dict[str, Any] = {
            "peer": client.peer, "method": exchange.method.decode("latin-1"),
            "host": exchange.host, "target": exchange.target,
        }
        if whole:
            self.log.debug(_CLIENT_DONE, **fields)
        else:
            self.log.info(CLIENT_GONE, **fields)
