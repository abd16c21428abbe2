"""
What the terminal tests share: an edge and agent with terminals on, tokens
asked for over the admin API, and a WebSocket client speaking the page's
protocol (typed JSON text messages, binary bytes).
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from tests.harness import TunnelHarness, eventually, listen_upstream
from tunneld.config import AgentTerminal, EdgeTerminalSection

OPERATOR = "alice"
CREDENTIAL = "alice-credential-0123456789"
# A quiet, predictable shell for tests: no rc files, a prompt that is easy to tell apart.
SHELL = ["/bin/sh"]
SHELL_ENV = {"PS1": "$ ", "ENV": ""}


def edge_terminal(**settings: Any) -> EdgeTerminalSection:
    settings.setdefault("enabled", True)
    settings.setdefault("operators", {OPERATOR: CREDENTIAL})
    return EdgeTerminalSection(**settings)


def agent_terminal(**settings: Any) -> AgentTerminal:
    settings.setdefault("enabled", True)
    settings.setdefault("command", SHELL)
    settings.setdefault("environment", SHELL_ENV)
    return AgentTerminal(**settings)


async def terminal_tunnel(
    case: Any, transport: str, edge_table: dict[str, Any], agent_table: Any,
    edge: EdgeTerminalSection | None = None, agent: AgentTerminal | None = None,
    agent_id: str = "node-a", agent_settings: dict[str, Any] | None = None,
    **edge_settings: Any,
) -> TunnelHarness:
    """An edge with terminals on and one agent (C{agent_id}) offering one."""
    harness = TunnelHarness(case, transport, edge_table)
    await harness.start_edge(terminal=edge or edge_terminal(), **edge_settings)
    port, _ = await listen_upstream(case)
    await harness.start_agent(
        agent_table(harness.link_address()), [("app.test", port)], agent_id=agent_id,
        terminal=agent or agent_terminal(), **(agent_settings or {}),
    )
    return harness


def admin_port(harness: TunnelHarness) -> int:
    assert harness.edge is not None and harness.edge.observe.admin is not None
    return harness.edge.observe.admin.address.port  # type: ignore[no-any-return]


async def admin(
    harness: TunnelHarness, method: bytes, path: str, credential: str | None = CREDENTIAL
) -> tuple[int, Any]:
    """One admin API request: its status and JSON body."""
    headers = Headers({b"host": [b"127.0.0.1"]})
    if credential is not None:
        headers.addRawHeader(b"authorization", b"Bearer " + credential.encode())
    url = f"http://127.0.0.1:{admin_port(harness)}{path}".encode()
    response = await harness.client.request(method, url, headers)
    body = await readBody(response)
    return response.code, json.loads(body)


async def token_for(harness: TunnelHarness, allocation: str) -> str:
    code, body = await admin(harness, b"POST", f"/api/v1/allocations/{allocation}/terminal-token")
    assert code == 201, (code, body)
    return str(body["token"])


class TerminalClient(WebSocketClientProtocol):  # type: ignore[misc]
    """The page's protocol, recorded: output bytes, JSON messages, the close."""

    def __init__(self) -> None:
        super().__init__()
        self.output = bytearray()
        self.messages: list[dict[str, Any]] = []
        self.closed: defer.Deferred[tuple[bool, int | None, str | None]] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.answer_heartbeats = True

    def onOpen(self) -> None:  # noqa: N802
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        if isBinary:
            self.output += payload
            return
        message = json.loads(payload)
        self.messages.append(message)
        if message.get("type") == "heartbeat" and self.answer_heartbeats:
            self.send_json({"type": "heartbeat"})

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        super().connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(None)

    def send_json(self, message: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(message).encode(), isBinary=False)

    def type(self, text: str) -> None:
        self.sendMessage(text.encode(), isBinary=True)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    async def ready(self) -> dict[str, Any]:
        await eventually(lambda: self.of_type("ready") or self.of_type("close"), "ready or close")
        if not self.of_type("ready"):
            raise AssertionError(f"closed instead of ready: {self.of_type('close')}")
        return self.of_type("ready")[0]

    async def close_message(self) -> dict[str, Any]:
        await eventually(lambda: self.of_type("close"), "a close message")
        return self.of_type("close")[0]

    async def sees(self, text: bytes, timeout: float = 30.0) -> None:
        await eventually(lambda: text in self.output, f"{text!r} in the output", timeout=timeout)


async def connect_terminal(
    case: Any, harness: TunnelHarness | None, allocation: str, token: str | None,
    rows: int = 24, cols: int = 80, port: int = 0,
) -> TerminalClient:
    """
    A browser-like WebSocket to the edge's terminal (on the admin listener of
    C{harness}'s edge, or on C{port}); open when this returns.
    """
    if not port:
        assert harness is not None
        port = admin_port(harness)
    query = f"?rows={rows}&cols={cols}" + (f"&token={token}" if token is not None else "")
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws/terminal/{allocation}{query}")
    factory.protocol = TerminalClient
    factory.opened = defer.Deferred()
    client: TerminalClient = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)

    async def cleanup() -> None:
        if client.transport is not None and not client.lost.called:
            client.transport.abortConnection()
        await client.lost
        await autobahn_timers_fired()

    case.addCleanup(lambda: defer.ensureDeferred(cleanup()))
    await factory.opened
    return client


async def autobahn_timers_fired() -> None:
    """
    Autobahn batches its handshake timers: a cancelled one stays in the
    reactor until its batch is due.  Wait for them (the reactor is then clean).
    """

    def pending() -> bool:
        return any(
            "_notify_bucket" in getattr(call.func, "__qualname__", "")
            for call in reactor.getDelayedCalls()  # type: ignore[attr-defined]
        )

    await eventually(lambda: not pending(), "Autobahn's batched timers", timeout=20)


def children_of(pid: int) -> list[int]:
    """Processes whose parent is C{pid} (Linux /proc)."""
    import os

    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(name))
    return found
