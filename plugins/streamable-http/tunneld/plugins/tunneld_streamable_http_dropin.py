"""
The streamable-HTTP transport, as Twisted's plugin system finds it.

This module is installed into a C{tunneld/plugins} directory that has no
C{__init__.py} (see docs/plugins.md): the distribution ships no part of
tunneld itself, only this drop-in and its own package.
"""

from tunneld_streamable_http.plugin import StreamableHTTPTransport

streamable_http = StreamableHTTPTransport()
