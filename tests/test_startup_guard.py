"""
L{StartupGuard} and L{ListeningService} failures, one object at a time: a
listener failing while starting or later, on a port in use, or on a socket
systemd did not pass.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_startup import held_port
from tunneld.errors import ListenError, StartupError
from tunneld.listening import ListeningService
from tunneld.observe import events
from tunneld.observe.systemd import Notifier, SystemdNotifyService
from tunneld.startup import StartupGuard


class _Listener(Service):
    """A listener whose outcome the test decides."""

    def __init__(self) -> None:
        self.listening: defer.Deferred[Any] = defer.Deferred()
        self.port = None


class _Reactor:
    def __init__(self, running: bool) -> None:
        self.running = running
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1

    def callWhenRunning(self, f: Any) -> None:  # noqa: N802
        pass

    def addSystemEventTrigger(self, *args: Any) -> str:  # noqa: N802
        return "trigger"

    def removeSystemEventTrigger(self, trigger: Any) -> None:  # noqa: N802
        pass


class _Notifier(Notifier):
    def __init__(self) -> None:
        super().__init__({})
        self.sent: list[tuple[str, ...]] = []

    def notify(self, *assignments: str) -> None:
        self.sent.append(assignments)


class StartupGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.exits: list[tuple[str, int]] = []

    def guard(self, reactor: Any) -> tuple[StartupGuard, _Listener, _Notifier]:
        guard = StartupGuard(
            "/etc/tunneld/tunneld.toml", reactor,
            exit_now=lambda code: self.exits.append(("now", code)),
            exit_when_stopped=lambda code: self.exits.append(("when stopped", code)),
        )
        listener = _Listener()
        listener.setServiceParent(guard)
        notifier = _Notifier()
        SystemdNotifyService(reactor, lambda: [listener.listening], notifier=notifier) \
            .setServiceParent(guard)
        return guard, listener, notifier

    def failed_events(self) -> list[Any]:
        return [e for e in self.log if e.get("event") == events.START_FAILED]

    def test_listener_failing_while_starting(self) -> None:
        """A listener failing inside start-up exits at once, with one critical event, before READY."""
        guard, listener, notifier = self.guard(_Reactor(running=False))

        def fail() -> None:
            listener.listening.errback(Failure(ListenError(
                "edge.public_listen[0]", "public HTTP", "tcp:80", "[Errno 98] Address already in use"
            )))

        listener.privilegedStartService = fail  # type: ignore[method-assign]
        guard.privilegedStartService()
        self.assertEqual(self.exits, [("now", 1)])
        (event,) = self.failed_events()
        self.assertEqual(
            event["error"],
            "/etc/tunneld/tunneld.toml: edge.public_listen[0]: public HTTP cannot listen on "
            "tcp:80: [Errno 98] Address already in use",
        )
        self.assertEqual(event["log_level"].name, "critical")
        self.assertEqual(notifier.sent, [])

    def test_listener_failing_later(self) -> None:
        """A listener failing with the reactor running stops the reactor and exits 1 afterwards; no READY=1."""
        reactor = _Reactor(running=True)
        guard, listener, notifier = self.guard(reactor)
        guard.privilegedStartService()
        guard.startService()
        self.assertEqual(self.exits, [])
        listener.listening.errback(Failure(StartupError("the tunnel to the moon collapsed")))
        self.assertEqual(self.exits, [("when stopped", 1)])
        self.assertEqual(reactor.stopped, 1)
        (event,) = self.failed_events()
        self.assertIn("the tunnel to the moon collapsed", event["error"])
        self.assertEqual([m for m in notifier.sent if "READY=1" in m], [])

    def test_all_listening(self) -> None:
        """With every listener up nothing exits, and READY=1 goes out."""
        guard, listener, notifier = self.guard(_Reactor(running=True))
        guard.privilegedStartService()
        guard.startService()
        listener.listening.callback(None)
        self.assertEqual(self.exits, [])
        self.assertEqual(notifier.sent[0][0], "READY=1")

    def test_real_listener_on_a_port_in_use(self) -> None:
        """A ListeningService on a port in use fails its listening with the key, endpoint and errno."""
        endpoint = f"tcp:{held_port(self)}:interface=127.0.0.1"
        guard = StartupGuard(
            "edge.toml", reactor, exit_now=lambda code: self.exits.append(("now", code))
        )
        listener = ListeningService(
            reactor, endpoint, protocol.Factory(), "public HTTP",
            key="edge.public_listen[0]", backlog=64,
        )
        listener.setServiceParent(guard)
        guard.privilegedStartService()
        self.assertEqual(self.exits, [("now", 1)])
        error = guard.error
        self.assertIsInstance(error, ListenError)
        self.assertEqual(
            str(error),
            f"edge.public_listen[0]: public HTTP cannot listen on {endpoint}: "
            "[Errno 98] Address already in use",
        )
        self.assertIsNone(listener.port)


class MissingSocketTests(SynchronousTestCase):
    def test_systemd_endpoint_without_socket(self) -> None:
        """A systemd: listener with no socket passed fails at start, saying what is missing."""
        service = ListeningService(
            reactor, "systemd:domain=INET:index=5", protocol.Factory(), "public HTTP",
            key="edge.public_listen[0]",
        )
        service.privilegedStartService()
        error = self.failureResultOf(service.listening, ListenError).value
        self.assertTrue(str(error).startswith(
            "edge.public_listen[0]: public HTTP cannot listen on systemd:domain=INET:index=5: "
            "systemd passed no such socket"
        ), str(error))


class UnixListenerTests(TestCase):
    async def test_unix_listener_says_its_path(self) -> None:
        """A UNIX-socket listener logs its path as the address, once."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        directory = tempfile.mkdtemp()  # short: a UNIX socket path has a length limit
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "public.sock")
        factory = protocol.Factory()
        factory.noisy = False
        service = ListeningService(
            reactor, f"unix:{path}", factory, "public HTTP", key="edge.public_listen[0]"
        )
        service.privilegedStartService()
        await service.listening
        await service.stopService()
        texts = [formatEvent(e) for e in log if formatEvent(e)]
        self.assertEqual(texts[0], f"public HTTP listening on {path}")
        self.assertEqual([t for t in texts if "listening on" in t], texts[:1])


class ListeningServiceTests(SynchronousTestCase):
    def test_endpoint_that_fails_to_build(self) -> None:
        """An endpoint that cannot even be built at start (a key file gone) fails listening, naming it."""
        service = ListeningService(
            reactor, "ssl:0:privateKey=/nonexistent/key.pem", protocol.Factory(), "public HTTP",
            key="edge.public_listen[0]",
        )
        service.privilegedStartService()
        error = self.failureResultOf(service.listening, ListenError).value
        self.assertTrue(str(error).startswith(
            "edge.public_listen[0]: public HTTP cannot listen on ssl:0:privateKey=/nonexistent/key.pem: "
        ), str(error))
        self.assertIn("No such file", str(error))
