# -*- test-case-name: tests.test_router -*-
"""
The routing table: public hostname and path → tunnel → a healthy agent session;
for TCP tunnels, edge port → tunnel → a healthy agent session.

Pure logic: no sockets, no transports.  Exact hostnames win over wildcards,
longer wildcards over shorter ones, longer path prefixes over shorter ones;
among the sessions serving a tunnel the one with the fewest open streams is
chosen, ties broken at random so load spreads.

Session affinity: a request carrying an MCP or ACP session id
(C{Mcp-Session-Id}, C{Acp-Session-Id}) goes to the agent session that served
that session first (its first request, or the response that gave it the id),
whatever the load; once that agent session is gone, the session's requests
are refused with C{session_gone} (404, which tells an MCP client to start a
new session) instead of reaching an agent that does not know them.  The table
is bounded: the oldest ids are forgotten first.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from tunneld.interfaces import IAgentLink
from tunneld.model.keys import tunnel_key
from tunneld.model.messages import TunnelSpec
from tunneld.model.reasons import Reason

# Hostnames whose candidate tunnels are remembered at once (any name a
# client sends is one, so the table is bounded).
_CANDIDATE_CACHE_SIZE = 4096
# MCP/ACP session ids remembered with the agent session serving them.
MAX_AFFINITIES = 65536
# An id whose agent session is gone.
_GONE = object()


@dataclass(eq=False)
class AgentSession:
    """One registered agent link and the tunnels it serves."""

    session_id: str
    agent_id: str
    link: IAgentLink
    tunnels: list[TunnelSpec] = field(default_factory=list)
    healthy: bool = True
    draining: bool = False
    # Tunnels (keys) whose upstream probe on this agent last reported unhealthy.
    unhealthy: set[str] = field(default_factory=set)

    def load(self) -> int:
        return self.link.active_streams()


@dataclass(frozen=True)
class Route:
    """Where a public request goes: the tunnel that matched and the chosen link."""

    tunnel: str
    link: IAgentLink
    session: AgentSession


class _Tunnel:
    def __init__(self, spec: TunnelSpec) -> None:
        self.spec = spec
        self.key = tunnel_key(spec)
        self.sessions: list[AgentSession] = []


class Router:
    """Maps hostnames (and path prefixes) to the agent sessions serving them."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        # hostname pattern -> list of tunnels sorted by longest path prefix first
        self._by_host: dict[str, list[_Tunnel]] = {}
        # Hostnames granted in configuration: when no agent serves them, the
        # answer is "agent unavailable", not "no such tunnel".
        self._reserved: set[str] = set()
        # TCP tunnels: edge port -> tunnel, and tunnel name -> its port.
        self._by_port: dict[int, _Tunnel] = {}
        self._port_of: dict[str, int] = {}
        # host -> its candidate tunnel lists (see _candidates), forgotten
        # whenever a hostname pattern comes or goes.
        self._candidate_cache: dict[str, list[list[_Tunnel]]] = {}
        # (tunnel key, session id) -> the agent session serving it, or _GONE;
        # and each agent session's ids, to mark them gone when it goes.
        self._affinity: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._affinities_of: dict[AgentSession, set[tuple[str, str]]] = {}
        self.max_affinities = MAX_AFFINITIES
        self._registered: set[AgentSession] = set()

    def reserve(self, pattern: str) -> None:
        """Know C{pattern} as a tunnel even while no agent serves it."""
        self._reserved.add(pattern.lower())

    def register(self, session: AgentSession, spec: TunnelSpec) -> None:
        """Add C{session} as a server of C{spec}."""
        tunnels = self._by_host.setdefault(spec.hostname.lower(), [])
        self._candidate_cache.clear()
        for tunnel in tunnels:
            if tunnel.spec.path_prefix == spec.path_prefix:
                break
        else:
            tunnel = _Tunnel(spec)
            tunnels.append(tunnel)
            tunnels.sort(key=lambda t: len(t.spec.path_prefix), reverse=True)
        if session not in tunnel.sessions:
            tunnel.sessions.append(session)
        self._registered.add(session)
        if spec not in session.tunnels:
            session.tunnels.append(spec)

    def unregister(self, session: AgentSession) -> None:
        """Remove C{session} from every tunnel it served."""
        self._registered.discard(session)
        for key in self._affinities_of.pop(session, ()):
            if key in self._affinity:
                self._affinity[key] = _GONE
        self._unregister_ports(session)
        self._candidate_cache.clear()
        for spec in session.tunnels:
            if spec.protocol == "tcp":
                continue
            tunnels = self._by_host.get(spec.hostname.lower(), [])
            for tunnel in list(tunnels):
                if session in tunnel.sessions:
                    tunnel.sessions.remove(session)
                if not tunnel.sessions:
                    tunnels.remove(tunnel)
            if not tunnels:
                self._by_host.pop(spec.hostname.lower(), None)

    def serving(self, spec: TunnelSpec) -> int:
        """
        How many sessions serve exactly C{spec} now, draining ones left out:
        they take no new streams and are on their way out, so an agent that
        moves off a drained session is not refused for its own old one.
        """
        for tunnel in self._by_host.get(spec.hostname.lower(), []):
            if tunnel.spec.path_prefix == spec.path_prefix:
                return sum(1 for session in tunnel.sessions if not session.draining)
        return 0

    def _candidates(self, host: str) -> list[list[_Tunnel]]:
        cache = self._candidate_cache
        found = cache.get(host)
        if found is None:
            found = self._find_candidates(host)
            if len(cache) >= _CANDIDATE_CACHE_SIZE:
                cache.clear()
            cache[host] = found
        return found

    def _find_candidates(self, host: str) -> list[list[_Tunnel]]:
        found = []
        exact = self._by_host.get(host)
        if exact:
            found.append(exact)
        # *.a.b.c matches x.a.b.c (and deeper names), most specific first.
        labels = host.split(".")
        for i in range(1, len(labels)):
            tunnels = self._by_host.get("*." + ".".join(labels[i:]))
            if tunnels:
                found.append(tunnels)
        return found

    def route(self, host: str, path: str, affinity: str = "") -> Route | Reason:
        """
        The route for a public request, or the reason there is none:
        C{no_tunnel} when nothing is registered for the name,
        C{agent_unavailable} when its agents are all unhealthy or draining,
        C{session_gone} when C{affinity} (an MCP/ACP session id) was served
        by an agent session that is gone or going,
        C{draining} when every one is draining (moving to another edge: a
        client may retry elsewhere, or soon).
        """
        host = host.lower().rstrip(".")
        for tunnels in self._candidates(host):
            for tunnel in tunnels:
                prefix = tunnel.spec.path_prefix
                if prefix and not _under(path, prefix):
                    continue
                if affinity:
                    bound = self._affinity.get((tunnel.key, affinity))
                    if bound is _GONE or (bound is not None and bound.draining):
                        return Reason.SESSION_GONE
                    if bound is not None:
                        self._affinity.move_to_end((tunnel.key, affinity))
                        return Route(tunnel.key, bound.link, bound)
                session = self._pick(tunnel.sessions, tunnel.key)
                if session is None:
                    return _none_usable(tunnel.sessions)
                if affinity:  # the session's first request this edge has seen
                    self.bind(tunnel.key, affinity, session)
                return Route(tunnel.key, session.link, session)
        if hostname_allowed(host, list(self._reserved)):
            return Reason.AGENT_UNAVAILABLE
        return Reason.NO_TUNNEL

    def bind(self, tunnel: str, affinity: str, session: AgentSession) -> None:
        """
        Requests of C{tunnel} carrying session id C{affinity} go to C{session}
        from now on (an upstream's response named the id, or its first request
        carried it).  An id already bound keeps its agent session.
        """
        key = (tunnel, affinity)
        if key in self._affinity or session not in self._registered:
            return
        self._affinity[key] = session
        self._affinities_of.setdefault(session, set()).add(key)
        while len(self._affinity) > self.max_affinities:
            (old, bound) = self._affinity.popitem(last=False)
            if bound is not _GONE:
                keys = self._affinities_of.get(bound)
                if keys is not None:
                    keys.discard(old)
                    if not keys:
                        del self._affinities_of[bound]

    def affinities(self) -> int:
        """How many session ids are remembered (gone ones included)."""
        return len(self._affinity)

    def _pick(self, sessions: list[AgentSession], key: str = "") -> AgentSession | None:
        usable = [
            s for s in sessions
            if s.healthy and not s.draining and (not s.unhealthy or key not in s.unhealthy)
        ]
        if not usable:
            return None
        if len(usable) == 1:
            return usable[0]
        least = min(s.load() for s in usable)
        return self._rng.choice([s for s in usable if s.load() == least])

    # -- port (TCP) tunnels -----------------------------------------------------

    def register_port(self, session: AgentSession, spec: TunnelSpec) -> None:
        """
        Add C{session} as a server of the TCP tunnel C{spec}, whose C{port}
        is the edge port it is (to be) reached on.  A name keeps one port and
        a port one name while any session serves them: check with
        L{port_of} and L{port_owner} first.
        """
        key = tunnel_key(spec)
        tunnel = self._by_port.get(spec.port)
        if tunnel is None:
            tunnel = self._by_port[spec.port] = _Tunnel(spec)
            self._port_of[key] = spec.port
        elif tunnel.key != key:
            raise ValueError(f"port {spec.port} already serves tunnel {tunnel.key}")
        if session not in tunnel.sessions:
            tunnel.sessions.append(session)
        if spec not in session.tunnels:
            session.tunnels.append(spec)

    def port_of(self, name: str) -> int | None:
        """The edge port of the TCP tunnel called C{name}, while any session serves it."""
        return self._port_of.get(name)

    def port_owner(self, port: int) -> str | None:
        """The name of the TCP tunnel on edge port C{port}, while any session serves it."""
        tunnel = self._by_port.get(port)
        return tunnel.key if tunnel is not None else None

    def route_port(self, port: int) -> Route | Reason:
        """
        The route for a connection to edge port C{port}, or the reason there
        is none: C{no_tunnel} when no tunnel has it, C{agent_unavailable}
        when its agents are all unhealthy or draining.
        """
        tunnel = self._by_port.get(port)
        if tunnel is None:
            return Reason.NO_TUNNEL
        session = self._pick(tunnel.sessions)
        if session is None:
            return _none_usable(tunnel.sessions)
        return Route(tunnel.key, session.link, session)

    def port_snapshot(self) -> dict[int, tuple[str, list[str]]]:
        """TCP tunnels: edge port -> (tunnel name, agent ids), for the admin API and tests."""
        return {
            port: (tunnel.key, [s.agent_id for s in tunnel.sessions])
            for port, tunnel in self._by_port.items()
        }

    def _unregister_ports(self, session: AgentSession) -> None:
        for spec in session.tunnels:
            if spec.protocol != "tcp":
                continue
            tunnel = self._by_port.get(spec.port)
            if tunnel is None or session not in tunnel.sessions:
                continue
            tunnel.sessions.remove(session)
            if not tunnel.sessions:
                del self._by_port[spec.port]
                self._port_of.pop(tunnel.key, None)

    def snapshot(self) -> dict[str, Any]:
        """Tunnels and their sessions, for the admin API and tests."""
        return {
            tunnel.key: [s.agent_id for s in tunnel.sessions]
            for tunnels in self._by_host.values()
            for tunnel in tunnels
        }


def _under(path: str, prefix: str) -> bool:
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] in "/?"


def hostname_allowed(hostname: str, allowed: list[str]) -> bool:
    """
    Whether a grant of C{allowed} patterns lets an agent register
    C{hostname}: equal names, or a name (or narrower wildcard) under a
    granted C{*.domain}.
    """
    hostname = hostname.lower()
    for pattern in allowed:
        pattern = pattern.lower()
        if hostname == pattern:
            return True
        if pattern.startswith("*.") and hostname.removeprefix("*.").endswith(pattern[1:]):
            return True
    return False


def _none_usable(sessions: list[AgentSession]) -> Reason:
    """Why no session of a tunnel can take a stream: all draining, or otherwise unusable."""
    if sessions and all(s.draining for s in sessions):
        return Reason.DRAINING
    return Reason.AGENT_UNAVAILABLE
