"""
A third-party transport, shipped only with the tests: tunnel frames as
32-bit length-prefixed messages over plain TCP.

It lives outside tunneld, in a C{tunneld/plugins} directory with no
C{__init__.py}, and is found by Twisted's plugin system like any drop-in.
It uses only tunneld's public seams: the interfaces, the schema helper and
L{tunneld.transports.mux.FrameLink}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import clientFromString
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import implementer

from tunneld.config.schema import parse_table, setting
from tunneld.interfaces import ITransportPlugin
from tunneld.listening import ListeningService
from tunneld.model.reasons import Reason
from tunneld.transports.mux import FrameLink, SocketCongestion


@dataclass(frozen=True)
class EdgeOptions:
    listen: str = setting("tcp:0:interface=127.0.0.1", "Where agents connect.")


@dataclass(frozen=True)
class AgentOptions:
    connect: str = setting("tcp:host=127.0.0.1:port=8083", "Where the edge listens.")


class LengthPrefixedFrames(Int32StringReceiver):
    MAX_LENGTH = 2 << 20
    link: FrameLink

    def __init__(self, is_edge: bool, setup: Any) -> None:
        self.is_edge = is_edge
        self.setup = setup

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.link = FrameLink(
            self, transport_name="lpframes", peer=f"{peer.host}:{peer.port}",
            reactor=self.setup.reactor, is_edge=self.is_edge,
            initial_window=self.setup.initial_window, max_frame_size=self.setup.max_frame_size,
        )
        self.transport.registerProducer(SocketCongestion(self.link), True)
        self.factory.made(self.link)

    def send_frame(self, payload: bytes) -> None:
        self.sendString(payload)

    def close_wire(self, reason: Reason, message: str) -> None:
        self.transport.loseConnection()

    def stringReceived(self, string: bytes) -> None:
        self.link.frame_received(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self.link.close(Reason.PROTOCOL_ERROR, f"frame of {length} bytes")

    def connectionLost(self, reason: Any = None) -> None:
        self.link.wire_lost(Reason.AGENT_GONE, "connection lost")


class _Factory(protocol.Factory):
    def __init__(self, is_edge: bool, setup: Any, made: Any) -> None:
        self.is_edge = is_edge
        self.setup = setup
        self.made = made

    def buildProtocol(self, addr: Any) -> LengthPrefixedFrames:
        p = LengthPrefixedFrames(self.is_edge, self.setup)
        p.factory = self
        return p


@implementer(ITransportPlugin)
class LengthPrefixedTransport:
    name = "lpframes"

    def edge_options(self, table: Any, where: str) -> EdgeOptions:
        return parse_table(EdgeOptions, table, where, "transports.lpframes")

    def agent_options(self, table: Any, where: str) -> AgentOptions:
        return parse_table(AgentOptions, table, where, "transports.lpframes")

    def edge_service(self, options: EdgeOptions, setup: Any) -> Any:
        return ListeningService(setup.reactor, options.listen,
                                _Factory(True, setup, setup.on_link), "lpframes agent link")

    def connect(self, options: AgentOptions, setup: Any) -> Any:
        opened: defer.Deferred[FrameLink] = defer.Deferred()
        factory = _Factory(False, setup, opened.callback)
        d = clientFromString(setup.reactor, options.connect).connect(factory)
        d.addErrback(opened.errback)
        return opened


lpframes = LengthPrefixedTransport()
