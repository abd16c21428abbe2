# -*- test-case-name: tests.test_observe -*-
"""
Observability of one edge as a service: the admin listener, RTT sampling and
systemd notification, started with the edge and stopped first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource

from tunneld.listening import ListeningService, listeners_under
from tunneld.observe.admin import EdgeView, admin_site
from tunneld.observe.metrics import EdgeMetrics
from tunneld.observe.stats import EdgeStats
from tunneld.observe.systemd import Notifier, SystemdNotifyService

RTT_SAMPLE_SECONDS = 5.0


class EdgeObservability(MultiService):
    """
    Admin API, metrics and readiness for the edge service C{root}: ready once
    every listener anywhere in its tree is bound (public, agent links, admin,
    and whatever listeners other parts of the edge add).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        sessions: Any,
        stats: EdgeStats,
        root: MultiService,
        admin_listen: str,
        notifier: Notifier | None = None,
        mounts: Mapping[tuple[bytes, ...], Resource] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.sessions = sessions
        self.stats = stats
        self.root = root
        state = getattr(getattr(root, "state", None), "backend", None)
        self.state_backend = state
        self.metrics = EdgeMetrics(stats, sessions, self.backends, self.state_health)
        policy = getattr(root, "policy", None)
        self.view = EdgeView(
            sessions, stats, self.metrics, self.listeners_up,
            backends=self.backends,
            policy=policy.snapshot if policy is not None else dict,
            # The same reasons as health_listen's /readyz, so both probes agree.
            problems=getattr(root, "not_ready", list),
            notes=getattr(root, "degraded", list),
            cluster=getattr(root, "cluster", None),
            transports=getattr(root, "transport_tables", dict),
        )
        self.admin: ListeningService | None = None
        if admin_listen:
            self.admin = ListeningService(
                reactor, admin_listen, admin_site(self.view, mounts), "admin API", key="edge.admin_listen"
            )
            self.admin.setServiceParent(self)
        sampler = TimerService(RTT_SAMPLE_SECONDS, self.sample_rtt)
        sampler.clock = reactor
        sampler.setServiceParent(self)
        self.notify = SystemdNotifyService(reactor, self._waits, self._status, notifier)
        self.notify.setServiceParent(self)

    def backends(self) -> dict[str, bool]:
        """The state backend's name and whether its store answers."""
        backend = self.state_backend
        if backend is None:
            return {"memory": True}
        return {backend.name: backend.health().reachable}

    def state_health(self) -> Any:
        """The state backend's L{StateHealth}, or None without one."""
        backend = self.state_backend
        return None if backend is None else backend.health()

    def _all_listeners(self) -> list[Any]:
        found = listeners_under(self.root)
        if self.admin is not None and self.admin not in found:
            found.append(self.admin)
        return found

    def _waits(self) -> list[Deferred[Any]]:
        return [listener.listening for listener in self._all_listeners()]

    def listeners_up(self) -> bool:
        """Whether every listener is bound and the edge is not stopping."""
        return bool(self.running) and all(
            getattr(listener, "port", None) is not None for listener in self._all_listeners()
        )

    def _status(self) -> str:
        parts = []
        for listener in self._all_listeners():
            address = listener.address
            role = getattr(listener, "role", type(listener).__name__)
            if address is not None and hasattr(address, "port"):
                parts.append(f"{role} on {address.host}:{address.port}")
        return "listening: " + ", ".join(parts)

    def sample_rtt(self) -> None:
        """Record each agent link's last heartbeat round trip in the histogram."""
        for session in list(self.sessions.sessions.values()):
            rtt = session.link.round_trip_time()
            if rtt is not None:
                self.stats.rtt(rtt)
