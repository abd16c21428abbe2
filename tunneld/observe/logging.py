"""
JSON-lines logs for log shippers: C{twistd --logger=tunneld.observe.logging.json_observer}.

Each event is one line of JSON (Twisted's own event serialisation): the
format string (C{log_format}, the event's stable identity), every named
field, C{log_level}, C{log_namespace} and C{log_time}.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import ILogObserver, eventAsJSON
from zope.interface import implementer


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON line, with its text rendering in C{log_text}."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        event = dict(event)
        event.setdefault("log_text", formatEvent(event))
        self.out.write(eventAsJSON(event) + "\n")
        self.out.flush()


def json_observer() -> ILogObserver:
    """The observer factory twistd's C{--logger} option names: JSON lines on stdout."""
    return JSONLinesObserver(sys.stdout)
