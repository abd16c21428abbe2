"""A Python-only upstream for the smoke mode: twisted.web.static.File over the bench www directory.

Usage: python bench/pyupstream.py WWW_DIR; prints "listening PORT" once bound.
"""

import sys

from twisted.internet import reactor
from twisted.web import server, static


def main() -> None:
    root = static.File(sys.argv[1])
    root.contentTypes = {}
    root.defaultType = "application/octet-stream"
    port = reactor.listenTCP(0, server.Site(root), backlog=1024, interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
