# -*- test-case-name: tests.test_websocket,tests.test_observe,tests.test_startup -*-
"""
The edge as a service tree: router, agent sessions, public listeners and one
listening service per configured transport, all under one L{MultiService}.

Stopping (SIGTERM under twistd) drains: see L{EdgeService.drain}.  SIGHUP
re-reads the configuration file and applies its limits to new work
(L{EdgeService.reload}); a file that fails validation changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from dataclasses import replace
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from tunneld.config import EdgeConfig, load_edge_config
from tunneld.edge.cluster import agent_url_maker, cluster_view, describe_agents, dialable_host
from tunneld.edge.gateway import EdgeGateway
from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPSettings
from tunneld.edge.http2 import PublicH2Factory, PublicH2Settings, PublicHTTPChooserFactory
from tunneld.edge.probes import probe_site
from tunneld.edge.public_tls import PublicTLSFactory, public_tls_contexts
from tunneld.edge.relay import RelayDialer, RelayPeers
from tunneld.edge.replay import ReplayBook
from tunneld.edge.sessions import AgentSessions
from tunneld.edge.tcp import TCPTunnels
from tunneld.edge.terminal import TerminalBridge
from tunneld.errors import ConfigError
from tunneld.interfaces import AgentLinkSetup, EdgeLinkSetup, ITransportPlugin
from tunneld.listening import ListeningService, address_text, listeners_under
from tunneld.model.messages import GoAway
from tunneld.model.reasons import Reason
from tunneld.observe.service import EdgeObservability
from tunneld.observe.stats import EdgeStats
from tunneld.policy.clientaddr import ProxyProtocolFactory, TrustedProxies
from tunneld.policy.gate import PublicPolicy
from tunneld.router import Router
from tunneld.state import make_backend
from tunneld.state.membership import EdgeMembership
from tunneld.state.service import StateService
from tunneld.tls import agent_link_tls, certificate_proves_edge, client_tls_for

# How often a drain looks whether the streams in flight have finished.
_DRAIN_POLL = 0.05


class EdgeService(MultiService):
    """Everything one edge process runs."""

    log = Logger()

    def __init__(
        self,
        config: EdgeConfig,
        transports: list[tuple[ITransportPlugin, Any]],
        reactor: Any,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.router = Router()
        self.stats = EdgeStats(reactor)
        edge = config.edge
        self.policy = PublicPolicy(config.limits, reactor, edge.max_streams_per_agent)
        # The one admission path of every public listener, TCP tunnels included.
        self.replay = ReplayBook(reactor, config.limits)
        self.gateway = EdgeGateway(self.router, self.stats, self.policy, replay=self.replay)
        self.tcp = TCPTunnels(config.edge, self.router, reactor, self.gateway)
        self.tcp.setServiceParent(self)
        self.sessions = AgentSessions(config, self.router, reactor, self.stats, tcp=self.tcp)
        self._proxy_wrappers: list[ProxyProtocolFactory] = []
        self._previous_sighup: Any = None
        self._previous_sigterm: Any = None
        self._stopping = False
        self._hurry = False
        settings = PublicHTTPSettings(
            max_header_bytes=edge.max_header_bytes,
            header_timeout=edge.header_timeout,
            idle_timeout=edge.idle_timeout,
            max_header_count=edge.max_header_count,
            max_request_line=edge.max_request_line,
            websocket_ping_interval=edge.websocket_ping_interval,
        )
        self.public: list[ListeningService] = []
        for i, description in enumerate(edge.public_listen):
            factory: Any = PublicHTTPFactory(self.gateway, settings, reactor)
            if config.limits.proxy_protocol:
                factory = ProxyProtocolFactory(
                    factory, TrustedProxies(config.limits.trusted_proxies), reactor,
                    edge.header_timeout,
                )
                self._proxy_wrappers.append(factory)
            listener = ListeningService(
                reactor, description, factory, "public HTTP",
                key=f"edge.public_listen[{i}]", backlog=edge.listen_backlog,
            )
            listener.setServiceParent(self)
            self.public.append(listener)
        self.probes: ListeningService | None = None
        if edge.health_listen:
            self.probes = ListeningService(
                reactor, edge.health_listen, probe_site(self.not_ready, self.degraded),
                "health probes",
                key="edge.health_listen",
            )
            self.probes.setServiceParent(self)
        self.public_h2c: list[ListeningService] = []
        self.public_tls: list[ListeningService] = []
        self._public_h2(settings)
        # The shared state (design §6), started before and closed after the
        # transports, which may keep what other edges must see there.
        self.state = StateService(reactor, make_backend(reactor, edge.state))
        self.state.setServiceParent(self)
        # This edge in the registry (its record, the tunnels its agents hold,
        # their hostname reservations), stopped before the store closes.
        shared = edge.state
        self.membership = EdgeMembership(
            self.state, reactor, shared.edge_name, ttl=shared.edge_ttl,
            interval=shared.heartbeat_interval, reservation_ttl=shared.reservation_ttl,
            agent_urls=shared.agent_urls,
        )
        self.membership.setServiceParent(self.state)
        self.membership.describe = lambda: json.dumps(describe_agents(self.sessions)).encode()
        self.sessions.membership = self.membership
        if self.state.backend.name != "memory":
            # Per-tunnel rates hold for the whole cluster.
            self.policy.share(self.state.backend)
        setup = EdgeLinkSetup(
            state=self.state.backend,
            on_link=self.sessions.link_connected,
            reactor=reactor,
            max_frame_size=edge.max_frame_size,
            initial_window=edge.initial_window,
            max_streams=edge.max_streams_per_agent,
            tls=agent_link_tls(edge.agent_tls),
        )
        self.transports: dict[str, Any] = {}
        self._agent_url_makers: list[tuple[Any, Any]] = []  # (listener, address -> URL)
        for plugin, options in transports:
            self.sessions.listener_added(plugin.name, getattr(options, "listen", ""), setup.tls)
            service = plugin.edge_service(options, setup)
            for listener in listeners_under(service):
                # A failure to listen names the key the endpoint came from.
                if isinstance(listener, ListeningService) and not listener.key:
                    listener.key = f"transports.{plugin.name}.listen"
            service.setServiceParent(self)
            self.transports[plugin.name] = service
            make_url = agent_url_maker(plugin.name, options, setup.tls is not None)
            if make_url is not None:
                self._agent_url_makers.extend(
                    (listener, make_url) for listener in listeners_under(service)
                )
        # Browser terminals to agents ([edge.terminal]), served on the admin listener.
        self.terminal: TerminalBridge | None = None
        mounts = {}
        if edge.terminal.enabled:
            self.terminal = TerminalBridge(
                reactor, edge.terminal, self.sessions, self.state.backend,
                edge_name=lambda: edge.state.edge_name,
            )
            self.terminal.setServiceParent(self)
            # Loaded here: its WebSocket page (Autobahn) weighs on an edge that serves no terminal.
            from tunneld.edge.terminal_web import terminal_mounts

            mounts = terminal_mounts(self.terminal)
        self.relays: RelayPeers | None = None
        self.relay_dialer: RelayDialer | None = None
        self._relay(transports)
        # Admin API, metrics, systemd readiness (once every listener in this tree is up).
        self.observe = EdgeObservability(
            reactor, self.sessions, self.stats, self, edge.admin_listen, mounts=mounts
        )
        self.observe.setServiceParent(self)

    def _relay(self, transports: list[tuple[ITransportPlugin, Any]]) -> None:
        """
        With a shared backend, requests for tunnels that only another edge
        holds are relayed to it (L{tunneld.edge.relay}); one edge alone, or
        the memory backend, never relays.
        """
        edge = self.config.edge
        shared = edge.state
        if self.state.backend.name == "memory" or not shared.relay:
            return
        tls = edge.agent_tls
        if not (tls.certificate and tls.client_ca):
            self.log.warn(
                "cross-edge relays are off: they need [edge.agent_tls] with a certificate and "
                "client_ca (edges authenticate each other with their certificates)"
            )
            return
        membership = self.membership
        self.relays = RelayPeers(
            self.state.backend, self.reactor, lambda: membership.cluster, certificate_proves_edge,
            max_streams=lambda: shared.relay_max_streams,
        )
        self.sessions.relays = self.relays
        self.gateway.remote = self.relays
        # TCP tunnels other edges hold are listened on here too, and relayed.
        self.relays.on_ports = self.tcp.relay_listen
        setup = AgentLinkSetup(
            reactor=self.reactor,
            tls_for=client_tls_for(
                ca=shared.relay_ca or tls.client_ca, certificate=tls.certificate, key=tls.key
            ),
            max_frame_size=edge.max_frame_size,
            initial_window=edge.initial_window,
        )
        self.relay_dialer = RelayDialer(
            self.router, self.reactor, lambda: membership.edge_id, membership.other_edges,
            transports, setup, shared.heartbeat_interval, tick=self.relays.refresh,
            max_streams_per_agent=lambda: self.config.edge.max_streams_per_agent,
        )
        self.relay_dialer.setServiceParent(self)

    def _public_h2(self, settings: PublicHTTPSettings) -> None:
        """The listeners speaking HTTP/2 as well: cleartext (prior knowledge) and TLS."""
        edge = self.config.edge
        h2_settings = PublicH2Settings(
            initial_window=edge.h2_initial_window,
            max_concurrent_streams=edge.h2_max_concurrent_streams,
            max_header_bytes=edge.max_header_bytes,
            header_timeout=edge.header_timeout,
            idle_timeout=edge.idle_timeout,
        )
        reactor = self.reactor
        for i, description in enumerate(edge.public_h2c_listen):
            chooser = PublicHTTPChooserFactory(
                PublicHTTPFactory(self.gateway, settings, reactor),
                PublicH2Factory(self.gateway, h2_settings, reactor),
                reactor, edge.header_timeout,
            )
            listener = ListeningService(
                reactor, description, chooser, "public HTTP/2 (h2c)",
                key=f"edge.public_h2c_listen[{i}]", backlog=edge.listen_backlog,
            )
            listener.setServiceParent(self)
            self.public.append(listener)
            self.public_h2c.append(listener)
        if not edge.public_tls_listen:
            return
        contexts = public_tls_contexts(edge.tls, self.config.source)
        tls_http1 = replace(settings, scheme="https")
        tls_h2 = replace(h2_settings, scheme="https")
        for i, description in enumerate(edge.public_tls_listen):
            chooser = PublicHTTPChooserFactory(
                PublicHTTPFactory(self.gateway, tls_http1, reactor),
                PublicH2Factory(self.gateway, tls_h2, reactor),
                reactor, edge.header_timeout,
            )
            listener = ListeningService(
                reactor, description, PublicTLSFactory(contexts, chooser), "public HTTPS",
                key=f"edge.public_tls_listen[{i}]", backlog=edge.listen_backlog,
            )
            listener.setServiceParent(self)
            self.public.append(listener)
            self.public_tls.append(listener)

    def not_ready(self) -> list[str]:
        """Why the edge should not get traffic now (empty: ready); /readyz."""
        problems = []
        if self.policy.draining:
            problems.append("draining")
        for listener in self.public:
            if listener.port is None:
                problems.append(f"public listener {listener.description} is not listening")
        for name, transport in self.transports.items():
            if getattr(transport, "running", 1) and getattr(transport, "port", True) is None:
                problems.append(f"{name} agent-link listener is not listening")
        return problems

    def degraded(self) -> list[str]:
        """
        What works in a degraded way now, without making the edge unready
        (/readyz detail): a state store that cannot be reached.
        """
        health = self.state.backend.health()
        if health.reachable:
            return []
        since = ""
        if health.degraded_since is not None:
            since = f" for {max(0.0, self.reactor.seconds() - health.degraded_since):.0f}s"
        return [
            f"degraded: state store {health.backend} unreachable{since} ({health.last_error}); "
            "rate limits and routing decided by this edge alone"
        ]

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._advertise_when_listening()
        source = self.config.source
        if os.path.isfile(source) and threading.current_thread() is threading.main_thread():
            # Only for a process run from a configuration file (twistd), never
            # inside someone else's process such as a test runner.
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            self.reactor.callWhenRunning(self._take_sigterm)

    def _advertise_when_listening(self) -> None:
        """Once every listener is bound, put its real address in the registry record."""
        listeners = listeners_under(self)
        waiting = [len(listeners)]

        def one(result: Any) -> Any:
            waiting[0] -= 1
            if waiting[0] == 0 and self.running:
                self.membership.advertise(*self.addresses())
            return result  # the start guard sees failures as before

        for listener in listeners:
            listener.listening.addBoth(one)

    def transport_tables(self) -> dict[str, Any]:
        """
        What each transport that keeps a table of its own shows of it
        (C{GET /api/transports}; a transport offers one with C{describe()}),
        with the agent session each row's link serves where known (by peer),
        and the replay buffers of public event streams.
        """
        by_peer = {
            (session.link.transport_name, session.link.peer): session
            for session in self.sessions.sessions.values()
        }
        tables: dict[str, Any] = {}
        for name, transport in sorted(self.transports.items()):
            describe = getattr(transport, "describe", None)
            if describe is None:
                continue
            table = describe()
            for row in table.get("connections", ()):
                session = by_peer.get((name, row.get("peer")))
                row["agent"] = session.agent_id if session is not None else None
                row["session"] = session.session_id if session is not None else None
            tables[name] = table
        return {"transports": tables, "sse_replay": self.replay.describe()}

    def cluster(self) -> Deferred[dict[str, Any]]:
        """The cluster view (C{GET /api/cluster}): edges, their agents, where each tunnel is served."""
        local = {
            "agents": describe_agents(self.sessions),
            "tunnels": self.membership.held(),
            "name": self.membership.edge_name,
        }
        view = ensureDeferred(cluster_view(self.state.backend, self.membership.edge_id, local))
        return view.addCallback(self._with_relays)

    def _with_relays(self, view: dict[str, Any]) -> dict[str, Any]:
        """The relay links in the cluster view: those other edges dialled to this one, and ours."""
        relays, dialer = self.relays, self.relay_dialer
        view["relays"] = relays.describe() if relays is not None else []
        view["relay_links"] = dialer.describe() if dialer is not None else []
        view["relayed_here"] = dialer.counts() if dialer is not None else {}
        return view

    def addresses(self) -> tuple[list[str], list[str]]:
        """This edge's public addresses and the URLs agents dial it by (for the registry)."""
        public = [
            address_text(listener.address) for listener in self.public
            if listener.address is not None
        ]
        urls = list(self.config.edge.state.agent_urls)
        if not urls:
            name = self.membership.edge_name
            for listener, make_url in self._agent_url_makers:
                address = getattr(listener, "address", None)
                if address is not None and hasattr(address, "port"):
                    urls.append(make_url(dialable_host(address.host, name), address.port))
        return public, urls

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def _take_sigterm(self) -> None:
        """
        Replace the reactor's SIGTERM handler (installed as it starts): a
        drained stop is a clean stop, so the process exits 0 rather than
        re-raising the signal; a second SIGTERM cuts the drain short.
        """
        if self.running and not self._stopping:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._sigterm)

    def _sigterm(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._terminate)

    def _terminate(self) -> None:
        if self._stopping:
            self.log.warn("SIGTERM again: closing what is still in flight now")
            self._hurry = True
            return
        self.log.info("SIGTERM: draining, then stopping")
        self.reactor.stop()

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        self._stopping = True
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        drained = ensureDeferred(self.drain(self.config.edge.drain_timeout))
        drained.addErrback(lambda f: self.log.failure("draining failed", f))
        drained.addCallback(lambda _: MultiService.stopService(self))
        drained.addCallback(self._stopped)
        return drained

    def _stopped(self, result: Any) -> Any:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        counters = self.policy.snapshot()
        refusals = counters["refusals"]
        self.log.info(
            "edge stopped; refusals since start: {refusals}",
            refusals=", ".join(f"{reason} {n}" for reason, n in sorted(refusals.items())) or "none",
            counters=counters,
        )
        held = [
            f"{name} {counters[name]}"
            for name in ("connections", "client_connections", "tunnel_streams")
            if counters[name]
        ]
        if held:
            # Every slot is given back when its connection or stream ends.
            self.log.warn("edge stopped with policy slots still held: {held}", held=", ".join(held))
        return result

    async def drain(self, timeout: float) -> None:
        """
        Stop taking new work and let the streams in flight finish: public
        listeners stop listening, new requests and agents are refused with
        C{draining}, every agent gets a GOAWAY (it reconnects elsewhere and
        keeps its in-flight streams), and after C{timeout} seconds whatever is
        still running is closed with C{draining}.
        """
        self.policy.draining = True
        self.sessions.draining = True
        if self.terminal is not None:
            # Terminals are not resumable: they end now, saying why, rather than at the deadline.
            self.terminal.shutdown("edge_stopping", "the edge is shutting down")
        # Event streams kept for replay end now (their clients resume elsewhere).
        self.replay.shutdown(Reason.DRAINING, "the edge is shutting down")
        # Agents are told to go (below) and must not find this edge again:
        # the agent listeners stop accepting, the links already up stay.
        stopping = [maybeDeferred(listener.stopService) for listener in self.public]
        for transport in self.transports.values():
            stop_accepting = getattr(transport, "stop_accepting", None)
            if stop_accepting is not None:
                stopping.append(maybeDeferred(stop_accepting))
        # The registry says this edge is draining (GoAway targets and the
        # cluster view skip it), and this edge reads who else is live.
        stopping.append(self.membership.set_draining())
        await gatherResults(stopping, consumeErrors=True)
        sessions = list(self.sessions.sessions.values())
        # Relay links (tunneld.edge.relay): the other edges stop routing here,
        # and the streams this edge relays out to them count as in flight.
        relayed_out = self.relays.links() if self.relays is not None else []
        if self.relay_dialer is not None:
            self.relay_dialer.going_away()
        links = [s.link for s in sessions] + relayed_out
        for session in sessions:
            session.link.send_control(GoAway(
                Reason.DRAINING, "the edge is shutting down", self.sessions.reconnect_to(session)
            ))
            # Each session closes as soon as its last stream ends; the
            # deadline is this drain's (below).
            self.sessions.retire(session, "the edge is shutting down", within=float("inf"))
        # Long-lived switched connections (WebSockets) would hold the drain to
        # its deadline: they get their Close (1001 draining) now, and reconnect.
        self.shutdown_upgraded(Reason.DRAINING, "the edge is shutting down")
        in_flight = sum(link.active_streams() for link in links)
        self.log.info(
            "draining: {streams} streams in flight on {sessions} agent sessions "
            "and {relays} relay links, up to {timeout}s",
            streams=in_flight, sessions=len(sessions), relays=len(relayed_out), timeout=timeout,
        )
        deadline = self.reactor.seconds() + timeout
        while not self._hurry and self.reactor.seconds() < deadline and any(
            link.active_streams() for link in links
        ):
            await deferLater(self.reactor, _DRAIN_POLL, lambda: None)
        left = sum(link.active_streams() for link in links)
        if left:
            self.log.warn(
                "drain deadline passed: closing {streams} streams with draining", streams=left
            )
        else:
            self.log.info("drained: every stream in flight finished")
        for session in list(self.sessions.sessions.values()):
            session.link.close(Reason.DRAINING, "the edge is shutting down")
        for link in relayed_out:
            link.close(Reason.DRAINING, "the edge is shutting down")

    # -- reload -------------------------------------------------------------

    def reload(self) -> bool:
        """
        Re-read the configuration file: new limits (and C{max_streams_per_agent},
        C{drain_timeout}) apply to new work; nothing established is touched.
        A file that fails validation is rejected with its reason and the
        configuration in force stays.
        """
        source = self.config.source
        try:
            new = load_edge_config(source)
        except ConfigError as e:
            self.log.error("configuration reload rejected, keeping the old one: {error}", error=str(e))
            return False
        old = self.config
        edge = dataclasses.replace(
            old.edge,
            max_streams_per_agent=new.edge.max_streams_per_agent,
            drain_timeout=new.edge.drain_timeout,
        )
        restart = [
            name for name, before, after in (
                ("edge", edge, new.edge),
                ("agents", old.agents, new.agents),
                ("transports", old.transports, new.transports),
                ("limits.proxy_protocol", old.limits.proxy_protocol, new.limits.proxy_protocol),
            )
            if before != after
        ]
        self.config = dataclasses.replace(old, edge=edge, limits=new.limits)
        self.policy.configure(new.limits, edge.max_streams_per_agent)
        self.replay.configure(new.limits)
        self.sessions.limits = new.limits
        for wrapper in self._proxy_wrappers:
            wrapper.trusted = TrustedProxies(new.limits.trusted_proxies)
        self.log.info("configuration reloaded from {source}: new limits apply to new work",
                      source=source)
        if restart:
            self.log.warn("changes to {sections} take a restart; not applied",
                          sections=", ".join(restart))
        return True

    def shutdown_upgraded(self, reason: Reason, message: str) -> int:
        """
        End every public connection that switched protocols (WebSocket and
        the like) for C{reason}, e.g. C{draining}: agents hear the reason,
        WebSocket clients get a Close frame with its code and text.  Returns
        how many were ended.
        """
        factories = [getattr(s.factory, "wrappedFactory", s.factory) for s in self.public]
        return sum(
            factory.shutdown_upgraded(reason, message)
            for factory in factories
            if hasattr(factory, "shutdown_upgraded")
        )
