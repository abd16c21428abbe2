# -*- test-case-name: tests.test_config -*-
"""
The edge's and the agent's configuration: one TOML file each.

Every key has a documented default (so no file at all is a valid edge
configuration: loopback, in-memory, development mode), and every mistake
fails at start with the file, the key and the reason.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any

from tunneld.errors import ConfigError
from tunneld.interfaces import ITransportPlugin
from tunneld.schema import non_negative, parse_table, positive, setting
from tunneld.transports.registry import find_transport

NO_FILE = "(defaults)"


def _hostname_pattern(value: str) -> str | None:
    host = value.removeprefix("*.")
    if not host or "*" in host or "/" in host or ":" in host or " " in host:
        return f"not a hostname or *.domain pattern: {value!r}"
    return None


def _hostname_patterns(values: list[str]) -> str | None:
    for value in values:
        problem = _hostname_pattern(value)
        if problem:
            return problem
    return None


def _frame_size(value: int) -> str | None:
    return None if value >= 128 * 1024 else f"must be at least 131072 bytes, got {value}"


def _non_empty(value: list[str]) -> str | None:
    return None if value else "must name at least one entry"


@dataclass(frozen=True)
class AgentGrant:
    """An agent the edge accepts, and the hostnames it may serve."""

    id: str = setting(..., "Agent id (as in the agent's [agent] id, or its certificate).")
    token: str = setting("", "Shared secret for token authentication (development).")
    hostnames: list[str] = setting(
        [], "Hostnames (or *.domain patterns) this agent may register.", check=_hostname_patterns
    )


@dataclass(frozen=True)
class EdgeSection:
    """The edge's own settings ([edge])."""

    public_listen: list[str] = setting(
        ["tcp:8080:interface=127.0.0.1"], "Endpoint strings for public HTTP/1.1 listeners."
    )
    public_url: str = setting(
        "http://{host}:8080/", "Template for the public URL shown to agents; {host} is the hostname."
    )
    transports: list[str] = setting(
        ["websocket"], "Agent-link transports to listen with, by plugin name.", check=_non_empty
    )
    max_header_bytes: int = setting(65536, "Largest request head accepted (bytes).", check=positive)
    header_timeout: float = setting(
        30.0, "Seconds a client has to send a complete request head.", check=positive
    )
    idle_timeout: float = setting(
        300.0, "Seconds a public connection may be idle between requests.", check=positive
    )
    hello_timeout: float = setting(
        10.0, "Seconds a new agent link has to say hello before it is dropped.", check=positive
    )
    initial_window: int = setting(
        256 * 1024, "Per-stream flow-control window (bytes) the edge grants.", check=positive
    )
    max_frame_size: int = setting(
        1 << 20, "Largest agent-link frame (bytes), at least 131072.", check=_frame_size
    )
    max_streams_per_agent: int = setting(
        10_000, "Concurrent streams one agent session may carry.", check=positive
    )
    websocket_ping_interval: float = setting(
        0.0,
        "Seconds a tunneled WebSocket may be silent before the edge pings the client "
        "(keeps NAT and load-balancer state alive; the client's Pong goes on to the upstream, "
        "which RFC 6455 allows); 0 = never.",
        check=non_negative,
    )
    open_loopback_registration: bool = setting(
        True,
        "When no [[agents]] are configured, agents connecting from a loopback address may "
        "register any hostname without credentials (development only).",
    )


@dataclass(frozen=True)
class EdgeConfig:
    """The whole edge configuration file."""

    edge: EdgeSection = field(default_factory=EdgeSection)
    agents: list[AgentGrant] = setting([], "Agents the edge accepts ([[agents]] entries).")
    transports: dict[str, dict[str, Any]] = setting(
        {}, "Per-transport tables ([transports.NAME]); see each transport's options."
    )
    source: str = NO_FILE


@dataclass(frozen=True)
class AgentSection:
    """The agent's own settings ([agent])."""

    id: str = setting("agent", "This agent's id.")
    token: str = setting("", "Token for token authentication (development).")
    transports: list[str] = setting(
        ["websocket"],
        "Transports to try, in order of preference; on failure the next is used.",
        check=_non_empty,
    )
    reconnect_initial: float = setting(0.5, "First reconnect delay (seconds).", check=positive)
    reconnect_max: float = setting(30.0, "Longest reconnect delay (seconds).", check=positive)
    healthy_after: float = setting(
        30.0, "Seconds a link must stay up before the backoff starts over.", check=positive
    )
    initial_window: int = setting(
        256 * 1024, "Per-stream flow-control window (bytes) the agent grants.", check=positive
    )
    max_frame_size: int = setting(
        1 << 20, "Largest agent-link frame (bytes), at least 131072.", check=_frame_size
    )
    upstream_max_idle: int = setting(
        16, "Idle keep-alive connections kept per upstream.", check=non_negative
    )
    upstream_connect_timeout: float = setting(
        10.0, "Seconds to connect to an upstream.", check=positive
    )
    upstream_response_timeout: float = setting(
        60.0, "Seconds an upstream may take to start its response.", check=positive
    )


@dataclass(frozen=True)
class TunnelSection:
    """One tunnel the agent serves ([[tunnels]])."""

    hostname: str = setting(..., "Public hostname (or *.domain pattern).", check=_hostname_pattern)
    upstream: str = setting(
        ..., "Client endpoint string of the local service, e.g. tcp:host=127.0.0.1:port=8000."
    )
    path_prefix: str = setting("", "Only requests under this path prefix ('' = all).")


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent configuration file."""

    agent: AgentSection = field(default_factory=AgentSection)
    tunnels: list[TunnelSection] = setting([], "Tunnels to register ([[tunnels]] entries).")
    transports: dict[str, dict[str, Any]] = setting(
        {}, "Per-transport tables ([transports.NAME]); see each transport's options."
    )
    source: str = NO_FILE


def read_toml(path: str) -> dict[str, Any]:
    """The parsed file, or a L{ConfigError} saying why it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "no such file") from None
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(syntax)", f"not valid TOML: {e}") from None


def _parse(cls: type[Any], raw: dict[str, Any], where: str) -> Any:
    raw = dict(raw)
    raw.pop("source", None)
    return parse_table(cls, raw, where)


def load_edge_config(path: str | None) -> EdgeConfig:
    """Read and validate an edge configuration; C{None} means all defaults."""
    where = path or NO_FILE
    raw = read_toml(path) if path else {}
    if "source" in raw:
        raise ConfigError(where, "source", "unknown key")
    config: EdgeConfig = _parse(EdgeConfig, raw, where)
    seen: set[str] = set()
    for i, grant in enumerate(config.agents):
        if grant.id in seen:
            raise ConfigError(where, f"agents[{i}].id", f"agent {grant.id!r} is listed twice")
        seen.add(grant.id)
    return EdgeConfig(config.edge, config.agents, config.transports, where)


def load_agent_config(path: str | None) -> AgentConfig:
    """Read and validate an agent configuration."""
    where = path or NO_FILE
    raw = read_toml(path) if path else {}
    if "source" in raw:
        raise ConfigError(where, "source", "unknown key")
    config: AgentConfig = _parse(AgentConfig, raw, where)
    return AgentConfig(config.agent, config.tunnels, config.transports, where)


def transport_options(
    names: list[str], tables: dict[str, dict[str, Any]], where: str, *, edge: bool
) -> list[tuple[ITransportPlugin, Any]]:
    """
    The plugins named in C{names} with their validated options; a missing
    plugin or a bad option fails with the file and key.
    """
    section = "edge" if edge else "agent"
    chosen = []
    for i, name in enumerate(names):
        plugin = find_transport(name, where, f"{section}.transports[{i}]")
        table = tables.get(name, {})
        options = plugin.edge_options(table, where) if edge else plugin.agent_options(table, where)
        chosen.append((plugin, options))
    return chosen
