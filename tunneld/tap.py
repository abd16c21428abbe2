# -*- test-case-name: tests.test_tap -*-
"""
C{twistd tunneld} and C{twistd tunneld-agent}: options and service makers.

All validation happens in C{postOptions}, so a bad configuration file stops
twistd before anything listens, with one line naming the file, the key and
the reason, and exit status 1 (a bad file is not a command-line mistake, so
twistd's usage text is left out).  The service tree's root is a
L{StartupGuard}: a listener that cannot listen stops the process too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from tunneld.config import (
    AgentConfig,
    EdgeConfig,
    load_agent_config,
    load_edge_config,
    transport_options,
)
from tunneld.errors import ConfigError


def _config_error(program: str, error: ConfigError) -> SystemExit:
    """The exit for a bad configuration: one line on stderr, status 1."""
    return SystemExit(f"{program}: {error}")


class EdgeOptions(usage.Options):
    """Options of C{twistd tunneld}."""

    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", None, "Edge configuration (TOML); without it, loopback defaults."],
    ]

    config: EdgeConfig
    transports: list[tuple[Any, Any]]

    def postOptions(self) -> None:  # noqa: N802
        try:
            self.config = load_edge_config(self["config"])
            edge = self.config.edge
            self.transports = transport_options(
                edge.transports, self.config.transports, self.config.source, edge=True
            )
        except ConfigError as e:
            raise _config_error("tunneld", e) from None


class AgentOptions(usage.Options):
    """Options of C{twistd tunneld-agent}."""

    synopsis = "--config FILE"
    optParameters = [
        ["config", "c", None, "Agent configuration (TOML)."],
    ]

    config: AgentConfig
    transports: list[tuple[Any, Any]]

    def postOptions(self) -> None:  # noqa: N802
        try:
            self.config = load_agent_config(self["config"])
            if not self.config.tunnels:
                raise ConfigError(self.config.source, "tunnels", "no [[tunnels]] configured")
            agent = self.config.agent
            self.transports = transport_options(
                agent.transports, self.config.transports, self.config.source, edge=False
            )
        except ConfigError as e:
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
