"""
atheris harness: the agent link's WebSocket frame reader
(L{tunneld.transports.websocket_framing.FrameReader}), edge side, fed the
input in arbitrary reads.  Only a L{FramingError} may come out, and nothing
handed over exceeds the message limit.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_wsframes.py -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["tunneld"]):
    from fuzz._common import pieces
    from tunneld.transports.websocket_framing import (
        MAX_CONTROL_PAYLOAD,
        FrameReader,
        FramingError,
    )

LIMIT = 1 << 16


class _Handler:
    def __init__(self) -> None:
        self.closed = False

    def message_received(self, payload: bytes, binary: bool) -> None:
        assert not self.closed
        assert len(payload) <= LIMIT, len(payload)

    def ping_received(self, payload: bytes) -> None:
        assert not self.closed
        assert len(payload) <= MAX_CONTROL_PAYLOAD

    def pong_received(self, payload: bytes | bytearray) -> None:
        assert not self.closed
        assert len(payload) <= MAX_CONTROL_PAYLOAD

    def close_received(self, code: int, reason: str) -> None:
        assert not self.closed
        self.closed = True


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    masked = fdp.ConsumeBool()
    reader = FrameReader(_Handler(), masked=masked, max_message=LIMIT)
    for piece in pieces(fdp):
        try:
            reader.feed(piece)
        except FramingError as e:
            assert e.code in (1002, 1007, 1009), e.code
            break


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
