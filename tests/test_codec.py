"""The protobuf codec: hand-written data frames, round trips, rejected frames, reason codes, fuzzing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_mux import HEAD, Handler, Receiver, Wire, make_link
from tunneld.model.messages import (
    STREAM_KINDS,
    GoAway,
    Hello,
    Refusal,
    ReplyHead,
    StreamHead,
    TunnelSpec,
    Welcome,
)
from tunneld.model.reasons import Reason
from tunneld.wire import codec
from tunneld.wire import codec as _plain
from tunneld.wire import tunnel_pb2 as pb
from tunneld.wire.codec import FrameError


class _Remembering(codec.Codec):
    """A codec that remembers, with the module's constants at hand as the tests use them."""

    _CACHED = codec._CACHED
    _MAX_NAMES = codec._MAX_NAMES
    REPLY = codec.REPLY


STREAM_IDS = [0, 1, 2, 127, 128, 255, 16383, 16384, 2097151, 2097152, 2**31 - 1, 2**32 - 1]
SIZES = [0, 1, 2, 125, 126, 127, 128, 129, 16380, 16381, 16382, 16383, 16384, 16385, 70000]


def generated_data(stream_id: int, data: bytes) -> bytes:
    return pb.Frame(stream_id=stream_id, data=pb.Data(data=data)).SerializeToString()


def wire(frame: pb.Frame) -> pb.Frame:
    """C{frame} serialised and parsed back, as the far end sees it."""
    return codec.decode(frame.SerializeToString())


class EncodeDataTests(SynchronousTestCase):
    """encode_data writes the same bytes as the generated encoder."""

    def test_boundaries(self) -> None:
        """Stream ids and sizes around every varint length boundary encode identically."""
        for stream_id in STREAM_IDS:
            for size in SIZES:
                data = bytes(i % 251 for i in range(size))
                self.assertEqual(
                    codec.encode_data(stream_id, data),
                    generated_data(stream_id, data),
                    (stream_id, size),
                )

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 2**32 - 1), st.binary(max_size=20000))
    def test_arbitrary(self, stream_id: int, data: bytes) -> None:
        """Any stream id and payload encodes identically and decodes back to itself."""
        encoded = codec.encode_data(stream_id, data)
        self.assertEqual(encoded, generated_data(stream_id, data))
        frame = codec.decode(encoded)
        self.assertEqual((frame.stream_id, frame.data.data), (stream_id, data))


_names = st.binary(max_size=140)
_header_lists = st.lists(st.tuples(_names, st.binary(max_size=300)), max_size=6).map(tuple)
_texts = st.text(max_size=140)
stream_heads = st.builds(
    StreamHead,
    kind=st.sampled_from(sorted(STREAM_KINDS)),
    tunnel=_texts,
    method=_texts,
    target=_texts,
    headers=_header_lists,
    peer=_texts,
    scheme=st.sampled_from(["http", "https"]),
)
reply_heads = st.builds(
    ReplyHead, status=st.integers(100, 999), reason=st.binary(max_size=140), headers=_header_lists
)
stream_ids = st.one_of(st.sampled_from(STREAM_IDS), st.integers(0, 2**32 - 1))


class HandEncodingTests(SynchronousTestCase):
    """open_bytes, reply_bytes, end_bytes and window_bytes write the generated encoder's bytes."""

    @settings(max_examples=300, deadline=None)
    @given(stream_ids, stream_heads)
    def test_open(self, stream_id: int, head: StreamHead) -> None:
        """Any stream head encodes identically and reads back to itself."""
        encoded = codec.open_bytes(stream_id, head)
        self.assertEqual(encoded, codec.encode_open(stream_id, head).SerializeToString())
        self.assertEqual(codec.read(encoded), (stream_id, codec.OPEN, head, False))

    @settings(max_examples=300, deadline=None)
    @given(stream_ids, reply_heads)
    def test_reply(self, stream_id: int, reply: ReplyHead) -> None:
        """Any reply head encodes identically and reads back to itself."""
        encoded = codec.reply_bytes(stream_id, reply)
        self.assertEqual(encoded, codec.encode_reply(stream_id, reply).SerializeToString())
        self.assertEqual(codec.read(encoded), (stream_id, codec.REPLY, reply, False))

    @settings(max_examples=300, deadline=None)
    @given(stream_ids, _header_lists)
    def test_end(self, stream_id: int, trailers: tuple[tuple[bytes, bytes], ...]) -> None:
        """Any trailers encode identically and read back to themselves."""
        encoded = codec.end_bytes(stream_id, trailers)
        self.assertEqual(encoded, codec.encode_end(stream_id, trailers).SerializeToString())
        self.assertEqual(codec.read(encoded), (stream_id, codec.END, trailers, False))

    @settings(max_examples=200, deadline=None)
    @given(stream_ids, st.integers(0, 2**32 - 1))
    def test_window(self, stream_id: int, increment: int) -> None:
        """Any increment encodes identically and reads back to itself."""
        encoded = codec.window_bytes(stream_id, increment)
        self.assertEqual(encoded, codec.encode_window(stream_id, increment).SerializeToString())
        self.assertEqual(codec.read(encoded), (stream_id, codec.WINDOW, increment, False))

    @settings(max_examples=200, deadline=None)
    @given(stream_ids, st.sampled_from(list(Reason)), _texts)
    def test_reset(self, stream_id: int, reason: Reason, message: str) -> None:
        """Any reset encodes identically and reads back to itself."""
        encoded = codec.reset_bytes(stream_id, reason, message)
        self.assertEqual(encoded, codec.encode_reset(stream_id, reason, message).SerializeToString())
        self.assertEqual(codec.read(encoded), (stream_id, codec.RESET, (reason, message), False))

    @settings(max_examples=200, deadline=None)
    @given(stream_ids, st.binary(max_size=300), stream_heads, reply_heads)
    def test_end_stream(
        self, stream_id: int, data: bytes, head: StreamHead, reply: ReplyHead
    ) -> None:
        """Open, Reply and Data frames with end_stream encode identically and read back with the flag."""
        for encoded, generated, expected in [
            (
                codec.encode_data(stream_id, data, end_stream=True),
                pb.Frame(stream_id=stream_id, data=pb.Data(data=data, end_stream=True)),
                (stream_id, codec.DATA, data, True),
            ),
            (
                codec.open_bytes(stream_id, head, end_stream=True),
                codec.encode_open(stream_id, head, end_stream=True),
                (stream_id, codec.OPEN, head, True),
            ),
            (
                codec.reply_bytes(stream_id, reply, end_stream=True),
                codec.encode_reply(stream_id, reply, end_stream=True),
                (stream_id, codec.REPLY, reply, True),
            ),
        ]:
            self.assertEqual(encoded, generated.SerializeToString())
            self.assertEqual(codec.read(encoded), expected)

    def test_header_cache(self) -> None:
        """Repeated, unhashable and many distinct headers all encode as the generated encoder does."""
        headers = [(b"server", b"s"), [b"list", b"pair"], (b"server", b"s")]
        headers += [(b"x-n", b"%d" % i) for i in range(codec._CACHED + 10)]
        remembering = codec.Codec()
        for _ in range(2):
            for encoder in (codec, remembering):
                self.assertEqual(
                    encoder.end_bytes(1, headers),  # type: ignore[arg-type]
                    codec.encode_end(1, headers).SerializeToString(),  # type: ignore[arg-type]
                )
        self.assertLessEqual(len(remembering.fields[b"\x0a"]), codec._CACHED)

    def test_remembered_parts(self) -> None:
        """Opens and Replies answered from the remembered parts encode as the generated encoder does."""
        heads = [
            StreamHead(kind="http", tunnel=f"t{i % 3}.test", method="GET", target=f"/{i}",
                       headers=((b"n", b"%d" % i),), peer=f"10.0.{i // 256}.{i % 256}", scheme="https")
            for i in range(codec._CACHED + 20)
        ]
        replies = [ReplyHead(200, b"OK", ((b"x-n", b"%d" % (i % 7)),)) for i in range(codec._CACHED + 20)]
        remembering = codec.Codec()
        for _ in range(2):
            for head, reply in zip(heads, replies, strict=True):
                for encoder in (codec, remembering):
                    self.assertEqual(encoder.open_bytes(5, head), codec.encode_open(5, head).SerializeToString())
                    self.assertEqual(encoder.reply_bytes(5, reply), codec.encode_reply(5, reply).SerializeToString())
        self.assertEqual(len(remembering.open_starts), 3)
        self.assertLessEqual(len(remembering.open_ends), codec._CACHED)
        self.assertLessEqual(len(remembering.fields[b"\x1a"]), codec._CACHED)

    def test_reply_names_shared(self) -> None:
        """Replies read by one Codec share their header names; each reads as its own tuple."""
        codec = _Remembering()
        reply = ReplyHead(200, b"OK", ((b"server", b"s"), (b"x", b"1")))
        first = codec.read(codec.reply_bytes(3, reply))
        again = codec.read(codec.reply_bytes(4, ReplyHead(204, b"", reply.headers), end_stream=True))
        self.assertEqual(first, (3, codec.REPLY, reply, False))
        self.assertEqual(again, (4, codec.REPLY, ReplyHead(204, b"", reply.headers), True))
        self.assertIs(first[2].headers[0][0], again[2].headers[0][0])
        other = ReplyHead(200, b"OK", ((b"server", b"s"), (b"x", b"2")))
        self.assertEqual(codec.read(codec.reply_bytes(3, other))[2], other)
        long = ReplyHead(200, b"OK", ((b"x", b"v" * 4096),))
        self.assertEqual(codec.read(codec.reply_bytes(3, long))[2], long)
        for n in range(codec._CACHED + 10):
            codec.read(codec.reply_bytes(3, ReplyHead(200, b"OK", ((b"x%d" % n, b"%d" % n),))))
        self.assertLessEqual(len(codec.names), codec._MAX_NAMES)
        # The module's functions remember nothing: two reads, two tuples of their own names.
        plain = [_plain.read(_plain.reply_bytes(5, reply))[2].headers for _ in range(2)]
        self.assertEqual(plain[0], plain[1])
        self.assertIsNot(plain[0][0][0], plain[1][0][0])

    def test_boundaries(self) -> None:
        """Header names, values and whole heads around the one-byte length limit encode identically."""
        for size in (0, 1, 59, 60, 61, 62, 63, 64, 123, 124, 125, 126, 127, 128, 129, 300):
            headers = ((b"n" * size, b"v" * (size // 2)), (b"m" * (size // 3), b"w" * size))
            head = StreamHead(kind="http", tunnel="t" * size, headers=headers)
            self.assertEqual(
                codec.open_bytes(size, head), codec.encode_open(size, head).SerializeToString()
            )
            self.assertEqual(
                codec.end_bytes(size, headers), codec.encode_end(size, headers).SerializeToString()
            )


class RoundTripTests(SynchronousTestCase):
    """Every message survives encoding and decoding unchanged."""

    def test_hello(self) -> None:
        """A Hello with several tunnels round-trips."""
        hello = Hello(
            agent_id="agent-1",
            tunnels=(
                TunnelSpec("demo.a.test"),
                TunnelSpec("*.a.test", path_prefix="/api"),
                TunnelSpec("ssh.a.test", protocol="tcp", port=2222),
            ),
            token="secret",
            software="tunneld-agent/0.1",
            initial_window=65536,
            max_frame_size=1 << 20,
        )
        self.assertEqual(codec.control_from(wire(codec.encode_control(hello))), hello)

    def test_welcome_with_refusals(self) -> None:
        """A Welcome with public URLs and refusals (each with its reason) round-trips."""
        welcome = Welcome(
            session_id="s-1",
            public_urls=("http://demo.a.test/", "https://demo.a.test/"),
            refused=(
                Refusal(TunnelSpec("other.test"), Reason.UNAUTHORIZED, "not granted"),
                Refusal(TunnelSpec("x.test", protocol="tcp"), Reason.BAD_REQUEST, "no tcp"),
            ),
            initial_window=131072,
            heartbeat_ms=10000,
            max_frame_size=1 << 20,
        )
        self.assertEqual(codec.control_from(wire(codec.encode_control(welcome))), welcome)

    def test_goaway(self) -> None:
        """A GoAway keeps its reason and message."""
        goaway = GoAway(Reason.DRAINING, "edge restarting")
        self.assertEqual(codec.control_from(wire(codec.encode_control(goaway))), goaway)

    def test_open(self) -> None:
        """An Open keeps its stream id and every field of the head."""
        head = StreamHead(
            kind="upgrade",
            tunnel="demo.a.test",
            method="GET",
            target="/chat?room=1",
            headers=((b"host", b"demo.a.test"), (b"upgrade", b"websocket"), (b"x", b"")),
            peer="198.51.100.7:40000",
            scheme="https",
        )
        frame = wire(codec.encode_open(7, head))
        self.assertEqual(frame.stream_id, 7)
        self.assertEqual(codec.head_from(frame), head)

    def test_open_defaults_scheme(self) -> None:
        """An Open without a scheme reads as http."""
        frame = wire(pb.Frame(stream_id=1, open=pb.Open(kind="tcp", tunnel="t")))
        self.assertEqual(codec.head_from(frame), StreamHead(kind="tcp", tunnel="t"))

    def test_reply(self) -> None:
        """A Reply keeps status, reason phrase and repeated headers in order."""
        reply = ReplyHead(
            status=404,
            reason=b"Not Found",
            headers=((b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")),
        )
        frame = wire(codec.encode_reply(9, reply))
        self.assertEqual(frame.stream_id, 9)
        self.assertEqual(codec.reply_from(frame), reply)

    def test_end(self) -> None:
        """An End keeps its trailers; an End without trailers has none."""
        frame = wire(codec.encode_end(3, ((b"grpc-status", b"0"),)))
        self.assertEqual(frame.stream_id, 3)
        self.assertEqual(codec.trailers_from(frame), ((b"grpc-status", b"0"),))
        self.assertEqual(codec.trailers_from(wire(codec.encode_end(3))), ())

    def test_reset(self) -> None:
        """A Reset keeps every reason and its message."""
        for reason in Reason:
            frame = wire(codec.encode_reset(5, reason, f"because {reason.value}"))
            self.assertEqual(frame.stream_id, 5)
            self.assertEqual(codec.reset_from(frame), (reason, f"because {reason.value}"))

    def test_window_and_ping(self) -> None:
        """Window increments and ping/pong opaque values round-trip."""
        self.assertEqual(wire(codec.encode_window(11, 2**32 - 1)).window.increment, 2**32 - 1)
        ping = wire(codec.encode_ping(2**64 - 1))
        pong = wire(codec.encode_ping(42, pong=True))
        self.assertEqual((ping.WhichOneof("body"), ping.ping.opaque), ("ping", 2**64 - 1))
        self.assertEqual((pong.WhichOneof("body"), pong.pong.opaque), ("pong", 42))


class RejectTests(SynchronousTestCase):
    """Malformed or impossible frames raise FrameError."""

    def test_garbage(self) -> None:
        """Bytes that are not a Frame raise FrameError."""
        for payload in [b"\xff\xff\xff\xff", b"\x32\x05ab", b"\x08", b"\x0f\x00", b"\x32\x80"]:
            self.assertRaises(FrameError, codec.decode, payload)

    def test_no_body(self) -> None:
        """An empty frame, or one with only a stream id, has no body and raises FrameError."""
        self.assertRaises(FrameError, codec.decode, b"")
        self.assertRaises(FrameError, codec.decode, pb.Frame(stream_id=3).SerializeToString())

    def test_reply_status_zero(self) -> None:
        """A reply with status 0 (or above 999, or below 100) is rejected."""
        for status in (0, 99, 1000):
            frame = wire(pb.Frame(stream_id=1, reply=pb.Reply(status=status)))
            self.assertRaises(FrameError, codec.reply_from, frame)

    def test_open_unknown_kind(self) -> None:
        """An open with a kind other than http, upgrade, tcp or terminal is rejected."""
        for kind in ("", "smtp", "HTTP"):
            frame = wire(pb.Frame(stream_id=1, open=pb.Open(kind=kind, tunnel="t")))
            self.assertRaises(FrameError, codec.head_from, frame)

    def test_control_from_data(self) -> None:
        """control_from refuses a frame that is not hello, welcome or goaway."""
        self.assertRaises(FrameError, codec.control_from, codec.decode(codec.encode_data(1, b"x")))


class ReasonCodeTests(SynchronousTestCase):
    """tunneld.model.reasons.Reason and the proto's Reason enum agree."""

    def test_wire_codes_match_proto(self) -> None:
        """Every Reason's wire_code is the proto enum value of the same name, and back."""
        for reason in Reason:
            self.assertEqual(reason.wire_code, pb.Reason.Value(reason.name), reason)
            self.assertIs(Reason.from_wire(reason.wire_code), reason)
        self.assertEqual(Reason.NO_TUNNEL.wire_code, pb.NO_TUNNEL)

    def test_proto_has_no_extra_reasons(self) -> None:
        """Every proto reason except REASON_UNSPECIFIED has a Reason member."""
        names = set(pb.Reason.keys()) - {"REASON_UNSPECIFIED"}
        self.assertEqual(names, {reason.name for reason in Reason})

    def test_unknown_codes(self) -> None:
        """Unknown or unspecified wire codes read as PROTOCOL_ERROR."""
        self.assertIs(Reason.from_wire(999), Reason.PROTOCOL_ERROR)
        self.assertIs(Reason.from_wire(0), Reason.PROTOCOL_ERROR)


# -- fuzzing FrameLink.frame_received -------------------------------------------

_HEADERS = ((b"host", b"a.test"),)
VALID_FRAMES = [
    codec.encode_open(1, HEAD).SerializeToString(),
    codec.encode_open(3, StreamHead(kind="tcp", tunnel="t", headers=_HEADERS)).SerializeToString(),
    codec.encode_reply(1, ReplyHead(200, b"OK", _HEADERS)).SerializeToString(),
    codec.encode_data(1, b"hello"),
    codec.encode_data(3, b"x" * 300),
    codec.encode_data(1, b"last", end_stream=True),
    codec.encode_open(5, HEAD, end_stream=True).SerializeToString(),
    codec.encode_reply(1, ReplyHead(204), end_stream=True).SerializeToString(),
    codec.encode_end(1, _HEADERS).SerializeToString(),
    codec.encode_reset(3, Reason.CLIENT_GONE, "bye").SerializeToString(),
    codec.open_bytes(
        9,
        StreamHead(
            kind="upgrade", tunnel="é.test", method="POST", target="/" + "q" * 200,
            headers=((b"x-long", b"v" * 130), (b"n" * 140, b"")) + _HEADERS * 8,
            peer="[2001:db8::1]:443", scheme="https",
        ),
    ),
    codec.reply_bytes(9, ReplyHead(999, b"R" * 200, ((b"set-cookie", b"c" * 300),) + _HEADERS * 8)),
    codec.encode_window(1, 100).SerializeToString(),
    codec.encode_ping(7).SerializeToString(),
    codec.encode_ping(7, pong=True).SerializeToString(),
    codec.encode_control(Hello("a", (TunnelSpec("a.test", "/x"),), token="t")).SerializeToString(),
    codec.encode_control(
        Welcome("s", ("http://a.test/",), (Refusal(TunnelSpec("b"), Reason.UNAUTHORIZED, "no"),))
    ).SerializeToString(),
    codec.encode_control(GoAway(Reason.DRAINING, "bye")).SerializeToString(),
]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and frame:
            frame[at] = draw(st.integers(0, 255))
        elif op == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and frame:
            del frame[at]
        elif op == "truncate":
            del frame[at:]
    return bytes(frame)


payloads = st.lists(
    st.one_of(st.binary(max_size=64), st.sampled_from(VALID_FRAMES), mutated_frames()),
    max_size=12,
)


class FrameLinkFuzzTests(SynchronousTestCase):
    """Whatever arrives, frame_received ignores it, processes it, or closes with PROTOCOL_ERROR."""

    def feed(self, link_wire: Wire, link: object, frames: list[bytes]) -> None:
        for payload in frames:
            link.frame_received(payload)  # type: ignore[attr-defined]
            if link.closed:  # type: ignore[attr-defined]
                assert link_wire.closed is not None
                self.assertEqual(link_wire.closed[0], Reason.PROTOCOL_ERROR)

    @settings(max_examples=500, deadline=None)
    @given(payloads, st.sampled_from([1 << 20, 128]))
    def test_agent_link(self, frames: list[bytes], max_frame_size: int) -> None:
        """An agent link fed arbitrary and mutated frames never raises."""
        link_wire = Wire()
        link = make_link(
            link_wire, Clock(), is_edge=False, window=256, max_frame_size=max_frame_size
        )
        link.set_handler(Handler())
        self.feed(link_wire, link, frames)

    @settings(max_examples=500, deadline=None)
    @given(payloads, st.sampled_from([1 << 20, 128]))
    def test_edge_link(self, frames: list[bytes], max_frame_size: int) -> None:
        """An edge link with open streams fed arbitrary and mutated frames never raises."""
        link_wire = Wire()
        link = make_link(
            link_wire, Clock(), is_edge=True, window=256, max_frame_size=max_frame_size
        )
        link.set_handler(Handler())
        for _ in range(2):
            link.open_stream(HEAD, Receiver()).write(b"y" * 300)
        self.feed(link_wire, link, frames)


def _outcome(read: object, payload: bytes) -> object:
    try:
        return read(payload)  # type: ignore[operator]
    except FrameError as e:
        return ("FrameError", str(e))


class HandReadingTests(SynchronousTestCase):
    """codec.read, which reads hot frames by hand, agrees with the generated parser on any input."""

    @settings(max_examples=1000, deadline=None)
    @given(st.one_of(st.binary(max_size=80), st.sampled_from(VALID_FRAMES), mutated_frames()))
    def test_any_bytes(self, payload: bytes) -> None:
        """Arbitrary and mutated frames read the same, or fail with the same FrameError."""
        self.assertEqual(
            _outcome(codec.read, payload), _outcome(codec.read_generated, payload)
        )

    def test_unusual_layouts(self) -> None:
        """Valid frames no encoder writes (fields repeated, reordered, long varints) read the same."""
        for payload in [
            b"\x32\x03\x0a\x01a\x08\x05",  # stream id after the body
            b"\x08\x05\x08\x07\x32\x00",  # stream id twice
            b"\x08\x85\x80\x80\x80\x00\x32\x03\x0a\x01a",  # padded varint
            b"\x08\x01\x32\x06\x0a\x01a\x0a\x01b",  # data field twice
            b"\x08\x01\x32\x02\x0a\x00\x4a\x02\x08\x01",  # data then window
            b"\x08\x01\x4a\x03\x08\x01\x10",  # unknown truncated field
            b"\x08\x01\x4a\x04\x08\x01\x10\x02",  # unknown field
            b"\x08\x01\x3a\x04\x0a\x02\x12\x00\x3a\x00",  # end twice merges
            b"\x08\x01\x3a\x06\x0a\x04\x12\x00\x0a\x00",  # header fields repeated
            b"\x08\x01\x4a\x0b\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # 64-bit
            b"\x08\x01\x32\x05\x0a\x01a\x10\x00",  # end_stream false, written out
            b"\x08\x01\x32\x05\x10\x01\x0a\x01a",  # end_stream before the data
            b"\x08\x01\x32\x05\x0a\x01a\x10\x02",  # end_stream as 2
            b"\x08\x01\x22\x00",  # open without a kind
            b"\x08\x01\x22\x06\x0a\x04http",  # open with only a kind
            b"\x08\x01\x22\x08\x0a\x04http\x12\x00",  # empty tunnel written out
            b"\x08\x01\x22\x0c\x12\x02ab\x0a\x04http",  # tunnel before kind
            b"\x08\x01\x22\x0c\x0a\x04http\x0a\x04tcp\x21",  # kind twice (truncated)
            b"\x08\x01\x22\x0c\x0a\x04http\x0a\x03tcp",  # kind twice: the last wins
            b"\x08\x01\x22\x09\x0a\x04http\x3a\x01h",  # scheme "h"
            b"\x08\x01\x22\x0a\x0a\x04http\x48\x01\x40\x01",  # unknown field
            b"\x08\x01\x22\x08\x0a\x04http\x40\x02",  # end_stream as 2
            b"\x08\x01\x22\x08\x0a\x04http\x40\x00",  # end_stream false, written out
            b"\x08\x01\x22\x08\x0a\x04http\x12\x80",  # truncated length
            b"\x08\x01\x22\x0a\x0a\x04http\x12\x02\xc3\x28",  # invalid UTF-8 tunnel
            b"\x08\x01\x22\x0a\x0a\x04http\x12\x02\xed\xa0",  # truncated surrogate
            b"\x08\x01\x22\x0b\x0a\x04http\x12\x03\xed\xa0\x80",  # surrogate
            b"\x08\x01\x22\x0a\x0a\x04http\x12\x02\xc0\x80",  # overlong NUL
            b"\x08\x01\x22\x08\x0a\x04HTTP\x40\x01",  # unknown kind
            b"\x08\x01\x22\x0c\x0a\x04http\x2a\x04\x12\x00\x0a\x00",  # value then name
            b"\x08\x01\x22\x0e\x0a\x04http\x2a\x00\x1a\x01G\x2a\x00",  # headers split
            b"\x08\x01\x2a\x00",  # reply without a status
            b"\x08\x01\x2a\x03\x08\xc8\x01",  # status 200
            b"\x08\x01\x2a\x03\x08\xe8\x07",  # status 1000
            b"\x08\x01\x2a\x07\x08\xc8\x81\x80\x80\x80\x00",  # status padded to 64 bits
            b"\x08\x01\x2a\x0b\x08\xc8\x81\x80\x80\x80\x80\x80\x80\x01",  # status > 32 bits
            b"\x08\x01\x2a\x06\x12\x01R\x08\xc8\x01",  # reason before status
            b"\x08\x01\x2a\x07\x08\xc8\x01\x12\x02\xff\xfe",  # reason not UTF-8 (bytes)
            b"\x08\x01\x2a\x07\x08\xc8\x01\x20\x01\x1a\x00",  # end_stream before headers
            b"\x08\x01\x2a\x05\x08\xc8\x01\x28\x01",  # unknown field
            b"\x08\x01\x42\x00",  # reset with nothing
            b"\x08\x01\x42\x02\x08\x63",  # unknown reason
            b"\x08\x01\x42\x0b\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # reason -1
            b"\x08\x01\x42\x05\x12\x01m\x08\x0e",  # message before reason
            b"\x08\x01\x42\x04\x12\x02\xc3\x28",  # message not UTF-8
        ]:
            self.assertEqual(
                _outcome(codec.read, payload), _outcome(codec.read_generated, payload), payload
            )


    @settings(max_examples=300, deadline=None)
    @given(stream_ids, stream_heads, reply_heads, st.booleans(), st.data())
    def test_heads(
        self, stream_id: int, head: StreamHead, reply: ReplyHead, end: bool, data: st.DataObject
    ) -> None:
        """Open and Reply frames, as written or mutated, read the same by hand and by the generated parser."""
        for payload in (
            codec.open_bytes(stream_id, head, end), codec.reply_bytes(stream_id, reply, end)
        ):
            cut = data.draw(st.integers(0, len(payload)))
            for variant in (
                payload,
                payload[:cut] + data.draw(st.binary(max_size=3)) + payload[cut:],
                payload[:cut] + payload[cut + 1 :],
            ):
                self.assertEqual(
                    _outcome(codec.read, variant), _outcome(codec.read_generated, variant), variant
                )

    def test_shared_names(self) -> None:
        """Header names read by hand (by one Codec) are shared between heads, as the generated parser's reading shares them."""
        codec = _Remembering()
        head = StreamHead(kind="http", tunnel="t", headers=((b"x-shared-name", b"1"),))
        first = codec.read(codec.open_bytes(1, head))[2]
        second = codec.read(codec.open_bytes(3, head))[2]
        self.assertIs(first.headers[0][0], second.headers[0][0])


class BufferReadingTests(SynchronousTestCase):
    """codec.read takes a frame as a bytearray or memoryview too, and hands back only bytes."""

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=80), st.sampled_from(VALID_FRAMES), mutated_frames()))
    def test_same_as_bytes(self, payload: bytes) -> None:
        """Any input reads as it does from bytes, from a bytearray and from a view into a larger buffer."""
        expected = _outcome(codec.read, payload)
        padded = b"--" + payload + b"--"
        for buffer in (bytearray(payload), memoryview(padded)[2 : 2 + len(payload)]):
            self.assertEqual(_outcome(codec.read, buffer), expected)

    def test_results_are_bytes(self) -> None:
        """A Data frame's bytes and an End frame's trailers come back as bytes, never as views of the buffer."""
        data = codec.encode_data(3, b"x" * 5000, end_stream=True)
        _, kind, body, end = codec.read(bytearray(data))
        self.assertEqual((kind, type(body), body, end), (codec.DATA, bytes, b"x" * 5000, True))
        _, kind, body, end = codec.read(memoryview(data))
        self.assertEqual((kind, type(body)), (codec.DATA, bytes))
        _, kind, trailers, _ = codec.read(bytearray(codec.end_bytes(3, [(b"grpc-status", b"0")])), borrow=True)
        self.assertEqual(trailers, ((b"grpc-status", b"0"),))
        self.assertEqual({type(part) for pair in trailers for part in pair}, {bytes})

    def test_borrowed_data_is_a_view(self) -> None:
        """With borrow, a Data frame's bytes from a bytearray or view come as a view of it, uncopied."""
        data = codec.encode_data(3, b"x" * 5000, end_stream=True)
        buffer = bytearray(data)
        _, kind, body, end = codec.read(buffer, borrow=True)
        self.assertEqual((kind, type(body), bytes(body), end), (codec.DATA, memoryview, b"x" * 5000, True))
        self.assertIs(body.obj, buffer)
        _, _, body, _ = codec.read(data, borrow=True)
        self.assertIs(type(body), bytes)
