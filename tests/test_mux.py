"""FrameLink and FrameStream: streams, credit windows, heartbeats and resets over a fake wire."""

from __future__ import annotations

import gc
import os
import weakref
from dataclasses import replace
from typing import Any, cast

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunneld.interfaces import IAgentLink, ILinkHandler, IStream, IStreamReceiver
from tunneld.model.messages import (
    ControlMessage,
    GoAway,
    Headers,
    Hello,
    ReplyHead,
    StreamHead,
    Welcome,
)
from tunneld.model.reasons import Reason
from tunneld.transports.mux import FrameLink, FrameStream
from tunneld.wire import codec
from tunneld.wire.heartbeat import Heartbeat

HEAD = StreamHead(kind="http", tunnel="a.test", method="GET", target="/", peer="192.0.2.1:5000")
WINDOW = 1000


@implementer(IStreamReceiver)
class Receiver:
    """Records what arrives on a stream, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.data = bytearray()

    def reply_received(self, reply: ReplyHead) -> None:
        self.events.append(("reply", reply))

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.events.append(("data", data))

    def end_received(self, trailers: Headers) -> None:
        self.events.append(("end", tuple(trailers)))

    def reset_received(self, reason: Reason, message: str) -> None:
        self.events.append(("reset", reason, message))

    def resets(self) -> list[tuple[object, ...]]:
        return [e for e in self.events if e[0] == "reset"]


@implementer(ILinkHandler)
class Handler:
    """Records link events; accepts every opened stream with a fresh L{Receiver} unless told not to."""

    def __init__(self, attach: bool = True) -> None:
        self.attach = attach
        self.controls: list[ControlMessage] = []
        self.streams: list[IStream] = []
        self.receivers: list[Receiver] = []
        self.lost: list[tuple[Reason, str]] = []

    def control_received(self, message: ControlMessage) -> None:
        self.controls.append(message)

    def stream_opened(self, stream: IStream) -> None:
        self.streams.append(stream)
        receiver = Receiver()
        self.receivers.append(receiver)
        if self.attach:
            stream.attach(receiver)

    def link_lost(self, reason: Reason, message: str) -> None:
        self.lost.append((reason, message))


@implementer(IPushProducer)
class Producer:
    """A push producer that records pause/resume/stop and otherwise does nothing."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:  # noqa: N802
        self.calls.append("pause")

    def resumeProducing(self) -> None:  # noqa: N802
        self.calls.append("resume")

    def stopProducing(self) -> None:  # noqa: N802
        self.calls.append("stop")


class Wire:
    """A C{FrameWire} that records what its link sends and queues it for L{Pair.pump}."""

    def __init__(self) -> None:
        self.outbox: list[bytes] = []
        self.events: list[tuple[object, ...]] = []
        self.closed: tuple[Reason, str] | None = None

    def send_frame(self, payload: bytes) -> None:
        self.outbox.append(payload)
        self.events.append(("frame", payload))

    def close_wire(self, reason: Reason, message: str) -> None:
        self.closed = (reason, message)
        self.events.append(("close", reason, message))

    def frames(self) -> list[codec.Frame]:
        return [codec.decode(e[1]) for e in self.events if e[0] == "frame"]  # type: ignore[arg-type]

    def data_sent(self, stream_id: int) -> int:
        return sum(
            len(f.data.data)
            for f in self.frames()
            if f.WhichOneof("body") == "data" and f.stream_id == stream_id
        )


class BatchingWire(Wire):
    """A L{Wire} that also takes frames in pieces (C{send_frames}), recording each batch's sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def send_frames(self, frames: list[tuple[bytes, bytes | memoryview]]) -> None:
        self.batches.append([sum(map(len, pieces)) for pieces in frames])
        for pieces in frames:
            self.send_frame(b"".join(pieces))


def make_link(
    wire: Wire, clock: Clock, *, is_edge: bool, window: int = WINDOW, **kwargs: object
) -> FrameLink:
    return FrameLink(
        wire,
        transport_name="fake",
        peer="agent" if is_edge else "edge",
        reactor=clock,
        is_edge=is_edge,
        initial_window=window,
        **kwargs,  # type: ignore[arg-type]
    )


class Pair:
    """An edge link and an agent link back to back; frames move only when pumped."""

    def __init__(
        self,
        clock: Clock,
        *,
        edge_window: int = WINDOW,
        agent_window: int = WINDOW,
        agent_handler: Handler | None = None,
        agent_kwargs: dict[str, object] | None = None,
        wire: type[Wire] | None = None,
    ) -> None:
        self.edge_wire, self.agent_wire = (wire or Wire)(), (wire or Wire)()
        self.edge = make_link(self.edge_wire, clock, is_edge=True, window=edge_window)
        self.agent = make_link(
            self.agent_wire, clock, is_edge=False, window=agent_window, **(agent_kwargs or {})
        )
        self.edge_handler = Handler()
        self.agent_handler = agent_handler if agent_handler is not None else Handler()
        self.edge.set_handler(self.edge_handler)
        self.agent.set_handler(self.agent_handler)

    def to_agent(self) -> None:
        """Deliver everything the edge sent; a closed wire then ends the agent's link."""
        self._deliver(self.edge_wire, self.agent)

    def to_edge(self) -> None:
        """Deliver everything the agent sent; a closed wire then ends the edge's link."""
        self._deliver(self.agent_wire, self.edge)

    def _deliver(self, wire: Wire, link: FrameLink) -> None:
        while wire.outbox:
            link.frame_received(wire.outbox.pop(0))
        if wire.closed is not None:
            link.wire_lost(*wire.closed)

    def pump(self) -> None:
        """Deliver in both directions until nothing is left in flight."""
        while self.edge_wire.outbox or self.agent_wire.outbox:
            self.to_agent()
            self.to_edge()
        self.to_agent()
        self.to_edge()

    def open(self, head: StreamHead = HEAD) -> tuple[FrameStream, Receiver, FrameStream, Receiver]:
        """Open a stream from the edge; the edge and agent ends with their receivers."""
        receiver = Receiver()
        stream = self.edge.open_stream(head, receiver)
        self.pump()
        assert isinstance(stream, FrameStream)
        remote = self.agent_handler.streams[-1]
        assert isinstance(remote, FrameStream)
        return stream, receiver, remote, self.agent_handler.receivers[-1]


class FakesTests(SynchronousTestCase):
    """The fakes used here provide the interfaces they stand in for, as do the real objects."""

    def test_fakes_provide_interfaces(self) -> None:
        """Receiver, Handler and Producer provide their zope interfaces."""
        self.assertTrue(verifyObject(IStreamReceiver, Receiver()))
        self.assertTrue(verifyObject(ILinkHandler, Handler()))
        self.assertTrue(verifyObject(IPushProducer, Producer()))

    def test_link_and_stream_provide_interfaces(self) -> None:
        """FrameLink provides IAgentLink and FrameStream provides IStream."""
        pair = Pair(Clock())
        stream, _, remote, _ = pair.open()
        self.assertTrue(verifyObject(IAgentLink, pair.edge))
        self.assertTrue(verifyObject(IStream, stream))
        self.assertTrue(verifyObject(IStream, remote))


class StreamTests(SynchronousTestCase):
    """Opening streams and moving heads, data, ends and resets both ways."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = Pair(self.clock)

    def test_open_reaches_agent_handler(self) -> None:
        """open_stream on the edge hands the agent's handler a stream carrying the same head."""
        stream, _, remote, _ = self.pair.open()
        self.assertEqual(remote.head, HEAD)
        self.assertEqual(remote.stream_id, stream.stream_id)
        self.assertEqual(self.pair.edge.active_streams(), 1)
        self.assertEqual(self.pair.agent.active_streams(), 1)

    def test_edge_stream_keeps_no_header_fields(self) -> None:
        """The agent gets the head's header fields; the edge's stream, its Open sent, holds the head without them."""
        head = StreamHead(kind="upgrade", tunnel="a.test", method="GET", target="/ws",
                          headers=((b"upgrade", b"websocket"),), peer="192.0.2.1:5000")
        stream, _, remote, _ = self.pair.open(head)
        self.assertEqual(remote.head, head)
        self.assertEqual(stream.head, head.without_headers())
        self.assertEqual(stream.head.headers, ())

    def test_stream_ids_are_odd_and_ascending(self) -> None:
        """The edge numbers its streams 1, 3, 5, ..."""
        ids = [self.pair.edge.open_stream(HEAD, Receiver()).stream_id for _ in range(3)]  # type: ignore[attr-defined]
        self.assertEqual(ids, [1, 3, 5])

    def test_exchange_both_ways(self) -> None:
        """Request data and end reach the agent; reply, data and trailers reach the edge; both forget the stream."""
        stream, receiver, remote, remote_receiver = self.pair.open()
        stream.write(b"request body")
        stream.end()
        reply = ReplyHead(status=200, reason=b"OK", headers=((b"content-type", b"text/plain"),))
        remote.send_reply(reply)
        remote.write(b"response ")
        remote.write(b"body")
        remote.end(((b"grpc-status", b"0"),))
        self.pair.pump()
        self.assertEqual(remote_receiver.events, [("data", b"request body"), ("end", ())])
        self.assertEqual(
            receiver.events,
            [
                ("reply", reply),
                ("data", b"response "),
                ("data", b"body"),
                ("end", ((b"grpc-status", b"0"),)),
            ],
        )
        self.assertEqual(self.pair.edge.active_streams(), 0)
        self.assertEqual(self.pair.agent.active_streams(), 0)

    def test_reset_from_edge(self) -> None:
        """A reset on the edge reaches the agent's receiver with its reason and message."""
        stream, receiver, _, remote_receiver = self.pair.open()
        stream.reset(Reason.CLIENT_GONE, "client hung up")
        self.pair.pump()
        self.assertEqual(remote_receiver.events, [("reset", Reason.CLIENT_GONE, "client hung up")])
        self.assertEqual(receiver.events, [])
        self.assertEqual(self.pair.edge.active_streams(), 0)
        self.assertEqual(self.pair.agent.active_streams(), 0)

    def test_reset_from_agent(self) -> None:
        """A reset on the agent reaches the edge's receiver with its reason and message."""
        _, receiver, remote, _ = self.pair.open()
        remote.reset(Reason.UPSTREAM_REFUSED, "connection refused")
        self.pair.pump()
        self.assertEqual(
            receiver.events, [("reset", Reason.UPSTREAM_REFUSED, "connection refused")]
        )
        self.assertEqual(self.pair.edge.active_streams(), 0)

    def test_late_frames_after_reset_are_ignored(self) -> None:
        """Data already in flight for a stream reset a moment ago is dropped, not a protocol error."""
        stream, receiver, remote, _ = self.pair.open()
        remote.write(b"in flight")
        stream.reset(Reason.CLIENT_GONE, "gone")
        self.pair.pump()
        self.assertFalse(self.pair.edge.closed)
        self.assertFalse(self.pair.agent.closed)
        self.assertEqual(receiver.events, [])

    def test_events_before_attach_are_replayed(self) -> None:
        """Frames arriving before the agent attaches a receiver are replayed to it in order."""
        pair = Pair(self.clock, agent_handler=Handler(attach=False))
        stream, _, remote, remote_receiver = pair.open()
        stream.write(b"early")
        stream.end()
        pair.pump()
        self.assertEqual(remote_receiver.events, [])
        remote.attach(remote_receiver)
        self.assertEqual(remote_receiver.events, [("data", b"early"), ("end", ())])

    def test_open_without_handler(self) -> None:
        """An agent link with no handler yet resets a new stream with AGENT_UNAVAILABLE."""
        pair = Pair(self.clock)
        pair.agent.handler = None
        receiver = Receiver()
        pair.edge.open_stream(HEAD, receiver)
        pair.pump()
        self.assertEqual([r[1] for r in receiver.resets()], [Reason.AGENT_UNAVAILABLE])

    def test_max_streams(self) -> None:
        """Streams beyond max_streams are reset with CAP_REACHED; the link stays up."""
        pair = Pair(self.clock, agent_kwargs={"max_streams": 1})
        first, second = Receiver(), Receiver()
        pair.edge.open_stream(HEAD, first)
        pair.edge.open_stream(HEAD, second)
        pair.pump()
        self.assertEqual(first.resets(), [])
        self.assertEqual([r[1] for r in second.resets()], [Reason.CAP_REACHED])
        self.assertFalse(pair.agent.closed)

    def test_stop_producing_cancels_a_turn_later(self) -> None:
        """stopProducing resets the stream with CANCELLED on the next reactor turn."""
        stream, _, _, remote_receiver = self.pair.open()
        stream.stopProducing()
        self.pair.pump()
        self.assertEqual(remote_receiver.events, [])
        self.clock.advance(0)
        self.pair.pump()
        self.assertEqual([r[1] for r in remote_receiver.resets()], [Reason.CANCELLED])

    def test_open_on_closed_link(self) -> None:
        """open_stream on a closed link resets the new stream with AGENT_GONE a turn later."""
        self.pair.edge.wire_lost(Reason.AGENT_GONE, "gone")
        receiver = Receiver()
        self.pair.edge.open_stream(HEAD, receiver)
        self.assertEqual(receiver.events, [])
        self.clock.advance(0)
        self.assertEqual([r[1] for r in receiver.resets()], [Reason.AGENT_GONE])
        self.assertEqual(self.pair.edge_wire.outbox, [])


class CreditTests(SynchronousTestCase):
    """Per-stream credit windows, producer pause/resume and the SATURATED lid."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = Pair(self.clock)

    def test_sender_stops_at_window(self) -> None:
        """Without credit the sender sends exactly initial_window bytes and pauses its producer."""
        stream, _, remote, remote_receiver = self.pair.open()
        remote.pauseProducing()
        producer = Producer()
        stream.registerProducer(producer, True)
        stream.write(b"a" * 2500)
        self.assertEqual(self.pair.edge_wire.data_sent(stream.stream_id), WINDOW)
        self.assertEqual(producer.calls, ["pause"])
        self.pair.pump()
        self.assertEqual(len(remote_receiver.data), WINDOW)
        self.assertEqual(self.pair.edge_wire.data_sent(stream.stream_id), WINDOW)
        self.assertEqual(producer.calls, ["pause"])

    def test_small_writes_stop_at_window(self) -> None:
        """Many small writes are cut at exactly initial_window bytes too."""
        stream, _, remote, _ = self.pair.open()
        remote.pauseProducing()
        producer = Producer()
        stream.registerProducer(producer, True)
        for _ in range(7):
            stream.write(b"b" * 300)
        self.pair.pump()
        self.assertEqual(self.pair.edge_wire.data_sent(stream.stream_id), WINDOW)
        self.assertEqual(producer.calls, ["pause"])

    def test_resume_lets_the_rest_flow(self) -> None:
        """resumeProducing on the receiving stream returns credit; the rest flows and the producer resumes."""
        stream, _, remote, remote_receiver = self.pair.open()
        remote.pauseProducing()
        producer = Producer()
        stream.registerProducer(producer, True)
        payload = bytes(range(256)) * 10
        stream.write(payload)
        self.pair.pump()
        remote.resumeProducing()
        self.pair.pump()
        self.assertEqual(bytes(remote_receiver.data), payload)
        self.assertEqual(producer.calls, ["pause", "resume"])
        self.assertFalse(self.pair.agent.closed)

    def test_end_waits_for_pending_data(self) -> None:
        """end() behind data held for credit is sent only after that data."""
        stream, _, remote, remote_receiver = self.pair.open()
        remote.pauseProducing()
        stream.write(b"c" * 1500)
        stream.end()
        self.pair.pump()
        self.assertNotIn(("end", ()), remote_receiver.events)
        remote.resumeProducing()
        self.pair.pump()
        self.assertEqual(len(remote_receiver.data), 1500)
        self.assertEqual(remote_receiver.events[-1], ("end", ()))

    def test_stalled_stream_does_not_stall_another(self) -> None:
        """A stream whose receiver is paused leaves a sibling stream on the same link flowing."""
        stalled, _, stalled_remote, stalled_receiver = self.pair.open()
        stalled_remote.pauseProducing()
        stalled.write(b"s" * 1500)
        other, _, _, other_receiver = self.pair.open()
        for _ in range(10):
            other.write(b"o" * 500)
            self.pair.pump()
        other.end()
        self.pair.pump()
        self.assertEqual(len(other_receiver.data), 5000)
        self.assertEqual(other_receiver.events[-1], ("end", ()))
        self.assertEqual(len(stalled_receiver.data), WINDOW)
        self.assertFalse(self.pair.agent.closed)

    def test_peer_window_from_hello_and_welcome(self) -> None:
        """Each side sends within the window its peer announced in Hello/Welcome, not its own."""
        pair = Pair(self.clock, edge_window=4000, agent_window=WINDOW)
        pair.agent.send_control(Hello(agent_id="a", tunnels=(), initial_window=WINDOW))
        pair.pump()
        pair.edge.send_control(Welcome(session_id="s", initial_window=4000))
        pair.pump()
        stream, _, remote, remote_receiver = pair.open()
        remote.pauseProducing()
        stream.write(b"w" * 3000)
        pair.pump()
        self.assertFalse(pair.agent.closed, pair.agent_wire.closed)
        self.assertEqual(len(remote_receiver.data), WINDOW)

    def test_link_pause_pauses_every_producer(self) -> None:
        """pause_sending pauses every stream's producer; resume_sending resumes them."""
        first, _, _, _ = self.pair.open()
        second, _, _, _ = self.pair.open()
        producers = [Producer(), Producer()]
        first.registerProducer(producers[0], True)
        second.registerProducer(producers[1], True)
        self.pair.edge.pause_sending()
        self.assertEqual([p.calls for p in producers], [["pause"], ["pause"]])
        late = Producer()
        third, _, _, _ = self.pair.open()
        third.registerProducer(late, True)
        self.assertEqual(late.calls, ["pause"])
        self.pair.edge.resume_sending()
        self.assertEqual([p.calls for p in producers + [late]], [["pause", "resume"]] * 3)

    def test_link_resume_keeps_creditless_stream_paused(self) -> None:
        """resume_sending leaves paused a producer whose stream still waits for credit."""
        stream, _, remote, _ = self.pair.open()
        remote.pauseProducing()
        producer = Producer()
        stream.registerProducer(producer, True)
        stream.write(b"x" * 1200)
        self.pair.edge.pause_sending()
        self.pair.edge.resume_sending()
        self.assertEqual(producer.calls, ["pause"])

    def test_saturated(self) -> None:
        """A producer that ignores pause gets its stream reset with SATURATED past the pending bound."""
        stream, _, remote, remote_receiver = self.pair.open()
        remote.pauseProducing()
        producer = Producer()
        stream.registerProducer(producer, True)
        # initial_window sent, then up to initial_window + max_pending held.
        for _ in range(6):
            stream.write(b"z" * 500)
        self.assertFalse(stream.closed)
        stream.write(b"z" * 500)
        self.assertTrue(stream.closed)
        stream.write(b"z" * 500)
        self.pair.pump()
        self.assertEqual(self.pair.edge_wire.data_sent(stream.stream_id), WINDOW)
        self.assertEqual(
            remote_receiver.resets(), [("reset", Reason.SATURATED, "sender ignored flow control")]
        )
        self.assertEqual(self.pair.edge.active_streams(), 0)
        self.assertFalse(self.pair.edge.closed)

    def test_saturated_log_names_pending_size(self) -> None:
        """The SATURATED warning reports how many bytes were pending, not zero."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        stream, _, remote, _ = self.pair.open()
        remote.pauseProducing()
        for _ in range(7):
            stream.write(b"z" * 500)
        saturated = [e for e in events if "saturated" in e.get("log_format", "")]
        self.assertEqual(len(saturated), 1)
        self.assertEqual(saturated[0]["size"], 2500)


class BatchedCreditTests(CreditTests):
    """The same credit rules when the wire takes Data frames in pieces (C{send_frames})."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = Pair(self.clock, wire=BatchingWire)


class BatchedDataTests(SynchronousTestCase):
    """A wire with C{send_frames} gets each write as one batch of frames no larger than the link allows."""

    def test_large_write_is_one_batch_of_limited_frames(self) -> None:
        """A write of 300 KiB goes out as one batch of Data frames of at most max_data bytes, in order."""
        pair = Pair(Clock(), edge_window=1 << 20, agent_window=1 << 20, wire=BatchingWire)
        stream, _, _, receiver = pair.open()
        payload = os.urandom(300 * 1024)
        stream.write(payload)
        wire = pair.edge_wire
        assert isinstance(wire, BatchingWire)
        limit = pair.edge.max_data
        head = len(codec.data_frame_head(stream.stream_id, limit))
        self.assertEqual(
            wire.batches[-1], [head + limit, head + limit, head + len(payload) - 2 * limit]
        )
        pair.pump()
        self.assertEqual(bytes(receiver.data), payload)
        self.assertTrue(all(type(d) is bytes for e, d, *_ in receiver.events if e == "data"))

    def test_held_data_is_sent_as_it_was_written(self) -> None:
        """Data held for credit and cut where the credit ends still arrives whole and in order."""
        pair = Pair(Clock(), wire=BatchingWire)
        stream, _, _, receiver = pair.open()
        payload = os.urandom(WINDOW * 2 - 10)  # held beyond the window, below the lid
        stream.write(payload[:100])
        stream.write(payload[100:])
        for _ in range(5):
            pair.pump()
        self.assertEqual(bytes(receiver.data), payload)


    def test_reply_with_data_is_one_batch(self) -> None:
        """A reply and the bytes after it, within the credit, go to the wire as one batch, in order."""
        pair = Pair(Clock(), wire=BatchingWire)
        stream, receiver, remote, _ = pair.open()
        wire = pair.agent_wire
        assert isinstance(wire, BatchingWire)
        payload = os.urandom(1000)
        credit = remote.send_credit
        remote.write_with_reply(ReplyHead(200), memoryview(payload))
        self.assertEqual(len(wire.batches), 1)
        self.assertEqual(
            [f.WhichOneof("body") for f in wire.frames()[-2:]], ["reply", "data"]
        )
        self.assertEqual(remote.send_credit, credit - len(payload))
        pair.pump()
        self.assertEqual(receiver.events, [("reply", ReplyHead(200)), ("data", payload)])

    def test_reply_with_data_beyond_credit(self) -> None:
        """Beyond the credit, the reply goes alone and the bytes wait for credit, arriving whole."""
        for wire_type in (Wire, BatchingWire):
            pair = Pair(Clock(), wire=wire_type)
            stream, receiver, remote, _ = pair.open()
            payload = os.urandom(WINDOW + 10)
            remote.write_with_reply(ReplyHead(200), payload)
            for _ in range(3):
                pair.pump()
            self.assertEqual(receiver.events[0], ("reply", ReplyHead(200)))
            self.assertEqual(bytes(receiver.data), payload)


class BorrowingReceiver(Receiver):
    """A L{Receiver} that takes Data as views of the frames (C{borrows_data})."""

    borrows_data = True


class ViewTests(SynchronousTestCase):
    """Data from a C{bytearray} frame is a view only for a receiver that takes views."""

    def _deliver(self, receiver: Receiver) -> None:
        pair = Pair(Clock(), edge_window=1 << 20, agent_window=1 << 20)
        stream, _, remote, _ = pair.open()
        remote.attach(receiver)
        payload = os.urandom(10_000)
        pair.edge_wire.outbox.clear()
        frame = bytearray(codec.encode_data(stream.stream_id, payload))
        pair.agent.frame_received(frame)
        pair.agent.frame_received(memoryview(codec.encode_data(stream.stream_id, payload)))
        self.assertEqual(bytes(receiver.data), payload + payload)

    def test_borrower_gets_views(self) -> None:
        """A borrowing receiver is handed memoryviews of the frames, not copies."""
        receiver = BorrowingReceiver()
        self._deliver(receiver)
        self.assertEqual([type(e[1]) for e in receiver.events if e[0] == "data"], [memoryview] * 2)

    def test_others_get_bytes(self) -> None:
        """Any other receiver gets bytes."""
        receiver = Receiver()
        self._deliver(receiver)
        self.assertEqual([type(e[1]) for e in receiver.events if e[0] == "data"], [bytes] * 2)


class FrameLimitTests(SynchronousTestCase):
    """Data frames grow to the limit both ends said in Hello and Welcome, and only then."""

    def _pair(self, agent_limit: int = 1 << 20) -> Pair:
        return Pair(
            Clock(), edge_window=1 << 21, agent_window=1 << 21, wire=BatchingWire,
            agent_kwargs={"max_frame_size": agent_limit},
        )

    def _sizes(self, pair: Pair, payload: bytes) -> list[int]:
        """The frame sizes of one 1.5 MiB write from the edge, checked on arrival."""
        stream, _, _, receiver = pair.open()
        stream.write(payload)
        wire = pair.edge_wire
        assert isinstance(wire, BatchingWire)
        pair.pump()
        self.assertEqual(bytes(receiver.data), payload)
        self.assertIsNone(pair.agent_wire.closed)
        return wire.batches[-1]

    def test_both_said_their_limits(self) -> None:
        """After Hello and Welcome each side sends Data frames up to the other's limit."""
        pair = self._pair()
        pair.agent.send_control(Hello(agent_id="a", tunnels=()))
        pair.edge.send_control(Welcome(session_id="s"))
        pair.pump()
        self.assertEqual((pair.edge.max_data, pair.agent.max_data), ((1 << 20) - 32,) * 2)
        sizes = self._sizes(pair, os.urandom(3 << 19))
        self.assertEqual(len(sizes), 2)
        self.assertTrue(all(size <= 1 << 20 for size in sizes))

    def test_smaller_limit_wins(self) -> None:
        """A peer with a smaller limit gets frames that fit it."""
        pair = self._pair(agent_limit=300_000)
        pair.agent.send_control(Hello(agent_id="a", tunnels=()))
        pair.pump()
        self.assertEqual(pair.edge.max_data, 300_000 - 32)
        self.assertTrue(all(size <= 300_000 for size in self._sizes(pair, os.urandom(3 << 19))))

    def test_old_peer_keeps_the_minimum(self) -> None:
        """A Hello that says no limit (an older agent), or one below the minimum, keeps 128 KiB frames."""
        for said in (0, 1000):
            pair = self._pair()
            hello = Hello(agent_id="a", tunnels=(), max_frame_size=said)
            pair.agent.send(codec.encode_control(hello).SerializeToString())
            pair.pump()
            self.assertEqual(pair.edge.max_data, 128 * 1024 - 32)
            self.assertTrue(all(size <= 128 * 1024 for size in self._sizes(pair, os.urandom(3 << 19))))


class ProtocolErrorTests(SynchronousTestCase):
    """A misbehaving peer closes the link with PROTOCOL_ERROR."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = Pair(self.clock)

    def assert_protocol_error(self, wire: Wire, handler: Handler) -> None:
        assert wire.closed is not None
        self.assertEqual(wire.closed[0], Reason.PROTOCOL_ERROR)
        self.assertEqual([r for r, _ in handler.lost], [Reason.PROTOCOL_ERROR])

    def test_data_beyond_credit(self) -> None:
        """A peer sending one byte more than its credit closes the link with PROTOCOL_ERROR."""
        stream, _, remote, remote_receiver = self.pair.open()
        remote.pauseProducing()
        self.pair.agent.frame_received(codec.encode_data(stream.stream_id, b"x" * WINDOW))
        self.assertFalse(self.pair.agent.closed)
        self.pair.agent.frame_received(codec.encode_data(stream.stream_id, b"x"))
        self.assert_protocol_error(self.pair.agent_wire, self.pair.agent_handler)
        self.assertEqual(remote_receiver.resets()[0][1], Reason.PROTOCOL_ERROR)

    def test_data_for_unopened_stream_at_edge(self) -> None:
        """Data for a stream the edge never opened is a protocol error."""
        self.pair.edge.frame_received(codec.encode_data(1, b"x"))
        self.assert_protocol_error(self.pair.edge_wire, self.pair.edge_handler)

    def test_data_for_unopened_stream_at_agent(self) -> None:
        """Data for a stream the edge never opened toward the agent is a protocol error."""
        self.pair.open()
        self.pair.agent.frame_received(codec.encode_data(3, b"x"))
        self.assert_protocol_error(self.pair.agent_wire, self.pair.agent_handler)

    def test_agent_may_not_open(self) -> None:
        """An agent opening a stream toward the edge makes the edge close with PROTOCOL_ERROR."""
        receiver = Receiver()
        self.pair.agent.open_stream(HEAD, receiver)
        self.pair.pump()
        self.assert_protocol_error(self.pair.edge_wire, self.pair.edge_handler)
        self.assertEqual(self.pair.edge_handler.streams, [])
        self.assertEqual([r[1] for r in receiver.resets()], [Reason.PROTOCOL_ERROR])

    def test_open_reusing_an_id(self) -> None:
        """An open for a stream id not above the last one is a protocol error."""
        self.pair.open()
        self.pair.agent.frame_received(codec.encode_open(1, HEAD).SerializeToString())
        self.assert_protocol_error(self.pair.agent_wire, self.pair.agent_handler)

    def test_oversized_frame(self) -> None:
        """A frame larger than max_frame_size is a protocol error."""
        pair = Pair(self.clock, agent_kwargs={"max_frame_size": 64})
        pair.agent.frame_received(codec.encode_data(1, b"x" * 100))
        self.assert_protocol_error(pair.agent_wire, pair.agent_handler)

    def test_undecodable_frame(self) -> None:
        """Bytes that are no frame close the link with PROTOCOL_ERROR after a GoAway."""
        self.pair.edge.frame_received(b"\xff\xfe not a frame")
        self.assert_protocol_error(self.pair.edge_wire, self.pair.edge_handler)
        last = self.pair.edge_wire.frames()[-1]
        self.assertEqual(
            codec.control_from(last), GoAway(Reason.PROTOCOL_ERROR, last.goaway.message)
        )


class LinkLifetimeTests(SynchronousTestCase):
    """wire_lost, close() and heartbeats."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = Pair(self.clock)

    def test_wire_lost_resets_every_stream(self) -> None:
        """wire_lost resets every open stream with its reason and tells the handler once."""
        _, first, _, _ = self.pair.open()
        _, second, _, _ = self.pair.open()
        self.pair.edge.wire_lost(Reason.AGENT_GONE, "connection lost")
        self.pair.edge.wire_lost(Reason.PROTOCOL_ERROR, "again")
        for receiver in (first, second):
            self.assertEqual(receiver.events, [("reset", Reason.AGENT_GONE, "connection lost")])
        self.assertEqual(self.pair.edge_handler.lost, [(Reason.AGENT_GONE, "connection lost")])
        self.assertEqual(self.pair.edge.active_streams(), 0)

    def test_close_sends_goaway_then_closes(self) -> None:
        """close() sends a GoAway with the reason, then closes the wire, then resets local streams."""
        _, receiver, _, remote_receiver = self.pair.open()
        self.pair.edge.close(Reason.DRAINING, "restarting")
        events = self.pair.edge_wire.events
        self.assertEqual(events[-1], ("close", Reason.DRAINING, "restarting"))
        assert events[-2][0] == "frame" and isinstance(events[-2][1], bytes)
        goaway = codec.control_from(codec.decode(events[-2][1]))
        self.assertEqual(goaway, GoAway(Reason.DRAINING, "restarting"))
        self.assertEqual(receiver.events, [("reset", Reason.DRAINING, "restarting")])
        self.assertEqual(self.pair.edge_handler.lost, [(Reason.DRAINING, "restarting")])
        self.pair.pump()
        self.assertEqual(self.pair.agent_handler.controls, [GoAway(Reason.DRAINING, "restarting")])
        self.assertEqual(remote_receiver.resets(), [("reset", Reason.DRAINING, "restarting")])

    def test_close_twice(self) -> None:
        """A second close() sends nothing more."""
        self.pair.edge.close(Reason.DRAINING, "one")
        count = len(self.pair.edge_wire.events)
        self.pair.edge.close(Reason.DRAINING, "two")
        self.assertEqual(len(self.pair.edge_wire.events), count)

    def test_control_messages_reach_handler(self) -> None:
        """Hello and Welcome sent with send_control reach the far handler."""
        hello = Hello(agent_id="a1", tunnels=(), token="t", initial_window=WINDOW)
        welcome = Welcome(session_id="s1", public_urls=("http://a.test/",))
        self.pair.agent.send_control(hello)
        self.pair.edge.send_control(welcome)
        self.pair.pump()
        # Each says the largest frame its link accepts (1 MiB by default);
        # the Welcome also says the edge's heartbeat interval.
        self.assertEqual(
            self.pair.edge_handler.controls, [replace(hello, max_frame_size=1 << 20)]
        )
        self.assertEqual(
            self.pair.agent_handler.controls,
            [replace(welcome, max_frame_size=1 << 20, heartbeat_ms=10_000)],
        )

    def test_pings_and_round_trip_time(self) -> None:
        """Each heartbeat interval sends a ping; the pong sets round_trip_time()."""
        self.assertIsNone(self.pair.edge.round_trip_time())
        self.clock.advance(10)
        pings = [f for f in self.pair.edge_wire.frames() if f.WhichOneof("body") == "ping"]
        self.assertEqual(len(pings), 1)
        self.pair.to_agent()
        self.clock.advance(0.25)
        self.pair.to_edge()
        self.assertEqual(self.pair.edge.round_trip_time(), 0.25)

    def test_pumped_pair_stays_up(self) -> None:
        """Links that hear each other's pings outlive many heartbeat timeouts."""
        for _ in range(12):
            self.clock.advance(10)
            self.pair.pump()
        self.assertFalse(self.pair.edge.closed)
        self.assertFalse(self.pair.agent.closed)

    def test_silence_closes_with_agent_gone(self) -> None:
        """A peer silent for heartbeat_timeout gets the link closed with AGENT_GONE."""
        _, receiver, _, _ = self.pair.open()
        self.clock.advance(20)
        self.assertFalse(self.pair.edge.closed)
        self.clock.advance(10)
        self.assertTrue(self.pair.edge.closed)
        assert self.pair.edge_wire.closed is not None
        self.assertEqual(self.pair.edge_wire.closed[0], Reason.AGENT_GONE)
        self.assertEqual([r for r, _ in self.pair.edge_handler.lost], [Reason.AGENT_GONE])
        self.assertEqual([r[1] for r in receiver.resets()], [Reason.AGENT_GONE])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HeartbeatTests(SynchronousTestCase):
    """Heartbeat: pings on the interval, silence declared at the timeout."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pings: list[int] = []
        self.silences: list[float] = []
        self.heartbeat = Heartbeat(self.clock, 10.0, 30.0, self.pings.append, self.silences.append)
        self.heartbeat.start()

    def test_silence_declared_at_the_timeout_after_the_last_sign_of_life(self) -> None:
        """Heard just after a ping, the link is called dead heartbeat_timeout later, not at the next ping tick after it."""
        self.clock.advance(10.5)
        self.assertEqual(self.pings, [1])
        self.heartbeat.heard()
        self.clock.advance(29.9)
        self.assertEqual(self.silences, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.silences), 1)
        self.assertAlmostEqual(self.silences[0], 30.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_every_sign_of_life_moves_the_deadline(self) -> None:
        """A peer heard every few seconds is never called dead, and hearing arms no timer of its own."""
        for _ in range(100):
            self.clock.advance(7.0)
            self.heartbeat.heard()
            self.assertLessEqual(len(self.clock.getDelayedCalls()), 2)
        self.assertEqual(self.silences, [])
        self.clock.advance(30.0)
        self.assertEqual(len(self.silences), 1)
        self.assertGreater(len(self.pings), 40)  # pings went on meanwhile

    def test_stop_cancels_both_timers(self) -> None:
        """stop() leaves no timer behind, and no silence is declared after it."""
        self.clock.advance(5)
        self.heartbeat.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual((self.pings, self.silences), ([], []))

    def test_interval_zero_is_off(self) -> None:
        """With interval 0 nothing is sent and nothing is declared dead."""
        heartbeat = Heartbeat(self.clock, 0.0, 30.0, self.pings.append, self.silences.append)
        self.heartbeat.stop()
        heartbeat.start()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EndStreamTests(SynchronousTestCase):
    """Version 2 links end a direction with the end_stream flag of its last frame."""

    def welcomed_pair(self, version: int) -> Pair:
        pair = Pair(Clock())
        pair.agent.send_control(Hello("a", (), version=version))
        pair.pump()
        pair.edge.send_control(Welcome("s", version=min(version, 2)))
        pair.pump()
        return pair

    def test_end_with_data_one_frame(self) -> None:
        """On a version 2 link the last bytes and the end travel as one Data frame."""
        pair = self.welcomed_pair(2)
        stream, receiver, remote, _ = pair.open()
        before = len(pair.agent_wire.frames())
        remote.end_with_data(b"body")
        frames = pair.agent_wire.frames()[before:]
        self.assertEqual(
            [(f.WhichOneof("body"), f.data.end_stream) for f in frames], [("data", True)]
        )
        pair.pump()
        self.assertEqual(receiver.events[-2:], [("data", b"body"), ("end", ())])
        stream.end()
        pair.pump()
        self.assertEqual((stream.closed, remote.closed), (True, True))

    def test_large_end_with_data_in_pieces(self) -> None:
        """A large last Data goes to a wire that takes pieces as head, payload and tail: the same frame bytes."""
        pair = Pair(Clock(), edge_window=1 << 20, agent_window=1 << 20, wire=BatchingWire)
        pair.agent.send_control(Hello("a", (), version=2))
        pair.pump()
        pair.edge.send_control(Welcome("s", version=2))
        pair.pump()
        stream, receiver, remote, _ = pair.open()
        wire = pair.agent_wire
        assert isinstance(wire, BatchingWire)
        payload = os.urandom(100 * 1024)
        before = len(wire.outbox)
        remote.end_with_data(payload)
        self.assertEqual(wire.outbox[before:], [codec.encode_data(remote.stream_id, payload, end_stream=True)])
        self.assertEqual(len(wire.batches), 1)
        pair.pump()
        self.assertEqual((bytes(receiver.data), receiver.events[-1]), (payload, ("end", ())))

    def test_end_with_data_version_1(self) -> None:
        """On a version 1 link (an older peer) the same call sends Data, then End."""
        pair = self.welcomed_pair(1)
        _, receiver, remote, _ = pair.open()
        before = len(pair.agent_wire.frames())
        remote.end_with_data(b"body")
        frames = pair.agent_wire.frames()[before:]
        self.assertEqual([f.WhichOneof("body") for f in frames], ["data", "end"])
        pair.pump()
        self.assertEqual(receiver.events[-2:], [("data", b"body"), ("end", ())])

    def test_end_with_data_beyond_credit(self) -> None:
        """Bytes beyond the credit wait for it, and the end follows them as its own frame."""
        pair = self.welcomed_pair(2)
        _, receiver, remote, _ = pair.open()
        remote.end_with_data(b"x" * (WINDOW + 10))
        pair.pump()
        self.assertEqual(bytes(receiver.data), b"x" * (WINDOW + 10))
        self.assertEqual(receiver.events[-1], ("end", ()))

    def test_flags_received(self) -> None:
        """Open, Reply and Data frames carrying end_stream end that direction on arrival."""
        pair = Pair(Clock())
        pair.agent.frame_received(codec.open_bytes(1, HEAD, end_stream=True))
        agent_receiver = pair.agent_handler.receivers[-1]
        self.assertEqual(agent_receiver.events, [("end", ())])
        receiver = Receiver()
        pair.edge.open_stream(HEAD, receiver)
        pair.edge.frame_received(codec.reply_bytes(1, ReplyHead(204), end_stream=True))
        self.assertEqual(receiver.events, [("reply", ReplyHead(204)), ("end", ())])
        other = Receiver()
        pair.edge.open_stream(HEAD, other)
        pair.edge.frame_received(codec.encode_data(3, b"abc", end_stream=True))
        self.assertEqual(other.events, [("data", b"abc"), ("end", ())])

    def test_open_ended(self) -> None:
        """open_stream(end_stream=True) sends one Open frame on a version 2 link, Open and End on version 1."""
        for version, kinds in [(2, [("open", True)]), (1, [("open", False), ("end", False)])]:
            pair = self.welcomed_pair(version)
            before = len(pair.edge_wire.frames())
            receiver = Receiver()
            stream = pair.edge.open_stream(HEAD, receiver, end_stream=True)
            frames = pair.edge_wire.frames()[before:]
            self.assertEqual(
                [(f.WhichOneof("body"), f.open.end_stream) for f in frames], kinds, version
            )
            pair.pump()
            self.assertEqual(pair.agent_handler.receivers[-1].events, [("end", ())])
            remote = pair.agent_handler.streams[-1]
            remote.send_reply(ReplyHead(200))
            remote.end_with_data(b"ok")  # type: ignore[attr-defined]
            pair.pump()
            self.assertEqual(receiver.events[-1], ("end", ()))
            self.assertTrue(stream.closed)  # type: ignore[attr-defined]

    def test_end_with_reply(self) -> None:
        """A response without a body is one Reply frame on a version 2 link, Reply and End on version 1."""
        for version, kinds in [(2, [("reply", True)]), (1, [("reply", False), ("end", False)])]:
            pair = self.welcomed_pair(version)
            _, receiver, remote, _ = pair.open()
            before = len(pair.agent_wire.frames())
            remote.end_with_reply(ReplyHead(204))
            frames = pair.agent_wire.frames()[before:]
            self.assertEqual(
                [(f.WhichOneof("body"), f.reply.end_stream) for f in frames], kinds, version
            )
            pair.pump()
            self.assertEqual(receiver.events[-2:], [("reply", ReplyHead(204)), ("end", ())])


class Holder(Receiver):
    """A receiver that holds its stream, as the edge's and the agent's exchanges do."""

    stream: IStream | None = None


class FreedWithoutCyclicGCTests(SynchronousTestCase):
    """
    A finished stream lets go of its receiver, so the two (which hold each
    other while the stream is open) are freed by reference counting: no
    garbage per request is left for the cyclic collector, whose pauses would
    otherwise land on every stream in flight.
    """

    def setUp(self) -> None:
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        gc.collect()

    def open(self, pair: Pair) -> tuple[FrameStream, Holder]:
        holder = Holder()
        stream = pair.edge.open_stream(HEAD, holder)
        holder.stream = stream
        assert isinstance(stream, FrameStream)
        pair.pump()
        return stream, holder

    def assert_freed(self, refs: list[weakref.ref[Any]]) -> None:
        """Once the test's own references are gone, nothing is left holding the pair."""
        self.assertEqual([ref() for ref in refs], [None] * len(refs))

    def test_ended_both_ways(self) -> None:
        """A stream ended in both directions and its receiver are freed once nothing else holds them."""
        pair = Pair(Clock())
        stream, holder = self.open(pair)
        remote = pair.agent_handler.streams.pop()
        stream.end()
        remote.send_reply(ReplyHead(200))
        remote.write(b"body")
        remote.end()
        pair.pump()
        self.assertEqual(holder.events[-1], ("end", ()))
        refs = [weakref.ref(stream), weakref.ref(holder)]
        del stream, holder
        self.assert_freed(refs)

    def test_reset_arrived(self) -> None:
        """A stream reset by the peer still tells its receiver why, then both are freed."""
        pair = Pair(Clock())
        stream, holder = self.open(pair)
        pair.agent_handler.streams.pop().reset(Reason.UPSTREAM_REFUSED, "refused")
        pair.pump()
        self.assertEqual(holder.resets(), [("reset", Reason.UPSTREAM_REFUSED, "refused")])
        refs = [weakref.ref(stream), weakref.ref(holder)]
        del stream, holder
        self.assert_freed(refs)

    def test_saturated(self) -> None:
        """A stream failed from inside (saturated) tells its own receiver, then both are freed."""
        pair = Pair(Clock())
        stream, holder = self.open(pair)
        stream.write(b"x" * (3 * WINDOW + 1))  # one window sent, two held: one byte too many
        self.assertEqual([r[1] for r in holder.resets()], [Reason.SATURATED])
        refs = [weakref.ref(stream), weakref.ref(holder)]
        del stream, holder
        self.assert_freed(refs)

    def test_closed_before_attach(self) -> None:
        """A receiver attached after the stream closed hears the replayed reset, and is not kept."""
        pair = Pair(Clock(), agent_handler=Handler(attach=False))
        stream, _ = self.open(pair)
        stream.reset(Reason.CLIENT_GONE, "gone")
        pair.pump()
        remote = cast(FrameStream, pair.agent_handler.streams[-1])
        holder = Holder()
        holder.stream = remote
        remote.attach(holder)
        self.assertEqual(holder.resets(), [("reset", Reason.CLIENT_GONE, "gone")])
        self.assertIsNone(remote.receiver)
