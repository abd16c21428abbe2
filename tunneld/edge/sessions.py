# -*- test-case-name: tests.test_end_to_end -*-
"""
Agent sessions on the edge: hello, authentication, registration, loss.

Every transport hands its new links to L{AgentSessions.link_connected}; from
there on the edge treats all links alike.  An agent gets C{hello_timeout}
seconds to say who it is; a bad hello closes the link with a reason that
names the failed check, and touches no other agent.
"""

from __future__ import annotations

import hmac
import ipaddress
import uuid
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from tunneld.config import AgentGrant, EdgeConfig
from tunneld.interfaces import IAgentLink, ILinkHandler, IStream
from tunneld.reasons import Reason
from tunneld.router import AgentSession, Router, hostname_allowed, tunnel_key
from tunneld.wire.messages import (
    PROTOCOL_VERSION,
    ControlMessage,
    GoAway,
    Hello,
    Refusal,
    TunnelSpec,
    Welcome,
)


class Unauthorized(Exception):
    """The agent could not prove who it is; the message names the failed check."""


def _is_loopback(peer: str) -> bool:
    host = peer.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@implementer(ILinkHandler)
class EdgeLinkHandler:
    """The edge's side of one agent link, from hello to loss."""

    log = Logger()

    def __init__(self, sessions: AgentSessions, link: IAgentLink) -> None:
        self.sessions = sessions
        self.link = link
        self.session: AgentSession | None = None
        self._hello_timer: Any = sessions.reactor.callLater(
            sessions.config.edge.hello_timeout, self._hello_timeout
        )

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        self.log.warn("agent link from {peer} sent no hello in time", peer=self.link.peer)
        self.link.close(Reason.PROTOCOL_ERROR, "no hello received in time")

    def control_received(self, message: ControlMessage) -> None:
        """ILinkHandler.control_received"""
        if isinstance(message, GoAway) and self.session is not None:
            # The agent is leaving (it closes the link next): its streams end
            # as agent_gone, not as a protocol error.
            self.log.info(
                "agent {agent} from {peer} is going away: {reason} ({message})",
                agent=self.session.agent_id, peer=self.link.peer,
                reason=message.reason.value, message=message.message,
            )
            self.link.close(Reason.AGENT_GONE, f"the agent went away ({message.reason.value})")
            return
        if not isinstance(message, Hello) or self.session is not None:
            self.link.close(Reason.PROTOCOL_ERROR, f"unexpected {type(message).__name__}")
            return
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self.sessions.hello(self, message)

    def stream_opened(self, stream: IStream) -> None:
        """ILinkHandler.stream_opened: agents may not open streams toward the edge."""
        stream.reset(Reason.PROTOCOL_ERROR, "agents may not open streams")

    def link_lost(self, reason: Reason, message: str) -> None:
        """ILinkHandler.link_lost"""
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self.sessions.lost(self, reason, message)


class AgentSessions:
    """Accepts agent links from every transport and keeps the router current."""

    log = Logger()

    def __init__(self, config: EdgeConfig, router: Router, reactor: Any) -> None:
        self.config = config
        self.router = router
        self.reactor = reactor
        self.sessions: dict[str, AgentSession] = {}
        self._grants = {grant.id: grant for grant in config.agents}
        for grant in config.agents:
            for pattern in grant.hostnames:
                router.reserve(pattern)

    def link_connected(self, link: IAgentLink) -> None:
        """A transport accepted a new agent link (the EdgeLinkSetup.on_link callback)."""
        self.log.info(
            "agent link up from {peer} over {transport}", peer=link.peer,
            transport=link.transport_name,
        )
        link.set_handler(EdgeLinkHandler(self, link))

    def _authorize(self, link: IAgentLink, hello: Hello) -> list[str] | None:
        """
        The hostname patterns this agent may register (None = any), or
        L{Unauthorized} naming the check that failed.
        """
        grant: AgentGrant | None = self._grants.get(hello.agent_id)
        if grant is None:
            if not self._grants and self.config.edge.open_loopback_registration:
                if _is_loopback(link.peer):
                    return None
                raise Unauthorized(
                    f"open registration is for loopback agents only, not {link.peer}"
                )
            raise Unauthorized(f"unknown agent id {hello.agent_id!r}")
        if not grant.token:
            raise Unauthorized(f"agent {grant.id!r} has no token configured")
        if not hmac.compare_digest(grant.token.encode(), hello.token.encode()):
            raise Unauthorized(f"wrong token for agent {grant.id!r}")
        return grant.hostnames

    def hello(self, handler: EdgeLinkHandler, hello: Hello) -> None:
        link = handler.link
        if hello.version < 1:
            self.log.warn("agent {agent} speaks unsupported protocol version {version}",
                          agent=hello.agent_id, version=hello.version)
            link.close(Reason.PROTOCOL_ERROR, f"unsupported protocol version {hello.version}")
            return
        try:
            allowed = self._authorize(link, hello)
        except Unauthorized as e:
            self.log.warn(
                "agent {agent} from {peer} refused: {check}",
                agent=hello.agent_id, peer=link.peer, check=str(e),
            )
            link.close(Reason.UNAUTHORIZED, str(e))
            return
        session = AgentSession(uuid.uuid4().hex, hello.agent_id, link)
        refused: list[Refusal] = []
        urls: list[str] = []
        for spec in hello.tunnels:
            problem = self._check_spec(spec, allowed)
            if problem is not None:
                refused.append(Refusal(spec, Reason.UNAUTHORIZED, problem))
                self.log.warn(
                    "agent {agent} may not register {tunnel}: {problem}",
                    agent=hello.agent_id, tunnel=tunnel_key(spec), problem=problem,
                )
                continue
            self.router.register(session, spec)
            urls.append(self._public_url(spec))
            self.log.info(
                "agent {agent} registered {tunnel} over {transport}",
                agent=hello.agent_id, tunnel=tunnel_key(spec), transport=link.transport_name,
            )
        handler.session = session
        self.sessions[session.session_id] = session
        link.send_control(
            Welcome(
                session_id=session.session_id,
                public_urls=tuple(urls),
                refused=tuple(refused),
                version=min(hello.version, PROTOCOL_VERSION),
                initial_window=self.config.edge.initial_window,
            )
        )

    def _check_spec(self, spec: TunnelSpec, allowed: list[str] | None) -> str | None:
        if spec.protocol != "http":
            return f"{spec.protocol} tunnels are not supported by this edge yet"
        host = spec.hostname.removeprefix("*.")
        if not host or "*" in host or "/" in host:
            return f"not a hostname: {spec.hostname!r}"
        if spec.path_prefix and not spec.path_prefix.startswith("/"):
            return f"path prefix must start with '/': {spec.path_prefix!r}"
        if allowed is not None and not hostname_allowed(spec.hostname, allowed):
            return f"hostname {spec.hostname} is not granted to this agent"
        return None

    def _public_url(self, spec: TunnelSpec) -> str:
        return self.config.edge.public_url.format(host=spec.hostname).rstrip("/") + (
            spec.path_prefix or "/"
        )

    def lost(self, handler: EdgeLinkHandler, reason: Reason, message: str) -> None:
        session = handler.session
        self.log.info(
            "agent link from {peer} down ({reason}: {message})",
            peer=handler.link.peer, reason=reason.value, message=message,
        )
        if session is None:
            return
        self.router.unregister(session)
        self.sessions.pop(session.session_id, None)
