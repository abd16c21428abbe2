# -*- test-case-name: tests.test_terminal -*-
"""
The browser's side of the edge's terminals, on the admin listener:

    POST /api/v1/allocations/ID/terminal-token   a single-use token (admin credential)
    GET  /api/v1/allocations                     allocations here and their live sessions
    GET  /api/v1/terminal/sessions               sessions: pending, ready, closed (reason)
    GET  /terminal/                              the page (xterm.js, installed by scripts/setup)
    WS   /ws/terminal/ID?token=…&rows=…&cols=…   the session

The WebSocket speaks typed JSON text messages (C{ready}, C{resize},
C{close} with a reason, C{error}, C{heartbeat}) and binary messages for the
terminal's bytes.  A refused or ended session gets a C{close} message with
the reason and its explanation, then a WebSocket Close whose reason text is
the reason's name.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, cast
from urllib.parse import quote, urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tunneld.edge.terminal import Refused, TerminalBridge, TerminalSession
from tunneld.wire.terminal import CLOSE_REASONS

PAGE_DIR = os.path.join(os.path.dirname(__file__), "terminal_page")
PAGE_FILES = {"index.html", "terminal.js", "terminal.css"}
XTERM_FILES = {"xterm.js", "xterm.css", "addon-fit.js"}
_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
          ".css": b"text/css; charset=utf-8"}
# The page loads only what the edge serves, and talks only to the edge.
_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    b"connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'"
)

# WebSocket close codes (an application may use 1000 and 4000-4999).
_NORMAL = {"exited", "browser_closed"}
_GOING = {"edge_stopping", "agent_stopping", "replaced"}
_POLICY = {
    "token_missing", "token_unknown", "token_reused", "token_expired",
    "token_other_allocation", "agent_identity",
}
_LATER = {"saturated", "session_live", "agent_busy", "agent_unavailable", "agent_gone"}


def close_code(reason: str) -> int:
    """The WebSocket close code a session's end is sent with."""
    if reason in _NORMAL:
        return 1000
    if reason in _GOING:
        return 4001
    if reason in _POLICY:
        return 4008
    if reason in _LATER:
        return 4013
    return 4011


def default_assets() -> str:
    """Where scripts/setup installs xterm.js: under the running Python environment."""
    return os.path.join(sys.prefix, "share", "tunneld", "xterm")


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


@implementer(IPushProducer)
class _SocketDrain:
    """The browser socket's producer hook: a full socket pauses the session's output."""

    def __init__(self, socket: TerminalSocket) -> None:
        self.socket = socket

    def pauseProducing(self) -> None:  # noqa: N802
        self.socket.full = True
        if self.socket.session is not None:
            self.socket.session.browser_full()

    def resumeProducing(self) -> None:  # noqa: N802
        self.socket.full = False
        if self.socket.session is not None:
            self.socket.session.browser_drained()

    def stopProducing(self) -> None:  # noqa: N802
        pass


class TerminalSocket(WebSocketServerProtocol):
    """One browser's WebSocket: admitted by its token, then bridged to the agent."""

    # Not `log`: Autobahn's own logger (level-filtered) must stay in place, or
    # each frame's debug line reaches the log (see tunneld/transports/websocket.py).
    _log = Logger()
    factory: TerminalSocketFactory

    def __init__(self) -> None:
        super().__init__()
        self.session: TerminalSession | None = None
        self.allocation = ""
        self.token = ""
        self.rows = 24
        self.cols = 80
        self.peer_name = ""
        self.full = False
        self.gone = False
        self.ended = False

    def onConnect(self, request: Any) -> None:  # noqa: N802
        path = request.path
        prefix = "/ws/terminal/"
        if not path.startswith(prefix) or not path[len(prefix):] or "/" in path[len(prefix):]:
            raise ConnectionDeny(404, "WS /ws/terminal/ALLOCATION?token=TOKEN")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin and origin != "null" and urlsplit(origin).netloc != host:
            raise ConnectionDeny(403, "a page from another origin may not open terminals")
        self.allocation = path[len(prefix):]
        params = request.params
        self.token = (params.get("token") or [""])[0]
        try:
            self.rows = max(1, min(int((params.get("rows") or ["24"])[0]), 1000))
            self.cols = max(1, min(int((params.get("cols") or ["80"])[0]), 1000))
        except ValueError:
            pass
        self.peer_name = str(request.peer)

    def onOpen(self) -> None:  # noqa: N802
        transport: Any = self.transport
        # Twisted Web's channel was this socket's producer until the switch.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(_SocketDrain(self), True)
        d = ensureDeferred(self.factory.bridge.admit(
            self.allocation, self.token, self, self.rows, self.cols, lambda: not self.gone
        ))
        d.addCallbacks(self._admitted, self._refused)

    def _admitted(self, session: TerminalSession) -> None:
        self.session = session
        if self.full:
            session.browser_full()
        if self.gone:
            session.browser_lost("the WebSocket closed during admission")

    def _refused(self, failure: Failure) -> None:
        if failure.check(Refused):
            refused: Refused = failure.value  # type: ignore[assignment]
            self.end(refused.reason, refused.message)
            return
        self._log.failure("terminal admission failed", failure)
        self.end("protocol_error", "the edge could not admit the session")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        session = self.session
        if isBinary:
            if session is not None:
                session.browser_bytes(payload)
            return
        try:
            message = json.loads(payload)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self.send_json({"type": "error", "reason": "protocol_error",
                            "message": f"not a JSON object: {e}"})
            return
        if session is not None:
            session.browser_message(message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        self.gone = True
        if self.session is not None:
            self.session.browser_lost(
                f"the WebSocket closed (code {code}{', ' + reason if reason else ''})"
            )

    # -- the session's view of the browser ---------------------------------------

    def send_json(self, message: dict[str, Any]) -> None:
        if not self.gone and not self.ended:
            self.sendMessage(json.dumps(message).encode(), isBinary=False)

    def send_bytes(self, data: bytes) -> None:
        if not self.gone and not self.ended:
            self.sendMessage(data, isBinary=True)

    def end(self, reason: str, message: str) -> None:
        if self.gone or self.ended:
            return
        self.send_json({
            "type": "close", "reason": reason, "message": message,
            "explanation": CLOSE_REASONS.get(reason, ""),
        })
        self.ended = True
        self.sendClose(close_code(reason), reason)

    def pause_reading(self) -> None:
        if not self.gone:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if not self.gone:
            self.transport.resumeProducing()  # type: ignore[union-attr]


class TerminalSocketFactory(WebSocketServerFactory):
    protocol = TerminalSocket  # type: ignore[assignment]

    def __init__(self, bridge: TerminalBridge) -> None:
        super().__init__()
        self.bridge = bridge
        size = bridge.settings.max_message_bytes
        self.setProtocolOptions(
            maxFramePayloadSize=size,
            maxMessagePayloadSize=size,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=2,
            autoFragmentSize=0,
            tcpNoDelay=True,
        )


class TokenAPI(resource.Resource):
    """C{/api/v1}: tokens, allocations, sessions."""

    def __init__(self, bridge: TerminalBridge) -> None:
        super().__init__()
        self.bridge = bridge
        self.putChild(b"allocations", _Allocations(bridge))
        terminal = resource.Resource()
        terminal.putChild(b"sessions", _Sessions(bridge))
        self.putChild(b"terminal", terminal)


class _Sessions(resource.Resource):
    isLeaf = True

    def __init__(self, bridge: TerminalBridge) -> None:
        super().__init__()
        self.bridge = bridge

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        return _json(request, 200, {
            "sessions": self.bridge.listing(), "refusals": dict(self.bridge.refusals),
        })


class _Allocations(resource.Resource):
    isLeaf = True

    def __init__(self, bridge: TerminalBridge) -> None:
        super().__init__()
        self.bridge = bridge

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        if request.postpath and request.postpath != [b""]:
            return _json(request, 404, {"error": "not found"})
        return _json(request, 200, {"allocations": self.bridge.allocations()})

    def render_POST(self, request: Request) -> Any:  # noqa: N802
        path = request.postpath or []
        if len(path) != 2 or path[1] != b"terminal-token" or not path[0]:
            return _json(request, 404, {"error": "POST /api/v1/allocations/ID/terminal-token"})
        identity = self.bridge.operator(request.getHeader(b"authorization"))
        if identity is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="tunneld terminal"')
            return _json(request, 401, {
                "error": "unauthorized",
                "message": "an operator's credential is needed: Authorization: Bearer TOKEN",
            })
        allocation = path[0].decode("utf-8", "replace")
        # One edge: the agent must be here.  Edges sharing a store: it may
        # be on another edge, which redeems the token (and checks then).
        if self.bridge.agent_session(allocation) is None and self.bridge.state.name == "memory":
            return _json(request, 404, {
                "error": "agent_unavailable",
                "message": f"no agent {allocation!r} is connected to this edge",
            })
        d = ensureDeferred(self.bridge.issue(allocation, identity))

        def issued(result: tuple[str, float]) -> None:
            token, ttl = result
            quoted = quote(allocation, safe="")
            body = _json(request, 201, {
                "token": token, "allocation": allocation, "identity": identity,
                "expires_in": ttl,
                "websocket": f"/ws/terminal/{quoted}?token={token}",
                "page": f"/terminal/#allocation={quoted}&token={token}",
            })
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            request.write(_json(request, 503, {
                "error": "state_unavailable", "message": failure.getErrorMessage(),
            }))
            request.finish()

        d.addCallbacks(issued, failed)
        return NOT_DONE_YET


class _Files(resource.Resource):
    """A few named files of one directory, with the page's security headers."""

    isLeaf = True

    def __init__(self, directory: str, names: set[str], index: str | None = None) -> None:
        super().__init__()
        self.directory = directory
        self.names = names
        self.index = index

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        parts = [p.decode("utf-8", "replace") for p in request.postpath or []]
        name = parts[0] if len(parts) == 1 else ""
        if not parts and self.index or name == "" and self.index and len(parts) <= 1:
            name = self.index
        if name not in self.names:
            request.setResponseCode(404)
            return b"not found\n"
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return (
                f"{name} is not installed in {self.directory} (scripts/setup installs "
                "xterm.js from npm)\n"
            ).encode()
        request.setHeader(b"content-type", _TYPES.get(os.path.splitext(name)[1], b"text/plain"))
        request.setHeader(b"content-security-policy", _CSP)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        return body


class _Page(resource.Resource):
    """C{/terminal/}: the page, and C{/terminal/xterm/…} from the assets directory."""

    def __init__(self, assets: str) -> None:
        super().__init__()
        self.page = _Files(PAGE_DIR, PAGE_FILES, index="index.html")
        self.xterm = _Files(assets, XTERM_FILES)

    def getChild(self, path: bytes, request: Request) -> resource.Resource:  # noqa: N802
        if path == b"xterm":
            return self.xterm
        cast(list[bytes], request.postpath).insert(0, path)
        return self.page

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        request.redirect(b"/terminal/")
        return b""


def terminal_mounts(bridge: TerminalBridge) -> dict[tuple[bytes, ...], resource.Resource]:
    """What the terminal adds to the admin site, by path."""
    assets = bridge.settings.assets or default_assets()
    if not os.path.isfile(os.path.join(assets, "xterm.js")):
        Logger().warn(
            "terminal page: xterm.js is not in {assets} (scripts/setup installs it); the "
            "page will say so", assets=assets,
        )
    ws = resource.Resource()
    ws.putChild(b"terminal", WebSocketResource(TerminalSocketFactory(bridge)))
    return {
        (b"api", b"v1"): TokenAPI(bridge),
        (b"terminal",): _Page(assets),
        (b"ws",): ws,
    }
