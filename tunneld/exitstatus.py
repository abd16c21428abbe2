# -*- test-case-name: tests.test_agent_refusals -*-
"""
The process's exit status, for a service that stops the process because it
cannot do its job.

twistd exits 0 whenever its reactor stops.  An agent the edge refuses for
good must exit non-zero, so that systemd (C{RestartPreventExitStatus=}) and
scripts see the failure: the status is noted here, the reactor is stopped
as usual (services stop, the pidfile goes, the log is flushed), and the
process leaves with the status once all that is done.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

# sysexits.h EX_CONFIG: the configuration is wrong; retrying as is cannot help.
EX_CONFIG = 78

_status = 0


def exit_when_stopped(status: int) -> None:
    """
    Leave the process with C{status} once the reactor has stopped and twistd
    has cleaned up (the first non-zero status given wins): twistd itself
    exits 0 whenever its reactor stops, and nothing it runs after the reactor
    can change that but the interpreter's own exit handlers.
    """
    global _status
    if status and not _status:
        _status = status
        atexit.register(_exit)


def stop_process(reactor: Any, status: int) -> None:
    """Stop the reactor; the process then exits with C{status} (the first one given wins)."""
    exit_when_stopped(status)
    if reactor.running:
        reactor.stop()


def _exit() -> None:
    # Registered last, so run first of the exit handlers: twistd has
    # finished by now, and the status must survive the normal exit.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_status)
