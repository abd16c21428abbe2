# -*- test-case-name: tests.test_scheduling -*-
"""
The daemon's CPU scheduling policy: as it was started, or Linux's C{SCHED_BATCH}.

Under Linux's default policy a task woken by I/O preempts the one running on
its CPU.  An edge and an agent that share a CPU (one host, or the one core a
benchmark pins them to) therefore hand it over at every link write: the
writer stops inside C{send} while the reader runs a reactor turn for the one
batch it was sent, then the writer finishes its turn, and so on, so that
every turn carries as little as it can and every hand-over is a context
switch.  Under C{SCHED_BATCH} a wake-up does not preempt (sched(7): for
"workloads that want a deterministic scheduling policy without interactivity
causing extra preemptions (between the workload's tasks)"): each process
finishes its turn, and the other then reads everything sent meanwhile at
once: far fewer preemptions and hand-overs (what it bought is in
docs/benchmarks.md, "What the speed tricks buy").

The price is that a woken tunneld waits for the running task's time slice
(a few milliseconds at most) instead of preempting it.  That matters only on
a CPU shared with other busy work, which is why the default keeps the policy
the process was started with (systemd's C{CPUSchedulingPolicy=} still
applies).
"""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["POLICIES", "CpuScheduling", "check_policy"]

# The values of the cpu_scheduling setting.
POLICIES = ("default", "batch")


def check_policy(value: str) -> str | None:
    """The configuration check: a known policy this platform can apply."""
    if value not in POLICIES:
        return f"must be one of {', '.join(map(repr, POLICIES))}, got {value!r}"
    if value == "batch" and not hasattr(os, "SCHED_BATCH"):
        return "'batch' needs Linux's SCHED_BATCH, which this platform does not have"
    return None


class CpuScheduling(Service):
    """Switch the process to C{SCHED_BATCH} while running, when configured to."""

    name = "cpu-scheduling"
    log = Logger()

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._saved: tuple[int, os.sched_param] | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.policy != "batch":
            return
        saved = (os.sched_getscheduler(0), os.sched_getparam(0))
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as e:
            self.log.warn(
                "cpu_scheduling = 'batch': could not switch to SCHED_BATCH ({error}); "
                "running under the policy the process started with",
                error=e,
            )
            return
        self._saved = saved
        self.log.info("CPU scheduling policy: SCHED_BATCH (cpu_scheduling = 'batch')")

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        saved, self._saved = self._saved, None
        if saved is not None:
            os.sched_setscheduler(0, *saved)
