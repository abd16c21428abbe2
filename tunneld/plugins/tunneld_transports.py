"""The built-in transport plugins (one object per transport)."""

from tunneld.transports.websocket import WebSocketTransport

websocket = WebSocketTransport()
