# -*- test-case-name: tests.test_heap -*-
"""
Keep the C heap's large blocks in the process while bodies stream through.

A bulk body crosses the edge and the agent as reads of up to 1 MiB
(L{tunneld.readsize}) and frames of ~128 KiB, so both daemons allocate and
free buffers of 128 KiB to a few MiB many times a second.  glibc's malloc
serves blocks above its mmap threshold (128 KiB at first, then raised to the
largest block freed so far) with a fresh C{mmap} each, and hands the top of
its heap back to the kernel whenever more than twice that threshold is free
there.  Either way the next buffer lands on pages the kernel has to fault in
and zero again: 50-240 page faults per MiB relayed, whenever the pattern of
sizes sets it off, and then up to a fifth of a daemon's CPU per MiB in the
1 MiB benchmark (docs/benchmarks.md).

L{keep_large_buffers} fixes both thresholds instead (which also turns off
glibc's own adjustment of them): blocks up to L{MMAP_THRESHOLD} come from the
heap and are reused, and up to L{TRIM_THRESHOLD} of free heap stays mapped.
What a daemon holds stays bounded by what it has in flight, plus that much.
Elsewhere (musl, macOS) it does nothing.

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

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_large_buffers"]

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Above the largest buffer of the data path (a 1 MiB read, a socket's write
# buffer joined for sending), far below what a daemon holds anyway.
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 8 * 1024 * 1024


def keep_large_buffers() -> bool:
    """
    Set glibc's mmap and trim thresholds for this process (see the module
    docstring); C{False} where the C library is not glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
