"""The built-in transport plugins (one object per transport)."""

from tunneld.transports.grpc import GrpcTransport
from tunneld.transports.websocket import WebSocketTransport

grpc = GrpcTransport()
websocket = WebSocketTransport()
