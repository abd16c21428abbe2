# -*- test-case-name: tests.test_fasthead -*-
"""
The common HTTP/1.1 exchange without C{h11}: a strict reader of plain request
heads and a writer of response heads, for L{tunneld.edge.http1.fast}.

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

L{check_fields} checks fields to send one by one as C{h11} does (same
grammar, same C{Content-Length} and C{Transfer-Encoding} rules, same
messages), and L{response_head} renders a status line and header block as
C{h11} writes them, checking the reason phrase too (which C{h11} does not).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tunneld.edge.forwarding import HOP_BY_HOP
from tunneld.speedups.memo import Bounded

__all__ = [
    "FastMemo", "check_fields", "field_block", "plain_block", "read_head", "response_head",
    "response_head_with",
]

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VCHAR = rb"[^\x00\s]"  # visible characters and obs-text, as h11 has it
_FIELD_VALUE = rb"(?:%s+(?:[ \t]+%s+)*)?" % (_FIELD_VCHAR, _FIELD_VCHAR)

# A request line and its field lines, each ending in CRLF (the blank line cut off).
_HEAD = re.compile(
    rb"%s [\x21-\x7e]+ HTTP/1\.1\r\n(?:%s:[ \t]*%s[ \t]*\r\n)*" % (_TOKEN, _TOKEN, _FIELD_VALUE)
)
_NAME = re.compile(_TOKEN)
_VALUE = re.compile(_FIELD_VALUE)
# Several values at once, one per line (a value with a line break in it
# shows up as one line too many).
_VALUES = re.compile(rb"%s(?:\n%s)*" % (_FIELD_VALUE, _FIELD_VALUE))
# Field names seen valid, with their lower-case form, kept at most (names repeat).
_NAMES_MAX = 1024
_REASON = re.compile(rb"[ \t\x21-\x7e\x80-\xff]*")  # h11's reason-phrase
_DIGITS = re.compile(rb"[0-9]{1,20}")  # h11's CONTENT_LENGTH_MAX_DIGITS

# Request fields that take a head off the fast path whatever their value.
_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})

Head = tuple[bytes, bytes, list[tuple[bytes, bytes]], int]


class FastMemo:
    """
    What the fast path remembers for the connections of one listener: the
    reply field names seen valid, with their lower-case form (L{check_fields},
    L{plain_block}).  Names recur from one reply to the next whatever the
    traffic; whole heads do not (each carries its own cookie and request id).
    Bounded.
    """

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names: Bounded[bytes, bytes] = Bounded(_NAMES_MAX)


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
    A response's status line and header block (fields checked already, by
    L{check_fields}), or None when the reason phrase does not fit HTTP's grammar.
    """
    return response_head_with(status, reason, field_block(fields))


def field_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Checked fields (L{check_fields}) as the lines of a header block."""
    return b"".join([b"%s: %s\r\n" % field for field in fields])


def response_head_with(status: int, reason: bytes, block: bytes) -> bytes | None:
    """L{response_head} for fields already rendered by L{field_block}."""
    if _REASON.fullmatch(reason) is None:
        return None
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, block)


def check_fields(
    fields: Iterable[tuple[bytes, bytes]], names: Bounded[bytes, bytes] | None = None,
) -> tuple[list[tuple[bytes, bytes]], int | None] | str:
    """
    Fields to send, checked one by one as C{h11} checks them (names are
    tokens; values visible characters with inner blanks; C{Content-Length}
    one number, repeated copies merged; C{Transfer-Encoding} only a single
    C{chunked}), and the declared length (None when there is none); or the
    first problem, in C{h11}'s words.  C{names}: the field names already
    seen valid, with their lower-case form (a listener's L{FastMemo}),
    which it adds to.
    """
    if names is None:
        names = Bounded(_NAMES_MAX)
    fields = list(fields)
    values = b"\n".join([value for _, value in fields])
    checked = _VALUES.fullmatch(values) is not None and values.count(b"\n") == len(fields) - 1
    length: bytes | None = None
    coding = False
    out: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        lower = names.get(name)
        if lower is None or not checked:
            if _NAME.fullmatch(name) is None:
                return f"Illegal header name {name!r}"
            if _VALUE.fullmatch(value) is None:
                return f"Illegal header value {value!r}"
            lower = names.keep(name, name.lower())
        if lower == b"content-length":
            lengths = {v.strip() for v in value.split(b",")}
            if len(lengths) != 1:
                return "conflicting Content-Length headers"
            value = lengths.pop()
            if _DIGITS.fullmatch(value) is None:
                return "bad Content-Length"
            if length is None:
                length = value
            elif length != value:
                return "conflicting Content-Length headers"
            else:
                continue
        elif lower == b"transfer-encoding":
            if coding:
                return "multiple Transfer-Encoding headers"
            value = value.lower()
            if value != b"chunked":
                return "Only Transfer-Encoding: chunked is supported"
            coding = True
        out.append((name, value))
    return out, (None if length is None else int(length))


# Reply fields a plain reply's block leaves out (hop-by-hop) or makes itself.
_SPECIAL = HOP_BY_HOP | {b"via", b"content-length"}


def plain_block(
    fields: Iterable[tuple[bytes, bytes]], via: bytes, names: Bounded[bytes, bytes],
) -> tuple[bytes, int | None] | None:
    """
    The header block and declared length a reply's C{fields} make (the
    end-to-end ones, checked as L{check_fields} checks them, with C{via}
    appended to their C{Via}), in one pass; or None when the fields are
    anything but plain (a field h11 would refuse, a C{Connection} naming
    other fields, a C{Content-Length} that is not one plain number, given
    once): the caller then takes the long way, which says what is wrong.
    """
    fields = fields if type(fields) is tuple else tuple(fields)
    values = b"\n".join([value for _, value in fields] + [via])
    if _VALUES.fullmatch(values) is None or values.count(b"\n") != len(fields):
        return None
    parts: list[bytes] = []
    vias: list[bytes] = []
    length: bytes | None = None
    special = _SPECIAL
    get = names.get
    for name, value in fields:
        lower = get(name)
        if lower is None:
            if _NAME.fullmatch(name) is None:
                return None
            lower = names.keep(name, name.lower())
        if lower in special:
            if lower == b"via":
                vias.append(value)
                continue
            if lower == b"content-length":
                if length is not None or _DIGITS.fullmatch(value) is None:
                    return None
                length = value
            elif lower == b"connection":
                for token in value.split(b","):
                    token = token.strip(b" \t").lower()
                    if token and token not in HOP_BY_HOP:
                        return None  # it names fields to drop: the long way
                continue
            else:
                continue
        parts += (name, b": ", value, b"\r\n")
    vias.append(via)
    parts += (b"Via: ", b", ".join(vias), b"\r\n")
    return b"".join(parts), (None if length is None else int(length))
