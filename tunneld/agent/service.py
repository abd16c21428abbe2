# -*- test-case-name: tests.test_end_to_end -*-
"""
The agent: dial the edge, register tunnels, carry streams to upstreams.

Transports are tried in the configured order; when one cannot connect the
next is tried and the agent says so.  Every reconnect starts again from the
preferred transport, so a fallback is left as soon as the preferred one works
again.  A lost link is redialled after a jittered exponential backoff.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld import __version__
from tunneld.agent.backoff import Backoff
from tunneld.agent.health import UpstreamProbe, parse_health_check
from tunneld.agent.tcp import TCPForwarder
from tunneld.agent.upstream import UpstreamPool
from tunneld.agent.upstream_h2 import H2UpstreamPool
from tunneld.config import AgentConfig
from tunneld.interfaces import (
    AgentLinkSetup,
    IAgentLink,
    ILinkHandler,
    IStream,
    ITransportPlugin,
)
from tunneld.reasons import Reason
from tunneld.router import tunnel_key
from tunneld.tls import client_tls_for
from tunneld.wire.messages import ControlMessage, GoAway, Health, Hello, TunnelSpec, Welcome


@implementer(ILinkHandler)
class _LinkEvents:
    """Tells the service which link an event came from (old links drain after GOAWAY)."""

    def __init__(self, service: AgentService, link: IAgentLink) -> None:
        self.service = service
        self.link = link

    def control_received(self, message: ControlMessage) -> None:
        """ILinkHandler.control_received"""
        self.service.control_received(self.link, message)

    def stream_opened(self, stream: IStream) -> None:
        """ILinkHandler.stream_opened"""
        self.service.stream_opened(stream)

    def link_lost(self, reason: Reason, message: str) -> None:
        """ILinkHandler.link_lost"""
        self.service.link_lost(self.link, reason, message)


class AgentService(Service):
    """Keeps one link to the edge up and serves the streams it brings."""

    log = Logger()

    def __init__(
        self,
        config: AgentConfig,
        transports: list[tuple[ITransportPlugin, Any]],
        reactor: Any,
        welcome_timeout: float = 15.0,
    ) -> None:
        self.config = config
        self.transports = transports
        self.reactor = reactor
        self.welcome_timeout = welcome_timeout
        section = config.agent
        self.backoff = Backoff(section.reconnect_initial, section.reconnect_max, section.healthy_after)
        tls = section.tls
        self.setup = AgentLinkSetup(
            reactor=reactor,
            tls_for=client_tls_for(tls.ca, tls.certificate, tls.key, tls.server_hostname),
            initial_window=section.initial_window,
            max_frame_size=section.max_frame_size,
        )
        self.specs = [
            TunnelSpec(
                hostname=t.hostname, path_prefix=t.path_prefix, protocol=t.protocol,
                port=t.remote_port,
            )
            for t in config.tunnels
        ]
        self.pools: dict[str, UpstreamPool | H2UpstreamPool | TCPForwarder] = {}
        for tunnel, spec in zip(config.tunnels, self.specs, strict=True):
            if spec.protocol == "tcp":
                self.pools[tunnel_key(spec)] = TCPForwarder(
                    reactor, tunnel_key(spec), tunnel.upstream, section.upstream_connect_timeout
                )
                continue
            if tunnel.upstream_protocol == "h2c":
                self.pools[tunnel_key(spec)] = H2UpstreamPool(
                    reactor,
                    tunnel.upstream,
                    connect_timeout=section.upstream_connect_timeout,
                    response_timeout=section.upstream_response_timeout,
                )
                continue
            self.pools[tunnel_key(spec)] = UpstreamPool(
                reactor,
                tunnel.upstream,
                max_idle=section.upstream_max_idle,
                connect_timeout=section.upstream_connect_timeout,
                response_timeout=section.upstream_response_timeout,
            )
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
        self._welcomed: IAgentLink | None = None
        self.link: IAgentLink | None = None
        self.public_urls: tuple[str, ...] = ()
        self.ready: Deferred[Welcome] = Deferred()
        # Observability seam: sees (and may wrap) each stream before it is served.
        self.stream_hook: Callable[[IStream], IStream] | None = None
        self._index = 0
        self._pending: Any = None
        self._welcome_timer: Any = None
        self._stopping = False
        self._links: set[IAgentLink] = set()
        self._prefer_timer: Any = None

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:  # noqa: N802
        Service.startService(self)
        self._stopping = False
        for probe in self.probes.values():
            probe.start()
        self._dial(0)

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        Service.stopService(self)
        self._stopping = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._cancel_welcome_timer()
        if self._prefer_timer is not None and self._prefer_timer.active():
            self._prefer_timer.cancel()
        for probe in self.probes.values():
            probe.stop()
        waits = [pool.close() for pool in self.pools.values()]
        for link in self._links:
            link.close(Reason.CANCELLED, "agent stopping")
            waits.append(link.when_closed())
        return DeferredList(waits)

    # -- dialling -----------------------------------------------------------

    def _dial(self, index: int) -> None:
        self._pending = None
        if self._stopping:
            return
        self._index = index
        plugin, options = self.transports[index]
        self.log.info("connecting to the edge over {transport}", transport=plugin.name)
        d = plugin.connect(options, self.setup)
        d.addCallbacks(self._connected, self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        if self._stopping:
            return
        failed = self.transports[self._index][0].name
        error = failure.getErrorMessage()
        if self._index + 1 < len(self.transports):
            fallback = self.transports[self._index + 1][0].name
            self.log.warn(
                "transport {transport} failed ({error}); falling back to {fallback}",
                transport=failed, error=error, fallback=fallback,
            )
            self._dial(self._index + 1)
            return
        self._retry_later(f"{failed} failed: {error}", lost=False)

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
        self._pending = self.reactor.callLater(delay, self._dial, 0)

    def _connected(self, link: IAgentLink) -> None:
        if self._stopping:
            link.close(Reason.CANCELLED, "agent stopping")
            return
        self.link = link
        self._links.add(link)
        link.when_closed().addCallback(lambda _: self._links.discard(link))
        link.set_handler(_LinkEvents(self, link))
        link.send_control(
            Hello(
                agent_id=self.config.agent.id,
                tunnels=tuple(self.specs),
                token=self.config.agent.token,
                software=f"tunneld-agent/{__version__}",
                initial_window=self.config.agent.initial_window,
            )
        )
        self._welcome_timer = self.reactor.callLater(self.welcome_timeout, self._no_welcome)

    def _no_welcome(self) -> None:
        self._welcome_timer = None
        if self.link is not None:
            self.link.close(Reason.PROTOCOL_ERROR, "the edge sent no welcome in time")

    def _cancel_welcome_timer(self) -> None:
        if self._welcome_timer is not None and self._welcome_timer.active():
            self._welcome_timer.cancel()
        self._welcome_timer = None

    # -- link events --------------------------------------------------------------

    def control_received(self, link: IAgentLink, message: ControlMessage) -> None:
        if link is not self.link:
            return
        if isinstance(message, Welcome):
            self._cancel_welcome_timer()
            self.backoff.link_up(self.reactor.seconds())
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
            if self._index > 0:
                self._schedule_preferred()
        elif isinstance(message, GoAway) and message.reason is Reason.DRAINING:
            self.log.info(
                "edge is draining ({message}); reconnecting", message=message.message
            )
            # In-flight streams finish on the old link; new ones arrive on the new.
            self.link = None
            self._pending = self.reactor.callLater(0, self._dial, 0)
        elif isinstance(message, GoAway):
            self.log.error(
                "edge is closing the link: {reason}: {message}",
                reason=message.reason.value, message=message.message,
            )
        else:
            link.close(Reason.PROTOCOL_ERROR, "unexpected hello from the edge")

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
        old = self.link
        if self._stopping or old is None:
            link.close(Reason.CANCELLED, "no longer needed")
            return
        self.log.info(
            "preferred transport {transport} is back; moving off {old}",
            transport=link.transport_name, old=old.transport_name,
        )
        self._index = 0
        self._connected(link)
        # The old link takes no new streams and closes once its last one ends.
        old.send_control(GoAway(Reason.DRAINING, "agent moved to its preferred transport"))
        self._retire(old, self.reactor.seconds() + 30.0)

    def _retire(self, link: IAgentLink, deadline: float) -> None:
        if link.active_streams() == 0 or self.reactor.seconds() >= deadline:
            link.close(Reason.DRAINING, "agent moved to its preferred transport")
            return
        self.reactor.callLater(0.5, self._retire, link, deadline)
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
        pool = self.pools.get(stream.head.tunnel)
        if pool is None:
            stream.reset(Reason.NO_TUNNEL, f"this agent does not serve {stream.head.tunnel}")
            return
        pool.forward(stream)

    def link_lost(self, link: IAgentLink, reason: Reason, message: str) -> None:
        if link is not self.link:
            return  # an old link that drained after GOAWAY
        self._cancel_welcome_timer()
        self.backoff.link_down(self.reactor.seconds())
        if reason is Reason.UNAUTHORIZED:
            self.log.error("the edge refused this agent: {message}", message=message)
        self.link = None
        self._retry_later(f"{reason.value}: {message}")
