# -*- test-case-name: tests.test_terminal -*-
"""
Browser terminals on the edge: the session authority and the byte bridge.

An I{allocation} is an agent's terminal service, named by the agent's id
(the identity its certificate proves, or its C{[[agents]]} grant): it exists
while that agent is connected to this edge.  An operator holding an admin
credential (C{[edge.terminal] operators}) asks for a token for it; the token
is single-use, short-lived, bound to the allocation and to the operator,
and kept in the state backend (so any edge of a cluster can honour it).  A
browser presents it once on C{WS /ws/terminal/ID}; the edge then opens a
stream of kind C{"terminal"} on the agent's link and bridges the two:
WebSocket messages (L{tunneld.edge.terminal_web}) one side, terminal records
(L{tunneld.wire.terminal}) the other.  The bytes never touch the state
backend: it holds tokens and who owns an allocation's live session.

A session moves C{pending} (admitted, the agent starting the program) →
C{ready} (the program runs) → C{closed} with a reason from
L{tunneld.wire.terminal.CLOSE_REASONS}, logged and shown to the browser.
One live session per allocation: a second is refused (C{session_live}) or
replaces the first (C{replaced}), as configured.  Every queue is bounded:
output waiting for a browser pauses the agent's stream past half of
C{max_queued_bytes} and closes the session with C{saturated} past all of it,
or when the browser took nothing for C{stall_timeout}.  Input waits within
the agent stream's credit window: the stream pauses the browser's socket.
Sessions are not resumable.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from tunneld.config import EdgeTerminalSection
from tunneld.interfaces import IStateBackend, IStream, IStreamReceiver, StateUnavailable
from tunneld.model.messages import Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason
from tunneld.tls import certificate_identity
from tunneld.wire.terminal import (
    CLOSE_REASONS,
    Close,
    Heartbeat,
    Output,
    Ready,
    RecordError,
    RecordReader,
    Resize,
    encode,
    encode_output,
)

TOKENS = "terminal-token"
USED = "terminal-token-used"
OWNERS = "terminal-owner"
# How long a used or expired token is still recognised as such (not "unknown").
_REMEMBERED = 600.0


class Browser(Protocol):
    """What a session needs of the browser's connection (the WebSocket protocol)."""

    peer_name: str

    def send_json(self, message: dict[str, Any]) -> None: ...
    def send_bytes(self, data: bytes) -> None: ...
    def end(self, reason: str, message: str) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Refused(Exception):
    """A browser's session was not admitted; C{reason} is a close reason's name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Grant:
    """What a token stands for."""

    allocation: str
    identity: str


def token_key(token: str) -> str:
    """The state backend keeps a token's hash, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


@implementer(IStreamReceiver, IPushProducer)
class TerminalSession:
    """
    One browser terminal: the agent's stream on one side, the browser on
    the other.  As a push producer it is the stream's source (the
    browser's input): the stream pauses it when the agent grants no credit.
    """

    log = Logger()

    def __init__(
        self, bridge: TerminalBridge, allocation: str, identity: str, browser: Browser
    ) -> None:
        self.bridge = bridge
        self.id = uuid.uuid4().hex[:16]
        self.allocation = allocation
        self.identity = identity
        self.browser = browser
        self.state = "pending"
        self.reason = ""
        self.message = ""
        now = bridge.reactor.seconds()
        self.created = now
        self.ready_at: float | None = None
        self.closed_at: float | None = None
        self.agent_session = ""
        self.stream: IStream | None = None
        self.reader = RecordReader()
        self.to_browser = 0
        self.to_agent = 0
        # Output the browser's connection cannot take yet, and its size.
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.largest_queue = 0
        self.browser_paused = False  # its socket is full
        self.stream_paused = False  # we paused the agent's stream
        self.input_paused = False  # the stream paused the browser's input
        self.keep_owner = False  # replaced: the record is the new session's now
        self._stall: Any = None
        self._beat: Any = None
        self._heard_agent = now
        self._heard_browser = now
        self._opaque = 0

    # -- wiring --------------------------------------------------------------

    def open(self, link: Any, rows: int, cols: int) -> None:
        """Open the terminal stream on the agent's link."""
        head = StreamHead(
            kind="terminal", tunnel=self.allocation,
            headers=((b"rows", str(rows).encode()), (b"cols", str(cols).encode())),
            peer=self.browser.peer_name, scheme="ws",
        )
        self.stream = link.open_stream(head, self)
        self.stream.registerProducer(self, True)
        interval = self.bridge.settings.heartbeat_interval
        self._beat = self.bridge.reactor.callLater(interval, self._heartbeat)

    # -- from the browser ------------------------------------------------------

    def browser_bytes(self, data: bytes) -> None:
        """Keystrokes (a binary message)."""
        self._heard_browser = self.bridge.reactor.seconds()
        if self.state == "closed" or self.stream is None:
            return
        self.to_agent += len(data)
        self.stream.write(encode_output(data))

    def browser_message(self, message: dict[str, Any]) -> None:
        """A typed JSON message from the page."""
        self._heard_browser = self.bridge.reactor.seconds()
        kind = message.get("type")
        if self.state == "closed":
            return
        if kind == "resize":
            rows, cols = message.get("rows"), message.get("cols")
            if (
                isinstance(rows, int) and isinstance(cols, int)
                and 0 < rows <= 1000 and 0 < cols <= 1000
            ):
                if self.stream is not None:
                    self.stream.write(encode(Resize(rows, cols)))
                return
            self.browser.send_json({
                "type": "error", "reason": "protocol_error",
                "message": "resize needs rows and cols, integers from 1 to 1000",
            })
        elif kind == "close":
            self.close("browser_closed", str(message.get("message", "closed by the user"))[:200])
        elif kind == "heartbeat":
            pass
        else:
            self.browser.send_json({
                "type": "error", "reason": "protocol_error",
                "message": f"unknown message type {kind!r}",
            })

    def browser_lost(self, detail: str) -> None:
        self.close("browser_gone", detail)

    # The browser's socket as a consumer pauses and resumes us.
    def browser_full(self) -> None:
        self.browser_paused = True
        if self.queued and self._stall is None and self.state != "closed":
            self._arm_stall()

    def browser_drained(self) -> None:
        self.browser_paused = False
        self._cancel_stall()
        while self.queue and not self.browser_paused:
            data = self.queue.popleft()
            self.queued -= len(data)
            self.browser.send_bytes(data)
        if self.queued and self.browser_paused:
            self._arm_stall()
        if self.stream_paused and self.queued <= self.bridge.settings.max_queued_bytes // 4:
            self.stream_paused = False
            if self.stream is not None:
                self.stream.resumeProducing()

    # -- IPushProducer: the browser's input, paused by the agent's stream -------

    def pauseProducing(self) -> None:  # noqa: N802
        if not self.input_paused:
            self.input_paused = True
            self.browser.pause_reading()

    def resumeProducing(self) -> None:  # noqa: N802
        if self.input_paused:
            self.input_paused = False
            self.browser.resume_reading()

    def stopProducing(self) -> None:  # noqa: N802
        self.close("agent_gone", "the agent's stream stopped")

    # -- IStreamReceiver: the agent's stream ------------------------------------

    def reply_received(self, reply: ReplyHead) -> None:
        self.close("protocol_error", "a terminal stream got an HTTP reply")

    def data_received(self, data: bytes) -> None:
        self._heard_agent = self.bridge.reactor.seconds()
        try:
            records = self.reader.feed(bytes(data))
        except RecordError as e:
            self.close("protocol_error", str(e))
            return
        for record in records:
            if self.state == "closed":
                return
            if isinstance(record, Output):
                self._to_browser(record.data)
            elif isinstance(record, Ready):
                self._ready(record.detail)
            elif isinstance(record, Close):
                reason = record.reason if record.reason in CLOSE_REASONS else "protocol_error"
                self.close(reason, record.message, from_agent=True)
            elif isinstance(record, Heartbeat):
                if not record.reply and self.stream is not None:
                    self.stream.write(encode(Heartbeat(record.opaque, reply=True)))
            else:
                self.close("protocol_error", f"the agent sent {type(record).__name__}")

    def end_received(self, trailers: Headers) -> None:
        self.close("agent_gone", "the agent ended the terminal stream", from_agent=True)

    def reset_received(self, reason: Reason, message: str) -> None:
        self.stream = None
        name = {
            Reason.SATURATED: "saturated",
            Reason.PROTOCOL_ERROR: "protocol_error",
        }.get(reason, "agent_gone")
        self.close(name, f"{reason.value}: {message}", from_agent=True)

    # -- the bridge ---------------------------------------------------------------

    def _ready(self, detail: str) -> None:
        if self.state != "pending":
            return
        self.state = "ready"
        self.ready_at = self.bridge.reactor.seconds()
        self.log.info(
            "terminal session {session} for {allocation} ready (operator {identity}, "
            "browser {peer}, agent {detail})",
            session=self.id, allocation=self.allocation, identity=self.identity,
            peer=self.browser.peer_name, detail=detail,
        )
        self.browser.send_json({"type": "ready", "session": self.id, "allocation": self.allocation})

    def _to_browser(self, data: bytes) -> None:
        self.to_browser += len(data)
        if not self.browser_paused and not self.queue:
            self.browser.send_bytes(data)
            return
        limit = self.bridge.settings.max_queued_bytes
        if self.queued + len(data) > limit:
            self.saturated(
                f"{self.queued} bytes of output waiting for the browser and {len(data)} more "
                f"coming (max {limit})"
            )
            return
        self.queue.append(data)
        self.queued += len(data)
        self.largest_queue = max(self.largest_queue, self.queued)
        if self.queued > limit // 2 and not self.stream_paused and self.stream is not None:
            self.stream_paused = True
            self.stream.pauseProducing()
        if self._stall is None and self.browser_paused:
            self._arm_stall()

    def _arm_stall(self) -> None:
        self._stall = self.bridge.reactor.callLater(
            self.bridge.settings.stall_timeout, self._stalled
        )

    def _cancel_stall(self) -> None:
        stall, self._stall = self._stall, None
        if stall is not None and stall.active():
            stall.cancel()

    def _stalled(self) -> None:
        self._stall = None
        self.saturated(
            f"the browser took nothing for {self.bridge.settings.stall_timeout:g}s with "
            f"{self.queued} bytes of output waiting"
        )

    def saturated(self, message: str) -> None:
        self.log.warn(
            "terminal session {session} for {allocation} saturated: {message} "
            "(queue {queued} bytes, largest {largest} bytes)",
            session=self.id, allocation=self.allocation, message=message,
            queued=self.queued, largest=self.largest_queue,
        )
        self.close("saturated", message)

    def _heartbeat(self) -> None:
        self._beat = None
        if self.state == "closed":
            return
        bridge = self.bridge
        interval = bridge.settings.heartbeat_interval
        now = bridge.reactor.seconds()
        if now - self._heard_agent > 3 * interval:
            self.close("agent_silent", f"nothing from the agent for {now - self._heard_agent:.0f}s")
            return
        if now - self._heard_browser > 3 * interval and not self.browser_paused:
            self.close(
                "browser_silent", f"nothing from the browser for {now - self._heard_browser:.0f}s"
            )
            return
        self._opaque += 1
        if self.stream is not None:
            self.stream.write(encode(Heartbeat(self._opaque)))
        self.browser.send_json({"type": "heartbeat"})
        bridge.refresh_owner(self)
        self._beat = bridge.reactor.callLater(interval, self._heartbeat)

    def close(self, reason: str, message: str, from_agent: bool = False) -> None:
        """End the session for C{reason}: the agent, the browser and the log are told."""
        if self.state == "closed":
            return
        was = self.state
        self.state = "closed"
        self.reason = reason
        self.message = message
        self.closed_at = self.bridge.reactor.seconds()
        self._cancel_stall()
        beat, self._beat = self._beat, None
        if beat is not None and beat.active():
            beat.cancel()
        stream, self.stream = self.stream, None
        if stream is not None:
            # Our direction ends (the agent's ends after its child is reaped);
            # a reset stream is gone already (self.stream is None then).
            stream.unregisterProducer()
            if not from_agent:
                stream.write(encode(Close(reason, message)))
            stream.end()
        self.queue.clear()
        self.queued = 0
        self.log.info(
            "terminal session {session} for {allocation} closed ({reason}: {message}); "
            "was {was}, {to_browser} bytes to the browser, {to_agent} to the agent",
            session=self.id, allocation=self.allocation, reason=reason, message=message,
            was=was, to_browser=self.to_browser, to_agent=self.to_agent,
        )
        self.browser.end(reason, message)
        self.bridge.closed(self)

    def describe(self) -> dict[str, Any]:
        """The session as the admin API lists it."""
        return {
            "session": self.id,
            "allocation": self.allocation,
            "identity": self.identity,
            "state": self.state,
            "reason": self.reason or None,
            "message": self.message or None,
            "browser": self.browser.peer_name,
            "agent_session": self.agent_session,
            "created": self.created,
            "ready_at": self.ready_at,
            "closed_at": self.closed_at,
            "bytes_to_browser": self.to_browser,
            "bytes_to_agent": self.to_agent,
            "queued_bytes": self.queued,
        }


class TerminalBridge(Service):
    """The edge's terminal sessions: tokens, admission, one live session per allocation."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        settings: EdgeTerminalSection,
        sessions: Any,
        state: IStateBackend,
        edge_name: Callable[[], str] = lambda: "",
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.sessions = sessions  # the edge's AgentSessions
        self.state = state
        self.edge_name = edge_name
        self.live: dict[str, TerminalSession] = {}
        self.by_id: dict[str, TerminalSession] = {}
        self.history: deque[TerminalSession] = deque(maxlen=settings.closed_kept or None)
        if not settings.closed_kept:
            self.history = deque(maxlen=0)
        self.refusals: dict[str, int] = {}

    # -- the authority ----------------------------------------------------------

    def operator(self, authorization: bytes | None) -> str | None:
        """The operator an C{Authorization: Bearer} header proves, or None."""
        if not authorization or not authorization.lower().startswith(b"bearer "):
            return None
        offered = authorization[7:].strip()
        found = None
        for name, token in self.settings.operators.items():
            # Every credential compared, in constant time each.
            if secrets.compare_digest(token.encode(), offered):
                found = name
        return found

    def agent_session(self, allocation: str) -> Any:
        """The usable agent session serving C{allocation} on this edge, or None."""
        for session in self.sessions.sessions.values():
            if session.agent_id == allocation and not session.draining:
                return session
        return None

    def allocations(self) -> list[dict[str, Any]]:
        out = []
        for session in self.sessions.sessions.values():
            live = self.live.get(session.agent_id)
            out.append({
                "allocation": session.agent_id,
                "agent_session": session.session_id,
                "transport": session.link.transport_name,
                "terminal": None if live is None else live.describe(),
            })
        out.sort(key=lambda a: (a["allocation"], a["agent_session"]))
        return out

    async def issue(self, allocation: str, identity: str) -> tuple[str, float]:
        """A new token for C{allocation}, bound to C{identity}: (token, seconds it lives)."""
        token = secrets.token_urlsafe(24)
        ttl = self.settings.token_ttl
        value = json.dumps({
            "allocation": allocation, "identity": identity,
            "expires_at": self.reactor.seconds() + ttl,
        }).encode()
        await self.state.put_record(TOKENS, token_key(token), value, ttl + _REMEMBERED)
        self.log.info(
            "terminal token issued for {allocation} to operator {identity} ({ttl:g}s)",
            allocation=allocation, identity=identity, ttl=ttl,
        )
        return token, ttl

    async def redeem(self, allocation: str, token: str) -> Grant:
        """Use C{token} for C{allocation} once, or L{Refused} saying why not."""
        if not token:
            raise Refused("token_missing", "no token in the URL (?token=…)")
        key = token_key(token)
        try:
            raw = await self.state.take_record(TOKENS, key)
            if raw is None:
                used = await self.state.get_record(USED, key)
                if used is not None:
                    raise Refused("token_reused", f"this token was used already ({used.decode()})")
                raise Refused("token_unknown", "no such token (never issued, or long expired)")
            grant = json.loads(raw)
            await self.state.put_record(
                USED, key, f"for {grant['allocation']}".encode(), _REMEMBERED
            )
        except StateUnavailable as e:
            raise Refused("token_unknown", f"the state backend cannot be asked: {e}") from None
        late = self.reactor.seconds() - float(grant["expires_at"])
        if late > 0:
            raise Refused("token_expired", f"the token expired {late:.1f}s before it was used")
        if grant["allocation"] != allocation:
            raise Refused(
                "token_other_allocation",
                f"the token is for allocation {grant['allocation']!r}, not {allocation!r}",
            )
        return Grant(allocation, str(grant["identity"]))

    async def admit(
        self, allocation: str, token: str, browser: Browser, rows: int, cols: int,
        still_there: Callable[[], bool],
    ) -> TerminalSession:
        """Redeem the token, take the allocation, open the agent's stream: a pending session."""
        try:
            grant = await self.redeem(allocation, token)
            if not still_there():
                raise Refused("browser_gone", "the browser left while its token was checked")
            agent = self.agent_session(allocation)
            if agent is None:
                raise Refused("agent_unavailable", f"no agent {allocation!r} is connected here")
            certificate = getattr(agent.link, "peer_certificate", None)
            if certificate is not None and not certificate_identity(certificate).is_agent(
                allocation
            ):
                raise Refused(
                    "agent_identity",
                    f"the connected agent's certificate is not for {allocation!r}",
                )
            session = TerminalSession(self, allocation, grant.identity, browser)
            await self._take(session)
            if not still_there():
                self.release(session)
                raise Refused("browser_gone", "the browser left while the session was admitted")
            agent = self.agent_session(allocation)
            if agent is None:
                self.release(session)
                raise Refused("agent_unavailable", f"agent {allocation!r} left meanwhile")
        except Refused as refused:
            self.refusals[refused.reason] = self.refusals.get(refused.reason, 0) + 1
            self.log.warn(
                "terminal session for {allocation} from {peer} refused ({reason}: {message})",
                allocation=allocation, peer=browser.peer_name, reason=refused.reason,
                message=refused.message,
            )
            raise
        session.agent_session = agent.session_id
        self.live[allocation] = session
        self.by_id[session.id] = session
        self.log.info(
            "terminal session {session} for {allocation} pending (operator {identity}, "
            "browser {peer}, agent session {agent})",
            session=session.id, allocation=allocation, identity=grant.identity,
            peer=browser.peer_name, agent=agent.session_id,
        )
        session.open(agent.link, rows, cols)
        return session

    def _owner_ttl(self) -> float:
        return 3 * self.settings.heartbeat_interval

    async def _take(self, session: TerminalSession) -> None:
        """Make C{session} the allocation's one live session, as configured, or L{Refused}."""
        allocation = session.allocation
        current = self.live.get(allocation)
        replace = self.settings.second_session == "replace"
        if current is not None and not replace:
            raise Refused("session_live", f"session {current.id} is live for {allocation!r}")
        owner = json.dumps({"session": session.id, "edge": self.edge_name()}).encode()
        try:
            taken = await self.state.put_record(
                OWNERS, allocation, owner, self._owner_ttl(), only_if_absent=True
            )
            if taken:
                return
            raw = await self.state.get_record(OWNERS, allocation)
            holder = json.loads(raw)["session"] if raw else None
            current = self.by_id.get(holder) if holder else None
            if raw is not None and current is None:
                raise Refused(
                    "session_live",
                    f"another edge holds a live session for {allocation!r}",
                )
            if current is not None and not replace:
                raise Refused("session_live", f"session {current.id} is live for {allocation!r}")
            if current is not None:
                current.keep_owner = True
                current.close("replaced", f"replaced by session {session.id}")
            await self.state.put_record(OWNERS, allocation, owner, self._owner_ttl())
        except StateUnavailable as e:
            # The live sessions of this edge are still known: decide by them alone.
            self.log.warn(
                "terminal session for {allocation}: state backend unavailable ({error}); "
                "deciding by this edge's sessions", allocation=allocation, error=str(e),
            )
            current = self.live.get(allocation)
            if current is not None:
                if not replace:
                    raise Refused("session_live", f"session {current.id} is live") from None
                current.close("replaced", f"replaced by session {session.id}")

    def refresh_owner(self, session: TerminalSession) -> None:
        owner = json.dumps({"session": session.id, "edge": self.edge_name()}).encode()
        d = self.state.put_record(OWNERS, session.allocation, owner, self._owner_ttl())
        d.addErrback(lambda f: None)  # refreshed again at the next heartbeat

    def release(self, session: TerminalSession) -> None:
        """Give up C{session}'s claim on its allocation (in the backend, if it still holds it)."""
        if session.keep_owner:
            return

        def drop(raw: bytes | None) -> Any:
            if raw is not None and json.loads(raw).get("session") == session.id:
                return self.state.delete_record(OWNERS, session.allocation)
            return None

        d = self.state.get_record(OWNERS, session.allocation)
        d.addCallback(drop)
        d.addErrback(lambda f: None)  # the record's TTL ends it

    def closed(self, session: TerminalSession) -> None:
        """A session ended: it is no longer live; the admin API keeps it a while."""
        if self.live.get(session.allocation) is session:
            del self.live[session.allocation]
        self.by_id.pop(session.id, None)
        self.history.appendleft(session)
        self.release(session)

    def listing(self) -> list[dict[str, Any]]:
        live = sorted(self.live.values(), key=lambda s: s.created)
        return [s.describe() for s in live] + [s.describe() for s in self.history]

    def shutdown(self, reason: str, message: str) -> int:
        """Close every live session for C{reason} (the edge stopping); how many."""
        sessions = list(self.live.values())
        for session in sessions:
            session.close(reason, message)
        return len(sessions)

    def stopService(self) -> Any:  # noqa: N802
        self.shutdown("edge_stopping", "the edge is stopping")
        return super().stopService()
