# -*- test-case-name: tests.test_fasthead -*-
"""
The common HTTP/1.1 exchange without C{h11}: a strict reader of plain request
heads and a writer of response heads, for L{tunneld.edge.http1}.

L{read_head} accepts only a complete head that C{h11} would parse the same
way and that needs none of its state machine: exactly C{HTTP/1.1}, CRLF line
ends, every line matching C{h11}'s own grammar (token method, visible-char
target, token field names, field values of visible chars and obs-text with
inner blanks, no obs-fold), exactly one C{Host}, no body (no
C{Content-Length}, no C{Transfer-Encoding}), no C{Expect}, no C{Upgrade}, no
C{Connection} token but C{keep-alive}, and not C{CONNECT}.  Anything else
is declined (C{None}), never refused: the caller hands those bytes to
C{h11}, which parses or rejects them as before.  So this reader can only
make the edge faster, never more lenient.

L{response_head} renders a status line and header block as C{h11} would
send it, checking every field with the same grammar (and, unlike C{h11},
the reason phrase too); L{content_length} reads a reply's length fields as
C{h11} does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["content_length", "read_head", "response_head", "trailer_block"]

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VCHAR = rb"[^\x00\s]"  # visible characters and obs-text, as h11 has it
_FIELD_VALUE = rb"(?:%s+(?:[ \t]+%s+)*)?" % (_FIELD_VCHAR, _FIELD_VCHAR)

# A request line and its field lines, each ending in CRLF (the blank line cut off).
_HEAD = re.compile(
    rb"%s [\x21-\x7e]+ HTTP/1\.1\r\n(?:%s:[ \t]*%s[ \t]*\r\n)*" % (_TOKEN, _TOKEN, _FIELD_VALUE)
)
# Field lines as this module writes them.
_BLOCK = re.compile(rb"(?:%s: %s\r\n)*" % (_TOKEN, _FIELD_VALUE))
_REASON = re.compile(rb"[ \t\x21-\x7e\x80-\xff]*")  # h11's reason-phrase
_DIGITS = re.compile(rb"[0-9]{1,20}")  # h11's CONTENT_LENGTH_MAX_DIGITS

# Request fields that take a head off the fast path whatever their value.
_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})

Head = tuple[bytes, bytes, list[tuple[bytes, bytes]], int]


def read_head(data: bytes) -> Head | None:
    """
    The method, target, fields (lower-cased names, values without their
    surrounding blanks) and length of the plain request head that C{data}
    starts with; None when there is none (incomplete, or anything unusual).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[: end + 2]
    if _HEAD.fullmatch(head) is None:
        return None
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    if method == b"CONNECT":
        return None
    fields: list[tuple[bytes, bytes]] = []
    hosts = 0
    for line in lines[1:-1]:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _NOT_PLAIN:
            return None
        value = value.strip(b" \t")
        if name == b"host":
            hosts += 1
        elif name == b"connection":
            for token in value.split(b","):
                token = token.strip(b" \t").lower()
                if token and token != b"keep-alive":
                    return None
        fields.append((name, value))
    if hosts != 1:
        return None
    return method, target, fields, end + 4


def response_head(status: int, reason: bytes, fields: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """
    A response's status line and header block, or None when a field name
    or value (or the reason phrase) does not fit HTTP's grammar.
    """
    block = b"".join([b"%s: %s\r\n" % field for field in fields])
    if _BLOCK.fullmatch(block) is None or _REASON.fullmatch(reason) is None:
        return None
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, block)


def trailer_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """Trailer fields as written after the last chunk, or None when one is malformed."""
    block = b"".join([b"%s: %s\r\n" % field for field in fields])
    if _BLOCK.fullmatch(block) is None:
        return None
    return block


def content_length(
    fields: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], int | None] | str:
    """
    A reply's fields with its C{Content-Length} fields read as C{h11} reads
    them (one value, repeated copies merged), and that length (None when
    there is none); or why they cannot be sent.
    """
    length: bytes | None = None
    out: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        if name.lower() != b"content-length":
            out.append((name, value))
            continue
        values = {v.strip() for v in value.split(b",")}
        if len(values) != 1:
            return "conflicting Content-Length headers"
        value = values.pop()
        if _DIGITS.fullmatch(value) is None:
            return "bad Content-Length"
        if length is None:
            length = value
            out.append((name, value))
        elif length != value:
            return "conflicting Content-Length headers"
    return out, (None if length is None else int(length))
