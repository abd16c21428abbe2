# -*- test-case-name: tests.test_gctune -*-
"""
Keep Python's cyclic garbage collector off the daemon's start-up heap.

A started edge or agent holds ~65,000-70,000 objects the collector tracks
(modules, classes, functions, protobuf descriptors, the config) that live as
long as the process.  Requests and streams leave nothing to the collector
(their objects are freed by reference counting), but every public connection
opened and closed, and every WebSocket, allocates objects that outlive a
young collection and so count towards the older ones: with one new
connection per request (C{Connection: close} clients, the soak of
C{bench/run}), the edge ran a full (generation 2) collection every couple of
seconds, each a walk over the whole heap, during which every stream in
flight waits (docs/benchmarks.md, "What the speed tricks buy").

L{GcTuning}, started last in the daemon's service tree, therefore:
  - collects once, then I{freezes} what start-up left (C{gc.freeze}): those
    objects move to a permanent generation that no collection walks again.
    A full collection then walks only what the daemon holds for its
    connections (~2,000 objects when idle);
  - raises the young generation's threshold from 700 to L{YOUNG_THRESHOLD}
    allocations, so a burst of connections is collected once rather than
    every 700 allocations, and their objects die young instead of being
    promoted (and walked again) by the older generations.

Nothing can leak from this: reference counting still frees every object,
frozen or not, and cycles made after start-up are still collected, just
after 10,000 net allocations instead of 700.  Only a reference cycle among
the frozen start-up objects, dropped later, would stay: a bounded, one-time
amount.  Stopping the service undoes both (unfreezing is all or nothing:
what the interpreter froze itself, a few hundred objects on Python 3.12,
is then unfrozen too, which is harmless).

It uses only the C{gc} module's public calls; L{TRICK} is its switch (for
comparing, and for debugging with every object visible to the collector).
"""

from __future__ import annotations

import gc

from twisted.application.service import Service

from tunneld.speedups.switches import Trick

__all__ = ["TRICK", "YOUNG_THRESHOLD", "GcTuning"]

# Allocations (net of deallocations) of tracked objects between young
# collections; CPython's default is 700.
YOUNG_THRESHOLD = 10_000


def _check() -> str | None:
    """This Python can freeze the heap."""
    missing = [name for name in ("freeze", "unfreeze", "get_freeze_count") if not hasattr(gc, name)]
    return f"the gc module lacks {', '.join(missing)}" if missing else None


TRICK = Trick(
    "gc_freeze",
    touches="the collector's thresholds and frozen generation, process-wide",
    fallback="the collector's defaults",
    check=_check,
)


class GcTuning(Service):
    """Freeze the start-up heap and raise the young threshold while running."""

    name = "gc-tuning"

    def __init__(self) -> None:
        self._saved: tuple[int, ...] | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if not TRICK.active:
            return
        self._saved = gc.get_threshold()
        gc.collect()
        gc.freeze()
        _, older, oldest = self._saved
        gc.set_threshold(YOUNG_THRESHOLD, older, oldest)

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        saved, self._saved = self._saved, None
        if saved is not None:
            gc.set_threshold(*saved)
            gc.unfreeze()
