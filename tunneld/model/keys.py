# -*- test-case-name: tests.test_router -*-
"""
The name a tunnel goes by: on the wire (Health reports, refusals), in logs,
in metrics and the admin API, and as the key of the agent's upstream pools.

One function, so the edge, the agent and the observers cannot spell it
differently.
"""

from __future__ import annotations

from tunneld.model.messages import TunnelSpec


def tunnel_key(spec: TunnelSpec) -> str:
    """The name a tunnel goes by on the wire and in logs: hostname plus path prefix."""
    return spec.hostname + spec.path_prefix


def held_key(spec: TunnelSpec, port: int = 0) -> str:
    """
    The key an edge holds a tunnel by in the cluster registry: L{tunnel_key}
    for an HTTP tunnel; C{NAME:PORT} for a TCP tunnel served on edge port
    C{port} (a hostname has no colon), so other edges know which port to
    listen on for it (the cross-edge relay).
    """
    if spec.protocol == "tcp":
        return f"{tunnel_key(spec)}:{port}"
    return tunnel_key(spec)


def tcp_of_key(key: str) -> tuple[str, int] | None:
    """The TCP tunnel (name, edge port) a registry key names, or None for an HTTP one."""
    host = key.partition("/")[0]
    name, colon, port = host.rpartition(":")
    if not colon or not port.isdigit():
        return None
    return name, int(port)
