# -*- test-case-name: tests.test_plugins -*-
"""
Finding transport plugins by the name the configuration uses.

Built-in and third-party transports are found the same way, through
L{twisted.plugin.getPlugins} on the L{tunneld.plugins} package, so routing
code never names a transport.
"""

from __future__ import annotations

from twisted.plugin import getPlugins
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

import tunneld.plugins
from tunneld.errors import MissingTransport
from tunneld.interfaces import ITransportPlugin


def available_transports() -> dict[str, ITransportPlugin]:
    """Every installed transport plugin, by name."""
    found: dict[str, ITransportPlugin] = {}
    for plugin in getPlugins(ITransportPlugin, tunneld.plugins):
        try:
            verifyObject(ITransportPlugin, plugin)
        except Invalid:
            continue
        found.setdefault(plugin.name, plugin)
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
