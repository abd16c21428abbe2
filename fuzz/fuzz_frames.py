"""
atheris harness: the agent-link frame decoder (codec.decode + FrameLink)
on the edge side, with two streams open.  Every transport that carries
tunnel frames (websocket, drop-ins) ends here.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_frames.py -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["tunneld"]):
    from twisted.internet.task import Clock

    from fuzz._common import pieces
    from tests.test_mux import HEAD, Handler, Receiver, Wire, make_link
    from tunneld.model.reasons import Reason


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    wire = Wire()
    link = make_link(wire, Clock(), is_edge=True, window=256, max_frame_size=1 << 16)
    link.set_handler(Handler())
    for _ in range(2):
        link.open_stream(HEAD, Receiver()).write(b"y" * 300)
    for payload in pieces(fdp):
        link.frame_received(payload)
        if link.closed:
            assert wire.closed is not None and wire.closed[0] is Reason.PROTOCOL_ERROR, wire.closed
            break


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
