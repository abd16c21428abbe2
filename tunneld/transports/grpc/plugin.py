# -*- test-case-name: tests.test_grpc_transport,tests.test_config -*-
"""
The C{grpc} transport plugin (L{ITransportPlugin}): its settings, the edge's
listener and the agent's dial.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from tunneld.config.schema import parse_table
from tunneld.errors import ConfigError
from tunneld.interfaces import AgentLinkSetup, EdgeLinkSetup, IAgentLink, ITransportPlugin
from tunneld.listening import ListeningService
from tunneld.transports.grpc.agent import dial
from tunneld.transports.grpc.edge import EdgeGrpcFactory
from tunneld.transports.grpc.options import GrpcAgentOptions, GrpcEdgeOptions, split_address

__all__ = ["GrpcTransport"]


@implementer(ITransportPlugin)
class GrpcTransport:
    """The C{grpc} transport plugin."""

    name = "grpc"

    def edge_options(self, table: Any, where: str) -> GrpcEdgeOptions:
        """ITransportPlugin.edge_options"""
        return parse_table(GrpcEdgeOptions, table, where, "transports.grpc")

    def agent_options(self, table: Any, where: str) -> GrpcAgentOptions:
        """ITransportPlugin.agent_options"""
        options = parse_table(GrpcAgentOptions, table, where, "transports.grpc")
        if split_address(options.address) is None:
            raise ConfigError(
                where, "transports.grpc.address", f"expected host:port, got {options.address!r}"
            )
        if options.min_idle_forwards > options.max_idle_forwards:
            raise ConfigError(
                where, "transports.grpc.min_idle_forwards",
                f"must not exceed max_idle_forwards ({options.max_idle_forwards}), "
                f"got {options.min_idle_forwards}",
            )
        return options

    def edge_service(self, options: object, setup: EdgeLinkSetup) -> IService:
        """ITransportPlugin.edge_service"""
        assert isinstance(options, GrpcEdgeOptions), options
        factory: Any = EdgeGrpcFactory(options, setup)
        if setup.tls is not None:
            factory = TLSMemoryBIOFactory(setup.tls, False, factory)
        service = ListeningService(setup.reactor, options.listen, factory, "grpc agent link")
        service.setName("transport:grpc")
        return service

    def connect(self, options: object, setup: AgentLinkSetup) -> Deferred[IAgentLink]:
        """ITransportPlugin.connect: fires once HTTP/2 is up and Control is open."""
        assert isinstance(options, GrpcAgentOptions), options
        return cast("Deferred[IAgentLink]", dial(options, setup))  # it fires with an AgentGrpcLink
