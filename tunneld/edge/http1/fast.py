# -*- test-case-name: tests.test_fasthead,tests.test_http1 -*-
"""
The common HTTP/1.1 exchange without C{h11}: a plain request in, its reply
out, on one connection, as C{h11} would have read and written them.

While C{h11} holds nothing of a connection (no partial head, no body, no
switch), L{FastPath.read} tries L{tunneld.edge.http1.fasthead.read_head} on
what arrives: a plain head (no body, no upgrade, no C{Expect}) is handed to
the connection as h11 would have parsed it, and its reply is written here
(L{reply}, L{body}, L{end}, L{answer}) byte for byte as h11 writes it.  Any
other bytes go to h11, and the connection stays there until h11 is idle
again.  Bytes a pipelining client sends meanwhile wait, unread, until the
exchange is over (L{pending}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from tunneld.edge.forwarding import phrase, reply_headers
from tunneld.edge.http1.exchange import PIPELINE, Connection, Exchange
from tunneld.edge.http1.fasthead import (
    FastMemo,
    check_fields,
    field_block,
    plain_block,
    read_head,
    response_head,
    response_head_with,
)
from tunneld.model.messages import Headers, ReplyHead
from tunneld.observe.stats import EdgeStats

if TYPE_CHECKING:
    from tunneld.edge.http1.deadlines import Deadline
    from tunneld.speedups.bulkwrite import EndOfTurn

__all__ = ["FastConnection", "FastPath"]

# How far the answer of a fast exchange has gone.
OUT_IDLE = 0  # nothing sent yet
OUT_BODY = 1  # head sent, body going
OUT_DONE = 2  # all sent; the connection stays open
OUT_CLOSE = 3  # all sent; the connection closes


class _Socket(TypingProtocol):
    def write(self, data: bytes) -> None: ...


class FastConnection(Connection, TypingProtocol):
    """What the fast path asks of its connection besides an exchange's needs."""

    @property
    def closing(self) -> bool: ...

    def request_head(self, method: bytes, target: bytes, headers: Headers) -> None:
        """A request head, read."""

    def request_end(self, trailers: Headers) -> None:
        """The end of that request (a plain head has no body)."""

    def to_h11(self, data: bytes) -> None:
        """Read C{data} with h11 from now on (until it is idle again)."""

    def await_head(self) -> None:
        """The exchange is over and the next request's bytes are here: give them the head deadline."""

    def await_request(self) -> None:
        """The exchange is over, nothing waits: the connection is idle (kept alive)."""

    def cycle_over(self) -> None:
        """The exchange is over; the reader goes on with what follows."""

    def close_after_response(self) -> None:
        """The answer is out and the connection closes."""

    def abort(self) -> None:
        """Drop the connection at once."""

    def bad_reply(self, exchange: Exchange, error: str) -> None:
        """The upstream's reply head cannot be sent on: answer 502 instead."""

    def reply_broke(self, exchange: Exchange, error: str) -> None:
        """The reply does not fit its own framing (too much or too little body)."""


def fast_block(fields: Headers, via: bytes, memo: FastMemo) -> tuple[bytes, int | None] | str:
    """
    A reply's header block (end-to-end fields and Via, checked and rendered
    as h11 would) and declared length for the fast path, or what is wrong.

    Every reply's head differs (its C{Set-Cookie}, its request id), so this is
    done for each one, in one pass (L{plain_block}); only field names are
    remembered (C{memo.names}).  Anything unusual (a field that fails the
    checks, a C{Connection} naming end-to-end fields, an odd or repeated
    C{Content-Length}) takes the long way, which says what is wrong in h11's words.
    """
    plain = plain_block(fields, via, memo.names)
    if plain is not None:
        return plain
    headers, _ = reply_headers(fields, via)
    checked = check_fields(headers, memo.names)
    if isinstance(checked, str):
        return checked
    return field_block(checked[0]), checked[1]


class FastPath:
    """
    The fast path of one connection: whether it may be tried (C{ok}: h11
    holds nothing), whether the current exchange is a fast one
    (C{active}), how far its answer went (C{out}) and what the client sent
    meanwhile (C{pending}).  C{turn} and C{memo} are its listener's: the
    writes queued for the end of the reactor turn, and what the fast path
    remembers of replies' fields.
    """

    __slots__ = (
        "connection", "socket", "stats", "deadline", "seconds", "via", "turn", "memo",
        "ok", "active", "their_done", "out", "pending", "parsing",
    )

    def __init__(
        self, connection: FastConnection, socket: _Socket, stats: EdgeStats,
        deadline: Deadline, via: bytes, turn: EndOfTurn, memo: FastMemo,
    ) -> None:
        self.connection = connection
        self.socket = socket
        self.stats = stats
        self.deadline = deadline
        self.seconds = deadline.seconds
        self.via = via
        self.turn = turn
        self.memo = memo
        self.ok = True  # h11 holds nothing: plain heads may be read here
        self.active = False  # the exchange in flight is a fast one
        self.their_done = False  # ... and its request is whole
        self.out = OUT_IDLE
        self.pending = b""  # bytes pipelined behind the exchange in flight, unread
        self.parsing = False  # inside read(): it goes on with what follows

    # -- reading ---------------------------------------------------------------

    def read(self, data: bytes) -> None:
        """Serve the plain request heads C{data} starts with; hand the rest to h11."""
        connection = self.connection
        self.parsing = True
        try:
            while not connection.closing:
                parsed = read_head(data)
                if parsed is None:
                    break
                method, target, fields, end = parsed
                data = data[end:]
                self.active = True
                self.their_done = False
                self.out = OUT_IDLE
                connection.request_head(method, target, fields)
                if self.active and not connection.closing:
                    self.their_done = True  # a plain head carries no body
                    connection.request_end(())
                if connection.closing:
                    return
                if self.active:  # the exchange goes on; what follows waits
                    if data:
                        self.pending = data
                        connection.pause_reading(PIPELINE)
                    return
                if not data:
                    connection.await_request()
                    return
                connection.await_head()
        finally:
            self.parsing = False
        if connection.closing:
            return
        self.ok = False  # until h11 holds nothing again
        connection.to_h11(data)

    def next_cycle(self) -> None:
        """After an answer or a request end: start over with what waits, or close."""
        out = self.out
        if out == OUT_CLOSE:
            self.connection.close_after_response()
            return
        if out != OUT_DONE or not self.their_done:
            return
        self.active = False
        connection = self.connection
        if self.parsing:
            connection.cycle_over()  # read() goes on with what follows
            return
        pending, self.pending = self.pending, b""
        if pending:
            connection.await_head()
            # Read what waited before reading more, so nothing overtakes it.
            self.read(pending)
            if self.ok and not self.pending and not connection.closing:
                connection.resume_reading(PIPELINE)
        else:
            connection.await_request()

    # -- writing ---------------------------------------------------------------

    def reply(self, exchange: Exchange, reply: ReplyHead) -> None:
        """The reply head of a fast exchange, framed as h11 would frame it."""
        checked = fast_block(reply.headers, self.via, self.memo)
        if isinstance(checked, str):
            self.connection.bad_reply(exchange, checked)
            return
        status = reply.status
        if not 200 <= status < 1000:
            self.connection.bad_reply(
                exchange, f"Response status_code should be in range [200, 1000), not {status}"
            )
            return
        block, length = checked
        if status == 204 or status == 304:
            exchange.bodyless = True
            left: int | None = 0
        else:
            if length is None:
                block += b"Transfer-Encoding: chunked\r\n"
            left = 0 if exchange.bodyless else length
        head = response_head_with(status, reply.reason or phrase(status), block)
        if head is None:
            self.connection.bad_reply(exchange, f"illegal reason phrase {reply.reason!r}")
            return
        exchange.chunked = left is None
        exchange.response_started = True
        exchange.left = left
        self.out = OUT_BODY
        self.stats.response(status)
        self.turn.queue(self.socket, head)  # with the body's start, at the end of the turn
        self.deadline.last_activity = self.seconds()

    def body(self, exchange: Exchange, data: bytes | memoryview) -> None:
        """Body bytes of a fast exchange's reply: one h11 event, one write."""
        left = exchange.left
        socket = self.socket
        turn = self.turn
        if left is None:
            if data:  # (an empty chunk would end the body)
                turn.queue(socket, b"%x\r\n" % len(data))
                turn.queue(socket, data)
                turn.queue(socket, b"\r\n")
        else:
            left -= len(data)
            if left < 0:
                self.connection.reply_broke(exchange, "Too much data for declared Content-Length")
                return
            exchange.left = left
            turn.forward(socket, data)
        self.stats.bytes_out += len(data)
        self.deadline.last_activity = self.seconds()

    def end(self, exchange: Exchange, trailers: Headers) -> None:
        """The end of a fast exchange's reply (the trailers of a chunked one)."""
        left = exchange.left
        if left is None:
            block = b""
            if trailers:
                checked = check_fields(trailers, self.memo.names)
                # malformed trailers are dropped, the body is still whole
                if not isinstance(checked, str):
                    block = b"".join([b"%s: %s\r\n" % field for field in checked[0]])
            self.socket.write(b"0\r\n%s\r\n" % block)
        elif left:
            self.connection.reply_broke(exchange, "Too little data for declared Content-Length")
            return
        self.out = OUT_DONE
        exchange.response_done = True
        self.connection.finish(exchange)
        self.next_cycle()

    def answer(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, keep: bool
    ) -> None:
        """The edge's own short answer to a fast request (C{body} empty for HEAD)."""
        if self.out != OUT_IDLE:
            self.connection.abort()
            return
        checked = check_fields(headers, self.memo.names)
        head = None if isinstance(checked, str) else response_head(
            status, phrase(status), checked[0]
        )
        if head is None:
            self.connection.abort()
            return
        self.stats.response(status)
        self.out = OUT_DONE if keep else OUT_CLOSE
        self.socket.write(head + body if body else head)
        self.next_cycle()
