# -*- test-case-name: tests.test_config,tests.test_startup,tests.test_identity -*-
"""
C{twistd tunneld} and C{twistd tunneld-agent}: options and service makers.

All validation happens in C{postOptions}, so a bad configuration file stops
twistd before anything listens, with one line naming the file, the key and
the reason, and exit status 1 (a bad file is not a command-line mistake, so
twistd's usage text is left out).  The service tree's root is a
L{StartupGuard}: a listener that cannot listen stops the process too.

The configuration is a pure schema (L{tunneld.config}); what it names is
resolved here, at start, by L{load_edge} and L{load_agent}: the transport
plugins and their tables, the certificates that must load, the agent id a
client certificate names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from tunneld.config import AgentConfig, EdgeConfig, load_agent_config, load_edge_config
from tunneld.errors import ConfigError, InvalidTransport
from tunneld.interfaces import ITransportPlugin
from tunneld.registry import transport_options

Transports = list[tuple[ITransportPlugin, Any]]


def _config_error(program: str, error: ConfigError | InvalidTransport) -> SystemExit:
    """The exit for a bad configuration or plugin: one line on stderr, status 1."""
    return SystemExit(f"{program}: {error}")


def load_edge(path: str | None) -> tuple[EdgeConfig, Transports]:
    """
    The edge's configuration as C{twistd tunneld} starts with it: the file
    checked against the schema, the public TLS certificates loaded (so a
    bad one stops the start with its key, before anything listens), the
    transport plugins found with their tables validated.  Raises L{ConfigError} or
    L{InvalidTransport}.
    """
    config = load_edge_config(path)
    if config.edge.public_tls_listen:
        from tunneld.edge.public_tls import public_tls_contexts

        public_tls_contexts(config.edge.tls, config.source)
    edge = config.edge
    transports = transport_options(edge.transports, config.transports, config.source, edge=True)
    return config, transports


def load_agent(path: str | None) -> tuple[AgentConfig, Transports]:
    """
    The agent's configuration as C{twistd tunneld-agent} starts with it:
    the file checked against the schema, its id taken from (or checked
    against) its client certificate, the transport plugins found with their
    tables validated.  Raises L{ConfigError} or L{InvalidTransport}.
    """
    from tunneld.agent.identity import resolve_agent_id

    config = load_agent_config(path)
    agent = dataclasses.replace(config.agent, id=resolve_agent_id(config.agent, config.source))
    config = dataclasses.replace(config, agent=agent)
    transports = transport_options(
        agent.transports, config.transports, config.source, edge=False
    )
    return config, transports


class EdgeOptions(usage.Options):
    """Options of C{twistd tunneld}."""

    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", None, "Edge configuration (TOML); without it, loopback defaults."],
    ]

    config: EdgeConfig
    transports: Transports

    def postOptions(self) -> None:  # noqa: N802
        try:
            self.config, self.transports = load_edge(self["config"])
        except (ConfigError, InvalidTransport) as e:
            raise _config_error("tunneld", e) from None


class AgentOptions(usage.Options):
    """Options of C{twistd tunneld-agent}."""

    synopsis = "--config FILE"
    optParameters = [
        ["config", "c", None, "Agent configuration (TOML)."],
    ]

    config: AgentConfig
    transports: Transports

    def postOptions(self) -> None:  # noqa: N802
        try:
            self.config, self.transports = load_agent(self["config"])
            if not self.config.tunnels:
                raise ConfigError(self.config.source, "tunnels", "no [[tunnels]] configured")
        except (ConfigError, InvalidTransport) as e:
            raise _config_error("tunneld-agent", e) from None


Options = EdgeOptions


def makeService(options: EdgeOptions, reactor: Any = None) -> IService:  # noqa: N802
    """The edge's service tree (the collector tuned once it has started)."""
    from tunneld.edge.service import EdgeService
    from tunneld.speedups.gctune import GcTuning
    from tunneld.speedups.scheduling import CpuScheduling
    from tunneld.speedups.service import Speedups
    from tunneld.startup import StartupGuard

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = StartupGuard(options.config.source, reactor)
    Speedups(dataclasses.asdict(options.config.speedups)).setServiceParent(top)
    EdgeService(options.config, options.transports, reactor).setServiceParent(top)
    CpuScheduling(options.config.edge.cpu_scheduling).setServiceParent(top)
    GcTuning().setServiceParent(top)
    return top


def makeAgentService(options: AgentOptions, reactor: Any = None) -> IService:  # noqa: N802
    """
    The agent's service, with the live console summary (when stdout is a
    terminal), systemd notification (when run by systemd: ready once the edge
    has welcomed the agent, i.e. its tunnels are served) and the collector
    tuned once it has started.
    """
    from tunneld.agent.service import AgentService
    from tunneld.exitstatus import EX_CONFIG, stop_process
    from tunneld.observe.console import AgentActivity, ConsoleSummary
    from tunneld.observe.systemd import SystemdNotifyService
    from tunneld.speedups.gctune import GcTuning
    from tunneld.speedups.scheduling import CpuScheduling
    from tunneld.speedups.service import Speedups
    from tunneld.startup import StartupGuard

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = StartupGuard(options.config.source, reactor)
    Speedups(dataclasses.asdict(options.config.speedups)).setServiceParent(top)
    agent = AgentService(options.config, options.transports, reactor)
    # Refused for good (identity, grant): stop, and exit non-zero.
    agent.on_fatal = lambda message: stop_process(reactor, EX_CONFIG)
    agent.setServiceParent(top)
    console = ConsoleSummary(reactor, agent, AgentActivity())
    if console.enabled:
        agent.stream_hook = console.activity.wrap
        console.setServiceParent(top)
    SystemdNotifyService(
        reactor, lambda: [agent.ready],
        lambda: f"agent {agent.agent_id} serving " + ", ".join(agent.public_urls),
    ).setServiceParent(top)
    CpuScheduling(options.config.agent.cpu_scheduling).setServiceParent(top)
    GcTuning().setServiceParent(top)
    return top
