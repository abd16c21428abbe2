# -*- test-case-name: tests.test_plugins -*-
"""
The transport plugins by the name the configuration uses, resolved at start.

Built-in and third-party transports are found the same way, through
L{twisted.plugin.getPlugins} on the L{tunneld.plugins} package, so routing
code never names a transport.  The service makers (L{tunneld.tap}) pick the
plugins the configuration names here and have each validate its own
C{[transports.NAME]} table; the configuration schema itself knows no plugin.

A plugin that cannot be used is an error naming it, never skipped: a module
in the plugin package that fails to import, an object claiming
L{ITransportPlugin} that does not provide it, two plugins of one name.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import getPlugins
from twisted.python.modules import getModule
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

import tunneld.plugins
from tunneld.endpoints import server_endpoint_problem
from tunneld.errors import ConfigError, InvalidTransport, MissingTransport
from tunneld.interfaces import ITransportPlugin

__all__ = ["available_transports", "find_transport", "transport_options"]


def _import_plugin_modules() -> None:
    """
    Import every module of the plugin package, so that one that fails is an
    L{InvalidTransport} naming it: L{getPlugins} would only log the
    traceback and leave the transport out.
    """
    for module in getModule(tunneld.plugins.__name__).iterModules():
        try:
            module.load()
        except Exception as e:
            raise InvalidTransport(
                f"transport plugin module {module.name} ({module.filePath.path}) cannot be "
                f"imported: {type(e).__name__}: {e}"
            ) from e


def available_transports() -> dict[str, ITransportPlugin]:
    """
    Every installed transport plugin, by name; L{InvalidTransport} names
    one that cannot be used.
    """
    _import_plugin_modules()
    found: dict[str, ITransportPlugin] = {}
    for plugin in getPlugins(ITransportPlugin, tunneld.plugins):
        what = f"transport plugin {getattr(plugin, 'name', '(no name)')!r} ({plugin!r})"
        try:
            verifyObject(ITransportPlugin, plugin)
        except Invalid as e:
            raise InvalidTransport(f"{what} does not provide ITransportPlugin: {e}") from e
        other = found.setdefault(plugin.name, plugin)
        if other is not plugin:
            raise InvalidTransport(
                f"two transport plugins are called {plugin.name!r}: {other!r} and {plugin!r}"
            )
    return found


def find_transport(name: str, where: str, key: str) -> ITransportPlugin:
    """
    The plugin called C{name}, or L{MissingTransport} naming it and listing
    what is installed.
    """
    plugins = available_transports()
    try:
        return plugins[name]
    except KeyError:
        installed = ", ".join(sorted(plugins)) or "none"
        raise MissingTransport(
            where, key, f"transport plugin {name!r} is not installed (installed: {installed})"
        ) from None


def transport_options(
    names: list[str], tables: dict[str, dict[str, Any]], where: str, *, edge: bool
) -> list[tuple[ITransportPlugin, Any]]:
    """
    The plugins named in C{names} with their validated options; a missing
    plugin or a bad option fails with the file and key.
    """
    section = "edge" if edge else "agent"
    chosen = []
    for i, name in enumerate(names):
        plugin = find_transport(name, where, f"{section}.transports[{i}]")
        table = tables.get(name, {})
        options = plugin.edge_options(table, where) if edge else plugin.agent_options(table, where)
        listen = getattr(options, "listen", None) if edge else None
        if isinstance(listen, str):
            # Whatever the plugin checks itself, its listener is an endpoint string.
            problem = server_endpoint_problem(listen)
            if problem:
                raise ConfigError(where, f"transports.{name}.listen", problem)
        chosen.append((plugin, options))
    return chosen
