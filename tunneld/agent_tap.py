"""C{twistd tunneld-agent}: the module the agent's ServiceMaker names."""

from tunneld.tap import AgentOptions as Options
from tunneld.tap import makeAgentService as makeService

__all__ = ["Options", "makeService"]
