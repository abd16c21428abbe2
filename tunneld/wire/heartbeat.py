# -*- test-case-name: tests.test_mux -*-
"""
Link heartbeats: ping every interval, measure the round trip, and call a link
dead once it has been silent for the timeout.

Shared by every transport, whatever carries the ping (a protocol C{Ping}
frame, an HTTP/2 PING): the transport says how to send one and reports what
it hears; the policy lives here once.

Silence has its own timer, armed for C{timeout} after the last sign of life:
the link is declared dead at the timeout, not at the next ping after it
(which could be up to one interval later).  Hearing something only notes
the time; the timer, when it fires early, moves itself to the new deadline.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

# Clock arithmetic may land a hair short of the deadline it was armed for.
_SLACK = 1e-6


class Heartbeat:
    """The heartbeat of one link, on the reactor clock."""

    def __init__(
        self,
        reactor: Any,
        interval: float,
        timeout: float,
        send_ping: Callable[[int], None],
        on_silence: Callable[[float], None],
    ) -> None:
        self.reactor = reactor
        self.interval = interval
        self.timeout = timeout
        self.rtt: float | None = None
        self.last_heard = reactor.seconds()
        self._send_ping = send_ping
        self._on_silence = on_silence
        self._ids = itertools.count(1)
        self._pings: dict[int, float] = {}
        self._call: Any = None
        self._deadline: Any = None

    def start(self) -> None:
        """Begin pinging and watching for silence (no-op when the interval is 0)."""
        self.last_heard = self.reactor.seconds()
        if self.interval <= 0:
            return
        if self._call is None:
            self._call = self.reactor.callLater(self.interval, self._beat)
        if self._deadline is None:
            self._deadline = self.reactor.callLater(self.timeout, self._check_silence)

    def stop(self) -> None:
        """Stop pinging and watching; the link is closed."""
        for call in (self._call, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._call = self._deadline = None

    def heard(self) -> None:
        """Anything arrived from the peer: it is alive."""
        self.last_heard = self.reactor.seconds()

    def pong(self, opaque: int) -> None:
        """The answer to ping C{opaque} arrived: that is the round trip."""
        sent = self._pings.pop(opaque, None)
        if sent is not None:
            self.rtt = self.reactor.seconds() - sent

    def _beat(self) -> None:
        self._call = None
        now = self.reactor.seconds()
        opaque = next(self._ids)
        self._pings = {k: v for k, v in self._pings.items() if now - v < self.timeout}
        self._pings[opaque] = now
        self._send_ping(opaque)
        self._call = self.reactor.callLater(self.interval, self._beat)

    def _check_silence(self) -> None:
        self._deadline = None
        now = self.reactor.seconds()
        silent = now - self.last_heard
        if silent + _SLACK >= self.timeout:
            self.stop()
            self._on_silence(silent)
            return
        self._deadline = self.reactor.callLater(self.timeout - silent, self._check_silence)
