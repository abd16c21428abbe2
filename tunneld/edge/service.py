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
from tunneld.edge.tcp import TCPTunnels
from tunneld.interfaces import EdgeLinkSetup, ITransportPlugin
from tunneld.listening import ListeningService
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
        self.tcp = TCPTunnels(config.edge, self.router, reactor)
        self.tcp.setServiceParent(self)
        self.sessions = AgentSessions(config, self.router, reactor, tcp=self.tcp)
        edge = config.edge
        settings = PublicHTTPSettings(
            max_header_bytes=edge.max_header_bytes,
            header_timeout=edge.header_timeout,
            idle_timeout=edge.idle_timeout,
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
