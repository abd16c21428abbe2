"""
The seams of tunneld.

Routing code talks to agents only through L{IAgentLink} and L{IStream}; each
transport (WebSocket, HTTP/2 in gRPC form, streamable HTTP, third-party
drop-ins) provides them and is found as an L{ITransportPlugin}.  The router
never imports a transport and a transport never imports the router.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    IReactorTime,
)
from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface

from tunneld.model.messages import ControlMessage, Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason
from tunneld.wire.codec import Codec

if TYPE_CHECKING:
    from OpenSSL.crypto import X509


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


class IUpstream(Interface):
    """
    Where the agent sends the streams of one tunnel (or of one kind): an
    HTTP/1.1 upstream with its pooled connections, an h2c upstream, the
    upgrade relays, a TCP forwarder, the terminal service.  The agent picks
    one by the stream's tunnel and kind and hands it the stream; it never
    asks what kind of upstream it holds.
    """

    def forward(stream: IStream) -> None:
        """
        Serve C{stream} to its end: attach to it, answer it, or reset it
        with a reason that names what went wrong.
        """

    def close() -> Deferred[Any]:
        """
        Stop taking streams and let go of what is idle; the Deferred fires
        once the connections (or processes) not serving a stream are gone.
        """


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
    peer_certificate: X509 | None = Attribute(
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

    def when_closed() -> Deferred[None]:
        """A Deferred that fires once the link's connection is fully closed."""


@dataclass(frozen=True)
class EdgeLinkSetup:
    """
    What the edge hands a transport to listen for agents.  C{reactor} is the
    whole reactor (endpoint strings need more than its clock); a transport
    uses its clock through L{IReactorTime}.
    """

    on_link: Callable[[IAgentLink], None]
    reactor: IReactorTime
    tls: IOpenSSLServerConnectionCreator | None = None  # agent-link TLS (mTLS), or None
    max_frame_size: int = 1 << 20
    initial_window: int = 256 * 1024
    max_streams: int = 10_000  # concurrent streams on one agent link
    # The frame codec, with what it remembers of recurring heads: one per edge, shared by its links.
    codec: Codec = field(default_factory=Codec)
    # The edge's IStateBackend (design §6): what a transport keeps there is
    # seen by every edge of the cluster (memory: this process only).
    state: IStateBackend | None = None


@dataclass(frozen=True)
class AgentLinkSetup:
    """What the agent hands a transport to dial the edge (C{reactor} as in L{EdgeLinkSetup})."""

    reactor: IReactorTime
    # hostname -> the TLS to dial it with; None: the transport's default (the system's roots)
    tls_for: Callable[[str], IOpenSSLClientConnectionCreator] | None = None
    max_frame_size: int = 1 << 20
    initial_window: int = 256 * 1024
    # An HTTP/1.1 forward proxy (host, port) every connection to the edge goes
    # through ([agent] proxy): plain requests in absolute form, or a CONNECT
    # tunnel (tunneld.proxyconnect); None: connect directly.
    proxy: tuple[str, int] | None = None
    # The frame codec, with what it remembers of recurring heads: one per agent, shared by its links.
    codec: Codec = field(default_factory=Codec)


class LinkRefused(Exception):
    """
    A transport's C{connect} failed in a way that dialling again will not
    change (the edge, or something in front of it, answered 401, 403 or 404
    to the agent's first request): the agent stops after a few rounds of
    such refusals instead of dialling forever.  The message says what was
    refused and by whom.
    """


class ITransportPlugin(IPlugin):
    """
    An agent-link transport, found with L{twisted.plugin.getPlugins} in the
    L{tunneld.plugins} package.

    Its options are its own: whatever C{edge_options} (C{agent_options})
    returns, the core only hands back to C{edge_service} (C{connect}), so
    they are C{object} here and the plugin's own type in the plugin.  An
    edge options object with a C{listen} endpoint string has it checked
    like every other listener.
    """

    name: str = Attribute("The name the configuration uses, e.g. 'websocket'.")

    def edge_options(table: Mapping[str, object], where: str) -> object:
        """
        Validate this transport's edge configuration table; raise
        L{tunneld.errors.ConfigError} naming C{where} and the key.
        """

    def agent_options(table: Mapping[str, object], where: str) -> object:
        """Validate this transport's agent configuration table, likewise."""

    def edge_service(options: object, setup: EdgeLinkSetup) -> IService:
        """A service accepting agent links, each handed to C{setup.on_link}."""

    def connect(options: object, setup: AgentLinkSetup) -> Deferred[IAgentLink]:
        """
        Dial the edge; a Deferred firing with the link, or failing (with
        L{LinkRefused} when retrying cannot help).
        """


# --- Shared state: what several edges agree on (design §6, issue 20) -------
#
# The state backend is the one place where edges keep what another edge must
# see: which edges are alive, which edge holds a session for which tunnel,
# hostname reservations, cluster-unique ID epochs, rate-limit buckets, cap
# counters and small records with a lifetime.  It holds the bytes of a
# stream only as a transport's bounded replay buffer (streamable HTTP).
# `tunneld.state.memory` is the one-process default, `tunneld.state.redis`
# shares it through Redis.  Every method answers with a Deferred and never
# blocks the reactor.


class StateUnavailable(Exception):
    """
    The shared store could not be asked (unreachable, timed out, failing
    over): the caller decides locally and says so.  The message names why.
    """


@dataclass(frozen=True)
class EdgeRecord:
    """One live edge as the cluster sees it."""

    edge_id: str  # unique per incarnation: a restarted edge is a new edge
    name: str  # the operator's name for it (the host name by default)
    relay_address: str = ""  # where other edges reach it for relayed streams ('' = nowhere)
    public_addresses: tuple[str, ...] = ()
    draining: bool = False
    started_at: float = 0.0  # seconds since the epoch, for people
    # Where an agent dials this edge, one URL per transport (ws://…, wss://…,
    # grpc://…, grpcs://…): what a draining edge's GoAway names as reconnect_to.
    agent_urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenVerdict:
    """The answer of a token bucket to one take."""

    allowed: bool
    retry_after: float  # seconds until the asked-for tokens are there; 0.0 when allowed
    tokens: float  # tokens left in the bucket after this take
    now: float  # the bucket clock at the decision (Redis TIME, or the reactor clock)
    degraded: bool = False  # decided by this edge alone because the shared store was unreachable


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a hostname for an identity."""

    granted: bool
    owner: str  # the identity holding the name now (the claimant when granted)
    expires_in: float | None  # seconds left on the reservation; None: it does not expire


@dataclass(frozen=True)
class CountResult:
    """A cluster-wide counter after an adjustment."""

    granted: bool  # False: the cap would have been exceeded, nothing was added
    total: int  # the sum of every live edge's contribution


@dataclass(frozen=True)
class LogEntry:
    """One entry of a bounded log (a replay buffer) and its event id."""

    event_id: str
    data: bytes


@dataclass(frozen=True)
class LogRead:
    """Entries of a bounded log after an event id."""

    entries: tuple[LogEntry, ...]
    # False when entries the reader has not seen were trimmed or expired, or
    # the event id was never issued by this log: a resume would lose data.
    complete: bool


@dataclass(frozen=True)
class StateHealth:
    """How the state backend is doing, for /readyz detail, metrics and logs."""

    backend: str  # "memory" or "redis"
    reachable: bool  # the shared store answers; False means degraded (local decisions)
    degraded_since: float | None = None  # reactor time the current outage began
    last_error: str = ""
    outages: int = 0  # times the store became unreachable since start
    fallback_decisions: int = 0  # token-bucket takes decided locally for want of the store
    failed_operations: int = 0  # operations that failed with StateUnavailable


class IStateBackend(Interface):
    """
    State shared by every edge of a cluster (design §6).

    Keys (tunnel keys, hostnames, bucket and counter names, record keys) are
    non-empty strings.  TTLs are seconds on the store's clock, refreshed by
    whoever holds the entry; an entry whose holder stops refreshing it (an
    edge killed with SIGKILL) disappears within its TTL.  Operations that
    cannot reach the store fail with L{StateUnavailable}, except
    L{take_tokens}, which then decides with a local bucket.
    """

    name: str = Attribute("The backend's name: 'memory' or 'redis'.")

    def start() -> Deferred[None]:
        """
        Connect.  Fires once the store answers, or once the connect timeout
        has passed with the backend in degraded mode (logged); fails only for
        a mistake a person must fix (e.g. the store refused the credentials).
        """

    def close() -> Deferred[None]:
        """Stop every timer and connection; entries left are kept by their TTLs."""

    def health() -> StateHealth:
        """The backend's state now (no I/O)."""

    def on_recovered(callback: Callable[[], None]) -> None:
        """Call C{callback} each time the store becomes reachable again after an outage."""

    # Cluster-unique IDs
    def allocate_epoch() -> Deferred[int]:
        """
        A number no other edge of the cluster has been or will be given: the
        prefix of every ID this edge mints (see L{tunneld.state.ids}).
        """

    # Edge registry
    def register_edge(record: EdgeRecord, ttl: float) -> Deferred[None]:
        """Add or refresh this edge's record for C{ttl} seconds."""

    def remove_edge(edge_id: str) -> Deferred[None]:
        """Forget an edge at once, with its tunnel entries and counter contributions."""

    def live_edges() -> Deferred[list[EdgeRecord]]:
        """Every edge whose record has not expired, in no particular order."""

    # Tunnel registry
    def hold_tunnels(edge_id: str, keys: Sequence[str], ttl: float) -> Deferred[None]:
        """Say that C{edge_id} holds a live session for each tunnel key, for C{ttl} seconds."""

    def release_tunnels(edge_id: str, keys: Sequence[str]) -> Deferred[None]:
        """C{edge_id} no longer holds a session for these tunnels."""

    def tunnel_edges(key: str) -> Deferred[list[str]]:
        """The edges holding a live session for tunnel C{key}, sorted."""

    def edge_tunnels(edge_id: str) -> Deferred[list[str]]:
        """The tunnel keys C{edge_id} holds, sorted."""

    # Hostname reservations
    def claim_name(name: str, identity: str, ttl: float | None) -> Deferred[Claim]:
        """
        Reserve C{name} for C{identity}: granted when free or already this
        identity's (then its lifetime becomes C{ttl}; None = no expiry),
        refused, with the owner, when another identity holds it.  Atomic.
        """

    def release_name(name: str, identity: str) -> Deferred[bool]:
        """Drop C{identity}'s reservation of C{name}; False when it held none."""

    def name_owner(name: str) -> Deferred[str | None]:
        """The identity holding C{name}, or None."""

    # Token buckets
    def take_tokens(bucket: str, cost: float, rate: float, burst: float) -> Deferred[TokenVerdict]:
        """
        Take C{cost} tokens from bucket C{bucket}, which holds C{burst} tokens
        at most and gains C{rate} a second (C{rate} > 0, C{burst} >= C{cost}).
        Never fails: without the store the verdict comes from a local bucket
        and says C{degraded}.
        """

    # Cluster-wide counters (caps), one TTL'd contribution per edge
    def set_count(counter: str, edge_id: str, value: int, ttl: float) -> Deferred[int]:
        """Set C{edge_id}'s contribution to C{counter} for C{ttl} seconds; the new total."""

    def adjust_count(
        counter: str, edge_id: str, delta: int, ttl: float, cap: int | None = None
    ) -> Deferred[CountResult]:
        """
        Add C{delta} to C{edge_id}'s contribution (never below 0) and refresh
        it for C{ttl} seconds; with C{cap}, an increase that would take the
        total past C{cap} is refused and changes nothing.  Atomic.
        """

    def count_total(counter: str) -> Deferred[int]:
        """The sum of every live contribution to C{counter}."""

    # Small records with a lifetime
    def put_record(
        namespace: str, key: str, value: bytes, ttl: float, only_if_absent: bool = False
    ) -> Deferred[bool]:
        """Store C{value} for C{ttl} seconds; with C{only_if_absent}, False if one exists."""

    def get_record(namespace: str, key: str) -> Deferred[bytes | None]:
        """The value, or None when absent or expired."""

    def take_record(namespace: str, key: str) -> Deferred[bytes | None]:
        """Get and delete atomically: of many concurrent takers one gets the value (single use)."""

    def delete_record(namespace: str, key: str) -> Deferred[bool]:
        """Delete; False when there was nothing."""

    # Bounded logs (replay buffers)
    def append_log(
        namespace: str, key: str, data: bytes, max_entries: int, ttl: float
    ) -> Deferred[str]:
        """
        Append C{data}, keep the newest C{max_entries} entries, keep the log
        for C{ttl} seconds after this append; the new entry's event id, which
        is unique within the log and increasing, whichever edge appended.
        """

    def read_log(
        namespace: str, key: str, after: str | None, limit: int
    ) -> Deferred[LogRead]:
        """
        At most C{limit} entries after event id C{after} (None: from the
        oldest kept), oldest first, and whether nothing in between was lost.
        """

    def delete_log(namespace: str, key: str) -> Deferred[None]:
        """Drop the log."""

    def extend_log(
        namespace: str, key: str, items: Sequence[bytes], max_entries: int, ttl: float
    ) -> Deferred[str]:
        """
        Append C{items} in order, as one atomic step: no other edge's entry
        falls between them (a single writer that must keep its order sends
        its batch this way rather than as concurrent L{append_log} calls,
        which may travel on different connections).  Otherwise as
        L{append_log}; the event id of the last new entry.
        """

    def trim_log(namespace: str, key: str, through: str) -> Deferred[None]:
        """
        Drop the entries up to and including event id C{through} (those every
        reader has had), so that a log bounded by count is bounded by use too;
        a read from before them then says C{complete=False}.
        """

    def watch_log(namespace: str, key: str, callback: Callable[[], None]) -> ILogWatch:
        """
        Call C{callback} (no arguments) soon after entries are appended to
        the log, by this edge or any other; one call may stand for several
        appends, and a call may come when nothing new is there.  It is also
        called after the store becomes reachable again (appends made
        meanwhile may not have been announced), so a watcher that reads the
        log on every call misses nothing.  It is never called from inside
        L{append_log} or L{extend_log}.
        """


class ILogWatch(Interface):
    """A registration made by L{IStateBackend.watch_log}."""

    def cancel() -> None:
        """Stop calling the callback; idempotent."""
