# -*- test-case-name: tests.test_speedups -*-
"""
Speed work that is not tunneld's logic, behind one door.

Every touch of another library's private state lives here, and so does the
tuning of the process; the rest of tunneld calls small public functions and
classes and never knows whether a trick or its fallback is at work.  Each
trick (L{switches.Trick}) has a capability check that runs once (the
internals are what the trick expects, else it stays off and the start-up
log says why), a fallback on public APIs, and a switch in the
configuration's C{[speedups]} table:

  - C{bulkwrite} (L{bulkwrite}): Twisted's TCP write queue, for writes
    without copies and an end-of-turn flush;
  - C{read_size} (L{readsize}): the read and send sizes of Twisted's TCP
    transport, grown while a socket streams;
  - C{lean_h2} (L{lean_h2}): h2's frame buffer, windows and streams, for an
    HTTP/2 connection whose costs do not grow with traffic;
  - C{websocket_takeover} (L{websocket_takeover}): Autobahn's protocol,
    taken over after the opening handshake;
  - C{native_mask} (L{native_mask}): Autobahn's compiled XOR masker;
  - C{tls_groups} (L{tls_groups}): pyOpenSSL's binding, for the list of
    key-exchange groups;
  - C{heap} (L{heap}) and C{gc_freeze} (L{gctune}): the process's malloc
    thresholds and garbage collector, through public calls.

Not tricks, so without a switch of their own: L{memo}'s bounded tables (the
per-object caches of the codec and the fast paths are plain Python) and
L{scheduling} (the C{cpu_scheduling} setting, a deployment choice).

This package imports nothing else of tunneld's.  Importing it is cheap: the
trick modules (and the libraries they reach into) load when used, or when
L{configure} switches them at start.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from tunneld.speedups.switches import ENVIRONMENT, Trick, environment_allows

__all__ = ["ENVIRONMENT", "MODULES", "NAMES", "Trick", "configure", "summary", "trick", "tricks"]

# Each trick's name (its configuration key) and the module that holds it.
MODULES = {
    "bulkwrite": "tunneld.speedups.bulkwrite",
    "read_size": "tunneld.speedups.readsize",
    "lean_h2": "tunneld.speedups.lean_h2",
    "websocket_takeover": "tunneld.speedups.websocket_takeover",
    "native_mask": "tunneld.speedups.native_mask",
    "tls_groups": "tunneld.speedups.tls_groups",
    "heap": "tunneld.speedups.heap",
    "gc_freeze": "tunneld.speedups.gctune",
}
NAMES = tuple(MODULES)


def trick(name: str) -> Trick:
    """The trick called C{name} (loading its module)."""
    found: Trick = importlib.import_module(MODULES[name]).TRICK
    return found


def tricks() -> list[Trick]:
    """Every trick, in the order of L{NAMES}."""
    return [trick(name) for name in NAMES]


def configure(switches: Mapping[str, bool]) -> dict[str, bool]:
    """
    Switch every trick: on unless C{switches} says C{False} for its name or
    for C{"enabled"} (all of them), or the environment says off (see
    L{switches}); a trick whose capability check fails stays off.  Returns
    each trick's previous state, which C{configure} takes back.
    """
    everything = switches.get("enabled", True) and environment_allows()
    before = {}
    for name in NAMES:
        current = trick(name)
        before[name] = current.wanted if current.deferred else current.active
        current.switch(everything and switches.get(name, True))
    return before


def summary() -> str:
    """The tricks and whether each is on: C{"bulkwrite on, read_size on, lean_h2 off, …"}."""
    return ", ".join(f"{t.name} {'on' if t.pending or t.active else 'off'}" for t in tricks())
