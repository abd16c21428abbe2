# -*- test-case-name: tests.test_config,tests.test_health,tests.test_state_config,tests.test_tcp -*-
"""
The configuration's own value syntaxes, parsed once.

Some settings are small languages of their own: a health check
(C{http:/path:STATUS}), a Redis URL, a Sentinel address, edge port ranges,
trusted proxy networks.  The schema checks them when the file is read (so a
typo stops the start with the file and the key), and the part that uses the
value parses it with the same function here, so the two cannot disagree.
Every parser raises L{ValueError} saying what is wrong.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "HealthCheck",
    "RedisTarget",
    "check_networks",
    "parse_address",
    "parse_health_check",
    "parse_port_ranges",
    "parse_redis_url",
]

DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class HealthCheck:
    """What to probe: a TCP connect, or an HTTP path and the status it should answer."""

    kind: str  # "tcp" or "http"
    path: str = "/"
    status: int | None = None


def parse_health_check(text: str) -> HealthCheck | None:
    """C{''} → None, C{tcp}, C{http:/path} or C{http:/path:STATUS}; else L{ValueError}."""
    if not text:
        return None
    if text == "tcp":
        return HealthCheck("tcp")
    if text.startswith("http:"):
        rest = text[5:]
        status: int | None = None
        path, sep, tail = rest.rpartition(":")
        if sep and tail.isdigit():
            status = int(tail)
            if not 100 <= status <= 599:
                raise ValueError(f"not an HTTP status: {tail}")
        else:
            path = rest
        if not path.startswith("/") or any(c in path for c in " \r\n"):
            raise ValueError(f"health check path must start with '/': {text!r}")
        return HealthCheck("http", path, status)
    raise ValueError(f"expected '', 'tcp' or 'http:/path[:STATUS]', got {text!r}")


@dataclass(frozen=True)
class RedisTarget:
    """A Redis server (or, with Sentinel, the credentials and database of the primary)."""

    scheme: str  # "redis", "rediss" (TLS) or "unix"
    host: str = ""
    port: int = DEFAULT_REDIS_PORT
    path: str = ""  # the socket, for unix
    db: int = 0
    username: str | None = None
    password: str | None = None

    def describe(self) -> str:
        """The target for logs: never the password."""
        if self.scheme == "unix":
            return f"unix:{self.path} db {self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """
    C{redis://[[user]:password@]host[:port][/db]}, C{rediss://…} (TLS) or
    C{unix:///path/redis.sock[?db=N]}; L{ValueError} says what is wrong.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a Redis URL ({e}): {url!r}") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"a unix: Redis URL needs a socket path: {url!r}")
        db_values = parse_qs(parts.query).get("db", ["0"])
        return RedisTarget(
            "unix", path=parts.path, db=_db(db_values[-1], url),
            username=username, password=password,
        )
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"the scheme must be redis, rediss or unix: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in Redis URL {url!r}")
    db_text = parts.path.lstrip("/") or "0"
    return RedisTarget(
        parts.scheme, parts.hostname, port or DEFAULT_REDIS_PORT, db=_db(db_text, url),
        username=username, password=password,
    )


def _db(text: str, url: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the database must be a number, got {text!r} in {url!r}")
    return int(text)


def parse_proxy_url(text: str) -> tuple[str, int] | None:
    """
    An HTTP forward proxy, C{http://host[:port]} (port 80 if left out), as
    (host, port); '' is none.  L{ValueError} says what is wrong.
    """
    if not text:
        return None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a proxy URL ({e}): {text!r}") from None
    if parts.scheme != "http":
        raise ValueError(f"a forward proxy is http://host:port (the agent asks it in plain HTTP/1.1): {text!r}")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"a forward proxy is http://host:port, nothing more: {text!r}")
    return parts.hostname, port or 80


def parse_address(text: str, default_port: int = DEFAULT_SENTINEL_PORT) -> tuple[str, int]:
    """C{host:port}, C{host} or C{[v6]:port} as (host, port); L{ValueError} if not."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError(f"not host:port: {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if not host or " " in host:
        raise ValueError(f"not host:port: {text!r}")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"not a port (1-65535) in {text!r}")
    return host, int(port_text)


def parse_port_ranges(value: str) -> list[tuple[int, int]]:
    """
    C{"10000-10100,2222"} as inclusive ranges; C{""} is none.  Raises
    L{ValueError} saying what is wrong.
    """
    ranges = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        low_text, _, high_text = part.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if high_text else low
        except ValueError:
            raise ValueError(f"not a port or port range: {part!r}") from None
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"not a port range within 1-65535: {part!r}")
        ranges.append((low, high))
    return ranges


def check_networks(values: list[str]) -> str | None:
    """A config check: every entry is an address or a CIDR network."""
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"not an IP address or network: {value!r}"
    return None
