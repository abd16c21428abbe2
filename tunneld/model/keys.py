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
