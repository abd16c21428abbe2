# -*- test-case-name: tests.test_websocket,tests.test_transport_choice -*-
"""
The agent: dial the edge, register tunnels, carry streams to upstreams.

Transports are tried in the configured order; when one cannot connect the
next is tried and the agent says so.  Every reconnect starts again from the
preferred transport, so a fallback is left as soon as the preferred one works
again.  A lost link is redialled after a jittered exponential backoff.

A link the edge turns away before its Welcome is a refusal: counted by
reason, logged, and redialled after the same backoff (an edge that is
draining is not asked again at once).  A refusal that retrying cannot
change (C{unauthorized}: the agent's id, token or certificate, or its grant)
stops the agent with a message saying what to fix; so do three rounds in a
row in which every transport's dial was refused for good (L{LinkRefused}:
an HTTP 401, 403 or 404 to its first request).  A link the edge asks to
leave (C{GoAway(draining)}) is replaced by a new one and retired: it closes
once its last stream has ended.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld import __version__
from tunneld.agent.backoff import Backoff
from tunneld.agent.health import UpstreamProbe
from tunneld.agent.identity import resolve_agent_id
from tunneld.agent.targets import retarget
from tunneld.agent.tcp import TCPForwarder
from tunneld.agent.terminal import DisabledTerminal, TerminalService
from tunneld.agent.upstream import UpstreamPool
from tunneld.agent.upstream_h2 import H2UpstreamPool
from tunneld.config import AgentConfig
from tunneld.config.values import parse_health_check, parse_proxy_url
from tunneld.interfaces import (
    AgentLinkSetup,
    IAgentLink,
    ILinkHandler,
    IStream,
    ITransportPlugin,
    IUpstream,
    LinkRefused,
)
from tunneld.model.keys import tunnel_key
from tunneld.model.messages import ControlMessage, GoAway, Health, Hello, TunnelSpec, Welcome
from tunneld.model.reasons import Reason
from tunneld.retire import Retirement
from tunneld.tls import client_tls_for

# Refusals that no retry can change: the agent stops instead of asking forever.
_FINAL_REFUSALS = frozenset({Reason.UNAUTHORIZED})
_FIX_HINT = (
    "check this agent's id (or leave it out to take the certificate's), its token or "
    "client certificate, and the edge's [[agents]] grant"
)
# Rounds in which every transport was refused for good (LinkRefused: 401,
# 403, 404 to the first request) before the agent stops; a round of them
# waits the same backoff as any failure.
_REFUSED_ROUNDS = 3
_REFUSED_HINT = (
    "check each transport's URL or address, and that the edge (and any proxy on the way) "
    "admits this agent"
)
# How long a link the agent moves off may keep its streams, at most (the
# edge that asked it to move closes it at its own drain_timeout first).
_RETIRE_DEADLINE = 300.0


@implementer(ILinkHandler)
class _Link:
    """
    One link as the service tracks it: its events tagged with it (old links
    drain after GOAWAY), whether the edge welcomed it, its own welcome timer,
    and its retirement once the agent moves off it.
    """

    def __init__(self, service: AgentService, link: IAgentLink) -> None:
        self.service = service
        self.link = link
        self.welcomed = False
        self.lost = False
        # The edge's GoAway before any Welcome: why it turned this link away.
        self.refusal: tuple[Reason, str] | None = None
        self.welcome_timer: Any = None
        self.retirement: Retirement | None = None

    def control_received(self, message: ControlMessage) -> None:
        """ILinkHandler.control_received"""
        self.service.control_received(self, message)

    def stream_opened(self, stream: IStream) -> None:
        """ILinkHandler.stream_opened"""
        self.service.stream_opened(stream)

    def link_lost(self, reason: Reason, message: str) -> None:
        """ILinkHandler.link_lost"""
        self.lost = True
        self.stop_timers()
        self.service.link_lost(self, reason, message)

    def stop_timers(self) -> None:
        timer, self.welcome_timer = self.welcome_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        retirement, self.retirement = self.retirement, None
        if retirement is not None:
            retirement.cancel()


class AgentService(Service):
    """Keeps one link to the edge up and serves the streams it brings."""

    log = Logger()

    def __init__(
        self,
        config: AgentConfig,
        transports: list[tuple[ITransportPlugin, Any]],
        reactor: Any,
        welcome_timeout: float | None = None,
    ) -> None:
        self.config = config
        self.transports = transports
        self.reactor = reactor
        section = config.agent
        self.welcome_timeout = (
            section.welcome_timeout if welcome_timeout is None else welcome_timeout
        )
        # Normally resolved at start (tunneld.tap.load_agent); a config built in code may leave it out.
        self.agent_id = section.id or resolve_agent_id(section, config.source)
        self.backoff = Backoff(section.reconnect_initial, section.reconnect_max, section.healthy_after)
        tls = section.tls
        self.setup = AgentLinkSetup(
            reactor=reactor,
            tls_for=client_tls_for(tls.ca, tls.certificate, tls.key, tls.server_hostname),
            initial_window=section.initial_window,
            max_frame_size=section.max_frame_size,
            proxy=parse_proxy_url(section.proxy),
        )
        self.specs = [
            TunnelSpec(
                hostname=t.hostname, path_prefix=t.path_prefix, protocol=t.protocol,
                port=t.remote_port,
            )
            for t in config.tunnels
        ]
        # Each tunnel's upstream, by tunnel key: the agent hands a stream to
        # the one its tunnel names and never asks what kind it is.
        self.pools: dict[str, IUpstream] = {}
        for tunnel, spec in zip(config.tunnels, self.specs, strict=True):
            upstream: IUpstream
            if spec.protocol == "tcp":
                upstream = TCPForwarder(
                    reactor, tunnel_key(spec), tunnel.upstream, section.upstream_connect_timeout
                )
            elif tunnel.upstream_protocol == "h2c":
                upstream = H2UpstreamPool(
                    reactor,
                    tunnel.upstream,
                    connect_timeout=section.upstream_connect_timeout,
                    response_timeout=section.upstream_response_timeout,
                    body_timeout=section.upstream_body_timeout,
                )
            else:
                upstream = UpstreamPool(
                    reactor,
                    tunnel.upstream,
                    max_idle=section.upstream_max_idle,
                    connect_timeout=section.upstream_connect_timeout,
                    response_timeout=section.upstream_response_timeout,
                    body_timeout=section.upstream_body_timeout,
                )
            self.pools[tunnel_key(spec)] = upstream
        self.probes: dict[str, UpstreamProbe] = {}
        for tunnel, spec in zip(config.tunnels, self.specs, strict=True):
            check = parse_health_check(tunnel.health_check)
            if check is not None:
                key = tunnel_key(spec)
                self.probes[key] = UpstreamProbe(
                    reactor, tunnel.upstream, tunnel.hostname, check, tunnel.health_interval,
                    tunnel.health_timeout,
                    functools.partial(self._health_changed, key),
                )
        # The opt-in terminal service ([agent.terminal]): streams of kind "terminal".
        self.terminal: TerminalService | None = None
        if section.terminal.enabled:
            self.terminal = TerminalService(reactor, section.terminal, self.agent_id)
        # Where terminal streams go: the service, or one that tells each
        # browser it is not enabled here.
        self._terminals: IUpstream = self.terminal or DisabledTerminal()
        self._welcomed: IAgentLink | None = None
        self.link: IAgentLink | None = None
        self.public_urls: tuple[str, ...] = ()
        self.ready: Deferred[Welcome] = Deferred()
        # Fires (with the message) when the edge refused this agent for good.
        self.gave_up: Deferred[str] = Deferred()
        # Called then too; the twistd plugin stops the process with it.
        self.on_fatal: Callable[[str], None] | None = None
        # Links the edge turned away before welcoming them, by reason.
        self.refusals: Counter[str] = Counter()
        # Observability seam: sees (and may wrap) each stream before it is served.
        self.stream_hook: Callable[[IStream], IStream] | None = None
        self._index = 0
        # Edges by URL ([agent] edge_urls), the one dialled now, and the edge
        # a draining edge's GoAway named (dialled first while it answers).
        self.edge_urls = list(section.edge_urls)
        self._url_index = 0
        self._url_failures = 0  # URLs failed in a row (a whole round: back off)
        self.redirect: str | None = None
        self._target: str | None = None  # the URL of the dial in progress, or None
        self._pending: Any = None
        self._stopping = False
        self._links: dict[IAgentLink, _Link] = {}
        self._prefer_timer: Any = None
        # This round's refusals for good (LinkRefused), and how many rounds in a row had only those.
        self._refused_round: list[str] = []
        self._refused_rounds = 0

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:  # noqa: N802
        Service.startService(self)
        self._stopping = False
        for probe in self.probes.values():
            probe.start()
        self._dial(0)

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        Service.stopService(self)
        self._stop_dialling()
        for probe in self.probes.values():
            probe.stop()
        waits = [pool.close() for pool in self.pools.values()]
        waits.append(self._terminals.close())
        for tracked in list(self._links.values()):
            tracked.stop_timers()
            tracked.link.close(Reason.CANCELLED, "agent stopping")
            waits.append(tracked.link.when_closed())
        return DeferredList(waits)

    def _stop_dialling(self) -> None:
        self._stopping = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._prefer_timer is not None and self._prefer_timer.active():
            self._prefer_timer.cancel()
        self._prefer_timer = None

    # -- dialling -----------------------------------------------------------

    def _dial(self, index: int) -> None:
        self._pending = None
        if self._stopping:
            return
        if index == 0:
            self._refused_round = []
        plugin, options = self.transports[index]
        target = self.redirect or (self.edge_urls[self._url_index] if self.edge_urls else None)
        if target is not None:
            found = self._dialling(target)
            if found is None:
                self.log.warn(
                    "cannot dial {url}: no configured transport speaks it (transports: "
                    "{transports})", url=target,
                    transports=", ".join(p.name for p, _ in self.transports),
                )
                target = None
                if self.redirect is not None:
                    self.redirect = None
                    self._dial(index)
                    return
            else:
                index, plugin, options = found
        self._index = index
        self._target = target
        if target is None:
            self.log.info("connecting to the edge over {transport}", transport=plugin.name)
        else:
            self.log.info("connecting to the edge at {url} over {transport}", url=target,
                          transport=plugin.name)
        d = plugin.connect(options, self.setup)
        d.addCallbacks(self._connected, self._connect_failed)

    def _dialling(self, url: str) -> tuple[int, ITransportPlugin, Any] | None:
        """The configured transport that dials C{url}, with its options aimed there."""
        for index, (plugin, options) in enumerate(self.transports):
            aimed = retarget(plugin.name, options, url)
            if aimed is not None:
                return index, plugin, aimed
        return None

    def _dial_in(self, delay: float) -> None:
        """Dial again (from the preferred transport) in C{delay} seconds; one dial pending at most."""
        if self._stopping:
            return
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = self.reactor.callLater(delay, self._dial, 0)

    def _connect_failed(self, failure: Failure) -> None:
        if self._stopping:
            return
        failed = self.transports[self._index][0].name
        error = failure.getErrorMessage()
        if failure.check(LinkRefused):
            self._refused_round.append(f"{failed}: {error}")
        target = self._target
        if target is not None:
            self._target_failed(target, error)
            return
        if self._index + 1 < len(self.transports):
            fallback = self.transports[self._index + 1][0].name
            self.log.warn(
                "transport {transport} failed ({error}); falling back to {fallback}",
                transport=failed, error=error, fallback=fallback,
            )
            self._dial(self._index + 1)
            return
        if len(self._refused_round) == len(self.transports):
            self._refused_rounds += 1
            if self._refused_rounds >= _REFUSED_ROUNDS:
                self._give_up(
                    f"every transport was refused for good, {self._refused_rounds} times in a "
                    f"row ({'; '.join(self._refused_round)})",
                    _REFUSED_HINT,
                )
                return
        else:
            self._refused_rounds = 0
        self._retry_later(f"{failed} failed: {error}", lost=False)

    def _target_failed(self, url: str, error: str) -> None:
        """A dial by URL failed: the edge named by a GoAway is dropped, a listed one is passed."""
        if url == self.redirect:
            self.redirect = None
            self.log.warn(
                "cannot connect to {url}, the edge named by a draining edge ({error}); dialling "
                "the configured edges", url=url, error=error,
            )
            self._dial(0)
            return
        self._url_failures += 1
        self._url_index = (self._url_index + 1) % max(1, len(self.edge_urls))
        if self._url_failures < len(self.edge_urls):
            self.log.warn("cannot connect to {url} ({error}); trying {next}", url=url,
                          error=error, next=self.edge_urls[self._url_index])
            self._dial(0)
            return
        self._url_failures = 0
        self._retry_later(f"{url}: {error}", lost=False)

    def _retry_later(self, why: str, lost: bool = True) -> None:
        """Dial again after the backoff; C{lost}: a link was up (else a dial failed)."""
        if self._stopping:
            return
        delay = self.backoff.next_delay()
        if lost:
            self.log.warn("link down ({why}); reconnecting in {delay:.1f}s", why=why, delay=delay)
        else:
            self.log.warn(
                "cannot connect to the edge ({why}); retrying in {delay:.1f}s", why=why, delay=delay
            )
        self._dial_in(delay)

    def _connected(self, link: IAgentLink) -> None:
        if self._stopping:
            link.close(Reason.CANCELLED, "agent stopping")
            return
        self.link = link
        tracked = _Link(self, link)
        self._links[link] = tracked
        link.when_closed().addCallback(lambda _: self._forget(tracked))
        link.set_handler(tracked)
        if tracked.lost:
            return  # turned away before it could say hello (see link_lost)
        link.send_control(
            Hello(
                agent_id=self.agent_id,
                tunnels=tuple(self.specs),
                token=self.config.agent.token,
                software=f"tunneld-agent/{__version__}",
                initial_window=self.config.agent.initial_window,
            )
        )
        # Each link has its own timer: an old link's can never close a new one.
        tracked.welcome_timer = self.reactor.callLater(
            self.welcome_timeout, self._no_welcome, tracked
        )

    def _forget(self, tracked: _Link) -> None:
        tracked.stop_timers()
        if self._links.get(tracked.link) is tracked:
            del self._links[tracked.link]

    def _no_welcome(self, tracked: _Link) -> None:
        tracked.welcome_timer = None
        if not tracked.welcomed and not tracked.lost:
            tracked.link.close(Reason.PROTOCOL_ERROR, "the edge sent no welcome in time")

    # -- link events --------------------------------------------------------------

    def control_received(self, tracked: _Link, message: ControlMessage) -> None:
        link = tracked.link
        if isinstance(message, GoAway) and not tracked.welcomed:
            # Turned away before a Welcome: a refusal (see link_lost).
            tracked.refusal = (message.reason, message.message)
            link.close(message.reason, message.message)
            return
        if link is not self.link:
            return  # an old link, retiring
        if isinstance(message, Welcome) and not tracked.welcomed:
            self._welcome(tracked, message)
        elif isinstance(message, GoAway) and message.reason is Reason.DRAINING:
            # In-flight streams finish on the old link; new ones arrive on the new.
            self.link = None
            self.backoff.link_down(self.reactor.seconds())
            delay = self.backoff.soon()
            moving_to = message.reconnect_to
            if moving_to and self._dialling(moving_to) is None:
                self.log.warn("the draining edge names {url}, which no configured transport "
                              "speaks: ignored", url=moving_to)
                moving_to = ""
            self.redirect = moving_to or None
            self.log.info(
                "edge is draining ({message}); moving to a new link{to} in {delay:.2f}s",
                message=message.message, delay=delay,
                to=f" to {moving_to}" if moving_to else "",
            )
            self._retire(tracked, "the edge asked this agent to move")
            self._dial_in(delay)
        elif isinstance(message, GoAway):
            self.log.error(
                "edge is closing the link: {reason}: {message}",
                reason=message.reason.value, message=message.message,
            )
        else:
            link.close(Reason.PROTOCOL_ERROR, f"unexpected {type(message).__name__} from the edge")

    def _welcome(self, tracked: _Link, message: Welcome) -> None:
        link = tracked.link
        tracked.welcomed = True
        timer, tracked.welcome_timer = tracked.welcome_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.backoff.link_up(self.reactor.seconds())
        self._refused_rounds = 0
        self._url_failures = 0
        self.public_urls = message.public_urls
        self.log.info(
            "link up over {transport} to {peer} (session {session})",
            transport=link.transport_name, peer=link.peer, session=message.session_id,
        )
        for url in message.public_urls:
            self.log.info("tunnel ready: {url}", url=url)
        self._welcomed = link
        for key, probe in self.probes.items():
            if probe.healthy is not None:
                link.send_control(Health(key, probe.healthy, probe.detail))
        for refusal in message.refused:
            self.log.error(
                "edge refused tunnel {tunnel}: {reason} ({message})",
                tunnel=tunnel_key(refusal.tunnel), reason=refusal.reason.value,
                message=refusal.message,
            )
        if not self.ready.called:
            self.ready.callback(message)
        if self._index > 0 and self._target is None:
            self._schedule_preferred()

    def _retire(self, tracked: _Link, message: str, within: float = _RETIRE_DEADLINE) -> None:
        """Close C{tracked}'s link once its last stream ends (at most C{within} seconds on)."""
        if tracked.retirement is None and not tracked.lost:
            retirement = Retirement(
                self.reactor, tracked.link, self.reactor.seconds() + within,
                Reason.DRAINING, message,
            )
            if not retirement.done:  # (done: it had no stream and is closed)
                tracked.retirement = retirement

    # -- returning to the preferred transport ---------------------------------

    def _schedule_preferred(self) -> None:
        interval = self.config.agent.prefer_retry_interval
        if interval > 0 and not self._stopping:
            self._prefer_timer = self.reactor.callLater(interval, self._try_preferred)

    def _try_preferred(self) -> None:
        self._prefer_timer = None
        if self._stopping or self._index == 0 or self.link is None:
            return
        plugin, options = self.transports[0]
        d = plugin.connect(options, self.setup)

        def failed(failure: Failure) -> None:
            self.log.info(
                "preferred transport {transport} still unavailable ({error})",
                transport=plugin.name, error=failure.getErrorMessage(),
            )
            self._schedule_preferred()

        d.addCallbacks(self._switch_to_preferred, failed)

    def _switch_to_preferred(self, link: IAgentLink) -> None:
        old = self._links.get(self.link) if self.link is not None else None
        if self._stopping or old is None:
            link.close(Reason.CANCELLED, "no longer needed")
            return
        self.log.info(
            "preferred transport {transport} is back; moving off {old}",
            transport=link.transport_name, old=old.link.transport_name,
        )
        self._index = 0
        self._connected(link)
        # The old link takes no new streams and closes once its last one ends.
        old.link.send_control(GoAway(Reason.DRAINING, "agent moved to its preferred transport"))
        self._retire(old, "agent moved to its preferred transport", within=30.0)

    def _health_changed(self, key: str, healthy: bool, detail: str) -> None:
        """An upstream probe changed its verdict: log it and tell the edge."""
        if healthy:
            self.log.info("upstream of {tunnel} is healthy: {detail}", tunnel=key, detail=detail)
        else:
            self.log.warn("upstream of {tunnel} is unhealthy: {detail}", tunnel=key, detail=detail)
        link = self.link
        if link is not None and link is self._welcomed:
            link.send_control(Health(key, healthy, detail))

    def stream_opened(self, stream: IStream) -> None:
        if self.stream_hook is not None:
            stream = self.stream_hook(stream)
        upstream = (
            self._terminals
            if stream.head.kind == "terminal"
            else self.pools.get(stream.head.tunnel)
        )
        if upstream is None:
            stream.reset(Reason.NO_TUNNEL, f"this agent does not serve {stream.head.tunnel}")
            return
        upstream.forward(stream)

    def link_lost(self, tracked: _Link, reason: Reason, message: str) -> None:
        if tracked.link is not self.link:
            return  # an old link that drained after GOAWAY
        self.link = None
        if not tracked.welcomed:
            refusal = tracked.refusal
            if refusal is None and reason in _FINAL_REFUSALS:
                refusal = (reason, message)
            if refusal is not None:
                self._refused(*refusal)
            else:
                self._retry_later(f"{reason.value}: {message}")
            return
        self.backoff.link_down(self.reactor.seconds())
        self._retry_later(f"{reason.value}: {message}")

    # -- refusals -----------------------------------------------------------

    def _refused(self, reason: Reason, message: str) -> None:
        """The edge turned a link away before welcoming it."""
        self.refusals[reason.value] += 1
        if reason in _FINAL_REFUSALS:
            self._give_up(f"the edge refused agent {self.agent_id!r}: {reason.value}: {message}")
            return
        if self._stopping:
            return
        delay = self.backoff.next_delay()
        # (Not "message": under a legacy log observer that key is taken.)
        self.log.warn(
            "the edge refused the link: {reason}: {detail} ({count} {reason} refusals so "
            "far); reconnecting in {delay:.1f}s",
            reason=reason.value, detail=message, count=self.refusals[reason.value],
            delay=delay,
        )
        self._dial_in(delay)

    def _give_up(self, message: str, hint: str = _FIX_HINT) -> None:
        """Stop for good: dialling again would be refused the same way."""
        if self._stopping:
            return
        self._stop_dialling()
        self.log.critical(
            "{refusal}. Retrying cannot change this, so the agent stops: {hint}.",
            refusal=message, hint=hint,
        )
        link = self.link
        if link is not None:
            link.close(Reason.CANCELLED, "agent giving up")
        if not self.gave_up.called:
            self.gave_up.callback(message)
        if self.on_fatal is not None:
            self.on_fatal(message)
