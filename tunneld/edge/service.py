# -*- test-case-name: tests.test_end_to_end -*-
"""
The edge as a service tree: router, agent sessions, public listeners and one
listening service per configured transport, all under one L{MultiService}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService

from tunneld.config import EdgeConfig
from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPSettings
from tunneld.edge.sessions import AgentSessions
from tunneld.interfaces import EdgeLinkSetup, ITransportPlugin
from tunneld.listening import ListeningService
from tunneld.reasons import Reason
from tunneld.router import Router


class EdgeService(MultiService):
    """Everything one edge process runs."""

    def __init__(
        self,
        config: EdgeConfig,
        transports: list[tuple[ITransportPlugin, Any]],
        reactor: Any,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.router = Router()
        self.sessions = AgentSessions(config, self.router, reactor)
        edge = config.edge
        settings = PublicHTTPSettings(
            max_header_bytes=edge.max_header_bytes,
            header_timeout=edge.header_timeout,
            idle_timeout=edge.idle_timeout,
            websocket_ping_interval=edge.websocket_ping_interval,
        )
        self.public: list[ListeningService] = []
        for description in edge.public_listen:
            listener = ListeningService(
                reactor, description, PublicHTTPFactory(self.router, settings, reactor),
                "public HTTP",
            )
            listener.setServiceParent(self)
            self.public.append(listener)
        setup = EdgeLinkSetup(
            on_link=self.sessions.link_connected,
            reactor=reactor,
            max_frame_size=edge.max_frame_size,
            initial_window=edge.initial_window,
        )
        self.transports: dict[str, Any] = {}
        for plugin, options in transports:
            service = plugin.edge_service(options, setup)
            service.setServiceParent(self)
            self.transports[plugin.name] = service

    def shutdown_upgraded(self, reason: Reason, message: str) -> int:
        """
        End every public connection that switched protocols (WebSocket and
        the like) for C{reason}, e.g. C{draining}: agents hear the reason,
        WebSocket clients get a Close frame with its code and text.  Returns
        how many were ended.
        """
        factories = [getattr(s.factory, "wrappedFactory", s.factory) for s in self.public]
        return sum(factory.shutdown_upgraded(reason, message) for factory in factories)
