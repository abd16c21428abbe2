# -*- test-case-name: tests.test_observe -*-
"""
JSON-lines logs for log shippers:

    twistd --nodaemon --pidfile= --logger=tunneld.observe.logging.json_observer tunneld ...

Each event is one line of JSON with a flat, stable shape: C{time} (Unix
seconds), C{level}, C{namespace}, C{format} (the format string: the event's
stable identity), C{text} (the rendered message), C{event} when the event has
a stable name (L{tunneld.observe.events}), C{traceback} for failures, and
every named field of the event.  Values JSON cannot hold are written as their
C{repr}.  (Twisted's C{eventAsJSON} is made for reloading events into
Python, with nested level objects and flattened copies; this is made for
Loki, Elasticsearch, journald's JSON mode and C{jq}.)
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

# Event keys Twisted uses for its own bookkeeping; the useful ones are renamed.
_INTERNAL = frozenset({
    "log_logger", "log_source", "log_flattened", "log_trace", "log_io", "log_system",
    "log_level", "log_namespace", "log_format", "log_time", "log_failure", "log_text",
    "format", "message", "isError", "failure", "why", "system", "time",
})


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object on one line."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if not text and "log_failure" not in event:
            # As Twisted's text observers: an event with no text is not written
            # (tunneld.listening blanks Twisted's own "starting on" lines so).
            return
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": event.get("log_time"),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "format": event.get("log_format"),
            "text": text,
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        for key, value in event.items():
            if key not in _INTERNAL and key not in record:
                record[key] = value
        self.out.write(json.dumps(record, default=repr, ensure_ascii=False) + "\n")
        self.out.flush()


def json_observer() -> ILogObserver:
    """The observer factory twistd's C{--logger} option names: JSON lines on stdout."""
    return JSONLinesObserver(sys.stdout)
