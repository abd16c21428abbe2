# -*- test-case-name: tests.test_cluster,tests.test_agent_targets -*-
"""
Which edge an agent dials: a URL names both the edge and the transport.

An agent may list several edges (C{[agent] edge_urls}), and a draining edge
may name another in its GoAway (C{reconnect_to}).  Both are URLs whose
scheme says the transport: C{ws://} and C{wss://} the WebSocket transport,
C{grpc://} and C{grpcs://} the gRPC one.  Dialling one means the transport's
own options with the edge's address replaced, which this module does for
the built-in transports by the fields their options have (C{url}; or
C{address} and C{tls}); a third-party transport is dialled only as its own
table says.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["URL_TRANSPORTS", "retarget", "transport_of"]

# URL scheme -> the transport that dials it.
URL_TRANSPORTS = {"ws": "websocket", "wss": "websocket", "grpc": "grpc", "grpcs": "grpc"}


def transport_of(url: str) -> str | None:
    """The transport a URL is for, or None for a scheme no built-in transport dials."""
    scheme, sep, _ = url.partition("://")
    return URL_TRANSPORTS.get(scheme.lower()) if sep else None


def retarget(transport: str, options: Any, url: str) -> Any | None:
    """
    C{options} of C{transport} with the edge replaced by C{url}'s, or None
    when the URL is not for that transport (or its options cannot say it).
    """
    if transport_of(url) != transport or not dataclasses.is_dataclass(options):
        return None
    scheme, _, rest = url.partition("://")
    fields = {field.name for field in dataclasses.fields(options)}
    if "url" in fields:
        return dataclasses.replace(options, url=url)  # type: ignore[type-var]
    if "address" in fields:
        address = rest.split("/", 1)[0]
        changes: dict[str, Any] = {"address": address}
        if "tls" in fields:
            changes["tls"] = scheme.lower().endswith("s")
        return dataclasses.replace(options, **changes)  # type: ignore[type-var]
    return None
