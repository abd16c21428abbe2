# -*- test-case-name: tests.test_end_to_end -*-
"""
The edge as a service tree: router, agent sessions, public listeners and one
listening service per configured transport, all under one L{MultiService}.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.application.service import MultiService

from tunneld.config import EdgeConfig
from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPSettings
from tunneld.edge.http2 import PublicH2Factory, PublicH2Settings, PublicHTTPChooserFactory
from tunneld.edge.public_tls import PublicTLSFactory, public_tls_contexts
from tunneld.edge.sessions import AgentSessions
from tunneld.edge.tcp import TCPTunnels
from tunneld.interfaces import EdgeLinkSetup, ITransportPlugin
from tunneld.listening import ListeningService
from tunneld.observe.service import EdgeObservability
from tunneld.observe.stats import EdgeStats
from tunneld.router import Router
from tunneld.tls import agent_link_tls


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
        self.stats = EdgeStats(reactor)
        self.tcp = TCPTunnels(config.edge, self.router, reactor)
        self.tcp.setServiceParent(self)
        self.sessions = AgentSessions(config, self.router, reactor, self.stats, tcp=self.tcp)
        edge = config.edge
        settings = PublicHTTPSettings(
            max_header_bytes=edge.max_header_bytes,
            header_timeout=edge.header_timeout,
            idle_timeout=edge.idle_timeout,
            max_header_count=edge.max_header_count,
            max_request_line=edge.max_request_line,
        )
        self.public: list[ListeningService] = []
        for description in edge.public_listen:
            listener = ListeningService(
                reactor, description, PublicHTTPFactory(self.router, settings, reactor, self.stats),
                "public HTTP",
            )
            listener.setServiceParent(self)
            self.public.append(listener)
        self.public_h2c: list[ListeningService] = []
        self.public_tls: list[ListeningService] = []
        self._public_h2(settings)
        setup = EdgeLinkSetup(
            on_link=self.sessions.link_connected,
            reactor=reactor,
            max_frame_size=edge.max_frame_size,
            initial_window=edge.initial_window,
            max_streams=edge.max_streams_per_agent,
            tls=agent_link_tls(edge.agent_tls),
        )
        self.transports: dict[str, Any] = {}
        for plugin, options in transports:
            self.sessions.listener_added(plugin.name, getattr(options, "listen", ""), setup.tls)
            service = plugin.edge_service(options, setup)
            service.setServiceParent(self)
            self.transports[plugin.name] = service
        # Admin API, metrics, systemd readiness (once every listener in this tree is up).
        self.observe = EdgeObservability(
            reactor, self.sessions, self.stats, self, edge.admin_listen
        )
        self.observe.setServiceParent(self)

    def _public_h2(self, settings: PublicHTTPSettings) -> None:
        """The listeners speaking HTTP/2 as well: cleartext (prior knowledge) and TLS."""
        edge = self.config.edge
        h2_settings = PublicH2Settings(
            initial_window=edge.h2_initial_window,
            max_concurrent_streams=edge.h2_max_concurrent_streams,
            max_header_bytes=edge.max_header_bytes,
            header_timeout=edge.header_timeout,
            idle_timeout=edge.idle_timeout,
        )
        reactor = self.reactor
        for description in edge.public_h2c_listen:
            chooser = PublicHTTPChooserFactory(
                PublicHTTPFactory(self.router, settings, reactor, self.stats),
                PublicH2Factory(self.router, h2_settings, reactor),
                reactor, edge.header_timeout,
            )
            listener = ListeningService(reactor, description, chooser, "public HTTP/2 (h2c)")
            listener.setServiceParent(self)
            self.public.append(listener)
            self.public_h2c.append(listener)
        if not edge.public_tls_listen:
            return
        contexts = public_tls_contexts(edge.tls, self.config.source)
        tls_http1 = replace(settings, scheme="https")
        tls_h2 = replace(h2_settings, scheme="https")
        for description in edge.public_tls_listen:
            chooser = PublicHTTPChooserFactory(
                PublicHTTPFactory(self.router, tls_http1, reactor, self.stats),
                PublicH2Factory(self.router, tls_h2, reactor),
                reactor, edge.header_timeout,
            )
            listener = ListeningService(
                reactor, description, PublicTLSFactory(contexts, chooser), "public HTTPS"
            )
            listener.setServiceParent(self)
            self.public.append(listener)
            self.public_tls.append(listener)
