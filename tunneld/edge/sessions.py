# -*- test-case-name: tests.test_websocket,tests.test_health,tests.test_identity -*-
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
import re
import uuid
from typing import Any, cast

from twisted.internet.defer import DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.config import AgentGrant, EdgeConfig
from tunneld.edge.cluster import reconnect_target
from tunneld.edge.relay import RELAY_PREFIX, RelayPeers
from tunneld.edge.tcp import TCPTunnels
from tunneld.interfaces import Claim, IAgentLink, ILinkHandler, IStream, StateUnavailable
from tunneld.model.keys import held_key, tunnel_key
from tunneld.model.messages import (
    PROTOCOL_VERSION,
    ControlMessage,
    GoAway,
    Health,
    Hello,
    Refusal,
    TunnelSpec,
    Welcome,
)
from tunneld.model.reasons import Reason
from tunneld.observe import events
from tunneld.observe.stats import EdgeStats
from tunneld.retire import Retirement
from tunneld.router import AgentSession, Router, hostname_allowed
from tunneld.state.membership import EdgeMembership
from tunneld.tls import AgentIdentity, certificate_identity


class Unauthorized(Exception):
    """The agent could not prove who it is; the message names the failed check."""


def _is_loopback(peer: str) -> bool:
    host = peer.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listens_on_loopback(listen: str) -> bool:
    """Whether an endpoint string listens on a loopback interface (or a unix socket)."""
    kind = listen.partition(":")[0]
    if kind in ("unix", "systemd"):
        return kind == "unix"
    found = re.search(r"interface=((?:\\:|[^:])*)", listen)
    if found is None:
        return False  # tcp without interface= listens on every address
    return _is_loopback(found.group(1).replace("\\:", ":") + ":0")


@implementer(ILinkHandler)
class EdgeLinkHandler:
    """The edge's side of one agent link, from hello to loss."""

    log = Logger()

    def __init__(self, sessions: AgentSessions, link: IAgentLink) -> None:
        self.sessions = sessions
        self.link = link
        self.session: AgentSession | None = None
        self.gone = False  # the link was lost (perhaps while its hello waited for the store)
        self.relay = False  # a relay link from another edge (tunneld.edge.relay), not an agent
        self._hello_timer: Any = sessions.reactor.callLater(
            sessions.config.edge.hello_timeout, self._hello_timeout
        )

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        self.log.warn("agent link from {peer} sent no hello in time", peer=self.link.peer)
        self.link.close(Reason.PROTOCOL_ERROR, "no hello received in time")

    def control_received(self, message: ControlMessage) -> None:
        """ILinkHandler.control_received"""
        if self.relay:
            if isinstance(message, GoAway) and self.sessions.relays is not None:
                self.sessions.relays.going_away(self.link)
            return
        if isinstance(message, Health) and self.session is not None:
            self.sessions.health(self.session, message)
            return
        if isinstance(message, GoAway) and self.session is not None:
            # The agent is leaving (stopping, or moving): no new streams for
            # it; those in flight finish, then its link closes.
            self.log.info(
                "agent {agent} is going away ({reason}: {message})",
                agent=self.session.agent_id, reason=message.reason.value,
                message=message.message,
            )
            self.sessions.retire(self.session, f"agent is going away: {message.message}")
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
        self.gone = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self.relay and self.sessions.relays is not None:
            self.sessions.relays.forget(self.link)
        self.sessions.lost(self, reason, message)


class AgentSessions:
    """Accepts agent links from every transport and keeps the router current."""

    log = Logger()

    def __init__(
        self, config: EdgeConfig, router: Router, reactor: Any,
        stats: EdgeStats | None = None, tcp: TCPTunnels | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.reactor = reactor
        self.stats = stats if stats is not None else EdgeStats(reactor)
        self.tcp = tcp
        self.sessions: dict[str, AgentSession] = {}
        self.connected_at: dict[str, float] = {}
        # Caps on agents; replaced as a whole on reload (SIGHUP).
        self.limits = config.limits
        self.draining = False
        # Drained sessions, closed once their last stream ends (see retire).
        self.retiring: dict[str, Retirement] = {}
        # This edge in the cluster registry (set by the edge service): the
        # tunnels its sessions hold, and their identities' hostname reservations.
        self.membership: EdgeMembership | None = None
        self.identities: dict[str, str] = {}  # session id -> the identity it proved
        self.holdings: dict[str, tuple[list[str], list[tuple[str, str]]]] = {}
        self._turn = 0  # drained agents take turns over the other edges
        # Relay links from the other edges (set by the edge service when it relays).
        self.relays: RelayPeers | None = None
        self._grants = {grant.id: grant for grant in config.agents}
        self._plaintext_public: set[str] = set()  # transports listening in the clear off loopback
        for grant in config.agents:
            for pattern in grant.hostnames:
                router.reserve(pattern)

    def listener_added(self, transport: str, listen: str, tls: Any) -> None:
        """
        A transport listens for agents on endpoint C{listen}; note (and warn
        about) a plaintext listener reachable off loopback, where tokens would
        cross the network in the clear.
        """
        if tls is not None or _listens_on_loopback(listen):
            return
        self._plaintext_public.add(transport)
        if self.config.edge.allow_token_on_plaintext:
            self.log.warn(
                "agent tokens are accepted in the clear on {transport} listener {listen} "
                "(allow_token_on_plaintext); use [edge.agent_tls] outside development",
                transport=transport, listen=listen,
            )
        else:
            self.log.warn(
                "{transport} listener {listen} is plaintext and not on loopback: token "
                "agents will be refused there (configure [edge.agent_tls])",
                transport=transport, listen=listen,
            )

    def link_connected(self, link: IAgentLink) -> None:
        """A transport accepted a new agent link (the EdgeLinkSetup.on_link callback)."""
        if self.draining:
            # A transport that cannot stop accepting (or a link that raced
            # the listener closing): turned away before any hello is read.
            self._refuse_draining(link, "?")
            return
        self.log.info(
            "agent link up from {peer} over {transport}", peer=link.peer,
            transport=link.transport_name,
        )
        link.set_handler(EdgeLinkHandler(self, link))

    def _refuse_draining(self, link: IAgentLink, agent: str) -> None:
        self.log.info(
            "agent link from {peer} over {transport} refused: the edge is draining",
            peer=link.peer, transport=link.transport_name,
        )
        self.stats.refused(
            Reason.DRAINING, kind="agent", peer=link.peer,
            message=f"agent {agent}: the edge is draining",
        )
        link.close(Reason.DRAINING, "the edge is shutting down")

    def _authorize_certificate(
        self, link: IAgentLink, hello: Hello
    ) -> tuple[AgentIdentity, list[str]]:
        """The identity a verified client certificate proves, and config grants on top."""
        certificate = link.peer_certificate
        if certificate is None:
            raise Unauthorized("no client certificate")
        try:
            identity = certificate_identity(certificate)
        except Exception as e:  # a certificate service_identity cannot read
            raise Unauthorized(f"unreadable client certificate: {e}") from None
        if identity.agent_id is None:
            raise Unauthorized("client certificate names no agent (no tunneld-agent:// URI or DNS SAN)")
        if not identity.is_agent(hello.agent_id):
            raise Unauthorized(
                f"hello claims agent {hello.agent_id!r} but the certificate is for "
                f"{identity.agent_id!r}"
            )
        grant = self._grants.get(identity.agent_id)
        return identity, list(grant.hostnames) if grant is not None else []

    def _authorize(
        self, link: IAgentLink, hello: Hello
    ) -> list[str] | tuple[AgentIdentity, list[str]] | None:
        """
        The hostname patterns this agent may register (None = any; with a
        client certificate, its identity plus the config's grant), or
        L{Unauthorized} naming the check that failed.
        """
        if getattr(link, "peer_certificate", None) is not None:
            return self._authorize_certificate(link, hello)
        if (
            link.transport_name in self._plaintext_public
            and not self.config.edge.allow_token_on_plaintext
        ):
            raise Unauthorized(
                "token authentication on a plaintext non-loopback listener is refused "
                "(use [edge.agent_tls], or set allow_token_on_plaintext)"
            )
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
        if hello.agent_id.startswith(RELAY_PREFIX):
            self._relay_hello(handler, hello)
            return
        if hello.version < 1:
            self.log.warn("agent {agent} speaks unsupported protocol version {version}",
                          agent=hello.agent_id, version=hello.version)
            self.stats.refused(
                Reason.PROTOCOL_ERROR, kind="agent", peer=link.peer,
                message=f"agent {hello.agent_id}: unsupported protocol version {hello.version}",
            )
            link.close(Reason.PROTOCOL_ERROR, f"unsupported protocol version {hello.version}")
            return
        try:
            allowed = self._authorize(link, hello)
        except Unauthorized as e:
            self.log.warn(
                "agent {agent} from {peer} refused: {check}",
                agent=hello.agent_id, peer=link.peer, check=str(e),
            )
            self.stats.refused(
                Reason.UNAUTHORIZED, kind="agent", peer=link.peer,
                message=f"agent {hello.agent_id}: {e}",
            )
            link.close(Reason.UNAUTHORIZED, str(e))
            return
        if self.draining:
            self._refuse_draining(link, hello.agent_id)
            return
        limits = self.limits
        if limits.max_agents and len(self.sessions) >= limits.max_agents:
            self.log.warn(
                "agent {agent} from {peer} refused: {reason} ({count} agent sessions)",
                agent=hello.agent_id, peer=link.peer, reason=Reason.CAP_REACHED.value,
                count=len(self.sessions),
            )
            link.close(Reason.CAP_REACHED, f"the edge has {len(self.sessions)} agent sessions")
            return
        session = AgentSession(uuid.uuid4().hex, hello.agent_id, link)
        refused: list[Refusal] = []
        accepted: list[TunnelSpec] = []
        for spec in hello.tunnels:
            problem = self._check_spec(spec, allowed)
            reason = Reason.UNAUTHORIZED
            if problem is None and limits.max_agents_per_tunnel and (
                self.router.serving(spec) >= limits.max_agents_per_tunnel
            ):
                reason = Reason.CAP_REACHED
                problem = f"{limits.max_agents_per_tunnel} agents serve it already"
            if problem is not None:
                self._refuse_tunnel(link, hello, spec, reason, problem, refused)
                continue
            accepted.append(spec)
        # The identity a hostname is reserved for: what the certificate proves,
        # else the agent id its token proves.  Open loopback registration
        # proves nothing (any id may be claimed), so it reserves nothing.
        identity = (allowed[0].agent_id if isinstance(allowed, tuple) else None) or hello.agent_id
        membership = self.membership
        if membership is None or not accepted or allowed is None:
            self._register(handler, hello, session, identity, accepted, [], refused)
            return
        names = sorted({spec.hostname.lower() for spec in accepted})
        claims = DeferredList(
            [membership.reserve(name, identity) for name in names], consumeErrors=True
        )
        claims.addCallback(self._claimed, handler, hello, session, identity, accepted, names, refused)
        claims.addErrback(lambda f: self.log.failure("registering agent {agent} failed", f,
                                                      agent=hello.agent_id))

    def _relay_hello(self, handler: EdgeLinkHandler, hello: Hello) -> None:
        """Another edge dials this one for relays (L{tunneld.edge.relay})."""
        link = handler.link
        relays = self.relays
        problem = (
            "this edge takes no relay links (no shared state backend, or [edge.state] relay "
            "is off)" if relays is None else relays.hello(link, hello)
        )
        if problem is None:
            handler.relay = True
            return
        self.log.warn("relay link from {peer} ({agent}) refused: {check}",
                      agent=hello.agent_id, peer=link.peer, check=problem)
        self.stats.refused(
            Reason.UNAUTHORIZED, kind="agent", peer=link.peer,
            message=f"relay {hello.agent_id}: {problem}",
        )
        link.close(Reason.UNAUTHORIZED, problem)

    def _refuse_tunnel(
        self, link: IAgentLink, hello: Hello, spec: TunnelSpec, reason: Reason, problem: str,
        refused: list[Refusal],
    ) -> None:
        refused.append(Refusal(spec, reason, problem))
        self.stats.refused(
            reason, kind="agent", host=spec.hostname,
            target=spec.path_prefix, peer=link.peer,
            message=f"agent {hello.agent_id}: {problem}",
        )
        self.log.warn(
            "agent {agent} may not register {tunnel}: {problem}",
            agent=hello.agent_id, tunnel=tunnel_key(spec), problem=problem,
        )

    def _claimed(
        self, results: list[tuple[bool, Any]], handler: EdgeLinkHandler, hello: Hello,
        session: AgentSession, identity: str, accepted: list[TunnelSpec], names: list[str],
        refused: list[Refusal],
    ) -> None:
        """The store answered the hostname claims of a hello: register what it granted."""
        membership = self.membership
        assert membership is not None
        granted: list[str] = []
        owners: dict[str, Claim] = {}
        for name, (ok, result) in zip(names, results, strict=True):
            if ok and isinstance(result, Claim):
                if result.granted:
                    granted.append(name)
                else:
                    owners[name] = result
                continue
            failure = cast(Failure, result)
            if not failure.check(StateUnavailable):
                self.log.failure("claiming hostname {name} failed", failure, name=name)
            # Degraded: the certificate (or grant) already allows the name; the
            # reservation is checked again once the store is back (next hello).
            self.log.warn(
                "hostname {name} registered for {identity} without checking its reservation: "
                "the state store cannot be asked ({why})",
                name=name, identity=identity, why=failure.getErrorMessage(),
            )
        if handler.gone or self.draining:
            for name in granted:
                membership.unreserve(name, identity)
            if not handler.gone:
                self._refuse_draining(handler.link, hello.agent_id)
            return
        kept: list[TunnelSpec] = []
        for spec in accepted:
            claim = owners.get(spec.hostname.lower())
            if claim is None:
                kept.append(spec)
                continue
            left = "" if claim.expires_in is None else f", for {claim.expires_in:.0f}s more"
            self.log.warn(
                "hostname {name} is reserved by agent identity {owner}{left}: refused to {identity}",
                name=spec.hostname, owner=claim.owner, left=left, identity=identity,
            )
            self._refuse_tunnel(
                handler.link, hello, spec, Reason.UNAUTHORIZED,
                f"hostname {spec.hostname} is reserved by another agent identity{left}",
                refused,
            )
        self._register(handler, hello, session, identity, kept, granted, refused)

    def _register(
        self, handler: EdgeLinkHandler, hello: Hello, session: AgentSession, identity: str,
        accepted: list[TunnelSpec], reserved: list[str], refused: list[Refusal],
    ) -> None:
        link = handler.link
        urls: list[str] = []
        held: list[str] = []
        for spec in accepted:
            if spec.protocol == "tcp":
                registered = cast(TCPTunnels, self.tcp).register(session, spec)
                if isinstance(registered, Refusal):
                    refused.append(registered)
                    self.log.warn(
                        "agent {agent} may not register {tunnel}: {problem}",
                        agent=hello.agent_id, tunnel=tunnel_key(spec), problem=registered.message,
                    )
                    continue
                urls.append(registered)
                held.append(held_key(spec, int(registered.rsplit(":", 1)[1])))
            else:
                self.router.register(session, spec)
                urls.append(self._public_url(spec))
                held.append(held_key(spec))
            self.log.info(
                "agent {agent} registered {tunnel} over {transport}",
                agent=hello.agent_id, tunnel=tunnel_key(spec), transport=link.transport_name,
            )
        handler.session = session
        self.sessions[session.session_id] = session
        self.connected_at[session.session_id] = self.reactor.seconds()
        self.identities[session.session_id] = identity
        if self.membership is not None:
            self.holdings[session.session_id] = (held, [(name, identity) for name in reserved])
            for key in held:
                self.membership.hold(key)
        self.stats.session_up(link.transport_name)
        link.send_control(
            Welcome(
                session_id=session.session_id,
                public_urls=tuple(urls),
                refused=tuple(refused),
                version=min(hello.version, PROTOCOL_VERSION),
                initial_window=self.config.edge.initial_window,
            )
        )

    def health(self, session: AgentSession, report: Health) -> None:
        """An agent's upstream probe changed its verdict on one of its tunnels."""
        if not any(tunnel_key(spec) == report.tunnel for spec in session.tunnels):
            return  # not a tunnel this session serves: nothing to route differently
        if report.healthy:
            session.unhealthy.discard(report.tunnel)
        else:
            session.unhealthy.add(report.tunnel)
        self.log.info(
            "agent {agent} reports {tunnel} {state}: {detail}",
            agent=session.agent_id, tunnel=report.tunnel,
            state="healthy" if report.healthy else "unhealthy", detail=report.detail,
        )

    def _check_spec(
        self, spec: TunnelSpec, allowed: list[str] | tuple[AgentIdentity, list[str]] | None
    ) -> str | None:
        if spec.protocol == "tcp" and self.tcp is None:
            return "tcp tunnels are not enabled on this edge"
        if spec.protocol == "tcp" and (spec.path_prefix or spec.hostname.startswith("*.")):
            return f"a tcp tunnel is named without wildcard or path: {tunnel_key(spec)!r}"
        if spec.protocol not in ("http", "tcp"):
            return f"{spec.protocol} tunnels are not supported by this edge"
        host = spec.hostname.removeprefix("*.")
        if not host or "*" in host or "/" in host:
            return f"not a hostname: {spec.hostname!r}"
        if spec.path_prefix and not spec.path_prefix.startswith("/"):
            return f"path prefix must start with '/': {spec.path_prefix!r}"
        if isinstance(allowed, tuple):
            identity, granted = allowed
            if not identity.permits(spec.hostname) and not hostname_allowed(spec.hostname, granted):
                return (
                    f"hostname {spec.hostname} is not in agent {identity.agent_id!r}'s "
                    "certificate or its [[agents]] grant"
                )
        elif allowed is not None and not hostname_allowed(spec.hostname, allowed):
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
        retirement = self.retiring.pop(session.session_id, None)
        if retirement is not None:
            retirement.cancel()
        self.router.unregister(session)
        self.identities.pop(session.session_id, None)
        holdings = self.holdings.pop(session.session_id, None)
        if holdings is not None and self.membership is not None:
            keys, names = holdings
            for key in keys:
                self.membership.release(key)
            for name, identity in names:
                self.membership.unreserve(name, identity)
        if self.sessions.pop(session.session_id, None) is not None:
            self.connected_at.pop(session.session_id, None)
            self.stats.session_down(handler.link.transport_name)
        if self.tcp is not None:
            self.tcp.release()

    def drain(self, session_id: str, message: str) -> AgentSession | None:
        """
        Give one session no new streams and ask its agent to move (GOAWAY
        draining); streams in flight finish.  None if there is no such session.
        """
        session = self.sessions.get(session_id)
        if session is None:
            return None
        if not session.draining:
            self.log.info(
                "drained agent {agent} session {session} over {transport}: {message}",
                agent=session.agent_id, session=session_id,
                transport=session.link.transport_name, message=message,
                event=events.AGENT_DRAINED,
            )
            session.link.send_control(
                GoAway(Reason.DRAINING, message, self.reconnect_to(session))
            )
            self.retire(session, message)
        return session

    def reconnect_to(self, session: AgentSession) -> str:
        """Another live edge for a drained agent to dial (GoAway reconnect_to), or ''."""
        membership = self.membership
        if membership is None:
            return ""
        self._turn += 1
        return reconnect_target(
            membership.other_edges(), session.link.transport_name, self._turn
        )

    def retire(self, session: AgentSession, message: str, within: float | None = None) -> None:
        """
        Route no new streams to C{session}; close its link once its last
        stream has ended, or after C{within} seconds (C{drain_timeout} if
        not given; the edge's own drain passes infinity and keeps the deadline).
        """
        session.draining = True
        if session.session_id not in self.retiring:
            if within is None:
                within = self.config.edge.drain_timeout
            deadline = self.reactor.seconds() + within
            retirement = Retirement(self.reactor, session.link, deadline, Reason.DRAINING, message)
            if not retirement.done:  # (done: closed at once, and lost() has run)
                self.retiring[session.session_id] = retirement
