"""
atheris harness: the public HTTP/1.1 parser (PublicHTTPProtocol over a
StringTransport), input fed in arbitrary pieces.  Whatever arrives, the
edge answers, waits or closes; any exception is a finding.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_http1.py -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["tunneld", "h11"]):
    from twisted.internet.protocol import connectionDone
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from fuzz._common import pieces
    from tests.test_http1 import HOST, FakeLink, FakeRoute, FakeRouter
    from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPSettings

CLOCK = Clock()
FACTORY = PublicHTTPFactory(
    FakeRouter({HOST: FakeRoute(HOST, FakeLink())}),
    PublicHTTPSettings(max_header_bytes=4096, max_header_count=20, max_request_line=1024),
    CLOCK,
)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    protocol = FACTORY.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    for piece in pieces(fdp):
        protocol.dataReceived(piece)
    written = transport.value()
    assert not written or written.startswith(b"HTTP/1.1 "), written[:60]
    protocol.connectionLost(connectionDone)
    CLOCK.advance(1000)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
