# -*- test-case-name: tests.test_relay -*-
"""
The cross-edge relay (design §6): a public request for a tunnel that only
another edge holds is carried to that edge over a relay link.

A relay link is an agent link.  The edge holding tunnels dials every other
live edge's agent listener with the transport plugin's own C{connect}, as an
agent would, and says in its hello that it is an edge (its id after
L{RELAY_PREFIX}); its TLS client certificate, signed by the agent CA, must
name that edge (a C{tunneld-edge://NAME} URI SAN, checked with
C{service_identity}), and it checks the dialled edge's certificate as an
agent does.  So one link per pair of edges and direction, set up once and
reused by every request, with the transport's flow control, heartbeat and
named reasons, and the routing code never learns a wire format.

On the edge that was dialled, the link is a relay peer (L{RelayPeers}): it
serves nothing itself, and sits in a routing table of its own, filled from
the registry with the tunnels that peer holds.  The gateway asks that table
(L{RelayPeers.route}, its C{remote}) only after a local miss, and opens the
stream on the peer's link as on an agent's.

On the edge that dialled, a stream the link brings (L{RelayDialer}) is served
by the local routing table only, whose sessions are genuine agents: a relay
peer is never in it.  So a relayed stream is never relayed again, whatever
the registry says: at most one extra hop, by construction.

TCP tunnels are held in the registry with their edge port (C{NAME:PORT});
the dialled edge listens on those ports too (L{RelayPeers.on_ports}) and
routes a connection to one by port, the holding edge by the tunnel's name.
A relay link is never one agent's session: the dialled edge caps the
streams it has on one (C{relay_max_streams}), the holding edge applies
C{max_streams_per_agent} to the agent session a relayed stream goes to.  A
draining edge tells its peers (a GoAway on the links it dialled) and waits
for the streams it relays out; a dialler closes its link to a draining edge
once the link is idle.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.edge.forwarding import host_of
from tunneld.edge.gateway import RouteLike
from tunneld.interfaces import (
    AgentLinkSetup,
    EdgeRecord,
    IAgentLink,
    ILinkHandler,
    IStateBackend,
    IStream,
    IStreamReceiver,
    ITransportPlugin,
    StateUnavailable,
)
from tunneld.model.keys import tcp_of_key
from tunneld.model.messages import (
    ControlMessage,
    GoAway,
    Headers,
    Hello,
    ReplyHead,
    TunnelSpec,
    Welcome,
)
from tunneld.model.reasons import Reason
from tunneld.router import AgentSession, Router

__all__ = ["RELAY_PREFIX", "RelayDialer", "RelayPeers", "relay_options", "spec_of_key"]

# The hello of a relay link names the dialling edge as this prefix + its edge id.
RELAY_PREFIX = "tunneld-edge:"

# A miss refreshes the table from the registry at most this often (seconds):
# names nobody serves cannot make an edge ask the store once per request.
_MIN_REFRESH = 1.0


def spec_of_key(key: str) -> TunnelSpec:
    """The HTTP tunnel a registry key names (hostname, then the path prefix if any)."""
    host, slash, rest = key.partition("/")
    return TunnelSpec(host, slash + rest if slash else "")


def relay_options(plugin: ITransportPlugin, url: str) -> object | None:
    """
    The agent options of C{plugin} that dial an edge's agent URL, or None for
    a URL it does not dial (the URL schemes of L{tunneld.edge.cluster}).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if plugin.name == "websocket" and scheme in ("ws", "wss"):
        table: dict[str, object] = {"url": url}
    elif plugin.name == "grpc" and scheme in ("grpc", "grpcs"):
        table = {"address": parts.netloc, "tls": scheme == "grpcs"}
    else:
        return None
    return plugin.agent_options(table, f"relay to {url}")


# -- the dialled side: relay peers as routes -----------------------------------


class RelayPeers:
    """
    Relay links from other edges, and the tunnels each holds (from the
    registry): the gateway's C{remote} routes.  Relay sessions live in their
    own L{Router}, never in the edge's.
    """

    log = Logger()

    def __init__(
        self, backend: IStateBackend, reactor: Any, edges: Callable[[], Sequence[EdgeRecord]],
        proves_edge: Callable[[Any, str], str | None],
        max_streams: Callable[[], int] = lambda: 10_000,
    ) -> None:
        self.backend = backend
        # Streams this edge may have in flight on one peer's relay link (its
        # own cap: a relay link carries many agents' streams, never one agent's).
        self.max_streams = max_streams
        self.reactor = reactor
        self.edges = edges  # the live edges at the last heartbeat
        self.proves_edge = proves_edge  # (certificate, edge name) -> why not, or None
        self.table = Router()
        self.peers: dict[str, AgentSession] = {}  # edge id -> its relay session
        self._refreshing = False
        self._waiting: list[Deferred[None]] = []  # callers of refresh() until the read is done
        self._refreshed_at = -_MIN_REFRESH
        # Told the edge ports of the TCP tunnels peers hold, whenever they may
        # have changed: this edge listens on them too (L{TCPTunnels.relay_listen}).
        self.on_ports: Callable[[set[int]], object] = lambda ports: None

    # Links

    def hello(self, link: IAgentLink, hello: Hello) -> str | None:
        """
        A link says it is a relay from another edge: accept it (a Welcome),
        or say why not (the caller refuses the link with C{unauthorized}).
        """
        edge_id = hello.agent_id[len(RELAY_PREFIX):]
        record = next((e for e in self.edges() if e.edge_id == edge_id), None)
        if record is None:
            return f"edge {edge_id!r} is not a live edge of this cluster"
        certificate = link.peer_certificate
        if certificate is None:
            return "a relay link needs the edge's client certificate"
        problem = self.proves_edge(certificate, record.name)
        if problem is not None:
            return problem
        old = self.peers.get(edge_id)
        if old is not None:
            self.forget(old.link)
        session = AgentSession(uuid.uuid4().hex, hello.agent_id, link)
        self.peers[edge_id] = session
        link.send_control(Welcome(session_id=session.session_id, version=hello.version))
        self.log.info("relay link up from edge {edge} over {transport}",
                      edge=edge_id, transport=link.transport_name)
        self.refresh()
        return None

    def going_away(self, link: IAgentLink) -> None:
        """The peer stops: no new streams for it (those in flight finish)."""
        for session in self.peers.values():
            if session.link is link:
                session.draining = True

    def forget(self, link: IAgentLink) -> None:
        """A relay link is gone."""
        for edge_id, session in list(self.peers.items()):
            if session.link is link:
                del self.peers[edge_id]
                self.table.unregister(session)
                self.log.info("relay link from edge {edge} down", edge=edge_id)
                self.on_ports(set(self.table.port_snapshot()))

    # Routes

    def route(self, host: str, path: str) -> RouteLike | Reason | Deferred[RouteLike | Reason]:
        """The gateway's C{remote}: a relay route after a local miss."""
        found = self.table.route(host, path)
        if not isinstance(found, Reason) or not self.peers:
            return self._capped(found)
        if self.reactor.seconds() - self._refreshed_at < _MIN_REFRESH:
            return found
        # Perhaps a tunnel that appeared since the last look: ask the registry once.
        later: Deferred[RouteLike | Reason] = self.refresh().addCallback(
            lambda _: self._capped(self.table.route(host, path))
        )
        return later

    def _capped(self, found: RouteLike | Reason) -> RouteLike | Reason:
        """A route on a relay link already carrying C{max_streams}: C{cap_reached}."""
        if isinstance(found, Reason):
            return found
        cap = self.max_streams()
        if found.link.active_streams() >= cap:
            return Reason.CAP_REACHED  # (the gateway logs the refusal)
        return found

    def route_port(self, port: int) -> RouteLike | Reason:
        """The gateway's C{remote} for TCP: a relay route for edge port C{port} after a local miss."""
        return self._capped(self.table.route_port(port))

    def links(self) -> list[IAgentLink]:
        """The relay links other edges dialled to this one (this edge relays out on them)."""
        return [session.link for session in self.peers.values()]

    def refresh(self) -> Deferred[None]:
        """Read the tunnels every peer holds; one read in flight at most, which every caller waits for."""
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        if self._refreshing:
            return waiting
        self._refreshing = True
        self._refreshed_at = self.reactor.seconds()
        peers = dict(self.peers)
        reads = DeferredList(
            [self.backend.edge_tunnels(edge_id) for edge_id in peers], consumeErrors=True
        )
        reads.addCallback(self._fill, peers)
        reads.addErrback(lambda f: self.log.failure("reading relay routes failed", f))
        reads.addBoth(self._refreshed)
        return waiting

    def _refreshed(self, _: object) -> None:
        self._refreshing = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _fill(self, results: list[tuple[bool, Any]], peers: dict[str, AgentSession]) -> None:
        for (ok, keys), (edge_id, session) in zip(results, peers.items(), strict=True):
            if self.peers.get(edge_id) is not session:
                continue  # gone meanwhile
            if not ok:
                failure = cast(Failure, keys)
                if not failure.check(StateUnavailable):
                    self.log.failure("reading edge {edge}'s tunnels failed", failure, edge=edge_id)
                continue  # degraded: keep what we knew
            self.table.unregister(session)
            session.tunnels = []
            for key in keys:
                tcp = tcp_of_key(key)
                if tcp is None:
                    self.table.register(session, spec_of_key(key))
                    continue
                name, port = tcp
                owner = self.table.port_owner(port)
                if owner is None or owner == name:
                    self.table.register_port(session, TunnelSpec(name, protocol="tcp", port=port))
        self.on_ports(set(self.table.port_snapshot()))

    def describe(self) -> list[dict[str, Any]]:
        """The relay peers, for the admin view."""
        return [
            {
                "edge": edge_id,
                "transport": session.link.transport_name,
                "streams": session.link.active_streams(),
                "tunnels": sorted(spec.hostname + spec.path_prefix for spec in session.tunnels),
            }
            for edge_id, session in sorted(self.peers.items())
        ]


# -- the dialling side: relayed streams served by local agents ----------------


@implementer(IStreamReceiver)
class _Toward:
    """Takes the events of one stream and gives them to the other of a pair."""

    borrows_data = True

    def __init__(self, other: IStream, relayed: bool) -> None:
        self.other = other
        self.relayed = relayed  # C{other} is the relay link's stream (the reply goes there)

    def reply_received(self, reply: ReplyHead) -> None:
        self.other.send_reply(reply)

    def data_received(self, data: bytes) -> None:
        self.other.write(data)

    def end_received(self, trailers: Headers) -> None:
        self.other.unregisterProducer()
        self.other.end(trailers)

    def reset_received(self, reason: Reason, message: str) -> None:
        self.other.unregisterProducer()
        self.other.reset(reason, message)


def splice_streams(relayed: IStream, local: IStream) -> None:
    """
    Join a stream from a relay link to one opened on a local agent link:
    events cross over, and each is the other's push producer, so credit is
    granted upstream only as fast as the far side takes the bytes.
    """
    local.registerProducer(relayed, True)
    relayed.registerProducer(local, True)
    relayed.attach(_Toward(local, relayed=False))


@implementer(ILinkHandler)
class _RelayLink:
    """This edge's side of one relay link it dialled: it serves what the peer sends."""

    log = Logger()

    def __init__(self, dialer: RelayDialer, edge_id: str, link: IAgentLink) -> None:
        self.dialer = dialer
        self.edge_id = edge_id
        self.link = link
        self.welcomed = False

    def control_received(self, message: ControlMessage) -> None:
        if isinstance(message, Welcome):
            self.welcomed = True
            self.log.info("relay link to edge {edge} up over {transport}",
                          edge=self.edge_id, transport=self.link.transport_name)
        elif isinstance(message, GoAway):
            # The peer is leaving; it sends nothing new.  Dial again later if it stays.
            self.log.info("edge {edge} closes its relay link ({reason}: {message})",
                          edge=self.edge_id, reason=message.reason.value,
                          message=message.message)

    def stream_opened(self, stream: IStream) -> None:
        self.dialer.serve(stream, self.edge_id)

    def link_lost(self, reason: Reason, message: str) -> None:
        self.dialer.lost(self, reason, message)


class RelayDialer(Service):
    """
    Keeps one relay link to every other live edge (checked every heartbeat
    interval, when C{tick} runs too), and serves the streams they bring with local agent sessions
    only (never relayed again: L{RelayPeers} are not in C{router}).
    """

    log = Logger()

    def __init__(
        self,
        router: Router,
        reactor: Any,
        this_edge: Callable[[], str],
        edges: Callable[[], Sequence[EdgeRecord]],
        transports: Sequence[tuple[ITransportPlugin, Any]],
        setup: AgentLinkSetup,
        interval: float,
        tick: Callable[[], object] = lambda: None,
        max_streams_per_agent: Callable[[], int] = lambda: 10_000,
    ) -> None:
        self.router = router
        # The per-agent cap, applied here to the agent session a relayed stream
        # goes to (the edge that relayed it cannot know that session).
        self.max_streams_per_agent = max_streams_per_agent
        self.draining = False  # this edge drains: no new links, its peers told (going_away)
        self.tick = tick  # also called each interval (the dialled side refreshes its routes)
        self.reactor = reactor
        self.this_edge = this_edge
        self.edges = edges
        self.plugins = {plugin.name: plugin for plugin, _ in transports}
        self.setup = setup
        self.links: dict[str, _RelayLink] = {}  # edge id -> the link dialled to it
        self.dialling: dict[str, Deferred[Any]] = {}
        # edge id -> why the last dial to it failed: a warning is logged when
        # this changes (not at every heartbeat), and a recovery once.
        self.problems: dict[str, str] = {}
        self.brought = 0  # streams relay links brought here
        self.relayed = 0  # of which served by a local agent session
        self._loop = LoopingCall(self.check)
        self._loop.clock = reactor
        self.interval = interval

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        for dialling in list(self.dialling.values()):
            dialling.cancel()
        closed = []
        for relay in list(self.links.values()):
            closed.append(relay.link.when_closed())
            relay.link.send_control(GoAway(Reason.DRAINING, "the edge is stopping"))
            relay.link.close(Reason.DRAINING, "the edge is stopping")
        return DeferredList(closed, consumeErrors=True).addCallback(lambda _: None)

    def check(self) -> None:
        """Dial the live edges without a link; close links to edges that are gone."""
        me = self.this_edge()
        if not me or not self.running:
            return
        self.tick()
        others = {e.edge_id: e for e in self.edges() if e.edge_id != me}
        live = {edge_id: e for edge_id, e in others.items() if not e.draining}
        for edge_id, relay in list(self.links.items()):
            record = others.get(edge_id)
            if record is None:
                relay.link.close(Reason.AGENT_GONE, f"edge {edge_id} left the cluster")
            elif record.draining and not relay.link.active_streams():
                # A draining edge's requests in flight to our agents finish
                # first (its drain waits for them); then the link goes.
                relay.link.close(Reason.DRAINING, f"edge {edge_id} is draining")
        if self.draining:
            return
        for edge_id in list(self.problems):
            if edge_id not in live:
                del self.problems[edge_id]  # gone: a later failure is news again
        for edge_id, record in live.items():
            if edge_id not in self.links and edge_id not in self.dialling:
                self._dial(me, record)

    def _dial(self, me: str, record: EdgeRecord) -> None:
        for url in record.agent_urls:
            for plugin in self.plugins.values():
                options = relay_options(plugin, url)
                if options is not None:
                    break
            else:
                continue
            break
        else:
            self._problem(record.edge_id, "names no agent URL this edge can dial for relays")
            return
        d = plugin.connect(options, self.setup)
        self.dialling[record.edge_id] = d

        def up(link: IAgentLink) -> None:
            self.dialling.pop(record.edge_id, None)
            if not self.running:
                link.close(Reason.DRAINING, "the edge is stopping")
                return
            relay = _RelayLink(self, record.edge_id, link)
            link.set_handler(relay)
            self.links[record.edge_id] = relay
            if self.problems.pop(record.edge_id, None) is not None:
                self.log.info("relay link to edge {edge} dialled again", edge=record.edge_id)
            link.send_control(Hello(agent_id=RELAY_PREFIX + me, tunnels=(),
                                    software="tunneld relay"))

        def failed(failure: Failure) -> None:
            self.dialling.pop(record.edge_id, None)
            if self.running:
                self._problem(record.edge_id, f"at {url}: {failure.getErrorMessage()}")

        d.addCallbacks(up, failed)

    def _problem(self, edge_id: str, problem: str) -> None:
        """
        A relay dial failed: warn when the reason is new for that edge, once
        (it is dialled again every heartbeat; the log says what changed).
        """
        if self.problems.get(edge_id) == problem:
            return
        self.problems[edge_id] = problem
        self.log.warn("relay link to edge {edge} failed {problem} (dialled again every "
                      "{interval}s; logged again when this changes)",
                      edge=edge_id, problem=problem, interval=self.interval)

    def going_away(self) -> None:
        """
        This edge drains: every peer is told (a GoAway on the link this edge
        dialled to it), so it routes no new stream here; streams in flight
        finish, and no new link is dialled.
        """
        self.draining = True
        for relay in self.links.values():
            relay.link.send_control(GoAway(Reason.DRAINING, "the edge is shutting down"))

    def lost(self, relay: _RelayLink, reason: Reason, message: str) -> None:
        if self.links.get(relay.edge_id) is relay:
            del self.links[relay.edge_id]
        if self.running:
            self.log.info("relay link to edge {edge} down ({reason}: {message})",
                          edge=relay.edge_id, reason=reason.value, message=message)

    def describe(self) -> list[dict[str, Any]]:
        """The links this edge dialled, for the admin view."""
        return [
            {"edge": edge_id, "transport": relay.link.transport_name,
             "welcomed": relay.welcomed, "streams": relay.link.active_streams()}
            for edge_id, relay in sorted(self.links.items())
        ]

    def counts(self) -> dict[str, int]:
        """Streams the relay links brought, and how many a local agent served."""
        return {"brought": self.brought, "served": self.relayed}

    def serve(self, stream: IStream, edge_id: str) -> None:
        """A stream relayed by edge C{edge_id}: to a local agent session, or refused."""
        self.brought += 1
        head = stream.head
        route: Any
        if head.kind == "tcp":
            # The TCP tunnel by its name (its port here may differ from the one it entered by).
            port = self.router.port_of(head.tunnel)
            route = Reason.NO_TUNNEL if port is None else self.router.route_port(port)
        else:
            host = host_of(next((v for k, v in head.headers if k == b"host"), b"")) or ""
            path = head.target.partition("?")[0] or "/"
            route = self.router.route(host, path)
        if isinstance(route, Reason):
            stream.reset(route, f"relayed to edge {self.this_edge()}: {route.description}")
            return
        cap = self.max_streams_per_agent()
        if route.link.active_streams() >= cap:
            stream.reset(Reason.CAP_REACHED, f"relayed to edge {self.this_edge()}: "
                         f"the agent session carries {cap} streams already")
            return
        if route.tunnel != head.tunnel:
            head = type(head)(head.kind, route.tunnel, head.method, head.target,
                              head.headers, head.peer, head.scheme)
        try:
            local = route.link.open_stream(head, _Toward(stream, relayed=True))
        except Exception:
            self.log.failure("opening a relayed stream for {tunnel} failed", tunnel=head.tunnel)
            stream.reset(Reason.AGENT_UNAVAILABLE, "the agent link took no new stream")
            return
        self.relayed += 1
        splice_streams(stream, local)
