"""A WebSocket echo upstream (Autobahn) for the WebSocket rows.

Usage: python bench/wsecho.py; prints "listening PORT" once bound.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        self.sendMessage(payload, isBinary)


def main() -> None:
    factory = WebSocketServerFactory()
    factory.protocol = Echo
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=30)
    port = reactor.listenTCP(0, factory, backlog=4096, interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
