# -*- test-case-name: tests.test_streamable_http -*-
"""The C{streamable-http} transport plugin: options, the edge's endpoint, the agent's dial."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from zope.interface import implementer

from tunneld.config.schema import parse_table
from tunneld.interfaces import AgentLinkSetup, EdgeLinkSetup, IAgentLink, ITransportPlugin
from tunneld_streamable_http.options import StreamableHTTPAgentOptions, StreamableHTTPEdgeOptions

NAME = "streamable-http"


@implementer(ITransportPlugin)
class StreamableHTTPTransport:
    """Agent links as plain HTTP/1.1: POSTs up, a Server-Sent-Events stream down."""

    name = NAME

    def edge_options(self, table: Any, where: str) -> StreamableHTTPEdgeOptions:
        """ITransportPlugin.edge_options"""
        return parse_table(StreamableHTTPEdgeOptions, table, where, f"transports.{NAME}")

    def agent_options(self, table: Any, where: str) -> StreamableHTTPAgentOptions:
        """ITransportPlugin.agent_options"""
        return parse_table(StreamableHTTPAgentOptions, table, where, f"transports.{NAME}")

    def edge_service(self, options: object, setup: EdgeLinkSetup) -> IService:
        """ITransportPlugin.edge_service"""
        from tunneld_streamable_http.edge import EdgeEndpoint

        assert isinstance(options, StreamableHTTPEdgeOptions), options

        return EdgeEndpoint(options, setup)

    def connect(self, options: object, setup: AgentLinkSetup) -> Deferred[IAgentLink]:
        """ITransportPlugin.connect"""
        from tunneld_streamable_http.agent import connect

        assert isinstance(options, StreamableHTTPAgentOptions), options

        return connect(options, setup)
