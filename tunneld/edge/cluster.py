# -*- test-case-name: tests.test_cluster -*-
"""
The edge's side of the cluster registry: how this edge tells the others
(and its agents) where it is.

An agent reconnecting to another edge (a drain's GoAway names one) needs a
URL it can dial with a transport it has: C{ws://} or C{wss://} for the
WebSocket transport, C{grpc://} or C{grpcs://} for gRPC.  By default the
edge makes them from the addresses its agent listeners are bound to; behind
a load balancer or NAT the operator sets C{[edge.state] agent_urls} instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from tunneld.interfaces import EdgeRecord

__all__ = ["agent_url_maker", "dialable_host", "reconnect_target"]

# The URL schemes an agent linked over a transport can dial (its own transport first).
_SCHEMES = {"websocket": ("ws", "wss"), "grpc": ("grpc", "grpcs")}


def agent_url_maker(
    transport: str, options: Any, tls: bool
) -> Callable[[str, int], str] | None:
    """
    How to write the URL of one of C{transport}'s listeners from its host
    and port, or None for a transport this edge cannot name (a third-party
    plugin: its agents keep the URLs they were configured with).
    """
    if transport == "websocket":
        path = getattr(options, "path", "/tunnel")
        scheme = "wss" if tls else "ws"
        return lambda host, port: f"{scheme}://{_bracketed(host)}:{port}{path}"
    if transport == "grpc":
        scheme = "grpcs" if tls else "grpc"
        return lambda host, port: f"{scheme}://{_bracketed(host)}:{port}"
    return None


def dialable_host(host: str, fallback: str) -> str:
    """C{host}, unless it is a wildcard (0.0.0.0, ::), which nobody can dial: then C{fallback}."""
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return fallback
    except ValueError:
        pass
    return host


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def reconnect_target(edges: Sequence[EdgeRecord], transport: str, turn: int) -> str:
    """
    The URL a draining edge names in its GoAway to an agent linked over
    C{transport}: one of C{edges} (live, not draining, not this one) that
    speaks the same transport, taking turns (C{turn}) so that the agents of
    a drained edge spread over the others instead of all landing on one.
    '' when none does: the agent dials its own URLs, as before clusters.
    """
    schemes = _SCHEMES.get(transport, ())
    candidates: list[str] = []
    for edge in sorted(edges, key=lambda e: e.edge_id):
        for url in edge.agent_urls:
            if url.partition("://")[0].lower() in schemes:
                candidates.append(url)
                break  # one URL per edge: the turns go round the edges
    return candidates[turn % len(candidates)] if candidates else ""
