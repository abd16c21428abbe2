"""The client address: trusted proxies, X-Forwarded-For and PROXY protocol v1/v2."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tunneld.edge.forwarding import peer_of
from tunneld.policy.clientaddr import (
    ProxyHeader,
    ProxyProtocolError,
    ProxyProtocolFactory,
    TrustedProxies,
    parse_proxy_header,
)

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def v2_tcp4(source: str, port: int) -> bytes:
    body = (ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address("203.0.113.1").packed
            + struct.pack("!HH", port, 443))
    return v2(1, 0x11, body)


class ForwardedForTests(SynchronousTestCase):
    trusted = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])

    def test_untrusted_peer_is_the_client(self) -> None:
        """A direct client cannot choose its address with X-Forwarded-For."""
        self.assertEqual(self.trusted.client("192.0.2.1", [b"10.9.9.9"]), "192.0.2.1")

    def test_rightmost_untrusted_hop(self) -> None:
        """Through trusted proxies, the first untrusted hop from the right is the client."""
        client = self.trusted.client("10.0.0.1", [b"1.1.1.1, 198.51.100.7", b"10.0.0.2"])
        self.assertEqual(client, "198.51.100.7")

    def test_garbage_hop_stops_the_walk(self) -> None:
        """An unparsable hop is not believed: the last trusted address stands."""
        self.assertEqual(self.trusted.client("10.0.0.1", [b"nonsense"]), "10.0.0.1")

    def test_ipv6_and_mapped(self) -> None:
        """IPv6 proxies are matched, IPv4-mapped addresses read as IPv4."""
        self.assertTrue(self.trusted.trusts("::ffff:10.1.2.3"))
        self.assertEqual(self.trusted.client("2001:db8::1", [b"[2001:db9::5]"]), "2001:db9::5")

    def test_nobody_trusted(self) -> None:
        """With no trusted proxies the peer is always the client."""
        self.assertEqual(TrustedProxies().client("10.0.0.1", [b"1.2.3.4"]), "10.0.0.1")


class PeerTests(SynchronousTestCase):
    def test_socket_peer_names(self) -> None:
        """A socket peer as logged and forwarded: IPv4, IPv6, and IPv4 through a dual-stack socket."""
        self.assertEqual(
            peer_of(IPv4Address("TCP", "192.0.2.1", 5)), ("192.0.2.1:5", b"192.0.2.1", "192.0.2.1")
        )
        self.assertEqual(
            peer_of(IPv6Address("TCP", "2001:db8::1", 5)),
            ("[2001:db8::1]:5", b"2001:db8::1", "2001:db8::1"),
        )
        self.assertEqual(
            peer_of(IPv6Address("TCP", "::ffff:192.0.2.1", 5)),
            ("192.0.2.1:5", b"192.0.2.1", "192.0.2.1"),
        )


class ParseTests(SynchronousTestCase):
    def test_v1_tcp4(self) -> None:
        """A v1 line gives the source address and its length."""
        data = b"PROXY TCP4 198.51.100.7 203.0.113.1 5555 443\r\nGET /"
        self.assertEqual(parse_proxy_header(data), (ProxyHeader("198.51.100.7", 5555), 46))

    def test_v1_tcp6_and_unknown(self) -> None:
        """v1 TCP6 is parsed; UNKNOWN means: use the socket peer."""
        data = b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n"
        self.assertEqual(parse_proxy_header(data), (ProxyHeader("2001:db8::7", 5555), len(data)))
        self.assertEqual(parse_proxy_header(b"PROXY UNKNOWN\r\n"), (None, 15))

    def test_v1_incomplete_and_too_long(self) -> None:
        """A partial line needs more bytes; a line past 107 bytes is an error."""
        self.assertIsNone(parse_proxy_header(b"PROX"))
        self.assertIsNone(parse_proxy_header(b"PROXY TCP4 1.2.3.4"))
        self.assertRaises(ProxyProtocolError, parse_proxy_header, b"PROXY " + b"x" * 200)

    def test_v1_malformed(self) -> None:
        """Bad families, addresses and ports are errors."""
        for line in (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n",
                     b"PROXY TCP4 1.2.3.4 1.2.3.4 x 2\r\n", b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n",
                     b"GET / HTTP/1.1\r\n"):
            self.assertRaises(ProxyProtocolError, parse_proxy_header, line)

    def test_v2_tcp4_tcp6_local(self) -> None:
        """v2 binary headers: IPv4, IPv6, LOCAL and unspecified families."""
        self.assertEqual(parse_proxy_header(v2_tcp4("198.51.100.7", 5555) + b"GET"),
                         (ProxyHeader("198.51.100.7", 5555), 28))
        body = (ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("::1").packed
                + struct.pack("!HH", 6000, 443))
        self.assertEqual(parse_proxy_header(v2(1, 0x21, body)), (ProxyHeader("2001:db8::7", 6000), 52))
        self.assertEqual(parse_proxy_header(v2(0, 0x00, b"")), (None, 16))
        self.assertEqual(parse_proxy_header(v2(1, 0x00, b"tlv")), (None, 19))

    def test_v2_incomplete_and_malformed(self) -> None:
        """A partial v2 header needs more; a wrong version, command or short block is an error."""
        whole = v2_tcp4("198.51.100.7", 5555)
        for cut in (5, 12, 15, 20):
            self.assertIsNone(parse_proxy_header(whole[:cut]))
        bad_version = SIGNATURE + struct.pack("!BBH", 0x11, 0x11, 0)
        self.assertRaises(ProxyProtocolError, parse_proxy_header, bad_version)
        self.assertRaises(ProxyProtocolError, parse_proxy_header, v2(2, 0x11, b""))
        self.assertRaises(ProxyProtocolError, parse_proxy_header, v2(1, 0x11, b"\0" * 4))


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.peer: Any = None

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data


class WrapperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.inner = Factory.forProtocol(Recorder)
        self.factory = ProxyProtocolFactory(self.inner, TrustedProxies(["10.0.0.0/8"]), self.clock, 5)

    def connect(self, ip: str) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", ip, 1000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 1000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_trusted_peer_announces_client(self) -> None:
        """From a trusted balancer, the wrapped protocol sees the announced client as its peer."""
        protocol, transport = self.connect("10.0.0.5")
        self.assertIsNone(protocol.wrappedProtocol.peer)
        header = v2_tcp4("198.51.100.7", 5555)
        protocol.dataReceived(header[:10])
        protocol.dataReceived(header[10:] + b"GET / HTTP/1.1\r\n")
        inner = protocol.wrappedProtocol
        self.assertEqual((inner.peer.host, inner.peer.port), ("198.51.100.7", 5555))
        self.assertEqual(inner.data, b"GET / HTTP/1.1\r\n")

    def test_untrusted_peer_cannot_spoof(self) -> None:
        """From anyone else the bytes pass through untouched and the socket peer stands."""
        protocol, transport = self.connect("192.0.2.1")
        protocol.dataReceived(b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n")
        inner = protocol.wrappedProtocol
        self.assertEqual(inner.peer.host, "192.0.2.1")
        self.assertEqual(inner.data, b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n")

    def test_bad_header_from_trusted_peer_aborts(self) -> None:
        """A trusted peer that sends no valid header is cut off."""
        protocol, transport = self.connect("10.0.0.5")
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertTrue(transport.disconnecting)

    def test_header_timeout(self) -> None:
        """A trusted peer silent past the timeout is cut off."""
        protocol, transport = self.connect("10.0.0.5")
        self.clock.advance(5)
        self.assertTrue(transport.disconnecting)
