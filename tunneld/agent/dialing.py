"""
Dialling a local upstream: how a connection attempt that ran out of time is
reported, shared by every kind of upstream (HTTP/1.1, h2c, upgrades, TCP).
"""

from __future__ import annotations

from typing import NoReturn

from twisted.internet import defer
from twisted.python.failure import Failure


def connect_timed_out(result: object, timeout: float) -> NoReturn:
    """Errback after cancelling a slow connect: whatever it raised, it was a timeout."""
    raise defer.TimeoutError(f"no connection within {timeout:g}s")


def connect_error(failure: Failure, timeout: float) -> str:
    """Why a connection attempt failed, for the log and the stream's reset."""
    if isinstance(failure.value, defer.TimeoutError):
        return f"no connection within {timeout:g}s"
    return failure.getErrorMessage()
