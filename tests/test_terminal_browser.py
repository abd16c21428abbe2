"""
The terminal page in a real browser: Debian's headless Chromium, driven by
playwright-core (tests/browser/drive.mjs; both installed by
scripts/setup-tests), against a real edge and agent with a real PTY.

One Chromium serves each test (pages in their own contexts); a test class
runs its scenarios in as few tests as it can, since a browser's start is
most of their time.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest, TestCase

from tests.end_to_end import EventCollector
from tests.harness import eventually
from tests.terminal_peers import (
    CREDENTIAL,
    admin_port,
    autobahn_timers_fired,
    children_of,
    terminal_tunnel,
    token_for,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PLAYWRIGHT = os.path.join(ROOT, ".venv", "share", "tunneld", "test-node")
XTERM = os.path.join(ROOT, ".venv", "share", "tunneld", "xterm", "xterm.js")
CHROMIUM = shutil.which("chromium")
NODE = shutil.which("node")

_CLOSED = "terminal session {session} for {allocation} closed ({reason}: {message}); " \
    "was {was}, {to_browser} bytes to the browser, {to_agent} to the agent"


class Driver(ProcessProtocol):
    """tests/browser/drive.mjs: one command at a time, one JSON answer each."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: list[defer.Deferred[dict[str, Any]]] = []
        self.started: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.errors = b""

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            answer = json.loads(line)
            if not self.started.called:
                self.started.callback(answer)
            elif self.waiting:
                self.waiting.pop(0).callback(answer)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.errors = (self.errors + data)[-4000:]

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        failure = RuntimeError(f"the browser driver ended: {self.errors.decode(errors='replace')}")
        if not self.started.called:
            self.started.errback(failure)
        for waiter in self.waiting:
            waiter.errback(failure)
        self.waiting = []
        self.ended.callback(None)

    async def __call__(self, cmd: str, **arguments: Any) -> dict[str, Any]:
        waiter: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.waiting.append(waiter)
        self.transport.write(json.dumps({"cmd": cmd, **arguments}).encode() + b"\n")  # type: ignore[union-attr]
        answer = await waiter
        if not answer.pop("ok"):
            raise AssertionError(f"browser: {cmd} failed: {answer['error']}")
        return answer


async def start_browser(case: TestCase) -> Driver:
    driver = Driver()
    reactor.spawnProcess(  # type: ignore[attr-defined]
        driver, NODE, [NODE, os.path.join(HERE, "browser", "drive.mjs"), PLAYWRIGHT, CHROMIUM],
        env={**os.environ}, path=HERE,
    )

    async def stop() -> None:
        if not driver.ended.called:
            try:
                await driver("quit")
            except AssertionError:
                pass
            await driver.ended

    case.addCleanup(lambda: defer.ensureDeferred(stop()))
    await driver.started
    return driver


def _agent_table(address: Any) -> dict[str, Any]:
    return {"url": f"ws://127.0.0.1:{address.port}/tunnel"}


class TerminalPageTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        missing = [name for name, there in (
            ("chromium (Debian package)", CHROMIUM), ("node", NODE),
            ("playwright-core (scripts/setup-tests)", os.path.isdir(PLAYWRIGHT)),
            ("xterm.js (scripts/setup)", os.path.isfile(XTERM)),
        ) if not there]
        if missing:
            raise SkipTest("needs " + ", ".join(missing))

    async def test_page(self) -> None:
        """
        The page asks for a token (operator credential), connects, renders
        `echo hi` and its `hi`; a viewport resize reaches the PTY (stty size);
        the agent's restart ends the session with agent_gone on the page and
        in the log; a closed page ends its session with browser_gone; the
        edge stopping ends a session with edge_stopping; no PTY child is left.
        """
        events = EventCollector(self)
        harness = await terminal_tunnel(
            self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"}, _agent_table
        )
        browser = await start_browser(self)
        base = f"http://127.0.0.1:{admin_port(harness)}/terminal/"
        page = (await browser("open", url=base, width=800, height=500))["page"]
        await browser("fill", page=page, fields={"#allocation": "node-a", "#credential": CREDENTIAL})
        await browser("click", page=page, selector="button[type=submit]")
        ready = await browser("waitState", page=page, state="ready", timeout=30000)
        await browser("type", page=page, text="echo hi\n")
        await browser("waitLine", page=page, line="hi", timeout=30000)

        # The viewport grows: the page fits the terminal to it and tells the PTY.
        await browser("resize", page=page, width=1200, height=800)
        await eventually(self._resized(browser, page, ready), "the page to refit")
        state = await browser("state", page=page)
        await browser("type", page=page, text="stty size\n")
        await browser("waitLine", page=page, line=f"{state['rows']} {state['cols']}", timeout=30000)

        # The agent restarts: the session ends, the page says agent_gone.
        agent = harness.agents[0]
        assert agent.terminal is not None
        [pty] = agent.terminal.sessions
        await agent.stopService()
        closed = await browser("waitState", page=page, state="closed", timeout=30000)
        self.assertIn(closed["reason"], ("agent_stopping", "agent_gone"))
        self.assertIn(closed["reason"], closed["status"])
        self.assertTrue(pty.ended)
        ptys = lambda: set(children_of(os.getpid())) - {browser.transport.pid}  # noqa: E731
        await eventually(lambda: not ptys(), "the PTY's child reaped")
        agent.startService()
        await eventually(
            lambda: harness.edge is not None and harness.edge.terminal is not None
            and harness.edge.terminal.agent_session("node-a") is not None, "the agent back",
        )

        # A page with a token in its address: connects at once; closing the page is browser_gone.
        token = await token_for(harness, "node-a")
        page2 = (await browser(
            "open", url=f"{base}#allocation=node-a&token={token}", width=800, height=500
        ))["page"]
        await browser("waitState", page=page2, state="ready", timeout=30000)
        await browser("close", page=page2)
        assert harness.edge is not None and harness.edge.terminal is not None
        bridge = harness.edge.terminal
        await eventually(lambda: not bridge.live, "the closed page's session to end")
        self.assertEqual(bridge.listing()[0]["reason"], "browser_gone")

        # The edge stops: the page says edge_stopping.
        token = await token_for(harness, "node-a")
        page3 = (await browser(
            "open", url=f"{base}#allocation=node-a&token={token}", width=800, height=500
        ))["page"]
        await browser("waitState", page=page3, state="ready", timeout=30000)
        await harness.edge.stopService()
        closed = await browser("waitState", page=page3, state="closed", timeout=30000)
        self.assertEqual(closed["reason"], "edge_stopping")
        self.assertIn("edge_stopping", closed["status"])
        await eventually(lambda: not agent.terminal.sessions, "the agent's PTY to end")  # type: ignore[union-attr]
        await eventually(lambda: not ptys(), "every child reaped")
        logged = [e["reason"] for e in events.matching(_CLOSED)]
        self.assertEqual(logged[-1], "edge_stopping")
        self.assertIn("browser_gone", logged)
        self.assertIn(logged[0], ("agent_stopping", "agent_gone"))
        await autobahn_timers_fired()

    def _resized(self, browser: Any, page: int, before: dict[str, Any]) -> Any:
        result: dict[str, Any] = {}

        def check() -> bool:
            d = defer.ensureDeferred(browser("state", page=page))
            d.addCallback(result.update)
            return bool(result) and (result["rows"], result["cols"]) != (
                before["rows"], before["cols"]
            )

        return check
