# -*- test-case-name: tests.test_heap -*-
"""
Keep the C heap's large blocks in the process while bodies stream through.

A bulk body crosses the edge and the agent as reads of up to 1 MiB
(L{tunneld.speedups.readsize}) and frames of ~128 KiB, so both daemons allocate and
free buffers of 128 KiB to a few MiB many times a second.  glibc's malloc
serves blocks above its mmap threshold (128 KiB at first, then raised to the
largest block freed so far) with a fresh C{mmap} each, and hands the top of
its heap back to the kernel whenever more than twice that threshold is free
there.  Either way the next buffer lands on pages the kernel has to fault in
and zero again, whenever the pattern of sizes sets it off (what that costs
is in docs/benchmarks.md, "What the speed tricks buy").

L{keep_large_buffers} fixes both thresholds instead (which also turns off
glibc's own adjustment of them): blocks up to L{MMAP_THRESHOLD} come from the
heap and are reused, and up to L{TRIM_THRESHOLD} of free heap stays mapped.
What a daemon holds stays bounded by what it has in flight, plus that much.
Elsewhere (musl, macOS), or with L{TRICK} switched off, it does nothing:
the C library's own adjustment stays.  It reaches into no library's
private state (C{mallopt} is glibc's public interface); it is a switch for
comparing, and for a heap that must shrink back after a burst.

One thing these settings do not govern: protobuf's C runtime (upb) calls
C{malloc_trim(0)} once every 10,000 frees of its message arenas, which hands
every free page of the heap back to the kernel, whatever the thresholds; the
next bulk transfer then faults its working set in again.  So nothing on a
request's path builds protobuf messages (L{tunneld.wire.codec} reads and
writes the per-request frames by hand): only control messages (Hello,
Welcome, pings, health) do, far too few to set it off.
"""

from __future__ import annotations

import ctypes
import platform
from typing import Any

from tunneld.speedups.switches import Trick

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "TRICK", "keep_large_buffers"]

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Above the largest buffer of the data path (a 1 MiB read, a socket's write
# buffer joined for sending), far below what a daemon holds anyway.
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 8 * 1024 * 1024


def _mallopt() -> Any:
    return ctypes.CDLL(None).mallopt


def _check() -> str | None:
    """The C library is glibc, with mallopt."""
    libc = platform.libc_ver()[0]
    if libc != "glibc":
        return f"the C library is {libc or 'not glibc'}"
    try:
        _mallopt()
    except (OSError, AttributeError) as e:  # pragma: no cover - glibc always has it
        return f"no mallopt: {e}"
    return None


TRICK = Trick(
    "heap",
    touches="glibc's malloc thresholds (mallopt), process-wide",
    fallback="glibc's own threshold adjustment",
    check=_check,
)


def keep_large_buffers() -> bool:
    """
    Set glibc's mmap and trim thresholds for this process (see the module
    docstring); C{False} when L{TRICK} is off (not glibc, or switched off).
    """
    if not TRICK.active:
        return False
    mallopt = _mallopt()
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
