# -*- test-case-name: tests.test_streamable_http -*-
"""
The C{[transports.streamable-http]} tables of the edge and the agent: every
key with its default and what it bounds.  The timeouts are the lid on time
as the sizes are the lid on memory: no phase of a connection may last
forever, no buffer may grow without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tunneld.config.schema import non_negative, positive, setting


def _url(value: Any) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected http(s)://host:port/path, got {value!r}"
    return None


def _path(value: Any) -> str | None:
    if not value.startswith("/") or "?" in value or "#" in value:
        return f"expected a path such as /tunnel, got {value!r}"
    return None


def _at_least(minimum: int) -> Any:
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be at least {minimum}, got {value!r}"

    return check


@dataclass(frozen=True)
class StreamableHTTPEdgeOptions:
    """Edge side of the streamable-HTTP transport."""

    listen: str = setting(
        "tcp:8084:interface=127.0.0.1", "Endpoint string the edge listens on for agents."
    )
    path: str = setting("/tunnel", "HTTP path of the agent endpoint.", check=_path)
    max_connections: int = setting(
        1000,
        "Agent connections this edge holds at most; past it an initialise is refused "
        "with 503 and Tunnel-Error: cap_reached.",
        check=positive,
    )
    max_post_bytes: int = setting(
        4 << 20,
        "Largest POST body (a batch of frames); a larger one is refused with 413. "
        "Never below the largest frame.",
        check=_at_least(65536),
    )
    replay_max_bytes: int = setting(
        8 << 20,
        "Bytes of edge→agent events kept until the agent acknowledges them (its replay "
        "buffer); streams pause at half of it, and the connection is closed with "
        "saturated if it is ever full.",
        check=_at_least(1 << 20),
    )
    replay_max_events: int = setting(
        16384, "Events kept until acknowledged, likewise by count.", check=_at_least(64)
    )
    request_timeout: float = setting(
        15.0,
        "Seconds a request has to arrive whole (head and body) once it begins; past it "
        "the edge answers 408 and closes the connection.",
        check=positive,
    )
    idle_timeout: float = setting(
        60.0, "Seconds an idle keep-alive connection is kept between requests.", check=positive
    )
    keepalive_interval: float = setting(
        15.0,
        "Seconds of silence after which an event stream gets a comment line (keeps "
        "proxies and the agent's idle timer from cutting it).",
        check=positive,
    )
    stall_timeout: float = setting(
        20.0,
        "Seconds an event stream may take nothing while events wait for it; then it is "
        "closed (the agent reconnects and resumes from its last event), never skipped.",
        check=positive,
    )
    max_stream_duration: float = setting(
        300.0,
        "Seconds after which an event stream ends cleanly and the agent resumes it on a "
        "new request (0 = never).",
        check=non_negative,
    )
    subscribe_timeout: float = setting(
        30.0,
        "Seconds a connection may have no event stream (before its first, or between "
        "two) before it is removed.",
        check=positive,
    )
    reorder_timeout: float = setting(
        30.0,
        "Seconds agent frames that arrived ahead of a missing one wait for it; then the "
        "connection is closed with protocol_error.",
        check=positive,
    )
    heartbeat_interval: float = setting(
        10.0, "Seconds between heartbeat pings (0 = off).", check=non_negative
    )
    heartbeat_timeout: float = setting(
        30.0, "Seconds of silence after which the agent is declared gone.", check=positive
    )
    state_timeout: float = setting(
        10.0,
        "Seconds the edge retries the state store for a connection's events before it "
        "closes the connection.",
        check=positive,
    )
    closed_ttl: float = setting(
        60.0,
        "Seconds a closed connection's reason is kept to answer its late requests "
        "(410 with the reason) rather than 404.",
        check=positive,
    )


@dataclass(frozen=True)
class StreamableHTTPAgentOptions:
    """Agent side of the streamable-HTTP transport."""

    url: str = setting(
        "http://127.0.0.1:8084/tunnel", "URL of the edge's agent endpoint.", check=_url
    )
    connect_timeout: float = setting(
        10.0,
        "Seconds to connect, initialise and open the event stream.",
        check=positive,
    )
    request_timeout: float = setting(
        30.0, "Seconds a POST may take to be answered.", check=positive
    )
    post_retry_for: float = setting(
        20.0,
        "Seconds a batch of frames is retried after transient failures (connection "
        "lost, 5xx) before the link is declared lost; keep it below the edge's "
        "reorder_timeout.",
        check=positive,
    )
    max_posts_in_flight: int = setting(
        2, "POSTs carrying frames at once (each on its own connection).", check=positive
    )
    max_pending_bytes: int = setting(
        8 << 20,
        "Bytes of agent→edge frames held until the edge accepts them; streams pause at "
        "half of it, and the link is closed with saturated if it is ever full.",
        check=_at_least(1 << 20),
    )
    ack_delay: float = setting(
        0.05,
        "Seconds the agent waits to acknowledge received events in a POST of their own "
        "when it has no frames to send.",
        check=positive,
    )
    idle_timeout: float = setting(
        45.0,
        "Seconds the event stream may be silent (the edge sends a comment every "
        "keepalive_interval) before the agent drops it and resumes.",
        check=positive,
    )
    resume_initial: float = setting(
        0.1, "First delay before resuming a lost event stream (seconds).", check=positive
    )
    resume_max: float = setting(
        5.0, "Longest delay between attempts to resume the event stream.", check=positive
    )
    healthy_after: float = setting(
        5.0,
        "Seconds an event stream must have lasted for the resume delay to start over "
        "from resume_initial.",
        check=positive,
    )
    resume_for: float = setting(
        30.0,
        "Seconds the agent keeps trying to resume its event stream before the link is "
        "declared lost (the agent then dials again).",
        check=positive,
    )
    heartbeat_interval: float = setting(
        10.0, "Seconds between heartbeat pings (0 = off).", check=non_negative
    )
    heartbeat_timeout: float = setting(
        30.0, "Seconds of silence after which the link is declared dead.", check=positive
    )
