"""
Tests for L{tunneld.speedups.heap}: large buffers are reused instead of faulted in again.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import tunneld

# Allocates 200 buffers of 1 MiB and more, each a little larger than the last
# (as reads and write buffers of a stream do), and prints the page faults it took.
_CHURN = """
import resource, sys
from tunneld.speedups.heap import keep_large_buffers
if sys.argv[1] == "keep":
    assert keep_large_buffers()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(200):
    buffer = b"x" * (1024 * 1024 + 4096 * i)
    frame = buffer[: 300 * 1024]
    del buffer, frame
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(tunneld.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, mode], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout)


class KeepLargeBuffersTests(SynchronousTestCase):
    """L{keep_large_buffers} stops glibc from returning big blocks to the kernel."""

    if platform.libc_ver()[0] != "glibc":
        skip = "mallopt thresholds are glibc's"

    def test_buffers_are_reused(self) -> None:
        """
        With the thresholds fixed, 200 MiB of growing buffers fault in a few
        pages each time the heap grows, not every page of every buffer.
        """
        kept = _faults("keep")
        default = _faults("default")
        # 200 buffers of 256+ pages each: ~60,000 faults when each is mapped anew.
        self.assertLess(kept, 5_000)
        self.assertLess(kept * 10, default)
