"""
The bulk data path of the gRPC link: DATA frames sent without copying their
payload (L{LeanH2Connection.send_data_parts}), read with one copy (its frame
reader), and C{Data} messages read without protobuf; each checked against
what stock h2 and the generated protobuf code do.
"""

from __future__ import annotations

import hashlib
from typing import Any

from h2 import events as h2events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import (
    FlowControlError,
    FrameTooLargeError,
    ProtocolError,
)
from hyperframe.frame import DataFrame
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.switches import switch_tricks, unavailable
from tests.test_grpc_transport import MB, BytesProducer, Receiver, head, link_pair, pattern, until
from tunneld.interfaces import EdgeLinkSetup
from tunneld.model.messages import ReplyHead
from tunneld.speedups.lean_h2 import LeanH2Connection, PiecewiseH2Connection, new_h2_connection
from tunneld.transports.grpc import (
    EdgeGrpcLink,
    GrpcEdgeOptions,
    _Call,
    _data_payload,
    data_message,
    grpc_message,
)
from tunneld.transports.grpc.framing import split_messages
from tunneld.wire import codec

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a")]


def connected(client: H2Connection, server: H2Connection) -> None:
    """Exchange prefaces and settings until both ends are quiet."""
    client.initiate_connection()
    server.initiate_connection()
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())


def lean_pair() -> tuple[LeanH2Connection, LeanH2Connection]:
    client = LeanH2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = LeanH2Connection(H2Configuration(client_side=False, header_encoding=None))
    connected(client, server)
    return client, server


def stock_pair() -> tuple[H2Connection, H2Connection]:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    connected(client, server)
    return client, server


def data_frame(stream_id: int, payload: bytes, flags: tuple[str, ...] = (), pad: int = 0) -> bytes:
    frame = DataFrame(stream_id, payload)
    for flag in flags:
        frame.flags.add(flag)
    if "PADDED" in flags:
        frame.pad_length = pad
    return frame.serialize()


def summary(events: list[h2events.Event]) -> list[tuple[Any, ...]]:
    """What matters of received events, comparable between h2 and the lean reader."""
    out: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, h2events.DataReceived):
            out.append(("data", event.stream_id, event.data, event.flow_controlled_length))
        elif isinstance(event, h2events.StreamEnded):
            out.append(("ended", event.stream_id))
        elif isinstance(event, h2events.WindowUpdated):
            out.append(("window", event.stream_id, event.delta))
        else:
            out.append((type(event).__name__,))
    return out


class SendDataPartsTests(SynchronousTestCase):
    skip = unavailable("lean_h2")  # they compare the lean connection with h2's own

    def test_same_bytes_and_state_as_send_data(self) -> None:
        """send_data_parts writes the bytes send_data writes, and leaves the same windows and stream state."""
        lean, _ = lean_pair()
        stock, _ = stock_pair()
        for conn in (lean, stock):
            conn.send_headers(1, REQUEST)
        lean.send_data_parts(1, [b"\x00\x00\x00\x00\x03", b"abc"])
        stock.send_data(1, b"\x00\x00\x00\x00\x03abc")
        lean.send_data_parts(1, [b"xy", b"", b"z"], end_stream=True)
        stock.send_data(1, b"xyz", end_stream=True)
        self.assertEqual(lean.data_to_send(), stock.data_to_send())
        self.assertEqual(lean.outbound_flow_control_window, stock.outbound_flow_control_window)
        self.assertEqual(
            lean.streams[1].outbound_flow_control_window,
            stock.streams[1].outbound_flow_control_window,
        )
        self.assertEqual(lean.streams[1].state_machine.state, stock.streams[1].state_machine.state)
        # After END_STREAM, both refuse more data the same way.
        with self.assertRaises(ProtocolError):
            stock.send_data(1, b"late")
        with self.assertRaises(ProtocolError):
            lean.send_data_parts(1, [b"late"])

    def test_chunks_keep_the_order_of_frames(self) -> None:
        """Frames queued by h2 and DATA queued as parts come out of chunks_to_send in the order sent."""
        lean, server = lean_pair()
        lean.send_headers(1, REQUEST)
        payload = b"p" * 16_000
        lean.send_data_parts(1, [b"head", payload])
        lean.ping(b"12345678")
        lean.send_data_parts(1, [b"tail"], end_stream=True)
        chunks = lean.chunks_to_send()
        self.assertTrue(all(type(chunk) is bytes for chunk in chunks))
        # The payload itself is handed over, not a copy of it.
        self.assertTrue(any(chunk is payload for chunk in chunks))
        self.assertEqual(lean.chunks_to_send(), [])
        self.assertEqual(lean.data_to_send(), b"")
        events = server.receive_data(b"".join(chunks))
        self.assertEqual(
            summary(events),
            [("RequestReceived",), ("data", 1, b"head" + payload, 16_004),
             ("PingReceived",), ("data", 1, b"tail", 4), ("ended", 1)],
        )

    def test_windows_and_frame_size_are_enforced(self) -> None:
        """Parts beyond the flow-control window or the peer's frame size are refused, as by send_data."""
        lean, _ = lean_pair()
        lean.send_headers(1, REQUEST)
        with self.assertRaises(FrameTooLargeError):
            lean.send_data_parts(1, [b"a" * 16_384, b"b"])
        for _ in range(4):
            lean.send_data_parts(1, [b"a" * 10_000, b"b" * 6_000])
        self.assertEqual(lean.local_flow_control_window(1), 65_535 - 4 * 16_000)
        with self.assertRaises(FlowControlError):
            lean.send_data_parts(1, [b"c" * 1_000, b"d" * 1_000])
        self.assertEqual(lean.local_flow_control_window(1), 65_535 - 4 * 16_000)

    def test_data_to_send_includes_parts(self) -> None:
        """data_to_send (used by the other HTTP/2 speakers) still returns everything, in order."""
        lean, server = lean_pair()
        lean.send_headers(1, REQUEST)
        lean.send_data_parts(1, [b"one", b"two"])
        lean.ping(b"abcdefgh")
        first = lean.data_to_send(10)
        rest = lean.data_to_send()
        events = server.receive_data(first + rest)
        self.assertEqual(
            summary(events),
            [("RequestReceived",), ("data", 1, b"onetwo", 6), ("PingReceived",)],
        )


class DataFrameReaderTests(SynchronousTestCase):
    skip = unavailable("lean_h2")  # they compare the lean connection with h2's own

    def frames(self) -> bytes:
        return b"".join([
            data_frame(1, b"plain"),
            data_frame(1, b""),
            data_frame(1, bytes(range(256)) * 40, ("PADDED",), pad=17),
            data_frame(1, b"zero padding", ("PADDED",), pad=0),
            data_frame(1, b"x" * 16_384),
            data_frame(1, b"y" * 16_183, ("PADDED",), pad=200),
            data_frame(1, b"last", ("END_STREAM",)),
        ])

    def receive(self, server: H2Connection, client: H2Connection, wire: bytes, step: int) -> list[Any]:
        client.send_headers(1, REQUEST)
        events: list[h2events.Event] = list(server.receive_data(client.data_to_send()))
        for start in range(0, len(wire), step):
            events.extend(server.receive_data(wire[start : start + step]))
        return summary(events)

    def test_reads_what_h2_reads(self) -> None:
        """DATA frames (padded, empty, ending) read whole or a few bytes at a time give h2's own events."""
        wire = self.frames()
        for step in (len(wire), 4096, 7, 1):
            client, server = lean_pair()
            stock_client, stock_server = stock_pair()
            lean = self.receive(server, client, wire, step)
            stock = self.receive(stock_server, stock_client, wire, step)
            self.assertEqual(lean, stock, f"step {step}")
            self.assertEqual(
                server._inbound_flow_control_window_manager.current_window_size,
                stock_server._inbound_flow_control_window_manager.current_window_size,
            )
            self.assertIn(("ended", 1), lean)

    def test_bad_data_frames_are_refused(self) -> None:
        """DATA on stream 0, padding longer than the frame, and an oversized frame are protocol errors."""
        stream_zero = b"\x00\x00\x03\x00\x00\x00\x00\x00\x00abc"
        too_much_padding = b"\x00\x00\x03\x00\x08\x00\x00\x00\x01\x05ab"
        for wire in (stream_zero, too_much_padding):
            for step in (len(wire), 1):
                client, server = lean_pair()
                client.send_headers(1, REQUEST)
                server.receive_data(client.data_to_send())
                with self.assertRaises(ProtocolError):
                    for start in range(0, len(wire), step):
                        server.receive_data(wire[start : start + step])
        # An oversized frame is refused from its header, before its body arrives.
        client, server = lean_pair()
        client.send_headers(1, REQUEST)
        server.receive_data(client.data_to_send())
        with self.assertRaises(FrameTooLargeError):
            server.receive_data(b"\x01\x00\x00\x00\x00\x00\x00\x00\x01")


def arrived(events: list[Any]) -> list[tuple[Any, ...]]:
    """summary() of receive_frames' events, its DataArrived ones read as h2 would report them."""
    return summary([
        h2events.DataReceived(
            stream_id=e[0],
            data=b"".join(e[1]) if isinstance(e[1], list) else bytes(e[1]),
            flow_controlled_length=e[2],
        )
        if isinstance(e, tuple) else e
        for e in events
    ])


def state(conn: H2Connection) -> list[Any]:
    """The receiving side's state that a DATA frame changes."""
    return [
        conn.state_machine.state,
        conn._inbound_flow_control_window_manager.current_window_size,
        conn.outbound_flow_control_window,
        [
            (sid, s.state_machine.state, s._inbound_window_manager.current_window_size,
             s._actual_content_length, s.outbound_flow_control_window)
            for sid, s in sorted(conn.streams.items())
        ],
    ]


class ReceiveFramesTests(SynchronousTestCase):
    """LeanH2Connection.receive_frames against stock h2's receive_data on the same bytes."""
    skip = unavailable("lean_h2")  # they compare the lean connection with h2's own


    def both(self, wire: bytes, step: int, head: bytes = b"") -> tuple[Any, Any, int]:
        """
        The outcome (events or the error's type, state after, bytes to send)
        of the lean and the stock server reading C{wire}, C{step} bytes at a
        time, after C{head} (the client's requests); and how many DATA frames
        the short path took.
        """
        outcomes = []
        short = 0
        for lean in (True, False):
            client, server = lean_pair() if lean else stock_pair()
            for stream_id, extra in ((1, []), (3, [(b"content-length", b"3")])):
                client.send_headers(stream_id, REQUEST + extra)
            server.receive_data(client.data_to_send() + head)
            events: list[Any] = []
            error: type[Exception] | None = None
            try:
                for start in range(0, len(wire), step):
                    chunk = wire[start : start + step]
                    if lean:
                        assert isinstance(server, LeanH2Connection)
                        events.extend(server.receive_frames(chunk))
                    else:
                        events.extend(server.receive_data(chunk))
            except ProtocolError as e:
                error = type(e)
            if lean:
                short = sum(isinstance(e, tuple) for e in events)
            outcomes.append((arrived(events), error, state(server), server.data_to_send()))
        return outcomes[0], outcomes[1], short

    def test_same_events_and_state_as_receive_data(self) -> None:
        """Plain DATA (short path) mixed with padded, ending, PING and WINDOW_UPDATE frames leaves h2's state."""
        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
        update = b"\x00\x00\x04\x08\x00\x00\x00\x00\x01\x00\x00\x01\x00"
        wire = b"".join([
            data_frame(1, b"plain"),
            data_frame(1, b""),
            ping,
            data_frame(1, b"x" * 16_384),
            update,
            data_frame(1, b"padded", ("PADDED",), pad=9),
            data_frame(3, b"abc"),  # a content-length to check: h2 reads it
            data_frame(1 | 1 << 31, b"reserved bit set"),
            data_frame(1, b"after"),
            data_frame(1, b"last", ("END_STREAM",)),
        ])
        for step in (len(wire), 4096, 7, 1):
            lean, stock, short = self.both(wire, step)
            self.assertEqual(lean, stock, f"step {step}")
            self.assertIsNone(lean[1])
            self.assertGreaterEqual(short, 4 if step == len(wire) else 0)
        self.assertEqual(self.both(wire, len(wire))[2], 5)

    def test_errors_as_receive_data(self) -> None:
        """Window overruns, a content-length overrun, DATA on closed, reset or unknown streams: as h2 has it."""
        full = data_frame(1, b"f" * 16_384)
        cases = {
            "connection window": (full * 4, True),
            "content-length": (data_frame(3, b"abcd"), True),
            "unknown stream": (data_frame(5, b"nobody"), True),
            "stream zero": (data_frame(1, b"ok") + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00z", True),
            # A stream error: h2 answers with RST_STREAM.
            "after END_STREAM": (data_frame(1, b"a", ("END_STREAM",)) + data_frame(1, b"b"), False),
        }
        for name, (wire, fatal) in cases.items():
            for step in (len(wire), 5):
                lean, stock, _ = self.both(wire, step)
                self.assertEqual(lean, stock, f"{name}, step {step}")
                self.assertEqual(lean[1] is not None, fatal, name)
        # DATA on a stream the client reset: h2 answers with RST_STREAM, no event.
        reset = b"\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x08"
        lean, stock, short = self.both(data_frame(1, b"late"), 4096, head=reset)
        self.assertEqual(lean, stock)
        self.assertEqual((lean[0], lean[1], short), ([], None, 0))
        self.assertNotEqual(lean[3], b"")

    def test_window_updates_as_receive_data(self) -> None:
        """WINDOW_UPDATE frames, good and bad, on the connection and on streams in every state: as h2 has it."""
        def update(stream_id: int, increment: int, flags: int = 0, extra: bytes = b"") -> bytes:
            body = increment.to_bytes(4, "big") + extra
            return (
                len(body).to_bytes(3, "big") + bytes([8, flags]) + stream_id.to_bytes(4, "big") + body
            )

        good = b"".join([
            update(0, 1000), update(1, 70_000), update(3, 1), update(1 | 1 << 31, 5),
            data_frame(1, b"x"), update(1, 2, flags=0xFF), update(0, 1 << 20),
            data_frame(3, b"abc", ("END_STREAM",)), update(3, 9),  # half-closed (remote)
        ])
        for step in (len(good), 13, 5, 1):
            lean, stock, _ = self.both(good, step)
            self.assertEqual(lean, stock, f"step {step}")
            self.assertIsNone(lean[1])
        cases = {
            "zero increment": (update(1, 0), True),
            "zero on the connection": (update(0, 0), True),
            "reserved bit in the increment": (update(1, 1 << 31 | 1), True),
            "connection window overflow": (update(0, (1 << 31) - 1), True),
            "stream window overflow": (update(1, (1 << 31) - 1), False),
            "idle stream": (update(7, 1), True),
            "five bytes": (update(1, 1, extra=b"\x00"), True),
            "closed stream": (data_frame(1, b"a", ("END_STREAM",)) + update(1, 1), False),
        }
        for name, (wire, fatal) in cases.items():
            for step in (len(wire), 3):
                lean, stock, _ = self.both(wire, step)
                self.assertEqual(lean, stock, f"{name}, step {step}")
                self.assertEqual(lean[1] is not None, fatal, name)


class DataMessageTests(SynchronousTestCase):
    def test_data_payload_matches_protobuf(self) -> None:
        """Data messages as data_message writes them are read to the bytes protobuf reads."""
        for size in (0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152):
            payload = pattern(size, seed=size)
            head_bytes, data = data_message(payload)
            message = memoryview(head_bytes[5:] + data)
            self.assertEqual(_data_payload(message), codec.decode(message.tobytes()).data.data)

    def test_other_messages_are_left_to_protobuf(self) -> None:
        """Messages laid out otherwise (a stream id, end_stream, another kind, truncated) are not read by hand."""
        for message in (
            codec.encode_data(3, b"abc"),
            codec.encode_data(0, b"abc", end_stream=True),
            codec.end_bytes(0, ()),
            codec.reply_bytes(0, ReplyHead(200, b"OK", ((b"a", b"b"),))),
            codec.encode_data(0, b"abcdef")[:-1],
            b"\x32",
            b"\x32\xff\xff\xff\xff\xff\xff",
        ):
            self.assertIsNone(_data_payload(memoryview(message)), message)

    def test_prefix_is_grpc_framing(self) -> None:
        """data_message's head is a gRPC length prefix followed by the Frame's head."""
        head_bytes, data = data_message(b"abc")
        self.assertEqual(head_bytes + data, grpc_message(codec.encode_data(0, b"abc")))


class SplitMessagesTests(SynchronousTestCase):
    def read(
        self, link: EdgeGrpcLink, frames: list[bytes], pieces: int = 0
    ) -> list[tuple[str, bytes]]:
        """
        What a Forward call reads from these DATA frames: runs of data, and
        other messages.  With C{pieces}, each frame comes as that many pieces
        (a frame gathered from several reads).
        """
        call = _Call(1, "forward")
        out: list[tuple[str, bytes]] = []
        for frame in frames:
            given: Any = frame
            if pieces:
                step = -(-len(frame) // pieces) or 1
                given = [memoryview(frame)[i : i + step] for i in range(0, len(frame), step)]
                given = given or [b""]
            for item in split_messages(call, given, link.max_message):
                data = item if isinstance(item, bytes) else _data_payload(item)
                if data is None:
                    out.append(("message", bytes(item)))
                elif out and out[-1][0] == "data":
                    out[-1] = ("data", out[-1][1] + data)
                else:
                    out.append(("data", data))
        self.assertEqual((call.inbox, call.data_left), (bytearray(), 0))
        return out

    def test_messages_read_alike_wherever_frames_split_them(self) -> None:
        """Data payloads (passed on piece by piece) and other messages read the same at any DATA frame split."""
        link = EdgeGrpcLink(
            GrpcEdgeOptions(), EdgeLinkSetup(on_link=lambda link: None, reactor=Clock())
        )
        first, second = pattern(3_000, seed=1), pattern(200, seed=2)
        end = codec.end_bytes(0, ((b"k", b"v" * 300),))
        wire = b"".join(
            [*data_message(first), grpc_message(end), *data_message(second), *data_message(b"")]
        )
        expected = [("data", first), ("message", end), ("data", second)]
        self.assertEqual(self.read(link, [wire]), expected)
        for cut in range(1, len(wire)):
            self.assertEqual(self.read(link, [wire[:cut], wire[cut:]]), expected, cut)
        for a in range(1, len(wire), 23):
            for b in range(a + 1, len(wire), 29):
                self.assertEqual(
                    self.read(link, [wire[:a], wire[a:b], wire[b:]]), expected, (a, b)
                )
        self.assertEqual(self.read(link, [wire[i : i + 1] for i in range(len(wire))]), expected)

    def test_gathered_frames_read_alike(self) -> None:
        """DATA frames given as the pieces of several reads read as the same frames whole."""
        link = EdgeGrpcLink(
            GrpcEdgeOptions(), EdgeLinkSetup(on_link=lambda link: None, reactor=Clock())
        )
        big, small = pattern(40_000, seed=3), pattern(300, seed=4)
        end = codec.end_bytes(0, ())
        wire = b"".join([*data_message(big), *data_message(small), grpc_message(end)])
        expected = [("data", big + small), ("message", end)]
        for cut in (1, 9, 17, 5_000, 40_010, 40_020, len(wire) - 3):
            for pieces in (1, 2, 3, 7):
                self.assertEqual(
                    self.read(link, [wire[:cut], wire[cut:]], pieces), expected, (cut, pieces)
                )
        alone = b"".join(data_message(big))
        for pieces in (2, 5):
            self.assertEqual(
                self.read(link, [alone[:30_000], alone[30_000:]], pieces), [("data", big)]
            )


class SmallWindowTests(TestCase):
    async def test_messages_split_across_frames_arrive_intact(self) -> None:
        """With 64 KiB windows, messages split across DATA frames anywhere still arrive intact both ways."""
        pair = await link_pair(
            self,
            edge={"stream_window": 65_535, "connection_window": 65_535},
            agent={"stream_window": 65_535, "connection_window": 65_535},
        )
        body = pattern(3 * MB + 12_345, seed=7)
        receiver = Receiver()
        stream = pair.edge.open_stream(head("/echo"), receiver)
        BytesProducer(stream, body)
        await receiver.done
        self.assertIsNone(receiver.reset)
        self.assertEqual(hashlib.sha256(receiver.data).digest(), hashlib.sha256(body).digest())


class _Borrower(Receiver):
    borrows_data = True


class BorrowTests(TestCase):
    async def test_only_a_borrowing_receiver_gets_views(self) -> None:
        """Data reaches a receiver that borrows as views, any other as bytes; both get every byte."""
        pair = await link_pair(self)
        body = pattern(2 * MB + 999, seed=3)
        for receiver, kind in ((_Borrower(), memoryview), (Receiver(), bytes)):
            stream = pair.edge.open_stream(head("/echo"), receiver)
            BytesProducer(stream, body)
            await receiver.done
            self.assertIsNone(receiver.reset)
            self.assertEqual(hashlib.sha256(receiver.data).digest(), hashlib.sha256(body).digest())
            kinds = {type(chunk) for chunk in receiver.chunks}
            self.assertIn(kind, kinds)
            self.assertLessEqual(kinds, {kind, bytes})


class WindowUpdateTests(SynchronousTestCase):
    skip = unavailable("lean_h2")  # they compare the lean connection with h2's own

    def test_same_bytes_and_windows_as_h2(self) -> None:
        """increment_flow_control_window writes h2's bytes and opens the same windows, in every state."""
        lean, lean_server = lean_pair()
        stock, stock_server = stock_pair()
        for conn, server in ((lean, lean_server), (stock, stock_server)):
            conn.send_headers(1, REQUEST)
            conn.send_headers(3, REQUEST, end_stream=True)  # half-closed (local)
            conn.send_headers(5, REQUEST)
            server.receive_data(conn.data_to_send())
            server.send_headers(5, [(b":status", b"200")], end_stream=True)
            conn.receive_data(server.data_to_send())  # 5: half-closed (remote)
            conn.increment_flow_control_window(1000, 1)
            conn.increment_flow_control_window(7, 3)
            conn.increment_flow_control_window(65536, 5)
            conn.increment_flow_control_window(1 << 20)
        self.assertEqual(lean.data_to_send(), stock.data_to_send())
        for sid in (1, 3, 5):
            self.assertEqual(
                vars(lean.streams[sid]._inbound_window_manager),
                vars(stock.streams[sid]._inbound_window_manager),
            )
            self.assertEqual(lean.streams[sid].state_machine.state, stock.streams[sid].state_machine.state)
        self.assertEqual(
            vars(lean._inbound_flow_control_window_manager),
            vars(stock._inbound_flow_control_window_manager),
        )

    def test_errors_as_h2(self) -> None:
        """Bad increments, unknown and closed streams raise what h2 raises."""
        lean, lean_server = lean_pair()
        stock, stock_server = stock_pair()
        for conn, server in ((lean, lean_server), (stock, stock_server)):
            conn.send_headers(1, REQUEST, end_stream=True)
            server.receive_data(conn.data_to_send())
            server.send_headers(1, [(b":status", b"200")], end_stream=True)
            conn.receive_data(server.data_to_send())  # 1: closed
        for conn in (lean, stock):
            self.assertRaises(ValueError, conn.increment_flow_control_window, 0, None)
            self.assertRaises(ValueError, conn.increment_flow_control_window, 1 << 31, None)
            self.assertRaises(KeyError, conn.increment_flow_control_window, 1, 9)
            self.assertRaises(ProtocolError, conn.increment_flow_control_window, 1, 1)
            self.assertRaises(FlowControlError, conn.increment_flow_control_window, (1 << 31) - 1, None)


class WindowReturnTests(TestCase):
    async def test_windows_return_at_half_and_an_idle_call_waits_for_its_open(self) -> None:
        """Streams longer than the window complete; the edge returns a call's window at half spent, never while
        the reused call is idle, and what is left goes with the next Open; h2's windows match the counts."""
        window = 65_535
        pair = await link_pair(
            self, edge={"stream_window": window}, agent={"stream_window": window}
        )
        edge = pair.edge
        await until(lambda: len(edge.idle) == 2)
        updates: list[tuple[int, int, bool]] = []
        increment = edge.conn.increment_flow_control_window

        def record(n: int, stream_id: int | None = None) -> None:
            if stream_id is not None:
                call = edge.calls[stream_id]
                updates.append((stream_id, n, call.stream is None and call.reuse))
            increment(n, stream_id)

        edge.conn.increment_flow_control_window = record  # type: ignore[method-assign]
        used: set[int] = set()
        for size in (5 * window + 1_234, 3 * window // 2, 7 * window + 99):
            body = pattern(size, seed=size)
            receiver = Receiver()
            stream = pair.edge.open_stream(head("/echo"), receiver)
            call = stream.call
            assert call is not None
            used.add(call.stream_id)
            BytesProducer(stream, body)
            await receiver.done
            self.assertIsNone(receiver.reset)
            self.assertEqual(hashlib.sha256(receiver.data).digest(), hashlib.sha256(body).digest())
            h2_window = edge.conn.streams[call.stream_id]._inbound_window_manager.current_window_size
            self.assertEqual(h2_window + call.unacked, window)
        stream_updates = [u for u in updates if u[0] in used]
        self.assertTrue(stream_updates)
        self.assertEqual([u for u in stream_updates if u[2]], [])
        self.assertTrue(all(n >= window // 2 for _, n, _ in stream_updates))

    async def test_a_pending_window_goes_out_with_the_next_open(self) -> None:
        """A reused call left with half its window due gets it back in _bind, as its next stream opens."""
        window = 65_535
        pair = await link_pair(self, edge={"stream_window": window}, agent={"stream_window": window})
        edge = pair.edge
        await until(lambda: len(edge.idle) == 2)
        # As if the last streams had left more than half the window due.
        due = window // 2 + 1
        calls = list(edge.idle)
        for call in calls:
            call.unacked = due
            edge.conn.streams[call.stream_id]._inbound_window_manager.current_window_size -= due
            edge.ack_call(call)
            self.assertEqual(call.unacked, due)  # idle: it waits
        receiver = Receiver()
        stream = edge.open_stream(head("/echo"), receiver)
        self.assertIn(stream.call, calls)
        self.assertEqual([c.unacked for c in calls if c is stream.call], [0])
        self.assertEqual([c.unacked for c in calls if c is not stream.call], [due])
        BytesProducer(stream, pattern(10))
        await receiver.done
        self.assertIsNone(receiver.reset)


def piecewise_pair() -> tuple[PiecewiseH2Connection, PiecewiseH2Connection]:
    client = PiecewiseH2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = PiecewiseH2Connection(H2Configuration(client_side=False, header_encoding=None))
    connected(client, server)
    return client, server


# The lean connection beside its fallback; the fallback alone where h2's internals differ.
_PAIRS = (piecewise_pair,) if unavailable("lean_h2") else (lean_pair, piecewise_pair)


class PiecewiseTests(SynchronousTestCase):
    """
    The lean connection's fallback on h2's public API (the lean_h2 trick
    off): the same calls give the same bytes, events, windows and errors.
    """

    def test_new_connection_follows_the_switch(self) -> None:
        """new_h2_connection makes the lean connection with the trick on, the public-API one with it off."""
        config = H2Configuration(client_side=True)
        if unavailable("lean_h2") is None:
            switch_tricks(self, True, "lean_h2")
            self.assertIsInstance(new_h2_connection(config), LeanH2Connection)
        else:  # an h2 whose internals differ: the public-API connection, even when switched on
            switch_tricks(self, True, "lean_h2")
            self.assertIs(type(new_h2_connection(config)), PiecewiseH2Connection)
        switch_tricks(self, False, "lean_h2")
        self.assertIs(type(new_h2_connection(config)), PiecewiseH2Connection)

    def test_same_exchange_as_lean(self) -> None:
        """Parts sent, room asked, chunks taken and frames received (in two reads) alike on both."""
        outcomes = []
        for pair in _PAIRS:
            client, server = pair()
            client.send_headers(1, REQUEST)
            server.receive_frames(client.data_to_send())
            client.send_data_parts(1, [b"x" * 100, memoryview(b"y" * 16_000)], size=16_100)
            room = client.send_room(1)
            client.ping(b"12345678")
            client.send_data_parts(1, [b"z"], end_stream=True)
            wire = b"".join(client.chunks_to_send())
            events = server.receive_frames(wire[:5000]) + server.receive_frames(wire[5000:])
            server.acknowledge_received_data(16_100, 1)
            outcomes.append((room, wire, arrived(events), state(server), server.data_to_send()))
        self.assertEqual(outcomes[0], outcomes[-1])
        self.assertEqual(outcomes[-1][0], 16_384)  # the peer's frame size, below the window left

    def test_same_errors_as_lean(self) -> None:
        """Too large a frame, beyond the window, and after END_STREAM: refused alike."""
        for pair in _PAIRS:
            client, _ = pair()
            client.send_headers(1, REQUEST)
            with self.assertRaises(FrameTooLargeError):
                client.send_data_parts(1, [b"a" * 16_384, b"b"])
            for _ in range(4):
                client.send_data_parts(1, [b"a" * 16_000])
            with self.assertRaises(FlowControlError):
                client.send_data_parts(1, [b"c" * 2_000])
            client.send_data_parts(1, [b"end"], end_stream=True)
            with self.assertRaises(ProtocolError):
                client.send_data_parts(1, [b"late"])
            self.assertEqual(client.chunks_to_send()[-1][-3:], b"end")
            self.assertEqual(client.chunks_to_send(), [])
