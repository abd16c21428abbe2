# -*- test-case-name: tests.test_state_config -*-
"""
Where the Redis backend connects, parsed once.

The configuration checks these strings at start (so a typo stops the edge
with the file and the key), and the Redis backend connects with the same
parse, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["RedisTarget", "StateOptions", "parse_address", "parse_redis_url"]

DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


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


class StateOptions(Protocol):
    """The settings a state backend is made from (the edge's [edge.state] table)."""

    @property
    def backend(self) -> str: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def sentinels(self) -> list[str]: ...
    @property
    def sentinel_master(self) -> str: ...
    @property
    def sentinel_password(self) -> str: ...
    @property
    def key_prefix(self) -> str: ...
    @property
    def command_timeout(self) -> float: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def probe_interval(self) -> float: ...
    @property
    def pool_size(self) -> int: ...
