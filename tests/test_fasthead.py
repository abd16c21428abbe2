"""
Tests for L{tunneld.edge.http1.fasthead}, the h11-free path of the public HTTP/1.1
listener: what its reader takes h11 parses identically, everything unusual
is left to h11, and a fast exchange writes the very bytes h11 would.
"""

from __future__ import annotations

from typing import Any

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.test_http1 import HOST, FakeLink, FakeRoute, FakeRouter, parse_all, request
from tunneld.edge.gateway import EdgeGateway
from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPProtocol, PublicHTTPSettings
from tunneld.edge.http1.fasthead import FastMemo, check_fields, read_head, response_head
from tunneld.model.reasons import Reason

_PLAIN = b"GET /a?b=c HTTP/1.1\r\nHost: app.example.com\r\nAccept: */*\r\n\r\n"

# Heads the fast reader must leave to h11, and why: each is either refused by
# h11 (request smuggling, bad characters) or needs its state machine (a body,
# Expect, a switch, closing, another HTTP version).
_DECLINED = {
    "incomplete head": b"GET / HTTP/1.1\r\nHost: a\r\n",
    "bare LF line ends": b"GET / HTTP/1.1\nHost: a\n\n",
    "LF ending one field": b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
    "leading blank line": b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "HTTP/1.0": b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
    "HTTP/2.0 version": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "lower-case version": b"GET / http/1.1\r\nHost: a\r\n\r\n",
    "no version": b"GET /\r\nHost: a\r\n\r\n",
    "two spaces in the request line": b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    "space in the target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "control character in the target": b"GET /a\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
    "obs-text in the target": b"GET /a\x80 HTTP/1.1\r\nHost: a\r\n\r\n",
    "non-token method": b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "CONNECT": b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n  z\r\n\r\n",
    "space before the colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "empty field name": b"GET / HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n",
    "non-token field name": b"GET / HTTP/1.1\r\nHost: a\r\nX(y): v\r\n\r\n",
    "field line without a colon": b"GET / HTTP/1.1\r\nHost: a\r\nXy\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "CR in a value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    "vertical tab in a value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x0bb\r\n\r\n",
    "no Host": b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
    "two Hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "Content-Length": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    "Transfer-Encoding": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    "Content-Length and Transfer-Encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
    "Expect": b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    "Upgrade": b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    "Connection: close": b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "Connection naming a field": b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-a\r\n\r\n",
}


def _h11_parse(data: bytes) -> tuple[h11.Request, h11.Connection]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return event, conn


_NAMES = [b"Host", b"host", b"HOST", b"Accept", b"X-A", b"Connection", b"Content-Length",
          b"Transfer-Encoding", b"Expect", b"Upgrade", b"X~!#$%&'*+.^_`|", b"", b"X(", b"X y"]
_VALUE_BYTES = [b"a", b"Z", b"0", b" ", b"\t", b",", b"keep-alive", b"close", b"\x80", b"\xff",
                b"\x7f", b"\x00", b"\r", b"\n", b"\x0b", b"chunked", b"5", b"\r\n "]


@st.composite
def _heads(draw: Any) -> bytes:
    """Request heads built from pieces on and around the edges of the grammar."""
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"M-1", b"CONNECT", b"G T", b""]))
    target = draw(st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/x", b"/\x80", b"/ a", b""]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.10"]))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    lines = [b"%s %s %s" % (method, target, version)]
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(_NAMES))
        value = b"".join(draw(st.lists(st.sampled_from(_VALUE_BYTES), max_size=4)))
        colon = draw(st.sampled_from([b": ", b":", b" :", b":\t", b": \t"]))
        fold = draw(st.sampled_from([b"", b"", b"", b" ", b"\t"]))
        lines.append(fold + name + colon + value + draw(st.sampled_from([b"", b" ", b"\t"])))
    tail = draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"abc"]))
    return eol.join(lines) + eol + eol + tail


@st.composite
def _mutated(draw: Any) -> bytes:
    data = bytearray(_PLAIN + draw(st.sampled_from([b"", _PLAIN])))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


class ReadHeadTests(SynchronousTestCase):
    """The fast reader takes only what h11 parses the same way."""

    def assert_same_as_h11(self, data: bytes) -> None:
        parsed = read_head(data)
        if parsed is None:
            return
        method, target, fields, end = parsed
        request, conn = _h11_parse(data)
        self.assertEqual(
            (request.method, request.target, request.http_version, list(request.headers)),
            (method, target, b"1.1", fields),
        )
        self.assertIsInstance(conn.next_event(), h11.EndOfMessage)  # no body
        self.assertEqual(conn.trailing_data[0], data[end:])
        conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
        conn.send(h11.EndOfMessage())
        self.assertIs(conn.our_state, h11.DONE)  # keep-alive, as the fast path assumes

    def test_plain_head(self) -> None:
        """A plain GET is read: method, target, lower-cased names, trimmed values, its length."""
        data = b"GET /a?b=c HTTP/1.1\r\nHost:  App.Example.com \t\r\nX-Empty:\r\n\r\nnext"
        self.assertEqual(
            read_head(data),
            (b"GET", b"/a?b=c", [(b"host", b"App.Example.com"), (b"x-empty", b"")], len(data) - 4),
        )
        self.assert_same_as_h11(data)

    def test_keep_alive_and_obs_text(self) -> None:
        """Connection: keep-alive and obs-text in a value stay on the fast path, as h11 reads them."""
        data = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive\r\nX: caf\xe9 au\tlait\r\n\r\n"
        self.assertIsNotNone(read_head(data))
        self.assert_same_as_h11(data)

    def test_declined(self) -> None:
        """Every unusual head in the table is left to h11 (which refuses it or needs its state)."""
        for label, data in _DECLINED.items():
            self.assertIsNone(read_head(data), label)

    @settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_heads())
    def test_built_heads_agree_with_h11(self, data: bytes) -> None:
        """A head built near the grammar's edges is declined, or parsed exactly as h11 parses it."""
        self.assert_same_as_h11(data)

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_mutated())
    def test_mutated_heads_agree_with_h11(self, data: bytes) -> None:
        """A plain head with bytes flipped, inserted or deleted is declined or parsed as h11 does."""
        self.assert_same_as_h11(data)


_REPLY_FIELDS = [
    (b"Content-Type", b"text/plain"), (b"Content-Length", b"3"), (b"content-length", b"3, 3"),
    (b"Content-Length", b"4"), (b"Content-Length", b"x"), (b"Transfer-Encoding", b"chunked"),
    (b"Connection", b"close"), (b"Connection", b"x-drop"), (b"X-Drop", b"1"), (b"Via", b"1.0 up"),
    (b"X-Bad", b"a\r\nb"), (b"X-Bad", b" lead"), (b"Bad Name", b"v"), (b"Keep-Alive", b"5"),
]


class WriterTests(SynchronousTestCase):
    """Response heads are written only when every field fits the grammar."""

    def test_response_head(self) -> None:
        """Status line, fields as given, blank line; a reason with CR or LF is refused."""
        self.assertEqual(
            response_head(200, b"OK", [(b"Content-Length", b"2"), (b"X", b"")]),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: \r\n\r\n",
        )
        self.assertIsNone(response_head(200, b"OK\r\nX: y", []))
        self.assertIsNone(response_head(200, b"OK\n", []))

    def test_refuses_splitting(self) -> None:
        """CR, LF or NUL in a name or value, a non-token name, or blanks around a value, are refused."""
        for field in [
            (b"X", b"a\r\nSet-Cookie: x"), (b"X", b"a\nb"), (b"X", b"a\x00"), (b"X", b"a\rb"),
            (b"X: y\r\nZ", b"a"), (b"X: y", b"a"), (b"X y", b"a"), (b"", b"a"), (b"X", b" a"),
            (b"X", b"a "), (b"X", b"a\x0b"),
        ]:
            self.assertIsInstance(check_fields([(b"A", b"1"), field]), str, field)

    def test_content_length(self) -> None:
        """Content-Length is read as h11 reads it: one value, copies merged, digits only."""
        self.assertEqual(check_fields([(b"A", b"1")]), ([(b"A", b"1")], None))
        self.assertEqual(
            check_fields([(b"Content-Length", b"5, 5"), (b"content-length", b"5")]),
            ([(b"Content-Length", b"5")], 5),
        )
        self.assertEqual(check_fields([(b"Content-Length", b"5, 6")]),
                         "conflicting Content-Length headers")
        self.assertEqual(check_fields([(b"Content-Length", b"5"), (b"Content-Length", b"6")]),
                         "conflicting Content-Length headers")
        for bad in [b"-1", b"x", b"", b"1" * 21, b"0x10"]:
            self.assertEqual(check_fields([(b"Content-Length", bad)]), "bad Content-Length")

    def test_transfer_encoding(self) -> None:
        """Transfer-Encoding may only be one chunked, as h11 has it."""
        self.assertEqual(check_fields([(b"TE", b"x"), (b"Transfer-Encoding", b"Chunked")]),
                         ([(b"TE", b"x"), (b"Transfer-Encoding", b"chunked")], None))
        self.assertEqual(check_fields([(b"Transfer-Encoding", b"gzip")]),
                         "Only Transfer-Encoding: chunked is supported")
        self.assertEqual(check_fields([(b"Transfer-Encoding", b"chunked")] * 2),
                         "multiple Transfer-Encoding headers")

    def test_same_checks_as_h11(self) -> None:
        """Every field list here is refused by both or accepted by both, with h11's message."""
        for fields in [[f] for f in _REPLY_FIELDS] + [_REPLY_FIELDS[1:4], _REPLY_FIELDS[:3]]:
            try:
                h11.Response(status_code=200, headers=fields)
                expected = None
            except h11.LocalProtocolError as error:
                expected = str(error)
            checked = check_fields(fields)
            self.assertEqual(checked if isinstance(checked, str) else None, expected, fields)


class FastBlockTests(SynchronousTestCase):
    """A reply's fields are filtered, checked and rendered in one pass; anything unusual the long way."""

    def test_plain_and_long_way_agree(self) -> None:
        """The one-pass block is the block the long way makes (filtered, checked, rendered)."""
        from tunneld.edge.forwarding import reply_headers
        from tunneld.edge.http1 import fast
        from tunneld.edge.http1.fasthead import field_block, plain_block

        memo = FastMemo()
        for fields in [
            ((b"Content-Length", b"2"), (b"Connection", b"keep-alive"), (b"X", b"y")),
            ((b"Via", b"1.0 up"), (b"Set-Cookie", b"sid=1; Path=/"), (b"Transfer-Encoding", b"chunked")),
            ((b"Connection", b"close, x-hop"), (b"X-Hop", b"1"), (b"Y", b"")),
            ((b"Content-Length", b"2, 2"), (b"Content-Length", b"2")),
            (),
        ]:
            headers, _ = reply_headers(fields, b"1.1 a")
            checked = check_fields(headers)
            assert not isinstance(checked, str)
            self.assertEqual(fast.fast_block(fields, b"1.1 a", memo), (field_block(checked[0]), checked[1]))
            self.assertEqual(fast.fast_block(list(fields), b"1.1 a", memo), (field_block(checked[0]), checked[1]))
        # A Connection naming an end-to-end field, a repeated length: the long way.
        self.assertIsNone(plain_block(((b"Connection", b"x-hop"), (b"X-Hop", b"1")), b"v", memo.names))
        self.assertIsNone(plain_block(((b"Content-Length", b"2"), (b"Content-Length", b"2")), b"v", memo.names))
        self.assertEqual(
            fast.fast_block(((b"Content-Length", b"2"), (b"Connection", b"keep-alive"), (b"X", b"y")), b"1.1 b", memo),
            (b"Content-Length: 2\r\nX: y\r\nVia: 1.1 b\r\n", 2),
        )

    def test_bad_fields_refused_every_time(self) -> None:
        """Fields that fail the checks are refused with h11's words, each time."""
        from tunneld.edge.http1 import fast

        memo = FastMemo()
        fields = ((b"X", b"a\r\nSet-Cookie: x"),)
        for _ in range(2):
            self.assertEqual(
                fast.fast_block(fields, b"1.1 a", memo), "Illegal header value b'a\\r\\nSet-Cookie: x'"
            )
        # A bad value in a field that is dropped anyway (hop-by-hop) does not matter.
        self.assertEqual(
            fast.fast_block(((b"Keep-Alive", b"a\rb"), (b"X", b"y")), b"1.1 a", memo),
            (b"X: y\r\nVia: 1.1 a\r\n", None),
        )

    def test_bounded(self) -> None:
        """Any number of distinct replies leaves at most the names table's limit."""
        from tunneld.edge.http1 import fast

        memo = FastMemo()
        for n in range(memo.names.limit + 20):
            fast.fast_block(((b"X-N%d" % n, b"%d" % n),), b"v", memo)
        self.assertLessEqual(len(memo.names), memo.names.limit)
        self.assertGreater(len(memo.names), 0)


class FastMatchesH11Tests(SynchronousTestCase):
    """For any reply, a fast exchange writes the same bytes, and ends the same way, as h11."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.link = FakeLink()
        self.factory = PublicHTTPFactory(
            EdgeGateway(FakeRouter({HOST: FakeRoute(HOST, self.link)})), PublicHTTPSettings(),
            self.clock,
        )

    def exchange(
        self, fast: bool, data: bytes, status: int, fields: list[tuple[bytes, bytes]],
        pieces: list[bytes], trailers: list[tuple[bytes, bytes]],
    ) -> tuple[bytes, bool, Any]:
        proto: PublicHTTPProtocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto._fast.ok = fast
        proto.dataReceived(data)
        stream = self.link.streams[-1]
        self.assertEqual(proto._fast.active, fast)
        stream.reply(status, fields, b"Custom Reason" if status == 299 else b"")
        for piece in pieces:
            stream.send(piece)
        stream.finish(trailers)
        proto.connectionLost()
        self.clock.advance(600)
        return transport.value(), transport.disconnecting, stream.reset_with

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.sampled_from([b"GET", b"HEAD"]),
        st.sampled_from([200, 299, 204, 304, 404, 999, 100, 1000]),
        st.lists(st.sampled_from(_REPLY_FIELDS), max_size=4),
        st.lists(st.binary(min_size=0, max_size=5), max_size=3),
        st.lists(st.sampled_from([(b"X-T", b"1"), (b"X-T", b"a\r\n")]), max_size=2),
    )
    def test_same_bytes(
        self, method: bytes, status: int, fields: list[tuple[bytes, bytes]],
        pieces: list[bytes], trailers: list[tuple[bytes, bytes]],
    ) -> None:
        """Status, framing (length, chunked, HEAD, 204/304), errors and trailers match h11's."""
        data = request(method.decode(), "/x", HOST)
        self.assertEqual(
            self.exchange(True, data, status, fields, pieces, trailers),
            self.exchange(False, data, status, fields, pieces, trailers),
        )

    def test_pipelined_mix(self) -> None:
        """Plain, bodied and plain requests pipelined in one read are served in turn, and in order."""
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(
            request("GET", "/1", HOST)
            + request("POST", "/2", HOST, "Content-Length: 5") + b"hello"
            + request("GET", "/3", HOST)
        )
        for index, body in [(0, b"one"), (1, b"two"), (2, b"three")]:
            self.assertEqual(len(self.link.streams), index + 1)
            stream = self.link.streams[index]
            stream.reply(200, [(b"Content-Length", b"%d" % len(body))])
            stream.send(body)
            stream.finish()
        self.assertEqual([s.head.target for s in self.link.streams], ["/1", "/2", "/3"])
        self.assertEqual(self.link.streams[1].body(), b"hello")
        self.assertEqual([r.body for r in parse_all(transport.value())], [b"one", b"two", b"three"])
        self.assertTrue(proto._fast.ok)  # back on the fast path once h11 holds nothing
        self.assertFalse(transport.disconnecting)
        proto.connectionLost()

    def test_pipelined_partial_body_is_read_on(self) -> None:
        """A bodied request waiting behind a fast one, its body incomplete, is read on once its turn comes."""
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(
            request("GET", "/1", HOST) + request("POST", "/2", HOST, "Content-Length: 10") + b"hello"
        )
        self.assertEqual(transport.producerState, "paused")  # the POST waits its turn
        first = self.link.streams[0]
        first.reply(204)
        first.finish()
        self.assertEqual(transport.producerState, "producing")  # its body may come now
        proto.dataReceived(b"world")
        second = self.link.streams[1]
        self.assertEqual((second.body(), second.ended), (b"helloworld", ()))
        proto.connectionLost()

    def test_refusal_then_next_request(self) -> None:
        """A refused plain request is answered and the next one in the same read is served."""
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(request("GET", "/", "nowhere.test") * 3 + request("GET", "/ok", HOST))
        [stream] = self.link.streams
        stream.reply(204)
        stream.finish()
        replies = parse_all(transport.value())
        self.assertEqual([r.status for r in replies], [404, 404, 404, 204])
        self.assertEqual(replies[0].headers[2], (b"tunnel-error", Reason.NO_TUNNEL.value.encode()))
        proto.connectionLost()
