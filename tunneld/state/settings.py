# -*- test-case-name: tests.test_state_config -*-
"""
What a state backend is made from: the settings of the edge's [edge.state]
table, as a structural type, so the backends can be built and tested from
any object that has them.  The Redis URL and Sentinel addresses among them
are parsed by L{tunneld.config.values}, as the configuration checked them.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["StateOptions"]


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
