"""
atheris harness: the gRPC (HTTP/2) agent-link transport's edge side fed raw
bytes after a valid HTTP/2 preface, as a hostile agent would send them.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_grpc.py -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["tunneld"]):
    from twisted.internet.protocol import connectionDone
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from fuzz._common import pieces
    from tunneld.interfaces import EdgeLinkSetup
    from tunneld.transports.grpc import EdgeGrpcFactory, GrpcEdgeOptions

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CLOCK = Clock()
FACTORY = EdgeGrpcFactory(GrpcEdgeOptions(), EdgeLinkSetup(on_link=lambda link: None, reactor=CLOCK))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    protocol = FACTORY.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    with_preface = fdp.ConsumeBool()
    for i, piece in enumerate(pieces(fdp)):
        protocol.dataReceived(PREFACE + piece if with_preface and i == 0 else piece)
    protocol.connectionLost(connectionDone)
    CLOCK.advance(1000)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
