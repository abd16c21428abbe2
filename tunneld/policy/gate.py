# -*- test-case-name: tests.test_policy -*-
"""
The gate every public connection and request passes.

L{PublicPolicy} answers two questions for the public listeners: may this
connection be served (caps on connections in total and per client address),
and may this request open a stream on this route (draining, rate limits per
tunnel and per tunnel and client address, concurrent exchanges per tunnel and
per agent session).  A yes is a slot object to release when the work ends;
a no is a L{Refused} carrying the L{Reason} and a C{Retry-After}.

Counters that must return to zero when the edge is idle are in
L{PublicPolicy.snapshot}; the admin API and metrics read it there.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from tunneld.config import LimitsSection, TunnelLimits
from tunneld.interfaces import IStateBackend
from tunneld.model.reasons import Reason
from tunneld.policy.caps import Cap, KeyedCap, Slots
from tunneld.policy.clientaddr import TrustedProxies
from tunneld.policy.ratelimit import BucketTable
from tunneld.policy.shared import SharedBuckets

__all__ = ["PublicPolicy", "Refused"]


@dataclass(frozen=True)
class Refused:
    """A refusal that says when to come back (C{Retry-After}, whole seconds)."""

    reason: Reason
    retry_after: int | None = None
    message: str = ""

    @property
    def text(self) -> str:
        return self.message or self.reason.description


def _burst(rate: float, burst: int | None) -> float:
    """Zero burst means one second's worth of the rate (at least one request)."""
    return float(burst) if burst else max(1.0, math.ceil(rate))


class PublicPolicy:
    """Caps and rate limits of the public side of one edge."""

    log = Logger()

    def __init__(
        self, limits: LimitsSection, clock: IReactorTime, max_streams_per_session: int = 0
    ) -> None:
        self.clock = clock
        self.draining = False
        self.refusals: Counter[str] = Counter()
        self.connections = Cap(0)
        self.client_connections = KeyedCap(0)
        self.tunnel_streams = KeyedCap(0)
        self.tunnel_buckets = BucketTable(clock, 0, 0)
        self.client_buckets = BucketTable(clock, 0, 0)
        # Set by share(): per-tunnel rates held cluster-wide in the state backend.
        self.shared: SharedBuckets | None = None
        self.configure(limits, max_streams_per_session)

    def share(self, backend: IStateBackend) -> None:
        """
        Hold per-tunnel rate limits for the whole cluster in C{backend}'s token
        buckets (several edges on Redis); per-client rates stay per edge.
        """
        self.shared = SharedBuckets(backend, self.clock, self.limits.max_buckets)

    def configure(self, limits: LimitsSection, max_streams_per_session: int = 0) -> None:
        """Apply (new) limits; work already admitted keeps its slots."""
        self.limits = limits
        self.max_streams_per_session = max_streams_per_session
        self.trusted = TrustedProxies(limits.trusted_proxies)
        self.connections.limit = limits.max_connections
        self.client_connections.limit = limits.max_connections_per_client
        self.tunnel_streams.limit = limits.max_streams
        self.tunnel_buckets.max_size = self.client_buckets.max_size = limits.max_buckets
        if self.shared is not None:
            self.shared.max_size = limits.max_buckets
        self.tunnel_buckets.reconfigure(limits.rate, _burst(limits.rate, limits.burst))
        self.client_buckets.reconfigure(
            limits.client_rate, _burst(limits.client_rate, limits.client_burst)
        )
        self._overrides: dict[str, TunnelLimits] = {
            name.lower(): table for name, table in limits.tunnels.items()
        }

    # -- connections -------------------------------------------------------

    def connection_opened(self, peer_host: str) -> Slots | Refused:
        """
        A public connection from C{peer_host} arrived: its slots, or why it
        is refused.  Behind a trusted proxy the peer is not the client, so
        only the total counts (the per-client cap applies to requests' real
        clients through the rate limits instead).
        """
        if self.draining:
            return self._refuse(Reason.DRAINING, self.limits.retry_after)
        total = self.connections.acquire()
        if total is None:
            return self._refuse(
                Reason.CAP_REACHED, self.limits.retry_after,
                f"the edge has {self.connections.limit} public connections open",
            )
        slots = Slots([total])
        if not self.trusted.trusts(peer_host):
            mine = self.client_connections.acquire(peer_host)
            if mine is None:
                slots.release()
                return self._refuse(
                    Reason.CAP_REACHED, self.limits.retry_after,
                    f"{self.client_connections.limit} connections from this address are open",
                )
            slots.add(mine)
        return slots

    def trusts(self, peer_host: str) -> bool:
        """Whether C{peer_host} is a trusted proxy, whose forwarding headers are believed."""
        return self.trusted.trusts(peer_host)

    def client_of(self, peer_host: str, forwarded_for: Iterable[bytes]) -> str:
        """The client address of a request (see L{TrustedProxies.client})."""
        return self.trusted.client(peer_host, forwarded_for)

    # -- requests ----------------------------------------------------------

    def admit(
        self, tunnel: str, client: str, session_streams: int, method: str = ""
    ) -> Slots | Refused:
        """
        May a request from C{client} open a stream on C{tunnel}, over an agent
        session that carries C{session_streams} now?  Its slots, or why not.
        C{method} is the JSON-RPC method the request names (C{Mcp-Method}),
        limited on its own where the tunnel's limits say so.
        """
        limits = self.limits
        if self.draining:
            return self._refuse(Reason.DRAINING, limits.retry_after)
        override = self._overrides.get(tunnel.lower()) if self._overrides else None
        rate = burst = client_rate = client_burst = None
        max_streams = None
        if override is not None:
            rate, client_rate = override.rate, override.client_rate
            max_streams = override.max_streams
            if rate is not None:
                burst = _burst(rate, override.burst if override.burst is not None else limits.burst)
            elif override.burst is not None:
                burst = _burst(limits.rate, override.burst)
            if client_rate is not None:
                client_burst = _burst(
                    client_rate,
                    override.client_burst if override.client_burst is not None
                    else limits.client_burst,
                )
            elif override.client_burst is not None:
                client_burst = _burst(limits.client_rate, override.client_burst)
        by_method = override.methods.get(method) if override is not None and method else None
        wait = self.client_buckets.take((tunnel, client), client_rate, client_burst)
        if wait == 0.0 and by_method is not None and by_method.rate is not None:
            wait = self.tunnel_buckets.take(
                f"{tunnel} {method}", by_method.rate, _burst(by_method.rate, by_method.burst or 0)
            )
            if wait:
                return self._refuse(
                    Reason.RATE_LIMITED, max(1, math.ceil(min(wait, 3600))),
                    f"too many {method} requests on this tunnel",
                )
        if wait == 0.0:
            shared = self.shared
            if shared is None:
                wait = self.tunnel_buckets.take(tunnel, rate, burst)
            else:
                tunnel_rate = limits.rate if rate is None else rate
                if tunnel_rate > 0:
                    wait = shared.take(
                        tunnel.lower(), tunnel_rate,
                        self.tunnel_buckets.burst if burst is None else burst,
                    )
        if wait:
            return self._refuse(Reason.RATE_LIMITED, max(1, math.ceil(min(wait, 3600))))
        cap = self.max_streams_per_session
        if cap and session_streams >= cap:
            return self._refuse(
                Reason.CAP_REACHED, limits.retry_after,
                f"the agent session carries {cap} streams already",
            )
        slot = self.tunnel_streams.acquire(tunnel, max_streams)
        if slot is None:
            return self._refuse(
                Reason.CAP_REACHED, limits.retry_after,
                "this tunnel has as many exchanges in flight as it may",
            )
        slots = Slots([slot])
        if by_method is not None and by_method.max_streams is not None:
            method_slot = self.tunnel_streams.acquire(f"{tunnel} {method}", by_method.max_streams)
            if method_slot is None:
                slots.release()
                return self._refuse(
                    Reason.CAP_REACHED, limits.retry_after,
                    f"this tunnel has {by_method.max_streams} {method} exchanges in flight, "
                    "as many as it may",
                )
            slots.add(method_slot)
        return slots

    def _refuse(self, reason: Reason, retry_after: int, message: str = "") -> Refused:
        self.refusals[reason.value] += 1
        return Refused(reason, retry_after, message)

    # -- observation -------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """
        The counters, read-only: slots in use (all zero on an idle edge),
        bucket table sizes, and refusals by reason since start.
        """
        shared = {} if self.shared is None else {"shared_rate": self.shared.snapshot()}
        return {
            **shared,
            "connections": self.connections.in_use,
            "client_connections": self.client_connections.total(),
            "clients_with_connections": len(self.client_connections.counts),
            "tunnel_streams": self.tunnel_streams.total(),
            "tunnels_with_streams": len(self.tunnel_streams.counts),
            "tunnel_buckets": len(self.tunnel_buckets if self.shared is None else self.shared),
            "client_buckets": len(self.client_buckets),
            "draining": self.draining,
            "refusals": dict(self.refusals),
        }
