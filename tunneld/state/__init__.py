# -*- test-case-name: tests.test_state -*-
"""
Where edges keep what other edges must see (design §6): the
L{tunneld.interfaces.IStateBackend} implementations and the pieces built on
them.

  - L{tunneld.state.memory}: one process, nothing to set up (the default);
  - L{tunneld.state.redis}: several edges sharing Redis (directly or through
    Sentinel), with L{tunneld.state.redisclient} the one door to txredisapi;
  - L{tunneld.state.membership}: this edge's registration, refreshed by a
    heartbeat on the reactor clock;
  - L{tunneld.state.ids}: IDs no two edges mint alike.

This package imports the seams (L{tunneld.interfaces}) and nothing of the
edge, the agent or the router, which consult it through the interface.
"""

from __future__ import annotations

from typing import Any

from tunneld.interfaces import IStateBackend
from tunneld.state.settings import StateOptions

__all__ = ["make_backend"]


def make_backend(reactor: Any, options: StateOptions) -> IStateBackend:
    """The backend C{options} (the validated [edge.state] table) names."""
    if options.backend == "redis":
        # Imported only when used: the default edge never loads txredisapi.
        from tunneld.state.redis import RedisStateBackend

        return RedisStateBackend.from_options(reactor, options)
    from tunneld.state.memory import MemoryStateBackend

    return MemoryStateBackend(reactor)
