# -*- test-case-name: tests.test_http1,tests.test_fasthead -*-
"""
The edge's public HTTP/1.1 listener.

  - L{protocol}: one connection: reading requests (h11), the checks only
    HTTP/1.1 needs (sizes, framing, 505), replies written with h11, the
    cycles of a kept-alive connection, closing; every request goes to the
    edge gateway (L{tunneld.edge.gateway}) to be routed, admitted and
    opened or refused, and the refusal is rendered here;
  - L{exchange}: one request carried on one stream (the stream's receiver
    and the socket's producer);
  - L{fast}: the common plain request read and answered without h11, byte
    for byte as h11 would, with L{fasthead} its parser and writer;
  - L{deadlines}: the connection's one timer (head, keep-alive, progress,
    linger, and a switched connection's pings).

Every refusal answers with the L{tunneld.model.reasons.Reason}'s HTTP status, a
C{Tunnel-Error} header naming it and a one-line body, and is logged and
counted by the gateway with the same label as on every other protocol.
"""

from tunneld.edge.http1.protocol import PublicHTTPFactory, PublicHTTPProtocol, PublicHTTPSettings

__all__ = ["PublicHTTPFactory", "PublicHTTPProtocol", "PublicHTTPSettings"]
