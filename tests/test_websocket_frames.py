"""Tests for L{tunneld.edge.websocket_frames} (frame boundaries and the edge's own frames) and the RFC 6455 facts it shares with the transport (L{tunneld.wire.rfc6455})."""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunneld.edge.websocket_frames import (
    MAX_CLOSE_REASON,
    FrameTracker,
    close_frame,
    ping_frame,
)


def frame(opcode: int, payload: bytes, mask: bool = False, fin: bool = True) -> bytes:
    """An RFC 6455 frame, with 7-, 16- or 64-bit length as the size needs."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    masked = 0x80 if mask else 0
    if size < 126:
        head = bytes((first, masked | size))
    elif size < 1 << 16:
        head = bytes((first, masked | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, masked | 127)) + struct.pack("!Q", size)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


def boundaries(data: bytes, cuts: list[int]) -> list[bool]:
    """Feed C{data} cut at C{cuts}; whether the tracker was at a boundary after each piece."""
    tracker = FrameTracker()
    seen = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        tracker.feed(data[start:cut])
        seen.append(tracker.at_boundary)
        start = cut
    return seen


class FrameTrackerTests(SynchronousTestCase):
    """L{FrameTracker} follows frame boundaries however the bytes are split."""

    def test_whole_frames(self) -> None:
        """After whole frames of every length encoding the tracker is at a boundary."""
        tracker = FrameTracker()
        for size in (0, 1, 125, 126, 65535, 65536, 70000):
            tracker.feed(frame(0x2, b"x" * size))
            self.assertTrue(tracker.at_boundary, size)

    def test_mid_frame(self) -> None:
        """Inside a header or a payload the tracker is not at a boundary."""
        data = frame(0x2, b"x" * 300, mask=True)
        for cut in (1, 2, 3, 4, 7, 8, 100, len(data) - 1):
            tracker = FrameTracker()
            tracker.feed(data[:cut])
            self.assertFalse(tracker.at_boundary, cut)
            tracker.feed(data[cut:])
            self.assertTrue(tracker.at_boundary, cut)

    @settings(deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([0x0, 0x1, 0x2, 0x9, 0xA]),
                st.one_of(st.integers(0, 300), st.sampled_from([65535, 65536, 70000])),
                st.booleans(),
            ),
            min_size=1, max_size=6,
        ),
        st.lists(st.integers(0, 250000), max_size=20),
    )
    def test_any_split(self, frames: list[tuple[int, int, bool]], cuts: list[int]) -> None:
        """However a run of frames is cut into reads, boundaries are found exactly at frame ends."""
        data = b""
        ends = {0}
        for opcode, size, mask in frames:
            data += frame(opcode, b"y" * size, mask=mask)
            ends.add(len(data))
        cuts = [c for c in cuts if c <= len(data)]
        points = [*sorted(set(cuts)), len(data)]
        self.assertEqual(boundaries(data, cuts), [point in ends for point in points])

    def test_close_seen(self) -> None:
        """A Close frame is noticed only once its payload has gone by."""
        tracker = FrameTracker()
        tracker.feed(frame(0x1, b"text"))
        self.assertFalse(tracker.close_seen)
        close = frame(0x8, struct.pack("!H", 1000) + b"bye", mask=True)
        tracker.feed(close[:-1])
        self.assertFalse(tracker.close_seen)
        tracker.feed(close[-1:])
        self.assertTrue(tracker.close_seen)


class EdgeFrameTests(SynchronousTestCase):
    """The frames the edge writes itself."""

    def test_close_frame(self) -> None:
        """A Close frame is unmasked, final, and carries the code and the reason."""
        data = close_frame(1013, "saturated: too slow")
        self.assertEqual(data[0], 0x88)
        self.assertEqual(data[1], len(data) - 2)
        self.assertEqual(struct.unpack("!H", data[2:4])[0], 1013)
        self.assertEqual(data[4:], b"saturated: too slow")

    def test_close_reason_cut_at_a_character(self) -> None:
        """A long reason is cut to 123 bytes without splitting a UTF-8 character."""
        data = close_frame(1001, "é" * 100)
        reason = data[4:]
        self.assertLessEqual(len(reason), MAX_CLOSE_REASON)
        self.assertEqual(reason.decode("utf-8"), "é" * (MAX_CLOSE_REASON // 2))
        self.assertLessEqual(len(data) - 2, 125)

    def test_ping_frame(self) -> None:
        """A Ping is unmasked and final; payloads over 125 bytes are refused."""
        self.assertEqual(ping_frame(b"abc"), b"\x89\x03abc")
        self.assertRaises(ValueError, ping_frame, b"x" * 126)

    def test_same_close_as_the_transport(self) -> None:
        """The edge's Close and the WebSocket transport's (unmasked) Close are the same bytes, from one RFC 6455 module."""
        from tunneld.transports.websocket_framing import FrameWriter
        from tunneld.wire import rfc6455

        writer = FrameWriter(masked=False)
        for code, reason in ((1001, "draining: the server is shutting down"), (1011, "é" * 100)):
            self.assertEqual(close_frame(code, reason), writer.close(code, reason))
        self.assertEqual(MAX_CLOSE_REASON, rfc6455.MAX_CONTROL_PAYLOAD - 2)
        self.assertEqual(ping_frame(b"t"), rfc6455.server_control_frame(rfc6455.OP_PING, b"t"))
