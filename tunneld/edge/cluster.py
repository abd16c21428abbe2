# -*- test-case-name: tests.test_cluster -*-
"""
The edge's side of the cluster registry: how this edge tells the others
(and its agents) where it is, where a drained agent should go, and the
cluster as the admin API shows it.

An agent reconnecting to another edge (a drain's GoAway names one) needs a
URL it can dial with a transport it has: C{ws://} or C{wss://} for the
WebSocket transport, C{grpc://} or C{grpcs://} for gRPC.  By default the
edge makes them from the addresses its agent listeners are bound to; behind
a load balancer or NAT the operator sets C{[edge.state] agent_urls} instead.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Callable, Sequence
from typing import Any

from tunneld.interfaces import EdgeRecord, IStateBackend, StateUnavailable
from tunneld.model.keys import tunnel_key
from tunneld.state.membership import AGENTS_NAMESPACE

__all__ = [
    "agent_url_maker", "cluster_view", "describe_agents", "dialable_host", "reconnect_target",
]

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


async def cluster_view(
    backend: IStateBackend, this_edge: str, local: dict[str, Any]
) -> dict[str, Any]:
    """
    The cluster as C{GET /api/cluster} shows it: every live edge with the
    agents it says it has and the tunnels it holds, and for each tunnel the
    edges serving it.  C{local} is this edge's own part (fresher than what
    it last stored).  Read from the store when asked: with the memory
    backend, this edge alone.
    """
    health = backend.health()
    try:
        records = await backend.live_edges()
    except StateUnavailable as e:
        # Degraded: this edge alone, and why.
        records = [EdgeRecord(this_edge, local.get("name", this_edge))]
        health = dataclasses.replace(health, reachable=False, last_error=str(e))
    edges = []
    served: dict[str, list[str]] = {}
    for record in sorted(records, key=lambda r: r.edge_id):
        this = record.edge_id == this_edge
        if this:
            agents = local["agents"]
            tunnels = local["tunnels"]
        else:
            try:
                raw = await backend.get_record(AGENTS_NAMESPACE, record.edge_id)
                tunnels = await backend.edge_tunnels(record.edge_id)
            except StateUnavailable:
                raw, tunnels = None, []
            agents = json.loads(raw) if raw else []
        for key in tunnels:
            served.setdefault(key, []).append(record.edge_id)
        edges.append({
            "edge_id": record.edge_id,
            "name": record.name,
            "this": this,
            "draining": record.draining,
            "public_addresses": list(record.public_addresses),
            "agent_urls": list(record.agent_urls),
            "started_at": record.started_at,
            "agents": agents,
            "tunnels": tunnels,
        })
    return {
        "backend": backend.name,
        "reachable": health.reachable,
        "error": "" if health.reachable else health.last_error,
        "this_edge": this_edge,
        "edges": edges,
        "tunnels": [{"tunnel": key, "edges": ids} for key, ids in sorted(served.items())],
    }


def describe_agents(sessions: Any) -> list[dict[str, Any]]:
    """This edge's agent sessions as the cluster view shows them (no RTT: it ages)."""
    return sorted(
        (
            {
                "agent": session.agent_id,
                "session": session.session_id,
                "transport": session.link.transport_name,
                "draining": session.draining,
                "tunnels": [tunnel_key(spec) for spec in session.tunnels],
            }
            for session in sessions.sessions.values()
        ),
        key=lambda a: (a["agent"], a["session"]),
    )
