# -*- test-case-name: tests.test_clientaddr -*-
"""
Who the public client really is.

The client address keys per-client rate limits and caps, so it must never be
taken from something a client can forge.  The socket's peer is the client
unless that peer is a configured trusted proxy (a load balancer in front of
the edge); only then is C{X-Forwarded-For} read, right to left, skipping
further trusted proxies: the first untrusted address is the client.

A trusted load balancer may instead announce the client with the PROXY
protocol (v1 text or v2 binary header before the first byte of HTTP).
L{ProxyProtocolFactory} wraps the public listener's factory when
C{proxy_protocol} is on: from a trusted peer the header is required and
parsed, and the wrapped protocol sees the announced address as C{getPeer()};
from any other peer bytes pass through untouched, so a client cannot spoof
a PROXY header either.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

__all__ = [
    "ProxyHeader",
    "ProxyProtocolError",
    "ProxyProtocolFactory",
    "TrustedProxies",
    "parse_proxy_header",
]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip("[]")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The addresses whose forwarding claims are believed."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks: list[_Network] = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        if not self.networks:
            return False
        address = _address(host)
        return address is not None and any(address in n for n in self.networks)

    def client(self, peer: str, forwarded_for: Iterable[bytes]) -> str:
        """
        The client address of a request from C{peer} carrying these
        C{X-Forwarded-For} values (in header order).
        """
        if not self.networks or not self.trusts(peer):
            return peer
        hops = [
            hop.strip().decode("ascii", "replace")
            for value in forwarded_for
            for hop in value.split(b",")
            if hop.strip()
        ]
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                # Garbage from the far side: the last trusted hop is all we know.
                return peer
            if not any(address in n for n in self.networks):
                return str(address)
            peer = str(address)
        return peer


# -- PROXY protocol -------------------------------------------------------------

_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # the longest v1 line, CRLF included
_V2_MAX = 16 + 65535


class ProxyProtocolError(Exception):
    """A malformed PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    """The client (source) address a load balancer announced."""

    host: str
    port: int


def parse_proxy_header(data: bytes) -> tuple[ProxyHeader | None, int] | None:
    """
    Parse a PROXY protocol v1 or v2 header at the start of C{data}.

    None when more bytes are needed; else the announced source (None for
    v1 C{UNKNOWN}, v2 C{LOCAL} or a non-IP family: use the socket's peer)
    and the number of header bytes.  Raises L{ProxyProtocolError}.
    """
    if data[:12] == _V2_SIGNATURE[: len(data[:12])] and len(data) < 12:
        return None
    if data.startswith(_V2_SIGNATURE):
        return _parse_v2(data)
    if b"PROXY "[: len(data)] == data[:6] and len(data) < 6:
        return None
    if data.startswith(b"PROXY "):
        return _parse_v1(data)
    raise ProxyProtocolError("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader | None, int] | None:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX:
            raise ProxyProtocolError("PROXY v1 line too long")
        return None
    parts = data[:end].split(b" ")
    consumed = end + 2
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return None, consumed
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"bad PROXY v1 line: {data[:end]!r}")
    source = _address(parts[2].decode("ascii", "replace"))
    destination = _address(parts[3].decode("ascii", "replace"))
    if source is None or destination is None:
        raise ProxyProtocolError("bad address in PROXY v1 line")
    want = 4 if parts[1] == b"TCP4" else 6
    if source.version != want and not (want == 6 and source.version == 4):
        raise ProxyProtocolError("PROXY v1 address does not match its family")
    try:
        port = int(parts[4])
        int(parts[5])
    except ValueError:
        raise ProxyProtocolError("bad port in PROXY v1 line") from None
    if not 0 <= port <= 65535:
        raise ProxyProtocolError("bad port in PROXY v1 line")
    return ProxyHeader(str(source), port), consumed


def _parse_v2(data: bytes) -> tuple[ProxyHeader | None, int] | None:
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyProtocolError(f"PROXY v2 header with command {command}")
    total = 16 + length
    if len(data) < total:
        return None
    if command == 0:  # LOCAL: the proxy's own connection (health checks)
        return None, total
    body = data[16:total]
    address_family = family >> 4
    if address_family == 1 and len(body) >= 12:
        host = str(ipaddress.IPv4Address(body[0:4]))
        (port,) = struct.unpack("!H", body[8:10])
    elif address_family == 2 and len(body) >= 36:
        address6 = ipaddress.IPv6Address(body[0:16])
        mapped = address6.ipv4_mapped
        host = str(mapped) if mapped is not None else str(address6)
        (port,) = struct.unpack("!H", body[32:34])
    elif address_family in (1, 2):
        raise ProxyProtocolError("PROXY v2 address block too short")
    else:  # AF_UNSPEC or AF_UNIX: nothing usable
        return None, total
    return ProxyHeader(host, port), total


class ProxyProtocolReceiver(ProtocolWrapper):
    """Reads a PROXY header from a trusted peer, then hands the connection on."""

    log = Logger()
    factory: ProxyProtocolFactory

    def __init__(self, factory: ProxyProtocolFactory, wrapped: Any) -> None:
        super().__init__(cast(Any, factory), wrapped)
        self._buffer = b""
        self._waiting = False
        self._announced: Any = None
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        # Unlike ProtocolWrapper, the wrapped protocol's connection may wait
        # for the PROXY header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        peer = self._socket().getPeer()
        if not self.factory.trusted.trusts(getattr(peer, "host", "")):
            self.wrappedProtocol.makeConnection(cast(Any, self))
            return
        self._waiting = True
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def _socket(self) -> Any:
        return self.transport

    def _timed_out(self) -> None:
        self._timer = None
        self.log.info("no PROXY header from {peer} in time", peer=str(self._socket().getPeer()))
        self._socket().abortConnection()

    def getPeer(self) -> Any:  # noqa: N802
        return self._announced or self._socket().getPeer()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self._waiting:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        try:
            parsed = parse_proxy_header(self._buffer)
        except ProxyProtocolError as e:
            self.log.info(
                "bad PROXY header from trusted {peer}: {error}",
                peer=str(self._socket().getPeer()), error=str(e),
            )
            self._stop_timer()
            self._waiting = False
            self._socket().abortConnection()
            return
        if parsed is None:
            return
        header, used = parsed
        self._stop_timer()
        self._waiting = False
        if header is not None:
            cls = IPv6Address if ":" in header.host else IPv4Address
            self._announced = cls("TCP", header.host, header.port)
        rest, self._buffer = self._buffer[used:], b""
        self.wrappedProtocol.makeConnection(cast(Any, self))
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._stop_timer()
        if self._waiting:
            # The wrapped protocol never saw this connection.
            self.factory.unregisterProtocol(self)
            return
        super().connectionLost(reason)


class ProxyProtocolFactory(WrappingFactory):
    """Wraps a public listener's factory to accept PROXY headers from trusted peers."""

    protocol = ProxyProtocolReceiver
    noisy = False  # its listener logs where it listens

    def __init__(
        self, wrapped: Any, trusted: TrustedProxies, clock: IReactorTime, timeout: float = 10.0
    ) -> None:
        super().__init__(wrapped)
        self.trusted = trusted
        self.clock = clock
        self.timeout = timeout
