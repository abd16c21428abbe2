# -*- test-case-name: tests.test_http1_wire -*-
"""
HTTP/1.1 framing for the agent's upstream connections: requests written,
responses parsed.

The upstream is the operator's own service, so this is a strict and lean
client side of RFC 9112, not a general-purpose HTTP library: requests are
written with validated heads and Content-Length or chunked bodies
(L{RequestWriter}); responses are parsed incrementally (L{ResponseParser}):
status line, header fields (obsolete line folding is unfolded), interim 1xx
responses skipped, no body after HEAD, 204 or 304, bodies delimited by
Content-Length, chunked coding (extensions ignored, trailers kept) or the
connection closing, and keep-alive unless C{Connection: close}, HTTP/1.0 or a
close-delimited body says otherwise.  Anything else raises L{ResponseError}
naming what was wrong; the caller resets the stream with C{upstream_error}.
"""

from __future__ import annotations

import re
import typing

from tunneld.speedups.memo import Bounded

__all__ = ["HeadMemo", "RequestError", "RequestWriter", "ResponseError", "ResponseParser", "ResponseSink"]

Header = tuple[bytes, bytes]
# Body bytes as the parser passes them on: C{bytes}, or a view of the read
# they came in (never changed, and not kept by the parser after the call).
Body = bytes | memoryview

# RFC 9110 section 5.6.2 (token) and 5.5 (field-value, without obs-fold).
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
_FIELD = rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r?\n"
# A block of header lines, each ending in CRLF (or a bare LF, RFC 9112 section 2.2).
_FIELD_BLOCK = re.compile(rb"(?:" + _FIELD + rb")*")
_FIELD_LINE = re.compile(_FIELD)
_ONE_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*")
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?\r?\n")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
_LENGTH = re.compile(rb"[0-9]{1,18}")
_METHOD = re.compile(_TOKEN)
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_NAME = re.compile(_TOKEN)
_FIELD_VALUE = re.compile(_VALUE)

_NO_BODY_STATUS = (204, 304)

# From this many bytes, the start of a Content-Length body that shares a
# read with the response head is passed on as a view of that read (usually
# most of it), instead of being copied out of it first.
_TAIL_VIEW_FROM = 32 * 1024

# Parser states.
_IDLE, _HEAD, _LENGTH_BODY, _CHUNK_HEAD, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


class ResponseError(Exception):
    """The upstream's response broke HTTP/1.1; the message says how."""


class RequestError(ValueError):
    """A request cannot be written as HTTP/1.1; the message says why."""


class ResponseSink(typing.Protocol):
    """Where L{ResponseParser} delivers a response."""

    def response_head(self, status: int, reason: bytes, headers: tuple[Header, ...]) -> None:
        """
        The final (non-1xx) response head; header names keep their case.
        """

    def response_data(self, data: Body) -> None:
        """Some body bytes, de-framed."""

    def response_end(self, data: Body, trailers: list[Header], reusable: bool) -> None:
        """
        The response is complete: C{data} is its last body bytes, if they
        came with the end; C{reusable} says whether the connection may carry
        another request (keep-alive, nothing more was sent).
        """


def _fields(block: bytes, what: str) -> list[Header]:
    """The header fields in C{block} (lines ending in CRLF or LF), validated."""
    if _FIELD_BLOCK.fullmatch(block) is not None:
        return _FIELD_LINE.findall(block)
    # Rare: obsolete line folding, or something invalid to name.
    fields: list[Header] = []
    for line in block.split(b"\n")[:-1]:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise ResponseError(f"{what} begin with a continuation line")
            folded = line.strip(b" \t")
            if _FIELD_VALUE.fullmatch(folded) is None:
                raise ResponseError(f"invalid {what} continuation line {line[:80]!r}")
            name, value = fields[-1]
            fields[-1] = (name, value + b" " + folded if value else folded)
            continue
        match = _ONE_FIELD.fullmatch(line)
        if match is None:
            raise ResponseError(f"invalid line in {what}: {line[:80]!r}")
        fields.append((match.group(1), match.group(2)))
    return fields


_HeadFacts = tuple[tuple[Header, ...], int | None, bool, bool]
_FIELDS_MAX = 1024
_FIELD_CACHED_UP_TO = 256


class HeadMemo:
    """
    What the writers of one upstream's connections remember: C{fields},
    request header fields already checked, with their lowercased name and
    the line they make.  The edge sends the same fields again and again
    (Host, the forwarding headers, each client's Accept and User-Agent), so
    most are validated once (short ones only).  Bounded: emptied when full.

    Response heads are not remembered: on real traffic each has its own
    (its C{Set-Cookie}, its request id), so each is read in full
    (L{_head_facts}).
    """

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: Bounded[Header, tuple[bytes, bytes]] = Bounded(_FIELDS_MAX)


def _head_facts(block: bytes) -> _HeadFacts:
    """
    The fields of a response head's header block, validated, with its body
    length, whether it is chunked, and whether it says C{Connection: close}.
    """
    headers = _fields(block, "response head")
    length = None
    chunked = close = False
    framing = _FRAMING
    for name, value in headers:
        lower = name.lower()
        if lower not in framing:
            continue
        if lower == b"content-length":
            for item in value.split(b","):
                item = item.strip(b" \t")
                if _LENGTH.fullmatch(item) is None:
                    raise ResponseError(f"invalid Content-Length {value[:40]!r}")
                if length is not None and int(item) != length:
                    raise ResponseError("conflicting Content-Length values")
                length = int(item)
        elif lower == b"transfer-encoding":
            if chunked or value.strip(b" \t").lower() != b"chunked":
                raise ResponseError(f"unsupported Transfer-Encoding {value[:40]!r}")
            chunked = True
        else:
            for token in value.split(b","):
                if token.strip(b" \t").lower() == b"close":
                    close = True
    if chunked and length is not None:
        raise ResponseError("both Content-Length and Transfer-Encoding")
    return tuple(headers), length, chunked, close


class ResponseParser:
    """
    Parses the responses on one connection to the upstream, one per
    L{expect}, delivering each to its L{ResponseSink}.

    @param max_head: the longest response head (or trailer block) accepted.
    """

    __slots__ = (
        "_sink", "_max_head", "_state", "_buffer", "_scanned", "_remaining", "_head_request",
        "_keep_alive",
    )

    def __init__(self, max_head: int = 64 * 1024) -> None:
        # Never called while idle; L{expect} names the sink of each response.
        self._sink = typing.cast(ResponseSink, None)
        self._max_head = max_head
        self._state = _IDLE
        self._buffer = b""
        self._scanned = 0
        self._remaining = 0
        self._head_request = False
        self._keep_alive = False

    def expect(self, sink: ResponseSink, head_request: bool) -> None:
        """A request went out: parse its response (for a HEAD request, without a body)."""
        self._sink = sink
        self._state = _HEAD
        self._buffer = b""
        self._scanned = 0
        self._head_request = head_request

    def feed(self, data: bytes) -> None:
        """Parse C{data}; raises L{ResponseError} if the response is malformed."""
        state = self._state
        if state == _LENGTH_BODY and not self._buffer:
            # The usual case for a body: hand the bytes on as they came.
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._sink.response_data(data)
                return
            if len(data) == remaining:
                self._finish([], data)
                return
        if state == _UNTIL_CLOSE:
            if data:
                self._sink.response_data(data)
            return
        if state == _IDLE:
            raise ResponseError(f"{len(data)} bytes after the response")
        self._buffer += data
        self._parse()

    def feed_eof(self) -> None:
        """
        The connection closed: a close-delimited body ends here; anything
        else still expected raises L{ResponseError} saying what was cut short.
        """
        state = self._state
        if state == _UNTIL_CLOSE:
            self._state = _IDLE
            self._sink.response_end(b"", [], False)
        elif state == _HEAD:
            if self._buffer:
                raise ResponseError("connection closed in the middle of the response head")
            raise ResponseError("connection closed before a response")
        elif state == _LENGTH_BODY:
            raise ResponseError(f"connection closed with {self._remaining} body bytes missing")
        elif state != _IDLE:
            raise ResponseError("connection closed in the middle of a chunked body")

    def _counted(self, buffer: bytes) -> bytes | None:
        """
        The rest of a counted piece (a Content-Length body, a chunk) when
        C{buffer} holds all of it, else None after passing on what it holds.
        """
        remaining = self._remaining
        if len(buffer) < remaining:
            self._remaining = remaining - len(buffer)
            self._buffer = b""
            if buffer:
                self._sink.response_data(buffer)
            return None
        self._buffer = buffer[remaining:]
        return buffer[:remaining]

    def _parse(self) -> None:
        while True:
            state = self._state
            buffer = self._buffer
            if state == _HEAD:
                if not self._head():
                    return
            elif state == _LENGTH_BODY:
                last = self._counted(buffer)
                if last is not None:
                    self._finish([], last)
                return
            elif state == _CHUNK_HEAD:
                match = _CHUNK_SIZE.match(buffer)
                if match is None:
                    if b"\n" in buffer[:256] or len(buffer) > 256:
                        raise ResponseError(f"invalid chunk header {buffer[:80]!r}")
                    return
                size = int(match.group(1), 16)
                self._buffer = buffer[match.end() :]
                if size:
                    self._remaining = size
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
                    self._scanned = 0
            elif state == _CHUNK_DATA:
                piece = self._counted(buffer)
                if piece is None:
                    return
                self._state = _CHUNK_END
                self._sink.response_data(piece)
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    if buffer and buffer != b"\r":
                        raise ResponseError("chunk data not followed by CRLF")
                    return
                if buffer[:2] != b"\r\n":
                    raise ResponseError("chunk data not followed by CRLF")
                self._buffer = buffer[2:]
                self._state = _CHUNK_HEAD
            elif state == _TRAILERS:
                if buffer[:2] == b"\r\n" or buffer[:1] == b"\n":
                    self._buffer = buffer[2:] if buffer[:1] == b"\r" else buffer[1:]
                    self._finish([])
                    return
                block, end = self._blank_line("trailers")
                if end < 0:
                    return
                trailers = _fields(buffer[:block], "trailers")
                self._buffer = buffer[end:]
                self._finish(trailers)
                return
            else:
                return

    def _blank_line(self, what: str) -> tuple[int, int]:
        """
        Where the lines of a head or trailers in the buffer end, and where the
        blank line after them ends; C{(-1, -1)} if it has not arrived yet.
        """
        buffer = self._buffer
        match = _BLANK_LINE.search(buffer, max(0, self._scanned - 2))
        if match is None:
            if len(buffer) > self._max_head:
                raise ResponseError(f"{what} longer than {self._max_head} bytes")
            self._scanned = len(buffer)
            return -1, -1
        end = match.end()
        if end > self._max_head:
            raise ResponseError(f"{what} longer than {self._max_head} bytes")
        return match.start() + 1, end

    def _head(self) -> bool:
        """Parse one response head if it is all here; False if more is needed."""
        block, end = self._blank_line("response head")
        if end < 0:
            return False
        buffer = self._buffer
        # What follows the head: copied out of the read, unless it is large
        # and turns out to start a Content-Length body (_body_tail).
        tail = None
        if len(buffer) - end < _TAIL_VIEW_FROM:
            self._buffer = buffer[end:]
        else:
            self._buffer = b""
            tail = memoryview(buffer)[end:]
        self._scanned = 0
        status_line = _STATUS_LINE.match(buffer)
        if status_line is None:
            line = buffer.split(b"\n", 1)[0]
            raise ResponseError(f"invalid status line {line[:80]!r}")
        status = int(status_line.group(2))
        reason = status_line.group(3) or b""
        fields = buffer[status_line.end() : block]
        if status < 200:
            if tail is not None:
                self._buffer = bytes(tail)
            _fields(fields, "response head")
            if status == 101:
                raise ResponseError("101 Switching Protocols to a request that did not ask to switch")
            if status < 100:
                raise ResponseError(f"invalid status {status}")
            return True  # 100 Continue, 103 Early Hints...: interim, not passed on
        headers, length, chunked, close = _head_facts(fields)
        self._keep_alive = status_line.group(1) == b"1" and not close
        if tail is not None and (
            chunked or not length or self._head_request or status in _NO_BODY_STATUS
        ):
            self._buffer, tail = bytes(tail), None
        self._sink.response_head(status, reason, headers)
        if self._state != _HEAD:
            return False  # the sink gave up on this response
        if self._head_request or status in _NO_BODY_STATUS or length == 0:
            self._finish([])
        elif chunked:
            self._state = _CHUNK_HEAD
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH_BODY
            if tail is not None:
                self._body_tail(tail)
        else:
            self._state = _UNTIL_CLOSE
            self._keep_alive = False
            if self._buffer:
                data, self._buffer = self._buffer, b""
                self._sink.response_data(data)
        return True

    def _body_tail(self, tail: memoryview) -> None:
        """The first bytes of a Content-Length body, in the head's read, passed on as they are."""
        remaining = self._remaining
        if len(tail) < remaining:
            self._remaining = remaining - len(tail)
            self._sink.response_data(tail)
            return
        # Bytes after the body, if any, stay (as bytes) to say the connection is not reusable.
        self._buffer = bytes(tail[remaining:])
        self._finish([], tail[:remaining])

    def _finish(self, trailers: list[Header], data: Body = b"") -> None:
        self._state = _IDLE
        reusable = self._keep_alive and not self._buffer
        self._buffer = b""
        self._sink.response_end(data, trailers, reusable)

    def abandon(self) -> None:
        """Stop parsing: the connection will not be used again."""
        self._state = _IDLE
        self._buffer = b""


# The names whose values decide the request's framing or keep-alive.
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
_COMMON_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"))


def _request_field(field: Header, fields: Bounded[Header, tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """C{field}'s lowercased name and its line, once it is known to be valid."""
    name, value = field
    if _NAME.fullmatch(name) is None:
        raise RequestError(f"invalid header name {name[:40]!r}")
    if _FIELD_VALUE.fullmatch(value) is None:
        raise RequestError(f"invalid value for header {name[:40]!r}")
    checked = (name.lower(), b"".join((name, b": ", value, b"\r\n")))
    if type(name) is bytes and type(value) is bytes and len(name) + len(value) <= _FIELD_CACHED_UP_TO:
        fields.keep(field, checked)
    return checked


class RequestWriter:
    """
    Writes one request at a time as HTTP/1.1 bytes, keeping count of the
    body so that it matches the framing chosen in L{head}.
    """

    __slots__ = ("_chunked", "_remaining", "_fields", "keep_alive")

    def __init__(self, memo: HeadMemo | None = None) -> None:
        """@param memo: what the upstream's connections remember (their pool's); without it, this writer's own."""
        self._fields = (memo or HeadMemo()).fields
        self._chunked = False
        self._remaining: int | None = None
        # False once a request said C{Connection: close}.
        self.keep_alive = True

    def head(self, method: bytes, target: bytes, headers: list[Header]) -> bytes:
        """
        The request line and header block.  A C{Transfer-Encoding: chunked}
        header makes the body chunked; a C{Content-Length} bounds it.
        Raises L{RequestError} for anything that is not valid HTTP/1.1.
        """
        if method not in _COMMON_METHODS and _METHOD.fullmatch(method) is None:
            raise RequestError(f"invalid method {method[:40]!r}")
        if _TARGET.fullmatch(target) is None:
            raise RequestError(f"invalid request target {target[:80]!r}")
        self._chunked = False
        self._remaining = None
        lines = [method, b" ", target, b" HTTP/1.1\r\n"]
        fields = self._fields
        for field in headers:
            try:
                known = fields.get(field)
            except (TypeError, ValueError):  # a field of unhashable buffers
                known = None
            lower, line = known or _request_field(field, fields)
            lines.append(line)
            if lower not in _FRAMING:
                continue
            value = field[1]
            if lower == b"content-length":
                if _LENGTH.fullmatch(value) is None:
                    raise RequestError(f"invalid Content-Length {value[:40]!r}")
                if self._remaining is not None and self._remaining != int(value):
                    raise RequestError("conflicting Content-Length values")
                self._remaining = int(value)
            elif lower == b"transfer-encoding":
                if value.lower() != b"chunked" or self._chunked:
                    raise RequestError(f"unsupported Transfer-Encoding {value[:40]!r}")
                self._chunked = True
            elif b"close" in value.lower():  # Connection
                if any(t.strip(b" \t") == b"close" for t in value.lower().split(b",")):
                    self.keep_alive = False
        if self._chunked and self._remaining is not None:
            raise RequestError("both Content-Length and Transfer-Encoding")
        lines.append(b"\r\n")
        return b"".join(lines)

    def data(self, data: bytes) -> list[bytes]:
        """The pieces that send C{data} as (part of) the body."""
        if self._chunked:
            return [b"%x\r\n" % len(data), data, b"\r\n"]
        remaining = self._remaining
        if remaining is None or len(data) > remaining:
            raise RequestError("more request body than its Content-Length")
        self._remaining = remaining - len(data)
        return [data]

    def end(self, trailers: typing.Sequence[Header] = ()) -> bytes:
        """The bytes that end the body (with trailers, if it is chunked)."""
        if self._chunked:
            lines = [b"0\r\n"]
            for name, value in trailers:
                if _NAME.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
                    raise RequestError(f"invalid trailer {name[:40]!r}")
                lines += (name, b": ", value, b"\r\n")
            lines.append(b"\r\n")
            return b"".join(lines)
        if self._remaining:
            raise RequestError(f"request body {self._remaining} bytes short of its Content-Length")
        return b""
