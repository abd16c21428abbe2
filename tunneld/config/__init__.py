# -*- test-case-name: tests.test_config -*-
"""
The edge's and the agent's configuration: one TOML file each, as a schema.

Every key has a documented default (so no file at all is a valid edge
configuration: loopback, in-memory, development mode), and every mistake
fails at start with the file, the key and the reason.

A pure schema: this package reads files and checks values, and imports
nothing of the edge, the agent, the policy or the transport plugins.  What
needs them is resolved at start by the service makers (L{tunneld.tap}): the
transport plugins named here and their C{[transports.NAME]} tables
(L{tunneld.registry}), the public TLS certificates, the agent id a client
certificate names.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tomllib
from dataclasses import dataclass, field
from typing import Any

from tunneld.config.schema import non_negative, parse_table, positive, setting
from tunneld.config.values import (
    check_networks,
    parse_address,
    parse_health_check,
    parse_port_ranges,
    parse_proxy_url,
    parse_redis_url,
)
from tunneld.endpoints import (
    client_endpoint_problem,
    optional_server_endpoint_problem,
    server_endpoint_problem,
)
from tunneld.errors import ConfigError
from tunneld.speedups.scheduling import check_policy

NO_FILE = "(defaults)"


def _problem(parse: Any, value: str) -> str | None:
    """What C{parse} says is wrong with C{value} (its ValueError), or None."""
    try:
        parse(value)
    except ValueError as e:
        return str(e)
    return None


def _hostname_pattern(value: str) -> str | None:
    host = value.removeprefix("*.")
    if not host or "*" in host or "/" in host or ":" in host or " " in host:
        return f"not a hostname or *.domain pattern: {value!r}"
    return None


def _hostname_patterns(values: list[str]) -> str | None:
    for value in values:
        problem = _hostname_pattern(value)
        if problem:
            return problem
    return None


def _frame_size(value: int) -> str | None:
    return None if value >= 128 * 1024 else f"must be at least 131072 bytes, got {value}"


def _h2_window(value: int) -> str | None:
    if 65535 <= value <= (1 << 31) - 1:
        return None
    return f"must be between 65535 and 2147483647 bytes, got {value}"


def _unset_or_non_negative(value: float | None) -> str | None:
    return None if value is None else non_negative(value)


def _health_check(value: str) -> str | None:
    return _problem(parse_health_check, value)


def _cpu_scheduling() -> Any:
    """The cpu_scheduling setting, which the edge and the agent both have."""
    return setting(
        "default",
        "CPU scheduling policy: 'default' keeps the one the process started with; 'batch' "
        "switches to Linux's SCHED_BATCH, under which a wake-up does not preempt the running "
        "task. Use 'batch' when edge and agent share a host (they then stop handing the CPU "
        "to each other at every link write); it delays wake-ups on a CPU busy with other work.",
        check=check_policy,
    )


def _non_empty(value: list[str]) -> str | None:
    return None if value else "must name at least one entry"


def _proxy_url(value: str) -> str | None:
    return _problem(parse_proxy_url, value)


def _port_ranges(value: str) -> str | None:
    return _problem(parse_port_ranges, value)


def _tunnel_protocol(value: str) -> str | None:
    return None if value in ("http", "tcp") else f"must be 'http' or 'tcp', got {value!r}"


def _port_or_zero(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be a port (1-65535) or 0, got {value}"


@dataclass(frozen=True)
class AgentGrant:
    """An agent the edge accepts, and the hostnames it may serve."""

    id: str = setting(..., "Agent id (as in the agent's [agent] id, or its certificate).")
    token: str = setting("", "Shared secret for token authentication (development).")
    hostnames: list[str] = setting(
        [], "Hostnames (or *.domain patterns) this agent may register.", check=_hostname_patterns
    )


def _upstream_protocol(value: str) -> str | None:
    return None if value in ("http1", "h2c") else f"must be 'http1' or 'h2c', got {value!r}"


@dataclass(frozen=True)
class SNICertificate:
    """A certificate served to clients asking for some hostnames ([[edge.tls.sni]])."""

    certificate: str = setting(..., "PEM file: the certificate, then any intermediates.")
    private_key: str = setting(..., "PEM file with the certificate's private key.")
    hostnames: list[str] = setting(
        [],
        "Hostnames (or *.domain patterns) this certificate is served for; "
        "empty = the DNS names in the certificate.",
        check=_hostname_patterns,
    )


@dataclass(frozen=True)
class PublicTLSSection:
    """TLS of the public TLS listeners ([edge.tls])."""

    certificate: str = setting(
        "", "PEM file: the default certificate (then any intermediates), served without an SNI match."
    )
    private_key: str = setting("", "PEM file with the default certificate's private key.")
    sni: list[SNICertificate] = setting(
        [], "Certificates chosen by the client's SNI hostname ([[edge.tls.sni]] entries)."
    )


@dataclass(frozen=True)
class EdgeAgentTLS:
    """TLS on the edge's agent-link listeners ([edge.agent_tls]); off without a certificate."""

    certificate: str = setting("", "PEM certificate the edge shows agents ('' = plaintext links).")
    key: str = setting("", "PEM private key of that certificate.")
    client_ca: str = setting(
        "", "PEM CA that signs agent certificates; with it, agents authenticate by certificate."
    )
    require_client_certificate: bool = setting(
        True, "Refuse agents without a client certificate (false: token agents over TLS too)."
    )


def _state_backend(value: str) -> str | None:
    return None if value in ("memory", "redis") else f"must be 'memory' or 'redis', got {value!r}"


def _redis_url(value: str) -> str | None:
    return _problem(parse_redis_url, value)


def _sentinel_addresses(values: list[str]) -> str | None:
    return next(filter(None, (_problem(parse_address, value) for value in values)), None)


def _agent_url(value: str) -> str | None:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("ws", "wss", "grpc", "grpcs") or not rest.split("/")[0]:
        return f"expected ws://, wss://, grpc:// or grpcs:// and a host:port, got {value!r}"
    return None


def _state_section(state: EdgeStateSection) -> str | None:
    """The checks that look at several [edge.state] keys at once."""
    if state.backend == "memory" and (state.sentinels or state.sentinel_master):
        return "sentinels and sentinel_master need backend = \"redis\""
    if state.sentinels and not state.sentinel_master:
        return "sentinel_master: required with sentinels (the Sentinels' name for the primary)"
    if state.sentinel_master and not state.sentinels:
        return "sentinel_master: needs sentinels (their host:port addresses)"
    if state.sentinels and state.redis_url.startswith("rediss:"):
        return "redis_url: TLS (rediss://) is not supported with sentinels"
    if state.heartbeat_interval * 2 >= state.edge_ttl:
        return (
            f"heartbeat_interval ({state.heartbeat_interval}) must be under half of "
            f"edge_ttl ({state.edge_ttl}), so one late heartbeat does not expire the edge"
        )
    return None


@dataclass(frozen=True)
class EdgeStateSection:
    """
    Where the edge keeps what other edges must see ([edge.state]): the registry of
    edges and tunnels, hostname reservations, cluster-wide limits.  The default
    needs nothing; several edges share one Redis.
    """

    backend: str = setting(
        "memory",
        "'memory': this process only, nothing to set up; 'redis': several edges share "
        "state through Redis (redis_url, or sentinels).",
        check=_state_backend,
    )
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "The Redis to use: redis://[user:password@]host[:port][/db], rediss://… for TLS, or "
        "unix:///path/redis.sock[?db=N].  With sentinels only its user, password and db apply.",
        check=_redis_url,
    )
    sentinels: list[str] = setting(
        [],
        "Redis Sentinel addresses (host:port); when set, the edge uses the primary they name "
        "sentinel_master and follows it across failovers.",
        check=_sentinel_addresses,
    )
    sentinel_master: str = setting("", "The Sentinels' name for the primary (with sentinels).")
    sentinel_password: str = setting("", "Password of the Sentinels themselves ('' = none).")
    key_prefix: str = setting(
        "tunneld:", "Prefix of every Redis key tunneld writes (clusters sharing a Redis differ here).",
        check=lambda value: None if value else "must not be empty",
    )
    edge_name: str = setting(
        "", "This edge's name in the cluster view ('' = the host name); its id adds an epoch."
    )
    agent_urls: list[str] = setting(
        [],
        "URLs by which agents reach this edge (ws://…, wss://…, grpc://…, grpcs://…), in the "
        "registry and in a draining edge's GoAway (reconnect_to); [] = made from the agent "
        "listeners' bound addresses, which is right only when agents dial them directly.",
        each=_agent_url,
    )
    edge_ttl: float = setting(
        15.0,
        "Seconds this edge's registry entries (its record, its tunnels, its counts) live "
        "without a heartbeat: an edge that dies is forgotten within this.",
        check=positive,
    )
    heartbeat_interval: float = setting(
        5.0, "Seconds between heartbeats refreshing those entries (under half of edge_ttl).",
        check=positive,
    )
    reservation_ttl: float = setting(
        0.0,
        "Seconds a hostname reservation outlives its agent's last session (0 = until "
        "released; another identity is refused the name meanwhile).",
        check=non_negative,
    )
    relay: bool = setting(
        True,
        "With a shared backend, carry a public request for a tunnel that only another edge "
        "holds to that edge over a relay link (an agent link it dials, authenticated both "
        "ways: needs [edge.agent_tls] with client_ca on every edge, and a certificate naming "
        "the edge, tunneld-edge://EDGE_NAME, from `tunneld certs edge --edge-name`).",
    )
    relay_ca: str = setting(
        "",
        "PEM CA the other edges' agent-link certificates are checked against when this edge "
        "dials them for relays ('' = edge.agent_tls.client_ca).",
    )
    relay_max_streams: int = setting(
        10_000,
        "Concurrent streams this edge relays to one other edge (over that edge's one relay "
        "link): a cap of its own, since a relay link carries many agents' streams and is "
        "never counted as one agent under max_streams_per_agent (the edge holding the agent "
        "applies that to the agent's session itself); past it, cap_reached.",
        check=positive,
    )
    command_timeout: float = setting(
        0.5,
        "Seconds a Redis command may take before the edge decides locally (a rate limit) "
        "or fails the operation, and reconnects.",
        check=positive,
    )
    connect_timeout: float = setting(
        5.0,
        "Seconds to wait for Redis at start before serving in degraded mode (logged); also "
        "the limit of one connection attempt.",
        check=positive,
    )
    probe_interval: float = setting(
        1.0, "While Redis is unreachable, seconds between checks that it is back.", check=positive
    )
    pool_size: int = setting(2, "Connections to Redis.", check=positive)


def _second_session(value: str) -> str | None:
    if value in ("refuse", "replace"):
        return None
    return f"must be 'refuse' or 'replace', got {value!r}"


def _credentials(value: dict[str, str]) -> str | None:
    for name, token in value.items():
        if not name:
            return "an operator needs a name"
        if len(token) < 16:
            return f"operator {name!r}: a token of at least 16 characters, got {len(token)}"
    return None


@dataclass(frozen=True)
class EdgeTerminalSection:
    """
    Browser terminals to agents ([edge.terminal]): the admin API hands out
    single-use tokens, the admin listener serves the page and the WebSocket.
    """

    enabled: bool = setting(
        False,
        "Serve terminals: POST /api/v1/allocations/ID/terminal-token, the page at /terminal/ "
        "and WS /ws/terminal/ID on the admin listener (edge.admin_listen).",
    )
    operators: dict[str, str] = setting(
        {},
        "Admin credentials that may ask for terminal tokens: name = bearer token (at least 16 "
        "characters), sent as 'Authorization: Bearer TOKEN'; the name is the identity a token "
        "and its session are bound to.  Needed when enabled.",
        check=_credentials,
    )
    token_ttl: float = setting(
        30.0, "Seconds a terminal token may wait for its first (and only) use.", check=positive
    )
    second_session: str = setting(
        "refuse",
        "A session for an allocation that has a live one: 'refuse' it (session_live) or "
        "'replace' the live one (closed with replaced).",
        check=_second_session,
    )
    max_queued_bytes: int = setting(
        1 << 20,
        "Bytes of output one session may hold for a browser that cannot take them yet; past "
        "half the agent's stream is paused (the PTY is no longer read), past all of it the "
        "session closes with saturated.  Input waits within the agent stream's credit window "
        "(the browser's socket is no longer read meanwhile).",
        check=positive,
    )
    stall_timeout: float = setting(
        30.0,
        "Seconds a browser may take nothing while output waits for it before the session "
        "closes with saturated.",
        check=positive,
    )
    heartbeat_interval: float = setting(
        15.0,
        "Seconds between heartbeats to the browser and the agent; silence for three of them "
        "closes the session (browser_silent, agent_silent).",
        check=positive,
    )
    max_message_bytes: int = setting(
        65536, "Largest WebSocket message a browser may send (bytes).", check=positive
    )
    assets: str = setting(
        "",
        "Directory holding xterm.js's files (xterm.js, xterm.css, addon-fit.js), as "
        "scripts/setup installs them from npm; '' = PREFIX/share/tunneld/xterm of the running "
        "Python environment.",
    )
    closed_kept: int = setting(
        100, "Closed sessions the admin API still lists (newest first).", check=non_negative
    )


def _terminal_section(section: EdgeTerminalSection) -> str | None:
    if section.enabled and not section.operators:
        return "operators: enabled needs at least one operator (name = token)"
    return None


@dataclass(frozen=True)
class EdgeSection:
    """The edge's own settings ([edge])."""

    public_listen: list[str] = setting(
        ["tcp:8080:interface=127.0.0.1"], "Endpoint strings for public HTTP/1.1 listeners.",
        each=server_endpoint_problem,
    )
    public_h2c_listen: list[str] = setting(
        [],
        "Endpoint strings for public cleartext listeners speaking HTTP/2 with prior knowledge "
        "and HTTP/1.1 (told apart by the HTTP/2 connection preface).",
        each=server_endpoint_problem,
    )
    public_tls_listen: list[str] = setting(
        [],
        "Endpoint strings (tcp:, unix:, systemd:) for public TLS listeners; ALPN picks "
        "HTTP/2 or HTTP/1.1.  Certificates come from [edge.tls].",
        each=server_endpoint_problem,
    )
    listen_backlog: int = setting(
        1024,
        "Pending-connection queue of the public TCP listeners whose endpoint string sets no "
        "backlog= (Twisted's own default, 50, overflows under bursts of new clients).",
        check=positive,
    )
    tls: PublicTLSSection = setting(
        PublicTLSSection(), "Certificates of the public TLS listeners ([edge.tls])."
    )
    h2_initial_window: int = setting(
        1 << 20,
        "HTTP/2 flow-control window (bytes) the edge grants each public stream; the "
        "connection window is 16 times this.",
        check=_h2_window,
    )
    h2_max_concurrent_streams: int = setting(
        256, "Concurrent streams one public HTTP/2 connection may open.", check=positive
    )
    public_url: str = setting(
        "http://{host}:8080/", "Template for the public URL shown to agents; {host} is the hostname."
    )
    transports: list[str] = setting(
        ["websocket"], "Agent-link transports to listen with, by plugin name.", check=_non_empty
    )
    admin_listen: str = setting(
        "tcp:8090:interface=127.0.0.1",
        "Endpoint string for the admin API (JSON, /metrics, /healthz, /readyz); keep it on "
        "loopback or a private network.  '' turns it off.",
        check=optional_server_endpoint_problem,
    )
    max_header_bytes: int = setting(65536, "Largest request head accepted (bytes).", check=positive)
    header_timeout: float = setting(
        30.0, "Seconds a client has to send a complete request head.", check=positive
    )
    idle_timeout: float = setting(
        300.0,
        "Seconds a public connection may be idle between requests, or make no progress during "
        "one (HTTP/2: keep its socket full, reading nothing it is sent).",
        check=positive,
    )
    hello_timeout: float = setting(
        10.0, "Seconds a new agent link has to say hello before it is dropped.", check=positive
    )
    initial_window: int = setting(
        1024 * 1024, "Per-stream flow-control window (bytes) the edge grants.", check=positive
    )
    max_frame_size: int = setting(
        1 << 20, "Largest agent-link frame (bytes), at least 131072.", check=_frame_size
    )
    max_streams_per_agent: int = setting(
        10_000, "Concurrent streams one agent session may carry.", check=positive
    )
    websocket_ping_interval: float = setting(
        0.0,
        "Seconds a tunneled WebSocket may be silent before the edge pings the client "
        "(keeps NAT and load-balancer state alive; the client's Pong goes on to the upstream, "
        "which RFC 6455 allows); 0 = never.",
        check=non_negative,
    )
    open_loopback_registration: bool = setting(
        True,
        "When no [[agents]] are configured, agents connecting from a loopback address may "
        "register any hostname without credentials (development only).",
    )
    max_header_count: int = setting(
        100, "Most header fields in one request head; more gets 431.", check=positive
    )
    max_request_line: int = setting(
        8192, "Longest request line (method, target, version) in bytes; longer gets 414.",
        check=positive,
    )
    allow_token_on_plaintext: bool = setting(
        False,
        "Accept token-authenticated agents on a plaintext agent listener bound to a "
        "non-loopback address (tokens then cross the network in the clear).",
    )
    agent_tls: EdgeAgentTLS = field(
        default_factory=EdgeAgentTLS, metadata={"doc": "TLS for agent links ([edge.agent_tls])."}
    )
    tcp_ports: str = setting(
        "10000-10100",
        "Edge ports TCP tunnels may listen on, as ranges: \"10000-10100,2222\" ('' = no TCP "
        "tunnels).  An agent asking for port 0 gets a free one from these.",
        check=_port_ranges,
    )
    tcp_listen_interface: str = setting(
        "127.0.0.1", "Address TCP tunnel listeners bind to ('0.0.0.0' or '::' for all)."
    )
    tcp_public_host: str = setting(
        "", "Host shown to agents in tcp://host:port URLs ('' = tcp_listen_interface)."
    )
    health_listen: str = setting(
        "",
        "Endpoint string for plain-text /healthz and /readyz alone (e.g. "
        "tcp:8082:interface=127.0.0.1), for a load balancer that must not reach the admin "
        "API; the admin API serves the same probes as JSON. '' = off.",
        check=optional_server_endpoint_problem,
    )
    drain_timeout: float = setting(
        30.0,
        "On SIGTERM, seconds in-flight streams may take to finish before they are closed "
        "with 'draining'.",
        check=non_negative,
    )
    cpu_scheduling: str = _cpu_scheduling()
    state: EdgeStateSection = setting(
        EdgeStateSection(),
        "Shared state for several edges ([edge.state]); the default keeps it in this process.",
        check=_state_section,
    )
    terminal: EdgeTerminalSection = setting(
        EdgeTerminalSection(),
        "Browser terminals to agents ([edge.terminal]); off by default.",
        check=_terminal_section,
    )


@dataclass(frozen=True)
class MethodLimits:
    """
    Limits for one JSON-RPC method on a tunnel ([limits.tunnels."HOST".methods."NAME"]),
    applied to requests whose Mcp-Method header names it; a key left out is no limit.
    """

    rate: float | None = setting(
        None, "Requests per second of this method on the tunnel.", check=_unset_or_non_negative
    )
    burst: int | None = setting(
        None, "Burst above that rate (unset: one second's worth).", check=_unset_or_non_negative
    )
    max_streams: int | None = setting(
        None, "Concurrent exchanges of this method on the tunnel.", check=_unset_or_non_negative
    )


@dataclass(frozen=True)
class TunnelLimits:
    """Overrides for one tunnel ([limits.tunnels."HOST"]); a key left out inherits [limits]."""

    rate: float | None = setting(None, "Requests per second for this tunnel.", check=_unset_or_non_negative)
    burst: int | None = setting(None, "Burst above the rate for this tunnel.", check=_unset_or_non_negative)
    client_rate: float | None = setting(
        None, "Requests per second per client address on this tunnel.", check=_unset_or_non_negative
    )
    client_burst: int | None = setting(
        None, "Burst per client address on this tunnel.", check=_unset_or_non_negative
    )
    max_streams: int | None = setting(
        None, "Concurrent public exchanges on this tunnel.", check=_unset_or_non_negative
    )
    methods: dict[str, MethodLimits] = setting(
        {},
        "Per-method limits, keyed by the JSON-RPC method an MCP client names in its "
        "Mcp-Method header (e.g. \"tools/call\").",
    )
    # Not limits inherited from [limits]: the edge's replay of this tunnel's
    # public Server-Sent Events (tunneld/edge/replay.py), off unless asked for.
    sse_replay: bool = setting(
        False,
        "Keep the last events of this tunnel's public text/event-stream replies and replay "
        "the missed ones to a client that reconnects with Last-Event-ID (the edge holds the "
        "upstream stream open meanwhile); an id no longer held is refused (410, "
        "Tunnel-Error: session_gone). One buffer per tunnel, URL and credentials.",
    )
    sse_replay_events: int = setting(
        1000, "Events one replay buffer keeps at most (with sse_replay).", check=positive
    )
    sse_replay_bytes: int = setting(
        1_048_576, "Bytes one replay buffer keeps at most (with sse_replay); a single larger "
        "event lets the stream go with 'saturated'.", check=positive,
    )
    sse_replay_linger: float = setting(
        30.0, "Seconds the edge keeps an event stream open and recording after its client "
        "went, for it to resume (with sse_replay).", check=positive,
    )
    sse_replay_streams: int = setting(
        100, "Replay buffers this tunnel keeps at once (with sse_replay); past it the one "
        "idle longest is let go.", check=positive,
    )


@dataclass(frozen=True)
class LimitsSection:
    """Rate limits and connection caps ([limits]); 0 means no limit.  SIGHUP reloads them."""

    rate: float = setting(
        0.0, "Requests per second per tunnel, all clients together (0 = no limit).",
        check=non_negative,
    )
    burst: int = setting(
        0, "Requests a tunnel may take at once above its rate (0 = one second's worth).",
        check=non_negative,
    )
    client_rate: float = setting(
        0.0, "Requests per second per (tunnel, client address) (0 = no limit).", check=non_negative
    )
    client_burst: int = setting(
        0, "Burst per (tunnel, client address) (0 = one second's worth).", check=non_negative
    )
    max_streams: int = setting(
        0, "Concurrent public exchanges per tunnel (0 = no cap).", check=non_negative
    )
    max_connections: int = setting(
        10_000, "Public connections open at once, in total (0 = no cap).", check=non_negative
    )
    max_connections_per_client: int = setting(
        256, "Public connections open at once per client address (0 = no cap).",
        check=non_negative,
    )
    max_agents: int = setting(
        1000, "Agent sessions registered at once, in total (0 = no cap).", check=non_negative
    )
    max_agents_per_tunnel: int = setting(
        32, "Agent sessions serving one tunnel at once (0 = no cap).", check=non_negative
    )
    retry_after: int = setting(
        1, "Retry-After seconds sent with cap_reached and draining refusals.", check=positive
    )
    trusted_proxies: list[str] = setting(
        [],
        "Addresses or CIDR networks of load balancers whose X-Forwarded-For (or PROXY "
        "header) names the client; from anyone else the socket peer is the client.",
        check=check_networks,
    )
    proxy_protocol: bool = setting(
        False,
        "Public listeners read a PROXY protocol v1/v2 header from trusted_proxies peers.",
    )
    max_buckets: int = setting(
        100_000, "Rate-limit buckets kept at most (idle full buckets are dropped first).",
        check=positive,
    )
    tunnels: dict[str, TunnelLimits] = setting(
        {}, "Per-tunnel overrides, keyed by the tunnel's hostname (plus path prefix, if any)."
    )


@dataclass(frozen=True)
class SpeedupsSection:
    """
    Speed tricks ([speedups]): each reaches into another library's private
    state (or tunes the process) and falls back to the public API when
    switched off, or when its check at start finds the internals changed.
    The start-up log says which are on.  The environment variable
    TUNNELD_SPEEDUPS=off turns them all off whatever this says.
    """

    enabled: bool = setting(True, "Every trick below; false turns them all off at once.")
    bulkwrite: bool = setting(
        True,
        "Large writes go to the socket without Twisted's copies, and small replies leave "
        "at the end of the reactor turn (Twisted's private write queue).",
    )
    read_size: bool = setting(
        True,
        "A streaming TCP socket reads and sends up to 1 MiB per system call instead of "
        "Twisted's 64/128 KiB (its transport's bufferSize and SEND_LIMIT).",
    )
    lean_h2: bool = setting(
        True,
        "HTTP/2 connections whose per-frame and per-stream costs do not grow with traffic "
        "(h2's private frame buffer, windows and stream bookkeeping).",
    )
    websocket_takeover: bool = setting(
        True,
        "After the WebSocket handshake the agent link reads and writes frames itself "
        "instead of through Autobahn (Autobahn's receive buffer).",
    )
    native_mask: bool = setting(
        True, "WebSocket masking with Autobahn's compiled masker, called directly (private)."
    )
    tls_groups: bool = setting(
        True,
        "TLS offers the hardened policy's whole list of key-exchange groups (X25519, P-256, "
        "P-384) through pyOpenSSL's private binding; off: P-256 only.",
    )
    heap: bool = setting(
        True, "glibc keeps large freed buffers for reuse (mallopt thresholds)."
    )
    gc_freeze: bool = setting(
        True,
        "The garbage collector skips the start-up heap (gc.freeze) and collects young "
        "objects less often.",
    )


@dataclass(frozen=True)
class EdgeConfig:
    """The whole edge configuration file."""

    edge: EdgeSection = field(default_factory=EdgeSection)
    agents: list[AgentGrant] = setting([], "Agents the edge accepts ([[agents]] entries).")
    transports: dict[str, dict[str, Any]] = setting(
        {}, "Per-transport tables ([transports.NAME]); see each transport's options."
    )
    source: str = NO_FILE
    limits: LimitsSection = field(default_factory=LimitsSection)
    speedups: SpeedupsSection = field(default_factory=SpeedupsSection)


@dataclass(frozen=True)
class AgentTLS:
    """The agent's TLS to the edge ([agent.tls]), used with wss:// and TLS transports."""

    ca: str = setting("", "PEM CA that signs the edge's certificate ('' = the system's roots).")
    certificate: str = setting("", "PEM client certificate this agent presents ('' = none).")
    key: str = setting("", "PEM private key of that certificate.")
    server_hostname: str = setting(
        "", "Name to verify the edge's certificate against ('' = the host in the URL)."
    )


def _environment(value: dict[str, str]) -> str | None:
    for name in value:
        if not name or "=" in name or "\0" in name:
            return f"not an environment variable name: {name!r}"
    return None


@dataclass(frozen=True)
class AgentTerminal:
    """
    A terminal service on this agent ([agent.terminal]): the edge opens
    a PTY running C{command} for a browser holding a token.  Off by default.
    """

    enabled: bool = setting(
        False, "Offer a terminal (a PTY) to the edge's browser sessions for this agent."
    )
    command: list[str] = setting(
        [],
        "The program and its arguments ([] = the user's login shell from the password "
        "database, started as a login shell).",
    )
    user: str = setting(
        "", "The user the program runs as ('' = the agent's own user; another needs root)."
    )
    environment: dict[str, str] = setting(
        {},
        "Environment variables on top of the base set: TERM, HOME, USER, LOGNAME, SHELL, and "
        "PATH and LANG as the agent has them.",
        check=_environment,
    )
    working_directory: str = setting("", "The program's directory ('' = the user's home).")
    term: str = setting("xterm-256color", "TERM for the program (the page's xterm.js is one).")
    max_sessions: int = setting(4, "Terminals open at once on this agent.", check=positive)
    close_grace: float = setting(
        2.0,
        "Seconds the program has to exit after its terminal hangs up (SIGHUP) before it is "
        "killed (SIGKILL).",
        check=positive,
    )
    heartbeat_timeout: float = setting(
        60.0,
        "Seconds without a word from the edge (heartbeats included) before the terminal is "
        "closed with agent_silent on this side.",
        check=positive,
    )


@dataclass(frozen=True)
class AgentSection:
    """The agent's own settings ([agent])."""

    id: str = setting(
        "",
        "This agent's id, which the edge checks: with a client certificate "
        "(agent.tls.certificate) it must be the certificate's (its tunneld-agent:// URI "
        "name, else its first DNS name), and '' takes it from there; without one, the "
        "[[agents]] id its token is granted under ('' = 'agent').",
    )
    token: str = setting("", "Token for token authentication (development).")
    transports: list[str] = setting(
        ["websocket"],
        "Transports to try, in order of preference; on failure the next is used.",
        check=_non_empty,
    )
    proxy: str = setting(
        "",
        "An HTTP/1.1 forward proxy every agent link goes through (http://host:port): the "
        "streamable-http transport sends it plain requests, the others ask it for a CONNECT "
        "tunnel (a proxy that refuses makes them fail, and the chain falls back). '' = none.",
        check=_proxy_url,
    )
    edge_urls: list[str] = setting(
        [],
        "Edges to dial, in order (ws://…, wss://…, grpc://…, grpcs://…; the scheme picks the "
        "transport, which must be in transports): after a failed dial the next is tried, and "
        "a draining edge's GoAway may name another (reconnect_to), dialled first.  [] = the "
        "edge in each [transports.NAME] table.",
        each=_agent_url,
    )
    prefer_retry_interval: float = setting(
        60.0,
        "While on a fallback transport, seconds between attempts to return to the first one "
        "(0 = never).",
        check=non_negative,
    )
    reconnect_initial: float = setting(0.5, "First reconnect delay (seconds).", check=positive)
    reconnect_max: float = setting(30.0, "Longest reconnect delay (seconds).", check=positive)
    healthy_after: float = setting(
        30.0, "Seconds a link must stay up before the backoff starts over.", check=positive
    )
    initial_window: int = setting(
        1024 * 1024, "Per-stream flow-control window (bytes) the agent grants.", check=positive
    )
    max_frame_size: int = setting(
        1 << 20, "Largest agent-link frame (bytes), at least 131072.", check=_frame_size
    )
    upstream_max_idle: int = setting(
        16, "Idle keep-alive connections kept per upstream.", check=non_negative
    )
    upstream_connect_timeout: float = setting(
        10.0, "Seconds to connect to an upstream.", check=positive
    )
    upstream_response_timeout: float = setting(
        60.0, "Seconds an upstream may take to start its response.", check=positive
    )
    upstream_body_timeout: float = setting(
        60.0,
        "Seconds an upstream may send nothing more of a response it has begun (while the "
        "client can take more) before the stream is cut with upstream_timeout; 0 = never "
        "(for responses that may idle longer: SSE without comments, long-poll, gRPC streams).",
        check=non_negative,
    )
    welcome_timeout: float = setting(
        15.0,
        "Seconds the edge has to answer a new link's hello; past it the link is closed and "
        "dialled again.",
        check=positive,
    )
    cpu_scheduling: str = _cpu_scheduling()
    tls: AgentTLS = field(
        default_factory=AgentTLS, metadata={"doc": "TLS to the edge ([agent.tls])."}
    )
    terminal: AgentTerminal = field(
        default_factory=AgentTerminal,
        metadata={"doc": "A terminal service for browsers through the edge ([agent.terminal])."},
    )


@dataclass(frozen=True)
class TunnelSection:
    """One tunnel the agent serves ([[tunnels]])."""

    hostname: str = setting(..., "Public hostname (or *.domain pattern).", check=_hostname_pattern)
    upstream: str = setting(
        ..., "Client endpoint string of the local service, e.g. tcp:host=127.0.0.1:port=8000.",
        check=client_endpoint_problem,
    )
    path_prefix: str = setting("", "Only requests under this path prefix ('' = all).")
    upstream_protocol: str = setting(
        "http1",
        "How to speak to the upstream: 'http1' (HTTP/1.1) or 'h2c' (HTTP/2 with prior "
        "knowledge, e.g. a gRPC server: trailers and HTTP/2-only semantics pass through).",
        check=_upstream_protocol,
    )
    protocol: str = setting(
        "http",
        "'http' (routed by hostname) or 'tcp' (raw bytes on an edge port; hostname names the tunnel).",
        check=_tunnel_protocol,
    )
    remote_port: int = setting(
        0, "For tcp tunnels: the edge port to listen on (0 = the edge picks one).",
        check=_port_or_zero,
    )
    health_check: str = setting(
        "",
        "Upstream probe: '' (none), 'tcp' (connect), or 'http:/path' / 'http:/path:STATUS' "
        "(GET, expecting STATUS, else any 2xx/3xx).  An unhealthy tunnel gets no new streams "
        "from the edge while other agents serve it.",
        check=_health_check,
    )
    health_interval: float = setting(10.0, "Seconds between upstream probes.", check=positive)
    health_timeout: float = setting(5.0, "Seconds a probe may take.", check=positive)


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent configuration file."""

    agent: AgentSection = field(default_factory=AgentSection)
    tunnels: list[TunnelSection] = setting([], "Tunnels to register ([[tunnels]] entries).")
    transports: dict[str, dict[str, Any]] = setting(
        {}, "Per-transport tables ([transports.NAME]); see each transport's options."
    )
    source: str = NO_FILE
    speedups: SpeedupsSection = field(default_factory=SpeedupsSection)


def read_toml(path: str) -> dict[str, Any]:
    """The parsed file, or a L{ConfigError} saying why it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "no such file") from None
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(syntax)", f"not valid TOML: {e}") from None


def _parse(cls: type[Any], raw: dict[str, Any], where: str) -> Any:
    raw = dict(raw)
    raw.pop("source", None)
    return parse_table(cls, raw, where)


def load_edge_config(path: str | None) -> EdgeConfig:
    """Read and validate an edge configuration; C{None} means all defaults."""
    where = path or NO_FILE
    raw = read_toml(path) if path else {}
    if "source" in raw:
        raise ConfigError(where, "source", "unknown key")
    config: EdgeConfig = _parse(EdgeConfig, raw, where)
    seen: set[str] = set()
    for i, grant in enumerate(config.agents):
        if grant.id in seen:
            raise ConfigError(where, f"agents[{i}].id", f"agent {grant.id!r} is listed twice")
        seen.add(grant.id)
    _check_tls_files(where, "edge.agent_tls", config.edge.agent_tls.certificate,
                     config.edge.agent_tls.key, config.edge.agent_tls.client_ca)
    if config.edge.agent_tls.client_ca and not config.edge.agent_tls.certificate:
        raise ConfigError(where, "edge.agent_tls.client_ca", "needs edge.agent_tls.certificate")
    return EdgeConfig(config.edge, config.agents, config.transports, where, config.limits, config.speedups)


def _check_tls_files(where: str, section: str, certificate: str, key: str, ca: str) -> None:
    if bool(certificate) != bool(key):
        missing = "key" if certificate else "certificate"
        raise ConfigError(where, f"{section}.{missing}", "certificate and key go together")
    for name, path in (("certificate", certificate), ("key", key), ("ca", ca)):
        if path:
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as e:
                key_name = "client_ca" if name == "ca" and section.startswith("edge") else name
                raise ConfigError(where, f"{section}.{key_name}", f"cannot read {path}: {e.strerror}") from None


def load_agent_config(path: str | None) -> AgentConfig:
    """Read and validate an agent configuration."""
    where = path or NO_FILE
    raw = read_toml(path) if path else {}
    if "source" in raw:
        raise ConfigError(where, "source", "unknown key")
    config: AgentConfig = _parse(AgentConfig, raw, where)
    tls = config.agent.tls
    _check_tls_files(where, "agent.tls", tls.certificate, tls.key, tls.ca)
    for i, tunnel in enumerate(config.tunnels):
        if tunnel.protocol == "tcp" and tunnel.path_prefix:
            raise ConfigError(where, f"tunnels[{i}].path_prefix", "tcp tunnels have no path prefix")
        if tunnel.protocol == "tcp" and tunnel.hostname.startswith("*."):
            raise ConfigError(where, f"tunnels[{i}].hostname", "a tcp tunnel's name has no wildcard")
        if tunnel.protocol == "http" and tunnel.remote_port:
            raise ConfigError(where, f"tunnels[{i}].remote_port", "only tcp tunnels have a port")
    _check_terminal(where, config.agent.terminal)
    return AgentConfig(config.agent, config.tunnels, config.transports, where, config.speedups)


def _check_terminal(where: str, terminal: AgentTerminal) -> None:
    """What [agent.terminal] names must exist on this machine (checked only when enabled)."""
    if not terminal.enabled:
        return
    key = "agent.terminal"
    if terminal.user:
        try:
            entry = pwd.getpwnam(terminal.user)
        except KeyError:
            raise ConfigError(where, f"{key}.user", f"no such user: {terminal.user!r}") from None
        if entry.pw_uid != os.getuid() and os.getuid() != 0:
            raise ConfigError(
                where, f"{key}.user",
                f"running as {terminal.user!r} needs the agent to run as root",
            )
    else:
        entry = pwd.getpwuid(os.getuid())
    if terminal.command:
        program = terminal.command[0]
        if shutil.which(program) is None:
            raise ConfigError(
                where, f"{key}.command[0]", f"no executable {program!r} (an absolute path, or on PATH)"
            )
    elif not entry.pw_shell or not os.access(entry.pw_shell, os.X_OK):
        raise ConfigError(
            where, f"{key}.command",
            f"user {entry.pw_name!r} has no usable login shell ({entry.pw_shell!r}); name a command",
        )
    directory = terminal.working_directory or entry.pw_dir
    if not os.path.isdir(directory):
        which = f"{key}.working_directory" if terminal.working_directory else f"{key}.user"
        raise ConfigError(where, which, f"no such directory: {directory!r}")
