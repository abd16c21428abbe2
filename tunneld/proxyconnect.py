# -*- test-case-name: tests.test_streamable_http_proxy -*-
"""
A client endpoint through an HTTP forward proxy's C{CONNECT} tunnel.

An agent behind a corporate proxy (C{[agent] proxy}) reaches the edge only
through it: a transport that needs its own connection (gRPC's HTTP/2, a
WebSocket, TLS to an https edge) asks the proxy for a C{CONNECT} tunnel and
speaks through it.  A proxy that refuses (many allow C{CONNECT} to port 443
only, some to nothing) fails the connection with L{ProxyRefused}, naming the
proxy and its answer, so the agent's chain falls back to a transport made of
plain requests (streamable HTTP).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["ProxyConnectEndpoint", "ProxyRefused", "proxy_text"]

# A proxy's answer to CONNECT longer than this is no answer.
_MAX_HEAD = 16384


class ProxyRefused(ConnectionError):
    """The forward proxy would not open a tunnel (its status and reason, or what it sent)."""


def proxy_text(proxy: tuple[str, int]) -> str:
    host, port = proxy
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Tunnel(Protocol):
    """Asks for the tunnel; once granted, the wrapped protocol owns the connection."""

    def __init__(self, factory: _TunnelFactory) -> None:
        self.factory = factory
        self.head = b""
        self.inner: Any = None

    def connectionMade(self) -> None:  # noqa: N802
        target = self.factory.target
        self.transport.write(  # type: ignore[union-attr]
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)
        )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > _MAX_HEAD:
                self._refused(f"an answer to CONNECT longer than {_MAX_HEAD} bytes")
            return
        head, rest = self.head[:end], self.head[end + 4 :]
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or parts[1] != "200":
            self._refused(status_line[:200] or "an empty answer")
            return
        inner = self.factory.inner.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        if inner is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.factory.fail(Failure(ConnectionError("the protocol factory declined")))
            return
        self.inner = inner
        inner.makeConnection(self.transport)
        self.factory.succeed(inner)
        if rest:
            inner.dataReceived(rest)

    def _refused(self, answer: str) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]
        self.factory.fail(Failure(ProxyRefused(
            f"the proxy {self.factory.proxy} refused CONNECT {self.factory.target.decode()}: {answer}"
        )))

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self.inner is not None:
            self.inner.connectionLost(reason)
        else:
            self.factory.fail(Failure(ProxyRefused(
                f"the proxy {self.factory.proxy} closed the connection before answering CONNECT "
                f"{self.factory.target.decode()} ({reason.getErrorMessage()})"
            )))


class _TunnelFactory(Factory):
    def __init__(self, inner: IProtocolFactory, target: bytes, proxy: str) -> None:
        self.inner = inner
        self.target = target
        self.proxy = proxy
        self.done: Deferred[Any] = Deferred()
        self.tunnels: list[_Tunnel] = []

    def buildProtocol(self, addr: Any) -> _Tunnel:  # noqa: N802
        tunnel = _Tunnel(self)
        self.tunnels.append(tunnel)
        return tunnel

    def succeed(self, protocol: Any) -> None:
        if not self.done.called:
            self.done.callback(protocol)

    def fail(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(failure)


@implementer(IStreamClientEndpoint)
class ProxyConnectEndpoint:
    """Connects to C{host}:C{port} through the forward proxy at C{proxy} (host, port)."""

    def __init__(
        self, reactor: Any, proxy: tuple[str, int], host: str, port: int, timeout: float = 30
    ) -> None:
        self.proxy = proxy
        self.target = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("idna")
        self.endpoint = HostnameEndpoint(reactor, proxy[0], proxy[1], timeout=timeout)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:  # noqa: N803
        factory = _TunnelFactory(protocolFactory, self.target, proxy_text(self.proxy))

        def cancel(_: Deferred[Any]) -> None:
            connected.cancel()
            for tunnel in factory.tunnels:
                if tunnel.transport is not None:
                    tunnel.transport.abortConnection()  # type: ignore[attr-defined]

        done: Deferred[Any] = Deferred(cancel)

        def tcp_failed(failure: Failure) -> None:
            if not done.called:
                done.errback(failure)

        connected = self.endpoint.connect(factory)
        connected.addErrback(tcp_failed)
        factory.done.chainDeferred(done)
        return done
