# -*- test-case-name: tests.test_grpc_transport,tests.test_agent_targets -*-
"""
The C{[transports.grpc]} settings of the edge and of the agent, each with
its documented default (docs/configuration.md is made from them).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunneld.config.schema import non_negative, positive, setting

__all__ = ["GrpcAgentOptions", "GrpcEdgeOptions", "split_address"]

MIB = 1024 * 1024


def _check_window(value: int) -> str | None:
    if not 65535 <= value <= 0x7FFFFFFF:
        return f"must be between 65535 and 2147483647, got {value}"
    return None


@dataclass(frozen=True)
class GrpcEdgeOptions:
    """Edge side of the gRPC transport."""

    listen: str = setting(
        "tcp:8082:interface=127.0.0.1", "Endpoint string the edge listens on for agents (HTTP/2)."
    )
    heartbeat_interval: float = setting(
        10.0, "Seconds between HTTP/2 PINGs (0 = off).", check=non_negative
    )
    heartbeat_timeout: float = setting(
        30.0, "Seconds of silence after which the link is declared dead.", check=positive
    )
    max_queued_opens: int = setting(
        4096,
        "Streams that may wait for the agent to open an idle Forward call; beyond this a new "
        "stream is refused with saturated.",
        check=non_negative,
    )
    queued_open_timeout: float = setting(
        10.0, "Seconds a stream may wait for an idle Forward call.", check=positive
    )
    handshake_timeout: float = setting(
        10.0, "Seconds an agent has to open its Control call after connecting.", check=positive
    )
    max_concurrent_calls: int = setting(
        0,
        "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls one agent may have open; 0 = "
        "[edge] max_streams_per_agent + 1024 (its streams, its Control call and its idle "
        "Forward calls), so that max_streams_per_agent, with its reason, refuses a stream "
        "before the agent runs out of calls.",
        check=non_negative,
    )
    stream_window: int = setting(
        MIB, "HTTP/2 receive window per call in bytes (returned as the consumer reads).",
        check=_check_window,
    )
    connection_window: int = setting(
        16 * MIB, "HTTP/2 receive window of the whole connection in bytes.", check=_check_window
    )


@dataclass(frozen=True)
class GrpcAgentOptions:
    """Agent side of the gRPC transport."""

    address: str = setting("127.0.0.1:8082", "host:port of the edge's gRPC listener.")
    tls: bool = setting(False, "Use TLS (with ALPN h2) to the edge.")
    min_idle_forwards: int = setting(
        2, "Idle Forward calls kept open for the edge at least.", check=positive
    )
    max_idle_forwards: int = setting(
        256, "Idle Forward calls kept open at most (the pool grows when it runs dry).",
        check=positive,
    )
    pool_shrink_interval: float = setting(
        10.0,
        "Seconds without the pool running dry after which it shrinks by half; idle calls "
        "that ended on an error are replaced on the same tick.",
        check=positive,
    )
    connect_timeout: float = setting(
        10.0, "Seconds allowed for connecting, TLS and the HTTP/2 handshake.", check=positive
    )
    heartbeat_interval: float = setting(
        10.0, "Seconds between HTTP/2 PINGs (0 = off).", check=non_negative
    )
    heartbeat_timeout: float = setting(
        30.0, "Seconds of silence after which the link is declared dead.", check=positive
    )
    stream_window: int = setting(
        MIB, "HTTP/2 receive window per call in bytes (returned as the consumer reads).",
        check=_check_window,
    )
    connection_window: int = setting(
        16 * MIB, "HTTP/2 receive window of the whole connection in bytes.", check=_check_window
    )


def split_address(address: str) -> tuple[str, int] | None:
    """C{"host:port"} or C{"[v6]:port"} as (host, port), or None if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
