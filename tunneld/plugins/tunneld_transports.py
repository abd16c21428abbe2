"""
The built-in transport plugins (one object per transport).

The websocket transport's module loads Autobahn (with its WAMP and validator
modules, a large share of a process's RSS), which an edge or agent whose
configuration names no websocket link never uses: its plugin object here
loads that module at its first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from zope.interface import implementer

from tunneld.interfaces import ITransportPlugin
from tunneld.transports.grpc import GrpcTransport


@implementer(ITransportPlugin)
class _LoadedOnUse:
    """A transport plugin whose module is imported when the plugin is first used."""

    def __init__(self, name: str, module: str, factory: str) -> None:
        self.name = name
        self._where = (module, factory)
        self._plugin: Any = None

    def _loaded(self) -> Any:
        if self._plugin is None:
            module, factory = self._where
            self._plugin = getattr(importlib.import_module(module), factory)()
        return self._plugin

    def edge_options(self, table: Any, where: str) -> object:
        """ITransportPlugin.edge_options"""
        return self._loaded().edge_options(table, where)

    def agent_options(self, table: Any, where: str) -> object:
        """ITransportPlugin.agent_options"""
        return self._loaded().agent_options(table, where)

    def edge_service(self, options: object, setup: Any) -> Any:
        """ITransportPlugin.edge_service"""
        return self._loaded().edge_service(options, setup)

    def connect(self, options: object, setup: Any) -> Any:
        """ITransportPlugin.connect"""
        return self._loaded().connect(options, setup)


grpc = GrpcTransport()
websocket = _LoadedOnUse("websocket", "tunneld.transports.websocket", "WebSocketTransport")
