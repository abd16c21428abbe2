"""The single-hop proxy a Twisted user would write: twisted.web.proxy.ReverseProxyResource.

Usage: python bench/twproxy.py UPSTREAM_PORT; prints "listening PORT" once bound.
"""

import sys

from twisted.internet import reactor
from twisted.web import proxy, server


def main() -> None:
    upstream_port = int(sys.argv[1])
    site = server.Site(proxy.ReverseProxyResource("127.0.0.1", upstream_port, b""))
    port = reactor.listenTCP(0, site, backlog=1024, interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
