"""
What the public listeners refuse or rewrite so that nothing a client sends
can desynchronise a proxy in front of the edge, reach the upstream under a
version it does not speak, or lie to the upstream about who the client is:
C{Content-Length} with C{Transfer-Encoding}, HTTP versions other than 1.x
on the HTTP/1.1 port, userinfo in the host, and client-supplied
C{X-Forwarded-For}, C{Forwarded} and C{X-Real-IP}.

Real edge, real agent (websocket link) and a real upstream (twisted.web)
that records every request it receives, all on loopback port 0; the public
client writes raw, pipelined bytes (HTTP/1.1) or raw h2 frames (HTTP/2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from h2 import events as h2events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from tests.end_to_end import EventCollector
from tests.harness import TunnelHarness, listen_upstream
from tunneld.config import LimitsSection
from tunneld.edge.forwarding import HOP_BY_HOP, forwarded_headers, own_forwarded

HOST = b"app.test"
BAD_REQUEST = "bad request from {peer}: {error}"
REFUSED = "refused {method} {host}{target} from {peer}: {reason}"


@dataclass(frozen=True)
class Seen:
    """One request as the upstream received it."""

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


class RecordingUpstream(resource.Resource):
    """The private service: records every request, answers C{served URI}."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    def render(self, request: server.Request) -> bytes:
        headers = [
            (name.lower(), value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        uri = request.uri
        self.seen.append(Seen(request.method, uri, headers, request.content.read()))
        request.setHeader(b"content-type", b"text/plain")
        return b"served " + uri

    def uris(self) -> list[bytes]:
        return [seen.uri for seen in self.seen]


@dataclass(frozen=True)
class Response:
    """One response as the raw client read it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


def parse_responses(data: bytes, partial: bool = False) -> list[Response]:
    """
    Every response in C{data} (Content-Length or chunked framing); with
    C{partial}, the whole ones only, else bytes left over are an error.
    """
    responses: list[Response] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            if partial:
                break
            raise AssertionError(f"incomplete response head: {head!r}")
        data = rest
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        fields = dict(headers)
        if fields.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, sep, rest = data.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16) if sep else -1
                if size < 0 or len(rest) < size + 2:
                    if partial:
                        return responses
                    raise AssertionError(f"incomplete chunked body: {data!r}")
                if size == 0:
                    data = rest[2:]
                    break
                body, data = body + rest[:size], rest[size + 2:]
        else:
            length = int(fields.get(b"content-length", b"0"))
            if len(data) < length:
                if partial:
                    break
                raise AssertionError(f"incomplete body: {data!r}")
            body, data = data[:length], data[length:]
        responses.append(Response(status, headers, body))
    return responses


class RawClient(protocol.Protocol):
    """Writes bytes as given and keeps everything it reads until the edge closes."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._settled: tuple[int, defer.Deferred[None]] | None = None

    def settled(self, most: int) -> defer.Deferred[None]:
        """
        Fires when the edge has closed the connection, or has sent more than
        C{most} whole responses (so that a test of an edge that wrongly keeps
        the connection fails at once instead of waiting for its timeout).
        """
        d: defer.Deferred[None] = defer.Deferred()
        self._settled = (most, d)
        self._check()
        return d

    def _check(self) -> None:
        if self._settled is None:
            return
        most, d = self._settled
        if self.closed.called or len(parse_responses(self.data, partial=True)) > most:
            self._settled = None
            d.callback(None)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data
        self._check()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.closed.callback(None)
        self._check()


class H2Request(protocol.Protocol):
    """One HTTP/2 request with prior knowledge (the h2 library), headers as given."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.h2 = H2Connection(
            H2Configuration(
                client_side=True, header_encoding=None, validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.goaway: int | None = None
        self.request_headers = headers
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.done: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.h2.initiate_connection()
        self.h2.send_headers(1, self.request_headers, end_stream=True)
        self.transport.write(self.h2.data_to_send())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        for event in self.h2.receive_data(data):
            if isinstance(event, h2events.ResponseReceived):
                self.headers = dict(event.headers)
                self.status = int(self.headers[b":status"])
            elif isinstance(event, h2events.DataReceived):
                self.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2events.StreamEnded | h2events.StreamReset):
                if not self.done.called:
                    self.done.callback(None)
            elif isinstance(event, h2events.ConnectionTerminated):
                self.goaway = event.error_code
                if not self.done.called:
                    self.done.callback(None)
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        if not self.done.called:
            self.done.errback(reason)
        self.closed.callback(None)


def request(method: str, target: str, *fields: str, version: str = "HTTP/1.1") -> bytes:
    return ("\r\n".join([f"{method} {target} {version}", *fields]) + "\r\n\r\n").encode()


class StrictPublicTests(TestCase):
    """The public HTTP/1.1 and HTTP/2 listeners, end to end, against a recording upstream."""

    timeout = 60

    def setUp(self) -> None:
        self.log = EventCollector(self)

    async def tunnel(self, limits: LimitsSection | None = None) -> tuple[TunnelHarness, RecordingUpstream]:
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge(limits=limits, public_h2c_listen=["tcp:0:interface=127.0.0.1"])
        upstream = RecordingUpstream()
        port, _ = await listen_upstream(self, upstream)
        address = harness.link_address()
        await harness.start_agent(
            {"url": f"ws://127.0.0.1:{address.port}/tunnel"}, [(HOST.decode(), port)]
        )
        return harness, upstream

    async def exchange(self, harness: TunnelHarness, data: bytes, answers: int) -> RawClient:
        """
        Write C{data} at once; wait until the edge closes the connection (or
        wrongly sends more than C{answers} responses), then check it did close.
        """
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", harness.public_port), client)

        async def close() -> None:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.closed

        self.addCleanup(close)
        client.transport.write(data)  # type: ignore[union-attr]
        await client.settled(answers)
        self.assertEqual(len(parse_responses(client.data, partial=True)), answers, client.data)
        self.assertTrue(client.closed.called, "the edge kept the connection open")
        return client

    async def served(self, harness: TunnelHarness, upstream: RecordingUpstream, path: str) -> None:
        """A request on a fresh connection is served: whatever came before it reached the upstream first."""
        client = await self.exchange(
            harness, request("GET", path, "Host: app.test", "Connection: close"), answers=1
        )
        [response] = parse_responses(client.data)
        self.assertEqual((response.status, response.body), (200, b"served " + path.encode()))
        self.assertEqual(upstream.uris()[-1], path.encode())

    async def h2(self, harness: TunnelHarness, headers: list[tuple[bytes, bytes]]) -> H2Request:
        assert harness.edge is not None
        client = H2Request(headers)
        port = harness.edge.public_h2c[0].address.port
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        await client.done
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
        return client

    def assertBadRequest(self, response: Response, status: int, text: str) -> None:  # noqa: N802
        self.assertEqual(response.status, status)
        self.assertEqual(response.header(b"tunnel-error"), [b"bad_request"])
        self.assertIn(text.encode(), response.body)

    # -- Content-Length with Transfer-Encoding -------------------------------

    async def test_content_length_with_chunked_is_refused_and_closes(self) -> None:
        """CL+TE is answered 400 and the connection closed: the request hidden in its body is never served."""
        harness, upstream = await self.tunnel()
        hidden = request("GET", "/smuggled", "Host: app.test")
        body = b"0\r\n\r\n" + hidden  # chunked: empty; by Content-Length: the hidden request too
        data = request(
            "POST", "/front", "Host: app.test", f"Content-Length: {len(body)}",
            "Transfer-Encoding: chunked",
        ) + body + request("GET", "/after", "Host: app.test")
        client = await self.exchange(harness, data, answers=1)
        [response] = parse_responses(client.data)
        self.assertBadRequest(response, 400, "Content-Length and Transfer-Encoding")
        self.assertEqual(response.header(b"connection"), [b"close"])
        [event] = self.log.matching(BAD_REQUEST)
        self.assertIn("Content-Length and Transfer-Encoding", event["error"])
        await self.served(harness, upstream, "/marker")
        self.assertEqual(upstream.uris(), [b"/marker"])

    async def test_content_length_with_chunked_after_a_plain_request(self) -> None:
        """Pipelined behind a plain GET (the fast path), a CL+TE request is refused the same way."""
        harness, upstream = await self.tunnel()
        data = (
            request("GET", "/first", "Host: app.test")
            + request(
                "POST", "/second", "Host: app.test", "Transfer-Encoding: chunked",
                "Content-Length: 3",
            )
            + b"3\r\nabc\r\n0\r\n\r\n"
            + request("GET", "/third", "Host: app.test")
        )
        client = await self.exchange(harness, data, answers=2)
        first, second = parse_responses(client.data)
        self.assertEqual((first.status, first.body), (200, b"served /first"))
        self.assertBadRequest(second, 400, "Content-Length and Transfer-Encoding")
        await self.served(harness, upstream, "/marker")
        self.assertEqual(upstream.uris(), [b"/first", b"/marker"])

    async def test_chunked_alone_keeps_the_connection(self) -> None:
        """A chunked request without Content-Length is served and the next pipelined request too."""
        harness, upstream = await self.tunnel()
        data = (
            request("POST", "/up", "Host: app.test", "Transfer-Encoding: chunked")
            + b"3\r\nabc\r\n0\r\n\r\n"
            + request("GET", "/next", "Host: app.test", "Connection: close")
        )
        client = await self.exchange(harness, data, answers=2)
        first, second = parse_responses(client.data)
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(upstream.uris(), [b"/up", b"/next"])
        self.assertEqual(upstream.seen[0].body, b"abc")

    async def test_chunked_in_http10_is_refused(self) -> None:
        """Transfer-Encoding in an HTTP/1.0 request is faulty framing (RFC 9112 6.1): 400, close."""
        harness, upstream = await self.tunnel()
        data = request(
            "POST", "/old", "Host: app.test", "Transfer-Encoding: chunked", version="HTTP/1.0"
        ) + b"3\r\nabc\r\n0\r\n\r\n"
        client = await self.exchange(harness, data, answers=1)
        [response] = parse_responses(client.data)
        self.assertBadRequest(response, 400, "Transfer-Encoding in an HTTP/1.0 request")
        await self.served(harness, upstream, "/marker")
        self.assertEqual(upstream.uris(), [b"/marker"])

    async def test_transfer_encoding_over_http2_is_a_protocol_error(self) -> None:
        """Over HTTP/2, Transfer-Encoding (with Content-Length) ends the connection with PROTOCOL_ERROR; nothing is forwarded."""
        harness, upstream = await self.tunnel()
        client = await self.h2(harness, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"app.test"),
            (b":path", b"/h2"), (b"transfer-encoding", b"chunked"), (b"content-length", b"3"),
        ])
        self.assertEqual((client.goaway, client.status), (ErrorCodes.PROTOCOL_ERROR, 0))
        await self.served(harness, upstream, "/marker")
        self.assertEqual(upstream.uris(), [b"/marker"])

    # -- HTTP versions -------------------------------------------------------

    async def test_other_major_versions_get_505(self) -> None:
        """HTTP/2.0, HTTP/3.0 and HTTP/0.9 request lines on the HTTP/1.1 port are answered 505 and closed."""
        harness, upstream = await self.tunnel()
        for version in ("HTTP/2.0", "HTTP/3.0", "HTTP/0.9"):
            data = request("GET", "/v", "Host: app.test", version=version) + request(
                "GET", "/after", "Host: app.test"
            )
            client = await self.exchange(harness, data, answers=1)
            [response] = parse_responses(client.data)
            self.assertBadRequest(response, 505, f"{version} is not supported")
            self.assertEqual(response.header(b"connection"), [b"close"])
        await self.served(harness, upstream, "/marker")
        self.assertEqual(upstream.uris(), [b"/marker"])
        self.assertEqual(len(self.log.matching(BAD_REQUEST)), 3)

    async def test_http10_is_still_served(self) -> None:
        """HTTP/1.0 (and a later 1.x minor version) are served as before."""
        harness, upstream = await self.tunnel()
        for version in ("HTTP/1.0", "HTTP/1.2"):
            client = await self.exchange(
                harness,
                request("GET", "/v", "Host: app.test", "Connection: close", version=version),
                answers=1,
            )
            [response] = parse_responses(client.data)
            self.assertEqual((response.status, response.body), (200, b"served /v"))
        self.assertEqual(upstream.uris(), [b"/v", b"/v"])

    # -- userinfo in the host ------------------------------------------------

    async def test_host_with_userinfo_is_refused(self) -> None:
        """A Host or absolute target with userinfo is answered 400 naming it and closed, on either parser path."""
        harness, upstream = await self.tunnel()
        cases = [
            request("GET", "/plain", "Host: evil@app.test"),
            request("GET", "http://evil@app.test/absolute", "Host: app.test"),
            request("POST", "/body", "Host: user:pw@app.test", "Content-Length: 2") + b"hi",
        ]
        for data in cases:
            client = await self.exchange(
                harness, data + request("GET", "/after", "Host: app.test"), answers=1
            )
            [refused] = parse_responses(client.data)
            self.assertBadRequest(refused, 400, "userinfo")
        await self.served(harness, upstream, "/marker")
        self.assertEqual(upstream.uris(), [b"/marker"])
        errors = [event["error"] for event in self.log.matching(BAD_REQUEST)]
        self.assertEqual(len(errors), 3)
        self.assertTrue(all("userinfo" in error for error in errors), errors)

    async def test_authority_with_userinfo_is_refused_over_http2(self) -> None:
        """Over HTTP/2, an :authority with userinfo is answered 400 naming it."""
        harness, upstream = await self.tunnel()
        client = await self.h2(harness, [
            (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"evil@app.test"),
            (b":path", b"/h2"),
        ])
        self.assertEqual(client.status, 400)
        self.assertEqual(client.headers.get(b"tunnel-error"), b"bad_request")
        self.assertIn(b"userinfo", client.body)
        self.assertEqual(upstream.uris(), [])

    # -- who the client is ---------------------------------------------------

    CLAIMS = ("X-Forwarded-For: 203.0.113.9", "Forwarded: for=203.0.113.9", "X-Real-IP: 203.0.113.9")

    def assertOwnClaims(self, seen: Seen) -> None:  # noqa: N802
        """The upstream got only the edge's word for who the client is."""
        self.assertEqual(seen.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(seen.header(b"x-real-ip"), [b"127.0.0.1"])
        self.assertEqual(len(seen.header(b"forwarded")), 1)
        self.assertTrue(seen.header(b"forwarded")[0].startswith(b"for=127.0.0.1;"), seen)
        self.assertNotIn(b"203.0.113.9", b" ".join(v for _, v in seen.headers))

    async def test_untrusted_client_cannot_claim_an_address(self) -> None:
        """From an untrusted peer, X-Forwarded-For, Forwarded and X-Real-IP are the edge's own, on both parser paths."""
        harness, upstream = await self.tunnel()
        data = request("GET", "/fast", "Host: app.test", *self.CLAIMS) + request(
            "POST", "/h11", "Host: app.test", "Content-Length: 2", "Connection: close", *self.CLAIMS
        ) + b"hi"
        client = await self.exchange(harness, data, answers=2)
        self.assertEqual([r.status for r in parse_responses(client.data)], [200, 200])
        self.assertEqual(upstream.uris(), [b"/fast", b"/h11"])
        for seen in upstream.seen:
            self.assertOwnClaims(seen)
            self.assertEqual(seen.header(b"forwarded"), [b'for=127.0.0.1;host="app.test";proto=http'])

    async def test_without_claims_nothing_is_added(self) -> None:
        """A request carrying none of them gets X-Forwarded-For only, as before."""
        harness, upstream = await self.tunnel()
        await self.served(harness, upstream, "/plain")
        [seen] = upstream.seen
        self.assertEqual(seen.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual((seen.header(b"forwarded"), seen.header(b"x-real-ip")), ([], []))

    async def test_untrusted_client_cannot_claim_an_address_over_http2(self) -> None:
        """Over HTTP/2 too, the client's X-Forwarded-For, Forwarded and X-Real-IP are replaced."""
        harness, upstream = await self.tunnel()
        claims = [tuple(c.lower().encode().split(b": ")) for c in self.CLAIMS]
        client = await self.h2(harness, [
            (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app.test"),
            (b":path", b"/h2"), *claims,  # type: ignore[list-item]
        ])
        self.assertEqual(client.status, 200)
        [seen] = upstream.seen
        self.assertOwnClaims(seen)

    async def test_trusted_proxy_claims_pass(self) -> None:
        """From a trusted proxy, X-Forwarded-For is appended to and Forwarded/X-Real-IP pass as sent."""
        harness, upstream = await self.tunnel(LimitsSection(trusted_proxies=["127.0.0.0/8"]))
        data = request("GET", "/fast", "Host: app.test", *self.CLAIMS) + request(
            "POST", "/h11", "Host: app.test", "Content-Length: 2", "Connection: close", *self.CLAIMS
        ) + b"hi"
        client = await self.exchange(harness, data, answers=2)
        self.assertEqual([r.status for r in parse_responses(client.data)], [200, 200])
        for seen in upstream.seen:
            self.assertEqual(seen.header(b"x-forwarded-for"), [b"203.0.113.9, 127.0.0.1"])
            self.assertEqual(seen.header(b"forwarded"), [b"for=203.0.113.9"])
            self.assertEqual(seen.header(b"x-real-ip"), [b"203.0.113.9"])


class ForwardedHeadersTests(SynchronousTestCase):
    """L{forwarded_headers} and the edge's own C{Forwarded} element."""

    CLAIMS = [(b"x-forwarded-for", b"203.0.113.9"), (b"forwarded", b"for=203.0.113.9"),
              (b"x-real-ip", b"203.0.113.9"), (b"forwarded", b"for=198.51.100.1")]

    def test_own_forwarded(self) -> None:
        """IPv6 nodes are bracketed and quoted, a host is a quoted-string, a non-IP peer is 'unknown'."""
        self.assertEqual(own_forwarded(b"192.0.2.1", b"a.test:8080", "http"),
                         b'for=192.0.2.1;host="a.test:8080";proto=http')
        self.assertEqual(own_forwarded(b"2001:db8::1", b'a"b\\c', "https"),
                         b'for="[2001:db8::1]";host="a\\"b\\\\c";proto=https')
        self.assertEqual(own_forwarded(b"UNIXAddress('/run/s')", b"a", "http"),
                         b'for=unknown;host="a";proto=http')

    def test_untrusted_with_connection_tokens(self) -> None:
        """With Connection tokens (the slower branch) the claims are replaced the same way, once each."""
        drop = HOP_BY_HOP | {b"x-hop"}
        out = forwarded_headers([*self.CLAIMS, (b"x-hop", b"1")], drop, b"a.test", b"192.0.2.1",
                                "http", b"1.1 tunneld")
        for fields in (out, forwarded_headers(self.CLAIMS, HOP_BY_HOP, b"a.test", b"192.0.2.1",
                                              "http", b"1.1 tunneld")):
            claims = [(n, v) for n, v in fields if n in (b"x-forwarded-for", b"forwarded", b"x-real-ip")]
            self.assertEqual(sorted(claims), [
                (b"forwarded", b'for=192.0.2.1;host="a.test";proto=http'),
                (b"x-forwarded-for", b"192.0.2.1"),
                (b"x-real-ip", b"192.0.2.1"),
            ])
        self.assertNotIn(b"x-hop", [n for n, _ in out])

    def test_trusted(self) -> None:
        """From a trusted proxy the claims pass and X-Forwarded-For is appended to."""
        out = forwarded_headers(self.CLAIMS, HOP_BY_HOP, b"a.test", b"192.0.2.1", "http",
                                b"1.1 tunneld", trusted=True)
        claims = [(n, v) for n, v in out if n in (b"x-forwarded-for", b"forwarded", b"x-real-ip")]
        self.assertEqual(claims, [
            (b"forwarded", b"for=203.0.113.9"), (b"x-real-ip", b"203.0.113.9"),
            (b"forwarded", b"for=198.51.100.1"), (b"x-forwarded-for", b"203.0.113.9, 192.0.2.1"),
        ])
