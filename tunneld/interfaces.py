"""
The seams of tunneld.

Routing code talks to agents only through L{IAgentLink} and L{IStream}; each
transport (WebSocket, HTTP/2 in gRPC form, streamable HTTP, third-party
drop-ins) provides them and is found as an L{ITransportPlugin}.  The router
never imports a transport and a transport never imports the router.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface

from tunneld.reasons import Reason
from tunneld.wire.messages import ControlMessage, Headers, ReplyHead, StreamHead


class IStreamReceiver(Interface):
    """
    Takes what arrives on a stream from the far end of the link.

    Calls come in protocol order: at most one C{reply_received} (edge side),
    any number of C{data_received}, then exactly one of C{end_received} or
    C{reset_received}.

    A receiver whose class sets C{borrows_data = True} may be handed a
    C{memoryview} by C{data_received}: a view of a received frame, which
    nothing changes afterwards, so it may be kept as C{bytes} would (keeping
    it keeps the whole frame).  Others always get C{bytes}.
    """

    def reply_received(reply: ReplyHead) -> None:
        """The upstream's response head arrived (edge side only)."""

    def data_received(data: bytes) -> None:
        """Bytes arrived; credit for them is returned once the stream is not paused."""

    def end_received(trailers: Headers) -> None:
        """The far end finished sending, with optional trailers."""

    def reset_received(reason: Reason, message: str) -> None:
        """The stream was ended abnormally, by the far end or by the link."""


class IStream(IPushProducer, IConsumer):
    """
    One public exchange carried over an agent link.

    As an L{IPushProducer} it produces the incoming data: pausing it stops the
    far end from sending more (no more credit is granted).  As an
    L{IConsumer} it takes outgoing data: it pauses a registered producer when
    the far end has granted no more credit or the link itself is congested.
    C{stopProducing} resets the stream with C{cancelled}.  C{write} also
    takes a C{memoryview} of bytes that nothing changes afterwards.
    """

    head: StreamHead = Attribute(
        "What the stream is about, as the edge opened it; once its header fields"
        " are sent on (the edge's Open, an agent's upgrade request), a head"
        " without them may replace it."
    )

    def attach(receiver: IStreamReceiver) -> None:
        """Say who takes incoming events (the agent does this on accepting)."""

    def send_reply(reply: ReplyHead) -> None:
        """Send the response head (agent side only)."""

    def end(trailers: Headers = ()) -> None:
        """Finish the outgoing direction, with optional trailers."""

    def reset(reason: Reason, message: str) -> None:
        """End both directions abnormally and tell the far end why."""


class ILinkHandler(Interface):
    """What the edge or agent core does with events from one agent link."""

    def control_received(message: ControlMessage) -> None:
        """A link-level message (hello, welcome, goaway) arrived."""

    def stream_opened(stream: IStream) -> None:
        """The far end opened a stream (agent side); call C{stream.attach}."""

    def link_lost(reason: Reason, message: str) -> None:
        """The link is gone; every open stream has already been reset."""


class IAgentLink(Interface):
    """One connected agent link, as seen from either end."""

    transport_name: str = Attribute("The plugin name of the transport, e.g. 'websocket'.")
    peer: str = Attribute("The far end's address, for logs.")
    peer_certificate: Any = Attribute(
        "The far end's verified TLS certificate (pyOpenSSL X509), or None."
    )

    def set_handler(handler: ILinkHandler) -> None:
        """Say who takes the link's events; called once, before any arrive."""

    def send_control(message: ControlMessage) -> None:
        """Send a link-level message."""

    def open_stream(
        head: StreamHead, receiver: IStreamReceiver, end_stream: bool = False
    ) -> IStream:
        """
        Open a new stream to the far end (edge side).  With C{end_stream}
        (a request without a body) the stream starts ended in this direction,
        exactly as if C{end()} followed: a link may then say both in one frame.
        """

    def round_trip_time() -> float | None:
        """The last measured heartbeat round trip in seconds, or None yet."""

    def active_streams() -> int:
        """How many streams are open on this link now."""

    def close(reason: Reason, message: str) -> None:
        """Reset every stream with C{reason} and close the link."""

    def when_closed() -> Any:
        """A Deferred that fires once the link's connection is fully closed."""


@dataclass(frozen=True)
class EdgeLinkSetup:
    """What the edge hands a transport to listen for agents."""

    on_link: Callable[[IAgentLink], None]
    reactor: Any
    tls: Any = None  # an IOpenSSLServerConnectionCreator (agent mTLS), or None
    max_frame_size: int = 1 << 20
    initial_window: int = 256 * 1024
    max_streams: int = 10_000  # concurrent streams on one agent link


@dataclass(frozen=True)
class AgentLinkSetup:
    """What the agent hands a transport to dial the edge."""

    reactor: Any
    tls_for: Callable[[str], Any] | None = None  # hostname -> IOpenSSLClientConnectionCreator
    max_frame_size: int = 1 << 20
    initial_window: int = 256 * 1024


class ITransportPlugin(IPlugin):
    """
    An agent-link transport, found with L{twisted.plugin.getPlugins} in the
    L{tunneld.plugins} package.
    """

    name: str = Attribute("The name the configuration uses, e.g. 'websocket'.")

    def edge_options(table: Mapping[str, Any], where: str) -> Any:
        """
        Validate this transport's edge configuration table; raise
        L{tunneld.errors.ConfigError} naming C{where} and the key.
        """

    def agent_options(table: Mapping[str, Any], where: str) -> Any:
        """Validate this transport's agent configuration table, likewise."""

    def edge_service(options: Any, setup: EdgeLinkSetup) -> Any:
        """An L{twisted.application.service.IService} accepting agent links."""

    def connect(options: Any, setup: AgentLinkSetup) -> Any:
        """Dial the edge; a Deferred firing with an L{IAgentLink}."""
