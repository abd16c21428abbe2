"""
Transport plugins of tunneld.

Twisted's plugin system searches this package, and any C{tunneld/plugins}
directory without an C{__init__.py} elsewhere on C{sys.path}, for objects
providing L{tunneld.interfaces.ITransportPlugin}: a third party adds a
transport by dropping a module into such a directory.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
