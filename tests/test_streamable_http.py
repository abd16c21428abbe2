"""
The streamable-HTTP transport (plugins/streamable-http, installed as a wheel
by scripts/setup-tests): the whole end-to-end suite over it, and what its
review checklist guards, each with real edges and agents on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from tests.end_to_end import EndToEndMixin
from tunneld.reasons import Reason

try:
    from tunneld_streamable_http import framing
except ImportError:  # pragma: no cover - scripts/setup-tests installs it
    framing = None  # type: ignore[assignment]

MISSING = None if framing is not None else "tunneld-streamable-http is not installed (scripts/setup-tests)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "plugins", "streamable-http")


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:  # noqa: N802
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


class RawAgent:
    """An agent written by hand with twisted.web's client: each request of the wire shape, as a test wants it."""

    def __init__(self, case: TestCase, url: str) -> None:
        self.url = url.encode()
        pool = HTTPConnectionPool(reactor, persistent=True)
        case.addCleanup(pool.closeCachedConnections)
        self.http = Agent(reactor, pool=pool)
        self.connection_id = b""

    async def request(
        self, method: bytes, headers: dict[bytes, bytes] | None = None, body: bytes | None = None
    ) -> Any:
        all_headers = Headers({k: [v] for k, v in (headers or {}).items()})
        if self.connection_id:
            all_headers.setRawHeaders(framing.CONNECTION_ID, [self.connection_id])
        return await self.http.request(
            method, self.url, all_headers, _Body(body) if body is not None else None
        )

    async def initialise(self) -> Any:
        from twisted.web.client import readBody

        response = await self.request(b"POST", {b"Content-Type": framing.FRAMES_TYPE}, b"")
        await readBody(response)
        (self.connection_id,) = response.headers.getRawHeaders(framing.CONNECTION_ID)
        return response


class StreamableHTTPEndToEnd(EndToEndMixin, TestCase):
    """Every end-to-end behaviour over the streamable-http transport."""

    skip = MISSING
    transport = "streamable-http"
    link_sockets = 5  # the listener, and both ends of the agent's event stream and of its POSTs

    def agent_table(self, address: Any) -> dict[str, Any]:
        return {"url": f"http://127.0.0.1:{address.port}/tunnel"}

    async def send_malformed_frame(self, address: Any) -> None:
        from twisted.web.client import readBody

        agent = RawAgent(self, f"http://127.0.0.1:{address.port}/tunnel")
        await agent.initialise()
        events = await agent.request(b"GET", {b"Accept": b"text/event-stream"})
        reader = _Events()
        events.deliverBody(reader)
        response = await agent.request(
            b"POST", {framing.SEQ: b"1"}, framing.encode_batch([b"\xff\xfe not a frame"])
        )
        await readBody(response)
        closed = await reader.closed
        self.assertIn(Reason.PROTOCOL_ERROR.value, closed)


class _Events(Protocol):
    """An event stream read by a test: every event, and how it ended."""

    def __init__(self) -> None:
        self.parser = framing.EventParser(1 << 22)
        self.events: list[Any] = []
        self.closed: defer.Deferred[str] = defer.Deferred()
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        for event in self.parser.feed(data):
            self.events.append(event)
            if event.kind == "close" and not self.closed.called:
                self.closed.callback(event.data.decode())
        for waiter in list(self._waiting):
            if len(self.events) >= waiter[0]:
                self._waiting.remove(waiter)
                waiter[1].callback(None)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.reason = reason
        self.ended.callback(None)

    def count(self, n: int) -> defer.Deferred[None]:
        """Fires once C{n} events have arrived."""
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.events) >= n:
            d.callback(None)
        else:
            self._waiting.append((n, d))
        return d


class PackagingTests(TestCase):
    """The transport ships as a distribution of its own, as a third party would ship it."""

    timeout = 300

    def test_wheel_is_a_dropin_found_without_changing_tunneld(self) -> None:
        """Its wheel carries its package and the drop-in (no part of tunneld, no cache); installed beside tunneld, the plugin is found by name."""
        build = os.path.abspath(self.mktemp())
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
             "--wheel-dir", build, PLUGIN],
            check=True, capture_output=True, timeout=240,
        )
        (wheel,) = [f for f in os.listdir(build) if f.endswith(".whl")]
        names = zipfile.ZipFile(os.path.join(build, wheel)).namelist()
        self.assertIn("tunneld/plugins/tunneld_streamable_http_dropin.py", names)
        self.assertIn("tunneld_streamable_http/edge.py", names)
        self.assertIn("tunneld_streamable_http/py.typed", names)
        self.assertEqual([n for n in names if n.startswith("tunneld/")],
                         ["tunneld/plugins/tunneld_streamable_http_dropin.py"])
        self.assertFalse([n for n in names if n.endswith("dropin.cache")])
        target = os.path.abspath(self.mktemp())
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
             os.path.join(build, wheel)],
            check=True, capture_output=True, timeout=240,
        )
        # tunneld from the checkout, the transport from the target only.
        script = (
            "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p];"
            f"sys.path[:0] = [{ROOT!r}, {target!r}];"
            "sys.path.append([p for p in __import__('site').getsitepackages()][0]);"
            "from tunneld.transports.registry import available_transports;"
            "plugins = available_transports();"
            "print(sorted(plugins), sys.modules['tunneld.plugins.tunneld_streamable_http_dropin'].__file__,"
            " sys.modules['tunneld_streamable_http'].__file__)"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=target,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        found, dropin, package = result.stdout.rsplit(" ", 2)
        self.assertIn("'streamable-http'", found)
        self.assertTrue(dropin.startswith(target), dropin)
        self.assertTrue(package.strip().startswith(target), package)
