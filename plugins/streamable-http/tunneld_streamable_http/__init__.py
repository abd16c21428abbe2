"""
The streamable-HTTP agent transport for tunneld: agent links as plain
HTTP/1.1 requests, for agents behind proxies that allow neither WebSocket
nor HTTP/2 (the shape of the MCP and ACP streamable HTTP transports).

A distribution of its own, found through tunneld's plugin directory like
any third-party transport; it uses only tunneld's public seams (the
interfaces, L{tunneld.transports.mux.FrameLink}, the schema and listening
helpers, the reasons).  See README.md for the wire shape.
"""

__version__ = "0.1.0"
