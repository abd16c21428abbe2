# -*- test-case-name: tests.test_http1,tests.test_public_h2 -*-
"""
What every public HTTP listener of the edge does the same way, whatever the
HTTP version: which fields are hop-by-hop, how a host is read from an
authority, which headers a forwarded request carries (C{X-Forwarded-*},
C{Via}) and which reply headers reach the public client.

Who the client is reaches the upstream only in the edge's own words: from a
peer that is not a trusted proxy, C{X-Forwarded-For} is the peer's address
alone, and a C{Forwarded} or C{X-Real-IP} the client sent is replaced by the
edge's (C{for=PEER;host=...;proto=...}, C{PEER}).  From a trusted proxy
(C{[limits] trusted_proxies}) its C{X-Forwarded-For} is appended to and the
other two pass as it sent them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from http import HTTPStatus

from tunneld.model.messages import Headers

__all__ = [
    "mcp_method",
    "session_affinity",
    "HOP_BY_HOP",
    "REPLACED",
    "USERINFO_REFUSAL",
    "forwarded_headers",
    "host_of",
    "own_forwarded",
    "peer_of",
    "phrase",
    "reply_headers",
    "tokens",
]

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection and the proxy
# authentication fields, which are meant for this hop only.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"trailer",
    }
)
# Request fields the edge sets itself rather than passing on what the client claims.
REPLACED = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"expect"})
# Client claims about who it is that only a trusted proxy may make.
_CLAIMS = frozenset({b"forwarded", b"x-real-ip"})
# What forwarded_headers leaves out or sets itself when C{drop} is HOP_BY_HOP,
# for a trusted proxy and for anyone else.
_SKIPPED_TRUSTED = HOP_BY_HOP | REPLACED | {b"host", b"x-forwarded-for", b"via"}
_SKIPPED = _SKIPPED_TRUSTED | _CLAIMS

# RFC 9110 section 4.2.4: userinfo in an http(s) target is an error, never
# something to strip quietly (C{evil@host} reads as "evil" to some parsers).
USERINFO_REFUSAL = "userinfo ('user@') is not allowed in the Host or target"


def phrase(status: int) -> bytes:
    """The standard reason phrase of C{status}, or empty."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def tokens(values: list[bytes]) -> set[bytes]:
    """The lower-cased tokens of comma-separated header values."""
    return {t.strip().lower() for value in values for t in value.split(b",") if t.strip()}


def peer_of(address: object) -> tuple[str, bytes, str | None]:
    """
    A public client's socket address as the log names it (C{host:port},
    C{[v6]:port}), as X-Forwarded-For carries it, and its host (None when
    the address is not an IP one, e.g. a UNIX socket).  An IPv4 client of a
    dual-stack IPv6 socket (C{::ffff:192.0.2.1}, as under systemd's
    C{ListenStream=80}) is named by its IPv4 address, so per-client limits,
    C{trusted_proxies} and the upstream see one name for one client.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        peer = str(address)
        return peer, peer.encode("ascii", "replace"), None
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return peer, host.encode("ascii"), host


def host_of(authority: bytes) -> str | None:
    """
    The lower-cased host of an authority (C{host[:port]}), or None (also
    for one with userinfo, which the listeners refuse by name first).
    """
    if b"@" in authority:
        return None
    authority = authority.strip().lower()
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            return None
        host = authority[: end + 1]
    else:
        host = authority.partition(b":")[0]
    host = host.rstrip(b".")
    if not host:
        return None
    try:
        return host.decode("ascii")
    except UnicodeDecodeError:
        return None


def _quoted(value: bytes) -> bytes:
    """An RFC 7230 quoted-string."""
    return b'"%s"' % value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')


def own_forwarded(client_ip: bytes, authority: bytes, scheme: str) -> bytes:
    """The edge's own C{Forwarded} element (RFC 7239) for a client at C{client_ip}."""
    try:
        address = ipaddress.ip_address(client_ip.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        node = b"unknown"  # not an IP peer (a UNIX socket)
    else:
        node = b'"[%s]"' % client_ip if address.version == 6 else client_ip
    return b"for=%s;host=%s;proto=%s" % (node, _quoted(authority), scheme.encode("ascii"))


def forwarded_headers(
    headers: Iterable[tuple[bytes, bytes]],
    drop: frozenset[bytes] | set[bytes],
    authority: bytes,
    client_ip: bytes,
    scheme: str,
    via: bytes,
    trusted: bool = False,
) -> list[tuple[bytes, bytes]]:
    """
    The request headers carried to the agent: C{Host} first (the authority
    actually routed), the end-to-end fields (lower-case names) minus C{drop}
    and those the edge sets itself, then C{X-Forwarded-For}, C{X-Forwarded-Proto},
    C{X-Forwarded-Host} and C{Via}.  Unless the peer is a C{trusted} proxy,
    C{X-Forwarded-For} is C{client_ip} alone and a C{Forwarded} or
    C{X-Real-IP} the client sent is replaced by the edge's own.
    """
    forwarded: list[tuple[bytes, bytes]] = [(b"host", authority)]
    xff: list[bytes] = []
    vias: list[bytes] = []
    claimed: list[bytes] = []
    skipped = (_SKIPPED_TRUSTED if trusted else _SKIPPED) if drop is HOP_BY_HOP else None
    for name, value in headers:
        if skipped is not None and name not in skipped:
            forwarded.append((name, value))
        elif name in drop or name in REPLACED or name == b"host":
            continue
        elif name == b"x-forwarded-for":
            if trusted:
                xff.append(value)
        elif name == b"via":
            vias.append(value)
        elif name in _CLAIMS and not trusted:
            if name not in claimed:
                claimed.append(name)
        else:
            forwarded.append((name, value))
    for name in claimed:
        if name == b"forwarded":
            forwarded.append((name, own_forwarded(client_ip, authority, scheme)))
        else:
            forwarded.append((name, client_ip))
    xff.append(client_ip)
    vias.append(via)
    forwarded.append((b"x-forwarded-for", b", ".join(xff)))
    forwarded.append((b"x-forwarded-proto", scheme.encode("ascii")))
    forwarded.append((b"x-forwarded-host", authority))
    forwarded.append((b"via", b", ".join(vias)))
    return forwarded


def reply_headers(headers: Headers, via: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
    """
    The reply headers passed to the public client: the end-to-end ones with
    C{Via} appended; and whether the reply declared a C{Content-Length}.
    """
    named: list[bytes] = []
    for name, value in headers:
        if name.lower() == b"connection":
            named.append(value)
    drop = HOP_BY_HOP | tokens(named) if named else HOP_BY_HOP
    out: list[tuple[bytes, bytes]] = []
    vias: list[bytes] = []
    has_length = False
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"via":
            vias.append(value)
            continue
        if lower == b"content-length":
            has_length = True
        out.append((name, value))
    vias.append(via)
    out.append((b"Via", b", ".join(vias)))
    return out, has_length


# MCP's and ACP's streamable-HTTP session headers: a session lives on the agent
# (the server behind it) that created it.
_AFFINITY_HEADERS = {b"mcp-session-id": "mcp", b"acp-session-id": "acp"}
# Longer ids are no session id (MCP: visible ASCII).
_MAX_SESSION_ID = 256


def session_affinity(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """
    The MCP or ACP session a request or response names (C{mcp:ID},
    C{acp:ID}), or ''.
    """
    for name, value in headers:
        kind = _AFFINITY_HEADERS.get(name.lower())
        if kind is not None and 0 < len(value) <= _MAX_SESSION_ID:
            return f"{kind}:{value.decode('latin-1')}"
    return ""


def mcp_method(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The JSON-RPC method a request's C{Mcp-Method} header names, or ''."""
    for name, value in headers:
        if name.lower() == b"mcp-method" and 0 < len(value) <= _MAX_SESSION_ID:
            return value.decode("latin-1")
    return ""
