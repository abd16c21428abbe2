"""The agent's HTTP/1.1 framing: responses parsed whole, byte by byte and in random chunks; requests written."""

from __future__ import annotations

import typing

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunneld.agent.http1_wire import (
    Header,
    HeadMemo,
    RequestError,
    RequestWriter,
    ResponseError,
    ResponseParser,
    ResponseSink,
)


class Recorder:
    """A L{ResponseSink} that records what it is given (body bytes joined)."""

    def __init__(self) -> None:
        self.head: tuple[int, bytes, list[Header]] | None = None
        self.body = b""
        self.end: tuple[list[Header], bool] | None = None

    def response_head(self, status: int, reason: bytes, headers: tuple[Header, ...]) -> None:
        assert self.head is None
        self.head = (status, reason, list(headers))

    def response_data(self, data: bytes | memoryview) -> None:
        assert self.head is not None and self.end is None
        self.body += data

    def response_end(self, data: bytes | memoryview, trailers: list[Header], reusable: bool) -> None:
        assert self.end is None
        self.body += data
        self.end = (trailers, reusable)

    def outcome(self) -> tuple[object, ...]:
        return (self.head, self.body, self.end)


_sink: type[ResponseSink] = Recorder  # Recorder is a ResponseSink


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return [p for p in pieces if p]


def parse(pieces: list[bytes], head_request: bool = False, eof: bool = False) -> tuple[object, ...]:
    """Feed C{pieces} to a fresh parser; the recorded outcome, or the error's message."""
    parser = ResponseParser(max_head=1024)
    recorder = Recorder()
    parser.expect(recorder, head_request)
    try:
        for piece in pieces:
            parser.feed(piece)
        if eof:
            parser.feed_eof()
    except ResponseError as e:
        return ("error", str(e))
    return recorder.outcome()


# (response bytes, HEAD request?, EOF at the end?, expected outcome)
GOOD = [
    (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
        False, False,
        ((200, b"OK", [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")]), b"hello",
         ([], True)),
    ),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5;name=value\r\nhello\r\n6\r\n world\r\nA \r\n0123456789\r\n0\r\nX-Sum: abc\r\nX-Two: 2\r\n\r\n",
        False, False,
        ((200, b"OK", [(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Sum")]),
         b"hello world0123456789", ([(b"X-Sum", b"abc"), (b"X-Two", b"2")], True)),
    ),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        False, False,
        ((200, b"OK", [(b"Transfer-Encoding", b"chunked")]), b"", ([], True)),
    ),
    (
        b"HTTP/1.1 200 OK\r\nServer: s\r\n\r\nuntil the connection closes",
        False, True,
        ((200, b"OK", [(b"Server", b"s")]), b"until the connection closes", ([], False)),
    ),
    (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        False, False,
        ((201, b"Created", [(b"Content-Length", b"2")]), b"ok", ([], True)),
    ),
    (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        True, False,
        ((200, b"OK", [(b"Content-Length", b"1000")]), b"", ([], True)),
    ),
    (
        b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
        False, False,
        ((204, b"No Content", [(b"Content-Length", b"7")]), b"", ([], True)),
    ),
    (
        b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        False, False,
        ((304, b"Not Modified", [(b"ETag", b'"x"')]), b"", ([], True)),
    ),
    (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
        False, False,
        ((200, b"OK", [(b"Connection", b"keep-alive, close"), (b"Content-Length", b"0")]), b"",
         ([], False)),
    ),
    (
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        False, False,
        ((200, b"OK", [(b"Content-Length", b"2")]), b"ok", ([], False)),
    ),
    (
        b"HTTP/1.1 200 OK\nX-Folded: one\n two\r\n\tthree\nContent-Length: 2, 2\n\nok",
        False, False,
        ((200, b"OK", [(b"X-Folded", b"one two three"), (b"Content-Length", b"2, 2")]), b"ok",
         ([], True)),
    ),
    (
        b"HTTP/1.1 404\r\nX-Empty:\r\nX-Spaces:  a  b \t\r\nContent-Length: 0\r\n\r\n",
        False, False,
        ((404, b"", [(b"X-Empty", b""), (b"X-Spaces", b"a  b"), (b"Content-Length", b"0")]), b"",
         ([], True)),
    ),
]

# (response bytes, HEAD request?, EOF at the end?, words the error names)
BAD = [
    (b"this is not http\r\n\r\n", False, False, "invalid status line"),
    (b"HTTP/2 200 OK\r\n\r\n", False, False, "invalid status line"),
    (b"HTTP/1.1 20 OK\r\n\r\n", False, False, "invalid status line"),
    (b"HTTP/1.1 099 Odd\r\n\r\n", False, False, "invalid status 99"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", False, False, "101"),
    (b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", False, False, "invalid line in response head"),
    (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", False, False, "invalid line in response head"),
    (b"HTTP/1.1 200 OK\r\n continued: x\r\n\r\n", False, False, "continuation"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", False, False, "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", False, False,
     "conflicting Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", False, False,
     "both Content-Length and Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", False, False,
     "unsupported Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, False,
     "invalid chunk header"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", False, False,
     "chunk data not followed by CRLF"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nBad Trailer\r\n\r\n", False,
     False, "invalid line in trailers"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 2000 + b"\r\n\r\n", False, False,
     "response head longer than 1024 bytes"),
    (b"", False, True, "connection closed before a response"),
    (b"HTTP/1.1 200 OK\r\nContent-", False, True, "in the middle of the response head"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123", False, True, "6 body bytes missing"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", False, True,
     "in the middle of a chunked body"),
]


class ResponseParserTests(SynchronousTestCase):
    """Every kind of response parses the same however its bytes are split."""

    def test_good_whole(self) -> None:
        """Each valid response, fed in one piece, gives its head, body, trailers and reusability."""
        for data, head_request, eof, expected in GOOD:
            self.assertEqual(parse([data], head_request, eof), expected, data)

    def test_good_byte_by_byte(self) -> None:
        """Each valid response, fed one byte at a time, gives the same outcome."""
        for data, head_request, eof, expected in GOOD:
            pieces = [data[i : i + 1] for i in range(len(data))]
            self.assertEqual(parse(pieces, head_request, eof), expected, data)

    def test_bad(self) -> None:
        """Each malformed response raises ResponseError naming what was wrong, whole or byte by byte."""
        for data, head_request, eof, words in BAD:
            for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
                outcome = parse(pieces, head_request, eof)
                self.assertEqual(outcome[0], "error", data)
                self.assertIn(words, outcome[1], data)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(GOOD + BAD), st.lists(st.integers(0, 10_000), max_size=12))
    def test_random_chunks(self, case: tuple[bytes, bool, bool, object], cuts: list[int]) -> None:
        """Any split of any response gives the same outcome as feeding it whole."""
        data, head_request, eof, _ = case
        self.assertEqual(
            parse(split(data, cuts), head_request, eof), parse([data], head_request, eof)
        )

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(min_size=0, max_size=300), max_size=8),
           st.lists(st.integers(0, 10_000), max_size=12))
    def test_chunked_bodies(self, chunks: list[bytes], cuts: list[int]) -> None:
        """Any chunked body, split anywhere, de-frames to its bytes."""
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c)
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
        outcome = parse(split(data, cuts))
        self.assertEqual(outcome[1:], (b"".join(chunks), ([], True)))

    def test_keep_alive_sequence(self) -> None:
        """One parser reads response after response on a kept-alive connection."""
        parser = ResponseParser()
        for n in range(3):
            recorder = Recorder()
            parser.expect(recorder, False)
            parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % n)
            self.assertEqual(recorder.outcome()[1:], (b"%d" % n, ([], True)))

    def test_bytes_after_the_response(self) -> None:
        """Bytes that come with the end of a response make its connection unfit for reuse."""
        self.assertEqual(
            parse([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"]),
            ((200, b"OK", [(b"Content-Length", b"2")]), b"ok", ([], False)),
        )

    def test_bytes_while_idle(self) -> None:
        """Bytes when no response is expected are an error."""
        parser = ResponseParser()
        self.assertRaises(ResponseError, parser.feed, b"HTTP/1.1 200 OK\r\n")

    def test_abandon(self) -> None:
        """A sink that abandons the parser mid-response hears nothing more."""
        parser = ResponseParser()

        class Quitter(Recorder):
            def response_head(self, status: int, reason: bytes, headers: tuple[Header, ...]) -> None:
                super().response_head(status, reason, headers)
                parser.abandon()

        recorder = Quitter()
        parser.expect(recorder, False)
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(recorder.outcome(), ((200, b"OK", [(b"Content-Length", b"2")]), b"", None))


# Larger than the size from which the bytes after a head are passed on as a view.
BIG = bytes(range(256)) * 300


class HeadTailTests(SynchronousTestCase):
    """A large Content-Length body that shares a read with its head goes on as a view of that read."""

    def feed_all(
        self, reads: list[bytes], head_request: bool = False
    ) -> tuple[Recorder, list[bytes | memoryview]]:
        """Feed C{reads} to a fresh parser: the recorder, and each body piece as it was given."""
        given: list[bytes | memoryview] = []

        class Keeper(Recorder):
            def response_data(self, data: bytes | memoryview) -> None:
                given.append(data)
                super().response_data(data)

            def response_end(
                self, data: bytes | memoryview, trailers: list[Header], reusable: bool
            ) -> None:
                if data:
                    given.append(data)
                super().response_end(data, trailers, reusable)

        parser = ResponseParser()
        recorder = Keeper()
        parser.expect(recorder, head_request)
        for read in reads:
            parser.feed(read)
        return recorder, given

    def test_whole_body_in_the_head_read(self) -> None:
        """A whole body after its head reaches the sink as a view of the read, uncopied."""
        read = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG
        recorder, given = self.feed_all([read])
        self.assertEqual(recorder.outcome()[1:], (BIG, ([], True)))
        self.assertEqual([type(g) for g in given], [memoryview])
        self.assertIs(typing.cast(memoryview, given[0]).obj, read)

    def test_small_tail_is_bytes(self) -> None:
        """A small body after its head is still passed on as bytes."""
        _, given = self.feed_all([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"])
        self.assertEqual(given, [b"hello"])
        self.assertIs(type(given[0]), bytes)

    def test_body_split_over_reads(self) -> None:
        """The body's start in the head's read, then the rest over further reads, arrive whole and in order."""
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (3 * len(BIG))
        for cut in (len(BIG), len(BIG) + 1, 2 * len(BIG) - 1):
            body = BIG * 3
            recorder, given = self.feed_all([head + body[:cut], body[cut : cut + 7], body[cut + 7 :]])
            self.assertEqual(recorder.outcome()[1:], (body, ([], True)))
            self.assertIs(type(given[0]), memoryview)

    def test_bytes_after_a_large_body(self) -> None:
        """Bytes after a large body in the same read make the connection unfit for reuse."""
        recorder, _ = self.feed_all(
            [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG + b"EXTRA"]
        )
        self.assertEqual(recorder.outcome()[1:], (BIG, ([], False)))

    def test_other_framings_with_a_large_tail(self) -> None:
        """Chunked, close-delimited, interim and bodiless responses parse a large tail as before."""
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BIG), BIG)
        cases = [
            ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked], False,
             (BIG, ([], True))),
            ([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
              % len(BIG) + BIG], False, (BIG, ([], True))),
            ([b"HTTP/1.1 204 No Content\r\n\r\n" + BIG], False, (b"", ([], False))),
            ([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n" + BIG], True, (b"", ([], False))),
        ]
        for reads, head_request, expected in cases:
            recorder, _ = self.feed_all(reads, head_request)
            self.assertEqual(recorder.outcome()[1:], expected, reads[0][:40])
        parser = ResponseParser()
        recorder = Recorder()
        parser.expect(recorder, False)
        parser.feed(b"HTTP/1.1 200 OK\r\n\r\n" + BIG)
        parser.feed_eof()
        self.assertEqual(recorder.outcome()[1:], (BIG, ([], False)))


class RequestWriterTests(SynchronousTestCase):
    """Requests are written as valid HTTP/1.1 with the body framing their headers choose."""

    def test_length_body(self) -> None:
        """A Content-Length body is written as is and must add up."""
        writer = RequestWriter()
        head = writer.head(b"POST", b"/x?y", [(b"Host", b"a.test"), (b"Content-Length", b"5")])
        self.assertEqual(head, b"POST /x?y HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(writer.data(b"hel"), [b"hel"])
        self.assertRaises(RequestError, writer.end)
        self.assertRaises(RequestError, writer.data, b"long")
        self.assertEqual(writer.data(b"lo"), [b"lo"])
        self.assertEqual(writer.end(), b"")
        self.assertTrue(writer.keep_alive)

    def test_chunked_body(self) -> None:
        """A chunked body is framed, and its trailers follow the last chunk."""
        writer = RequestWriter()
        writer.head(b"PUT", b"/", [(b"Transfer-Encoding", b"chunked")])
        self.assertEqual(b"".join(writer.data(b"x" * 26)), b"1a\r\n" + b"x" * 26 + b"\r\n")
        self.assertEqual(writer.end([(b"X-Sum", b"1")]), b"0\r\nX-Sum: 1\r\n\r\n")

    def test_no_body(self) -> None:
        """A request without framing headers has no body."""
        writer = RequestWriter()
        self.assertEqual(writer.head(b"GET", b"/", []), b"GET / HTTP/1.1\r\n\r\n")
        self.assertRaises(RequestError, writer.data, b"x")
        self.assertEqual(writer.end(), b"")

    def test_connection_close(self) -> None:
        """A request saying Connection: close leaves the connection unfit for reuse."""
        writer = RequestWriter()
        writer.head(b"GET", b"/", [(b"Connection", b"Keep-Alive, Close")])
        self.assertFalse(writer.keep_alive)

    def test_invalid(self) -> None:
        """Methods, targets, names, values and framing headers that are not HTTP/1.1 are refused."""
        for method, target, headers in [
            (b"GE T", b"/", []),
            (b"GET", b"/a b", []),
            (b"GET", b"", []),
            (b"GET", b"/", [(b"Bad Name", b"x")]),
            (b"GET", b"/", [(b"X", b"a\r\nInjected: 1")]),
            (b"GET", b"/", [(b"Content-Length", b"x")]),
            (b"GET", b"/", [(b"Content-Length", b"1"), (b"Content-Length", b"2")]),
            (b"GET", b"/", [(b"Transfer-Encoding", b"gzip")]),
            (b"GET", b"/", [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"1")]),
        ]:
            self.assertRaises(RequestError, RequestWriter().head, method, target, headers)


class RequestFieldCacheTests(SynchronousTestCase):
    """Request header fields are validated once each, in a bounded table."""

    def test_known_name_new_value_is_checked(self) -> None:
        """A field whose name was seen valid is still refused for a bad value, every time."""
        RequestWriter().head(b"GET", b"/", [(b"X-Cached", b"ok")])
        for _ in range(2):
            self.assertRaises(
                RequestError, RequestWriter().head, b"GET", b"/", [(b"X-Cached", b"a\r\nInjected: 1")]
            )

    def test_repeated_fields_write_the_same(self) -> None:
        """A request met again (its fields from the table) is written and framed the same."""
        fields = [(b"Host", b"a.test"), (b"Content-Length", b"2"), (b"Connection", b"close")]
        heads = []
        memo = HeadMemo()
        for _ in range(2):
            writer = RequestWriter(memo)
            heads.append(writer.head(b"POST", b"/", fields))
            self.assertFalse(writer.keep_alive)
            self.assertRaises(RequestError, writer.data, b"abc")
        self.assertEqual(heads[0], heads[1])
        self.assertEqual(memo.fields[(b"Host", b"a.test")], (b"host", b"Host: a.test\r\n"))
        self.assertEqual(
            heads[0], b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        )

    def test_views_and_long_values(self) -> None:
        """Fields of memoryviews or bytearrays, and long values, are written but not kept."""
        long_value = b"v" * 1000
        fields = [(b"X-View", memoryview(b"seen")), (b"X-Array", bytearray(b"mutable")), (b"X-Long", long_value)]
        memo = HeadMemo()
        head = RequestWriter(memo).head(b"GET", b"/", fields)  # type: ignore[arg-type]
        self.assertIn(b"X-View: seen\r\nX-Array: mutable\r\nX-Long: " + long_value, head)
        self.assertEqual(len(memo.fields), 0)

    def test_table_is_bounded(self) -> None:
        """Any number of distinct fields leaves at most _FIELDS_MAX entries."""
        from tunneld.agent import http1_wire

        memo = HeadMemo()
        for n in range(http1_wire._FIELDS_MAX + 50):
            RequestWriter(memo).head(b"GET", b"/", [(b"X-N", b"%d" % n)])
        self.assertLessEqual(len(memo.fields), http1_wire._FIELDS_MAX)
        self.assertGreater(len(memo.fields), 0)


class FramingFieldTests(SynchronousTestCase):
    """The framing fields are found in any case, folded or not, and nothing else is taken for one."""

    def test_any_case(self) -> None:
        """Content-Length, Transfer-Encoding and Connection are read whatever their case."""
        self.assertEqual(
            parse([b"HTTP/1.1 200 OK\r\ncOnTeNt-LeNgTh: 3\r\nX: y\r\n\r\nabc"])[1], b"abc"
        )
        chunked = parse([b"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"])
        self.assertEqual(chunked[1], b"abc")
        for block in (b"CONNECTION: Close", b"Connection: keep-alive, close"):
            outcome = parse([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n%s\r\n\r\n" % block])
            self.assertEqual(outcome[2], ([], False))  # not reusable

    def test_lookalikes(self) -> None:
        """A field whose name or value only contains a framing name frames nothing."""
        response = (
            b"HTTP/1.1 200 OK\r\nX-Content-Length: 9\r\nX: content-length: 9\r\n"
            b"X-Connection: close\r\nContent-Length: 1\r\n\r\na"
        )
        outcome = parse([response])
        self.assertEqual(outcome[1], b"a")
        self.assertEqual(outcome[2], ([], True))

    def test_folded_and_refused_heads(self) -> None:
        """Folded framing fields are read; conflicting ones refused, each time."""
        folded = parse([b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length:\r\n 2\r\n\r\nab"])
        self.assertEqual(folded[1], b"ab")
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"
        for _ in range(2):
            self.assertEqual(parse([response]), ("error", "conflicting Content-Length values"))
