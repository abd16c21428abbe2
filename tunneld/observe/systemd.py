# -*- test-case-name: tests.test_systemd -*-
"""
Readiness and liveness for systemd's C{Type=notify} services.

The C{NOTIFY_SOCKET} protocol is one datagram per message on a Unix socket
whose path is in the environment (a leading C{@} means the abstract
namespace): C{READY=1} once every listener accepts connections,
C{STOPPING=1} as soon as stopping starts, C{WATCHDOG=1} every half of
C{WATCHDOG_USEC} while running, and C{STATUS=...} for C{systemctl status}.
Without C{NOTIFY_SOCKET} the service does nothing, so the same code runs
under systemd, in a terminal and in tests.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tunneld.observe import events


class Notifier:
    """Sends C{NOTIFY_SOCKET} datagrams; a no-op when there is no socket."""

    log = Logger()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        watchdog = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if watchdog.isdigit() and int(watchdog) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(watchdog) / 2e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> None:
        """Send one datagram of newline-separated C{KEY=VALUE} assignments."""
        if self.address is None:
            return
        data = "\n".join(assignments).encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.sendto(data, self.address)
        except OSError as e:
            self.log.warn(
                "cannot notify systemd: {error}", error=str(e), event=events.NOTIFY_FAILED
            )
        finally:
            sock.close()


class SystemdNotifyService(Service):
    """
    Tells systemd when the process is ready, alive and stopping.

    C{STOPPING=1} goes out as soon as the reactor begins to shut down (a
    C{before shutdown} trigger, so it precedes a drain however long the other
    services take), or when this service stops, whichever comes first.
    C{waits} gives the Deferreds (listeners' C{listening}) that must all fire
    before C{READY=1}; C{status} says what to put in C{STATUS=} then.
    """

    log = Logger()
    name = "systemd-notify"

    def __init__(
        self,
        reactor: Any,
        waits: Callable[[], list[Deferred[Any]]],
        status: Callable[[], str] = lambda: "running",
        notifier: Notifier | None = None,
    ) -> None:
        self.reactor = reactor
        self.waits = waits
        self.status = status
        self.notifier = notifier or Notifier()
        self.ready = False
        self._watchdog: LoopingCall | None = None
        self._trigger: Any = None
        self._stopping_sent = False

    def startService(self) -> None:  # noqa: N802
        Service.startService(self)
        self._stopping_sent = False
        add_trigger = getattr(self.reactor, "addSystemEventTrigger", None)
        if add_trigger is not None:
            self._trigger = add_trigger("before", "shutdown", self._stopping)
        d = DeferredList(self.waits(), fireOnOneErrback=True, consumeErrors=True)
        d.addCallbacks(self._ready, lambda _: None)
        interval = self.notifier.watchdog_interval
        if interval is not None:
            self._watchdog = LoopingCall(self.notifier.notify, "WATCHDOG=1")
            self._watchdog.clock = self.reactor
            self._watchdog.start(interval, now=False)

    def _ready(self, _: Any) -> None:
        if not self.running:
            return
        self.ready = True
        status = self.status()
        self.notifier.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        self.log.info("ready: {status}", status=status, event=events.READY)

    def _stopping(self) -> None:
        self.ready = False
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        if not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.notify("STOPPING=1", "STATUS=stopping: draining connections")
            self.log.info("stopping", event=events.STOPPING)

    def stopService(self) -> Any:  # noqa: N802
        Service.stopService(self)
        if self._trigger is not None:
            self.reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        self._stopping()
        return None
