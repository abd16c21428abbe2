# -*- test-case-name: tests.test_tcp -*-
"""
TCP tunnels on the edge: one public listener per tunnel, raw bytes to agents.

An agent registers a tunnel with C{TunnelSpec(protocol="tcp", port=N)}; the
edge listens on port N (or, for 0, on a free port it picks) among the
configured C{tcp_ports}, on C{tcp_listen_interface}.  More agents registering
the same tunnel name share its listener (connections go to the least loaded
healthy one); when the last of them goes, the listener closes.  Each public
connection goes through the edge gateway (L{tunneld.edge.gateway}) as any
public request does: connection caps, draining, the tunnel's rate limits and
stream caps, logged and counted alike; a refusal is a TCP reset.  An
admitted connection becomes one stream of kind C{"tcp"} spliced onto the
socket by L{tunneld.splice.StreamSplice}: backpressure and half-close both
ways, a TCP reset and a logged L{Reason} when anything fails.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.config import EdgeSection
from tunneld.config.values import parse_port_ranges
from tunneld.edge.gateway import Client, EdgeGateway
from tunneld.edge.gateway import Refusal as PublicRefusal
from tunneld.interfaces import IStream
from tunneld.model.keys import tunnel_key
from tunneld.model.messages import Refusal, TunnelSpec
from tunneld.model.reasons import Reason
from tunneld.policy.caps import Releasable
from tunneld.router import AgentSession, Router
from tunneld.splice import StreamSplice

# How many free-looking ports to try binding before giving up on allocation.
_ALLOCATION_ATTEMPTS = 256


class PublicTCPProtocol(StreamSplice):
    """
    One public TCP connection to a tunnel's port, carried on one stream;
    the gateway's exchange for it (its log fields: C{TCP tunnel:port}).
    """

    side = "client"
    gone_reason = Reason.CLIENT_GONE
    method = b"TCP"

    def __init__(self, tunnels: TCPTunnels, port: int) -> None:
        super().__init__(f"port {port}")
        self._tunnels = tunnels
        self._port = port
        self.host = ""  # the tunnel, once routed
        self.target = f":{port}"
        self.live = True
        self.slots: Releasable | None = None
        self._client: Client | None = None
        self._awaiting = False  # the gateway's decision is still to come

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self._tunnels.connections.add(self)
        gateway = self._tunnels.gateway
        self._client = client = gateway.connect(self.transport.getPeer(), "tcp", b"")  # type: ignore[union-attr]
        if not gateway.connect_tcp(client, self, self._port) and self.live:
            # Nothing is read until the stream exists.
            self._awaiting = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def opened(self, stream: IStream) -> None:
        """PublicExchange.opened"""
        self.stream = stream
        self.tunnel = self.host
        if self._awaiting:
            self._awaiting = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        if not self._done:  # a stream may be reset while opening
            self.splice()

    def refused(self, refusal: PublicRefusal) -> None:
        """PublicExchange.refused: a TCP reset."""
        self.reset(refusal.reason, refusal.text)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.live = False
        self._tunnels.connections.discard(self)
        super().connectionLost(reason)
        slots, self.slots = self.slots, None
        if slots is not None:
            slots.release()
        if self._client is not None:
            self._client.close()


class PublicTCPFactory(Factory):
    """Builds the connections of one tunnel port."""

    noisy = False

    def __init__(self, tunnels: TCPTunnels, port: int) -> None:
        self.tunnels = tunnels
        self.port = port

    def buildProtocol(self, addr: Any) -> PublicTCPProtocol:  # noqa: N802
        protocol = PublicTCPProtocol(self.tunnels, self.port)
        protocol.factory = self
        return protocol


class TCPTunnels(Service):
    """
    The edge's TCP tunnel listeners: opened as agents register, closed when
    the last agent serving a tunnel is gone, all closed when the edge stops.
    """

    log = Logger()
    name = "tcp-tunnels"

    def __init__(
        self, edge: EdgeSection, router: Router, reactor: Any,
        gateway: EdgeGateway | None = None,
    ) -> None:
        self.router = router
        self.gateway = gateway if gateway is not None else EdgeGateway(router)
        self.reactor = reactor
        self.ranges = parse_port_ranges(edge.tcp_ports)
        self.ports_text = edge.tcp_ports
        self.interface = edge.tcp_listen_interface
        self.public_host = edge.tcp_public_host or edge.tcp_listen_interface
        self.listeners: dict[int, IListeningPort] = {}
        # Ports listened on for TCP tunnels only other edges hold (the relay):
        # a connection to one is relayed to the edge holding it.
        self.relay_ports: set[int] = set()
        self._relay_problems: dict[int, str] = {}
        self.connections: set[PublicTCPProtocol] = set()
        self._last_port: dict[str, int] = {}  # a returning tunnel gets its port back if free
        self._closing: list[Deferred[Any]] = []
        self._rng = random.Random()

    def url(self, port: int) -> str:
        """The public URL of a tunnel on C{port}."""
        host = f"[{self.public_host}]" if ":" in self.public_host else self.public_host
        return f"tcp://{host}:{port}"

    def register(self, session: AgentSession, spec: TunnelSpec) -> str | Refusal:
        """
        Serve the TCP tunnel C{spec} from C{session}: its public URL, or the
        refusal saying why not (C{unauthorized} for a port this edge does not
        allow or that another tunnel has, C{cap_reached} when no port is free).
        """
        name = tunnel_key(spec)
        current = self.router.port_of(name)
        if current is not None:
            if spec.port and spec.port != current:
                return Refusal(
                    spec, Reason.UNAUTHORIZED,
                    f"tcp tunnel {name} is already served on port {current}, not {spec.port}",
                )
            port: int | Refusal = current
        elif spec.port:
            port = self._open_requested(spec)
        else:
            port = self._allocate(spec)
        if isinstance(port, Refusal):
            return port
        self.router.register_port(session, replace(spec, port=port))
        self._last_port[name] = port
        return self.url(port)

    def _in_range(self, port: int) -> bool:
        return any(low <= port <= high for low, high in self.ranges)

    def _open_requested(self, spec: TunnelSpec) -> int | Refusal:
        port = spec.port
        if not self.ranges:
            return Refusal(spec, Reason.UNAUTHORIZED, "this edge serves no tcp tunnels (tcp_ports is empty)")
        if not self._in_range(port):
            return Refusal(
                spec, Reason.UNAUTHORIZED,
                f"port {port} is outside this edge's tcp_ports ({self.ports_text})",
            )
        owner = self.router.port_owner(port)
        if owner is not None:
            return Refusal(spec, Reason.UNAUTHORIZED, f"port {port} is taken by tcp tunnel {owner}")
        if port in self.relay_ports:
            # Listened on for another edge's tunnel: local agents come first now.
            self.relay_ports.discard(port)
            return port
        problem = self._listen(port)
        if problem is not None:
            return Refusal(spec, Reason.UNAUTHORIZED, f"cannot listen on port {port}: {problem}")
        return port

    def _allocate(self, spec: TunnelSpec) -> int | Refusal:
        if not self.ranges:
            return Refusal(spec, Reason.UNAUTHORIZED, "this edge serves no tcp tunnels (tcp_ports is empty)")
        size = sum(high - low + 1 for low, high in self.ranges)
        start = self._rng.randrange(size)
        previous = self._last_port.get(tunnel_key(spec))
        candidates = itertools.chain(
            [previous] if previous is not None else [],
            (self._nth_port((start + i) % size) for i in range(size)),
        )
        attempts = 0
        for port in candidates:
            if port in self.listeners or self.router.port_owner(port) is not None:
                continue
            if self._listen(port) is None:
                return port
            attempts += 1
            if attempts >= _ALLOCATION_ATTEMPTS:
                break
        return Refusal(spec, Reason.CAP_REACHED, f"no free port in tcp_ports ({self.ports_text})")

    def _nth_port(self, n: int) -> int:
        for low, high in self.ranges:
            if n <= high - low:
                return low + n
            n -= high - low + 1
        raise IndexError(n)

    def _listen(self, port: int) -> str | None:
        """Listen on C{port}; None, or why not."""
        try:
            listening = self.reactor.listenTCP(
                port, PublicTCPFactory(self, port), interface=self.interface
            )
        except CannotListenError as e:
            return str(e.socketError)
        self.listeners[port] = listening
        self.log.info(
            "tcp tunnel listening on {host}:{port}", host=self.interface, port=port
        )
        return None

    def relay_listen(self, ports: set[int]) -> None:
        """
        Listen on C{ports} (in this edge's C{tcp_ports}) as well, the ports of
        TCP tunnels other edges hold: their connections are relayed
        (L{tunneld.edge.relay}).  Ports no longer wanted are closed unless a
        local agent serves them; one that cannot be listened on is logged
        once.
        """
        if not self.running:
            return
        for port in sorted(ports - self.relay_ports):
            if port in self.listeners or not self._in_range(port):
                continue
            problem = self._listen(port)
            if problem is None:
                self.relay_ports.add(port)
                self._relay_problems.pop(port, None)
            elif self._relay_problems.get(port) != problem:
                self._relay_problems[port] = problem
                self.log.warn("cannot listen on port {port} for another edge's tcp tunnel: "
                              "{problem}", port=port, problem=problem)
        for port in sorted(self.relay_ports - ports):
            self.relay_ports.discard(port)
        self.release()

    def release(self) -> None:
        """Close the listeners of tunnels no session serves any more."""
        for port in [
            p for p in self.listeners
            if self.router.port_owner(p) is None and p not in self.relay_ports
        ]:
            listening = self.listeners.pop(port)
            self.log.info("tcp tunnel on port {port} closed: no agent serves it", port=port)
            self._track(maybeDeferred(listening.stopListening))

    def _track(self, d: Deferred[Any]) -> None:
        self._closing.append(d)

        def closed(result: object) -> object:
            self._closing.remove(d)
            return result

        d.addBoth(closed)

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        Service.stopService(self)
        listeners, self.listeners = self.listeners, {}
        for listening in listeners.values():
            self._track(maybeDeferred(listening.stopListening))
        for connection in list(self.connections):
            connection.reset(Reason.DRAINING, "the edge is stopping")
        waits = list(self._closing) + [c.when_lost() for c in self.connections]
        return DeferredList(waits)
