"""Tests for L{tunneld.transports.websocket_framing}: the agent link's RFC 6455 reader and writer."""

from __future__ import annotations

import os
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.switches import switch_tricks
from tests.test_websocket_frames import frame
from tunneld.transports.websocket_framing import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_NO_STATUS,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    FrameReader,
    FrameWriter,
    FramingError,
    mask,
)
from tunneld.wire.rfc6455 import MAX_CLOSE_REASON

SIZES = (0, 1, 125, 126, 65535, 65536, 1 << 20)
LIMIT = 2 << 20


class Recorder:
    """A C{FrameHandler} that records everything it is handed."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def message_received(self, payload: bytes, binary: bool) -> None:
        self.events.append(("message", payload, binary))

    def ping_received(self, payload: bytes) -> None:
        self.events.append(("ping", payload))

    def pong_received(self, payload: bytes | bytearray) -> None:
        self.events.append(("pong", payload))

    def close_received(self, code: int, reason: str) -> None:
        self.events.append(("close", code, reason))


def read(data: bytes, *, masked: bool, cuts: list[int] | None = None, limit: int = LIMIT) -> list[tuple[object, ...]]:
    """What a reader hands over for C{data}, fed in pieces cut at C{cuts}."""
    recorder = Recorder()
    reader = FrameReader(recorder, masked=masked, max_message=limit)
    start = 0
    for cut in [*sorted(set(cuts or [])), len(data)]:
        reader.feed(data[start:cut])
        start = cut
    return recorder.events


def refusal(data: bytes, *, masked: bool = True, limit: int = LIMIT) -> tuple[int, str]:
    """The close code and reason a reader refuses C{data} with."""
    try:
        read(data, masked=masked, limit=limit)
    except FramingError as e:
        return e.code, e.reason
    raise AssertionError("no FramingError")


def naive_mask(key: bytes, data: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


class MaskTests(SynchronousTestCase):
    """L{mask} is XOR with the repeated key, on either side of the native-masker threshold."""

    def test_mask_matches_the_definition(self) -> None:
        """Every size from 0 to 600 and a 64 KiB payload mask exactly as RFC 6455 5.3 says."""
        key = b"\x01\x80\xfe\x37"
        for size in [*range(601), 65536 + 3]:
            data = os.urandom(size)
            self.assertEqual(mask(key, data), naive_mask(key, data), size)

    def test_pure_python_mask(self) -> None:
        """Without Autobahn's compiled masker, large payloads mask and round-trip the same way."""
        switch_tricks(self, False, "native_mask")
        key = b"\x9a\x00\x11\xff"
        for size in (127, 128, 4097, 65536):
            data = os.urandom(size)
            self.assertEqual(mask(key, data), naive_mask(key, data), size)
        payload = os.urandom(70000)
        self.assertEqual(read(FrameWriter(masked=True).binary(payload), masked=True), [("message", payload, True)])


class RoundTripTests(SynchronousTestCase):
    """What a writer encodes, the matching reader decodes, however it is cut."""

    def test_sizes_whole_and_byte_by_byte(self) -> None:
        """Each size (0 to 1 MiB, every length encoding) survives both directions, whole and byte by byte."""
        for masked in (True, False):
            writer = FrameWriter(masked=masked)
            for size in SIZES:
                payload = os.urandom(size)
                data = writer.binary(payload)
                self.assertEqual(read(data, masked=masked), [("message", payload, True)])
                recorder = Recorder()
                reader = FrameReader(recorder, masked=masked, max_message=LIMIT)
                for i in range(len(data)):
                    reader.feed(data[i : i + 1])
                self.assertEqual(recorder.events, [("message", payload, True)], (masked, size))

    def test_large_and_small_reads_of_one_payload(self) -> None:
        """A payload over reads large and small arrives whole; short reads are gathered, not listed one by one."""
        payload = os.urandom(600 * 1024)
        data = FrameWriter(masked=True).binary(payload)
        recorder = Recorder()
        reader = FrameReader(recorder, masked=True, max_message=LIMIT)
        reader.feed(data[:100_000])
        for at in range(100_000, 300_000, 100):
            reader.feed(data[at : at + 100])
        reader.feed(data[300_000:400_000])
        reader.feed(data[400_000:400_010])
        self.assertEqual(len(reader._payload), 4)
        reader.feed(data[400_010:])
        self.assertEqual(recorder.events, [("message", payload, True)])

    def test_random_chunks(self) -> None:
        """A run of frames of every size, cut into random reads, comes out whole and in order."""
        rng = random.Random(8)
        for masked in (True, False):
            writer = FrameWriter(masked=masked)
            payloads = [rng.randbytes(size) for size in SIZES]
            data = b"".join(writer.binary(p) for p in payloads)
            cuts = [rng.randrange(len(data)) for _ in range(300)]
            self.assertEqual(
                read(data, masked=masked, cuts=cuts), [("message", p, True) for p in payloads]
            )

    @settings(deadline=None, max_examples=150)
    @given(
        st.lists(st.binary(max_size=300) | st.sampled_from([b"z" * 65535, b"q" * 70000]), max_size=5),
        st.lists(st.integers(0, 200_000), max_size=12),
        st.booleans(),
    )
    def test_any_split(self, payloads: list[bytes], cuts: list[int], masked: bool) -> None:
        """However a run of frames is cut into reads, each message comes out once, unchanged."""
        writer = FrameWriter(masked=masked)
        data = b"".join(writer.binary(p) for p in payloads)
        cuts = [c for c in cuts if c <= len(data)]
        self.assertEqual(
            read(data, masked=masked, cuts=cuts), [("message", p, True) for p in payloads]
        )


class WriterTests(SynchronousTestCase):
    """The frames L{FrameWriter} makes."""

    def test_client_masks_with_a_fresh_key_per_frame(self) -> None:
        """A client's frames are masked, each with the next 4 bytes of its random source."""
        source = bytes(range(1, 33)) * 128
        writer = FrameWriter(masked=True, random=lambda n: source[:n])
        first, second = writer.binary(b"hello"), writer.binary(b"hello")
        self.assertEqual(first[:2], b"\x82\x85")
        self.assertEqual(first[2:6], b"\x01\x02\x03\x04")
        self.assertEqual(second[2:6], b"\x05\x06\x07\x08")
        self.assertEqual(first[6:], naive_mask(b"\x01\x02\x03\x04", b"hello"))
        self.assertNotEqual(first[6:], second[6:])

    def test_server_frames_are_plain(self) -> None:
        """A server's frames carry no mask: header then payload as given."""
        writer = FrameWriter(masked=False)
        self.assertEqual(writer.binary(b"abc"), b"\x82\x03abc")
        self.assertEqual(writer.binary(b"x" * 126)[:4], b"\x82\x7e\x00\x7e")
        self.assertEqual(writer.binary(b"x" * 65536)[:10], b"\x82\x7f" + struct.pack("!Q", 65536))

    def test_binary_frames_as_binary(self) -> None:
        """
        Messages given in pieces (bytes and views) encode byte for byte as
        L{FrameWriter.binary} of each joined payload, keys taken in the same order.
        """
        source = os.urandom(4096)
        rng = random.Random(5)
        messages: list[list[bytes | memoryview]] = []
        for size in (0, 1, 2, 127, 128, 129, 4096, 65535, 65536, 200_000):
            payload = rng.randbytes(size)
            cut = size // 3
            messages.append([payload[:cut], memoryview(b"--" + payload[cut:])[2:]])
        messages.append([b"ab", b"", memoryview(b"cd"), b"e" * 300])
        for masked in (True, False):
            batched = FrameWriter(masked=masked, random=lambda n: source[:n])
            single = FrameWriter(masked=masked, random=lambda n: source[:n])
            expected = b"".join(single.binary(b"".join(bytes(p) for p in m)) for m in messages)
            self.assertEqual(batched.binary_frames(messages), expected)
            self.assertEqual(batched.binary_frames([]), b"")

    def test_binary_frames_without_the_native_masker(self) -> None:
        """Without Autobahn's compiled masker, batched frames are masked the same."""
        source = os.urandom(4096)
        messages: list[list[bytes | memoryview]] = [[b"h" * 5, os.urandom(70000)], [os.urandom(300)]]
        expected = FrameWriter(masked=True, random=lambda n: source[:n]).binary_frames(messages)
        switch_tricks(self, False, "native_mask")
        got = FrameWriter(masked=True, random=lambda n: source[:n]).binary_frames(messages)
        self.assertEqual(got, expected)

    def test_close_reason_cut_at_a_character(self) -> None:
        """A Close reason is cut to 123 bytes without splitting a UTF-8 character."""
        data = FrameWriter(masked=False).close(4008, "é" * 100)
        self.assertEqual(data[0], 0x88)
        self.assertLessEqual(data[1], 125)
        self.assertEqual(struct.unpack("!H", data[2:4])[0], 4008)
        self.assertEqual(data[4:].decode("utf-8"), "é" * (MAX_CLOSE_REASON // 2))

    def test_control_frames(self) -> None:
        """Pong echoes its payload, an empty Close has no code, a ping over 125 bytes is refused."""
        writer = FrameWriter(masked=False)
        self.assertEqual(writer.pong(b"hb"), b"\x8a\x02hb")
        self.assertEqual(writer.close(None), b"\x88\x00")
        self.assertRaises(ValueError, writer.ping, b"p" * 126)


class ReaderTests(SynchronousTestCase):
    """What L{FrameReader} hands over, and what it refuses with which close code."""

    def test_fragments_reassembled_around_a_ping(self) -> None:
        """A fragmented message with a Ping in between: the Ping at once, then the whole message."""
        data = (
            frame(0x2, b"ab", mask=True, fin=False)
            + frame(0x9, b"hb", mask=True)
            + frame(0x0, b"cd", mask=True, fin=False)
            + frame(0x0, b"ef", mask=True)
        )
        self.assertEqual(read(data, masked=True), [("ping", b"hb"), ("message", b"abcdef", True)])

    def test_large_messages_are_handed_over_uncopied(self) -> None:
        """
        A large whole message comes as a view of the read (unmasked) or as
        the buffer it was unmasked into (masked); small ones come as bytes.
        """
        payload = os.urandom(100_000)
        plain = FrameWriter(masked=False).binary(payload)
        recorder = Recorder()
        FrameReader(recorder, masked=False, max_message=LIMIT).feed(plain)
        [(_, view, _)] = recorder.events
        self.assertIsInstance(view, memoryview)
        assert isinstance(view, memoryview)
        self.assertIs(view.obj, plain)
        self.assertEqual(view, payload)
        masked = read(FrameWriter(masked=True).binary(payload), masked=True)
        self.assertEqual(masked, [("message", payload, True)])
        self.assertIsInstance(masked[0][1], bytearray)
        for small in (b"", b"x" * 127, b"y" * 4095):
            for is_masked in (True, False):
                [(_, got, _)] = read(FrameWriter(masked=is_masked).binary(small), masked=is_masked)
                self.assertEqual((type(got), got), (bytes, small))

    def test_text_and_pong(self) -> None:
        """A text message is handed over as not binary; a Pong is handed over as a Pong."""
        data = frame(0xA, b"late", mask=True) + frame(0x1, b"hi", mask=True)
        self.assertEqual(read(data, masked=True), [("pong", b"late"), ("message", b"hi", False)])

    def test_close_then_nothing(self) -> None:
        """A Close hands over its code and reason; bytes after it are ignored."""
        data = frame(0x8, struct.pack("!H", 4005) + b"draining: bye", mask=True)
        data += frame(0x2, b"after", mask=True)
        self.assertEqual(read(data, masked=True), [("close", 4005, "draining: bye")])
        self.assertEqual(read(frame(0x8, b"", mask=True), masked=True), [("close", CLOSE_NO_STATUS, "")])

    def test_masking_rules(self) -> None:
        """A server refuses unmasked frames, a client refuses masked ones (1002)."""
        self.assertEqual(
            refusal(frame(0x2, b"x"), masked=True), (CLOSE_PROTOCOL_ERROR, "unmasked frame from a client")
        )
        self.assertEqual(
            refusal(frame(0x2, b"x", mask=True), masked=False),
            (CLOSE_PROTOCOL_ERROR, "masked frame from a server"),
        )

    def test_protocol_errors(self) -> None:
        """Each violation of RFC 6455 is refused with 1002 and a reason naming it."""
        rsv = bytearray(frame(0x2, b"x", mask=True))
        rsv[0] |= 0x40
        cases = {
            bytes(rsv): "reserved bits set",
            frame(0x3, b"", mask=True): "unknown opcode 3",
            frame(0xB, b"", mask=True): "unknown opcode 11",
            frame(0x9, b"p", mask=True, fin=False): "fragmented control frame",
            frame(0x9, b"p" * 126, mask=True): "control frame payload of 126 bytes",
            frame(0x0, b"c", mask=True): "continuation frame outside a message",
            frame(0x2, b"a", mask=True, fin=False) + frame(0x2, b"b", mask=True): "new message before",
            frame(0x8, b"\x03", mask=True): "one-byte payload",
            frame(0x8, struct.pack("!H", 1005), mask=True): "invalid close code 1005",
            frame(0x8, struct.pack("!H", 2999), mask=True): "invalid close code 2999",
            b"\x82\xfe\x00\x05" + b"k" * 9: "not minimally encoded",
            b"\x82\xff" + struct.pack("!Q", 1 << 63) + b"k" * 4: "not minimally encoded",
        }
        for data, reason in cases.items():
            code, said = refusal(data)
            self.assertEqual(code, CLOSE_PROTOCOL_ERROR, said)
            self.assertIn(reason, said)

    def test_close_reason_not_utf8(self) -> None:
        """A Close whose reason is not UTF-8 is refused with 1007."""
        code, _ = refusal(frame(0x8, struct.pack("!H", 1000) + b"\xff\xfe", mask=True))
        self.assertEqual(code, CLOSE_INVALID_PAYLOAD)

    def test_too_big_refused_from_the_header(self) -> None:
        """A frame, or fragments together, over the limit is refused with 1009 before its payload arrives."""
        head = frame(0x2, b"y" * 70000, mask=True)[:14]
        self.assertEqual(refusal(head, limit=65536)[0], CLOSE_TOO_BIG)
        parts = frame(0x2, b"y" * 40000, mask=True, fin=False) + frame(0x0, b"y" * 40000, mask=True)
        code, reason = refusal(parts, limit=65536)
        self.assertEqual((code, reason), (CLOSE_TOO_BIG, "message of 80000 bytes exceeds 65536"))
        self.assertEqual(read(frame(0x2, b"y" * 65536, mask=True), masked=True, limit=65536)[0][1], b"y" * 65536)

    def test_stopped_after_an_error(self) -> None:
        """After a refusal the reader ignores whatever follows."""
        recorder = Recorder()
        reader = FrameReader(recorder, masked=True, max_message=LIMIT)
        self.assertRaises(FramingError, reader.feed, frame(0x3, b"", mask=True))
        reader.feed(frame(0x2, b"late", mask=True))
        self.assertEqual(recorder.events, [])
