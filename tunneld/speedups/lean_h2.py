# -*- test-case-name: tests.test_grpc_bulk -*-
"""
The h2 connection every HTTP/2 speaker here uses (the gRPC agent link,
public HTTP/2, h2c upstreams): L{new_h2_connection} makes one.

L{PiecewiseH2Connection} is h2's connection plus calls that take and give a
DATA payload in pieces (L{PiecewiseH2Connection.receive_frames},
L{PiecewiseH2Connection.send_data_parts},
L{PiecewiseH2Connection.chunks_to_send}, L{PiecewiseH2Connection.send_room}),
built on h2's public API: the fallback.  L{LeanH2Connection} is the same
calls without the costs that grow with traffic, done on h2's private state
(its frame buffer, flow-control window managers and stream bookkeeping, and
hyperframe's frame repr): the trick, used when L{TRICK} is on.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, cast

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import Event, WindowUpdated
from h2.exceptions import (
    FlowControlError,
    FrameDataMissingError,
    FrameTooLargeError,
    ProtocolError,
)
from h2.frame_buffer import FrameBuffer
from h2.stream import H2Stream, StreamInputs, StreamState
from hyperframe.exceptions import InvalidDataError, InvalidFrameError, InvalidPaddingError
from hyperframe.frame import DataFrame, Frame

from tunneld.speedups.switches import Trick

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "TRICK", "DataArrived", "LeanH2Connection", "Payload", "Piece", "PiecewiseH2Connection",
    "new_h2_connection",
]

# A DATA frame that L{LeanH2Connection.receive_frames} took on its short
# path: the stream's id, the payload and its length (no padding, so the
# length flow control counted).  A memoryview payload is a view of the
# (immutable) bytes read; a frame gathered from several reads is a list of
# the pieces that carry it, not joined.
Payload = bytes | memoryview | list[bytes | bytearray | memoryview]
DataArrived = tuple[int, Payload, int]
# A piece of what is sent: bytes, or a view of (immutable) bytes.
Piece = bytes | memoryview


def _size_repr(data: bytes) -> str:
    return f"<{len(data)} bytes>"


# A DATA frame at least this long that has not arrived whole is gathered as
# the chunks that carry it, then joined once (see _FrameBuffer).
_GATHER = 16 * 1024


class _FrameBuffer(FrameBuffer):
    """
    h2's frame reader, with two changes for received DATA frames.

    Their payload is copied once on its way from the socket to the frame.
    h2 appends every chunk read to one buffer, copies a frame's body out of
    it and the payload out of that copy.  Here a long DATA frame that has not
    arrived whole is gathered as the chunks that carry it and joined once;
    one that has is copied out of the buffer once.

    They describe their payload by its size: h2 builds C{repr(frame)} of
    every frame it receives (for a trace log that is off), and a DATA frame's
    repr hex-encodes its whole payload before keeping 20 characters of it:
    with 1 MiB frames that was a fifth of the edge's CPU time.
    """

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        # The DATA frame being gathered: its header, body length and chunks.
        self._gathering: DataFrame | None = None
        self._gather_length = 0
        self._chunks: list[bytes | bytearray | memoryview] = []
        self._chunks_size = 0
        # What followed a gathered frame in its last chunk: read next, before
        # anything added later.
        self._rest: memoryview | None = None

    def take_rest(self) -> memoryview | None:
        """What followed the last gathered frame in the chunk that completed it (nothing else is buffered)."""
        rest, self._rest = self._rest, None
        return rest

    def _restore(self) -> None:
        rest, self._rest = self._rest, None
        if rest is not None:
            self._data[:0] = rest

    def add_data(self, data: Buffer) -> None:
        """FrameBuffer.add_data"""
        if self._rest is not None:
            self._restore()
        if self._gathering is None:
            super().add_data(data)
        else:
            chunk = bytes(data)  # the same object if it is bytes
            self._chunks.append(chunk)
            self._chunks_size += len(chunk)

    def __next__(self) -> Frame:
        if self._rest is not None:
            self._restore()
        if self._gathering is not None:
            if self._chunks_size < self._gather_length:
                raise StopIteration
            return self._gathered()
        data = self._data
        if len(data) < 9 or data[3] != 0 or self._headers_buffer:
            # Not a whole DATA frame's header, or not DATA, or DATA inside a
            # header block (h2 says why that is an error): h2 reads it.
            return super().__next__()
        try:
            frame, length = Frame.parse_frame_header(memoryview(bytes(data[:9])))
        except (InvalidDataError, InvalidFrameError) as err:
            raise ProtocolError(f"Received frame with invalid header: {err!s}") from err
        self._validate_frame_length(length)
        data_frame = cast(DataFrame, frame)  # frame type 0
        if len(data) < length + 9:
            if length >= _GATHER:
                # The buffer itself becomes the first chunk: no copy.
                del data[:9]
                self._gathering = data_frame
                self._gather_length = length
                self._chunks = [data]
                self._chunks_size = len(data)
                self._data = bytearray()
            raise StopIteration
        body = memoryview(data)[9 : 9 + length]
        try:
            self._parse_body(data_frame, body)
        finally:
            # The buffer cannot shrink while a view of it is alive.
            body.release()
        del data[: 9 + length]
        return data_frame

    def ready(self) -> DataFrame | None:
        """The DATA frame being gathered, if all of it has arrived."""
        if self._gathering is not None and self._chunks_size >= self._gather_length:
            return self._gathering
        return None

    def take_gathered(self) -> list[bytes | bytearray | memoryview]:
        """
        The body of the frame L{ready} returned, as the pieces of the chunks
        that carry it, without joining them; what follows it is read next.
        """
        chunks, length = self._chunks, self._gather_length
        self._gathering, self._chunks, self._chunks_size = None, [], 0
        last = chunks[-1]
        keep = len(last) - (sum(map(len, chunks)) - length)
        if keep < len(last):
            rest = memoryview(last)[keep:]
            if type(last) is bytes:
                # What follows is left where it is (see take_rest).
                self._rest = rest
            else:
                self._data += rest
            chunks[-1] = memoryview(last)[:keep]
        return chunks

    def _gathered(self) -> DataFrame:
        """The gathered DATA frame, whole: its chunks joined, what follows it back in the buffer."""
        frame, length = self._gathering, self._gather_length
        assert frame is not None
        body = b"".join(self.take_gathered())
        if "PADDED" in frame.flags:
            self._parse_body(frame, memoryview(body))
        else:
            frame.data = body
            frame.body_len = length
            frame._body_repr = partial(_size_repr, body)  # type: ignore[method-assign]
        return frame

    @staticmethod
    def _parse_body(frame: DataFrame, body: memoryview) -> None:
        try:
            frame.parse_body(body)
        except InvalidDataError as err:
            raise ProtocolError("Received frame with non-compliant data") from err
        except InvalidFrameError as err:
            raise FrameDataMissingError("Frame data missing or invalid") from err
        frame._body_repr = partial(_size_repr, frame.data)  # type: ignore[method-assign]


_DATA_HEADER = struct.Struct(">HBBBL")
# A whole WINDOW_UPDATE frame: length (4), type (8), no flags, stream, increment.
_WINDOW_UPDATE = struct.Struct(">HBBBLL")
_LARGEST_WINDOW = 2**31 - 1
_WINDOW_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE)
_END_STREAM = 0x1
_OPEN_CONNECTION = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
_RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
_SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


class PiecewiseH2Connection(H2Connection):
    """
    h2's connection, with a DATA payload taken and given in pieces, on h2's
    public API (each call joins or copies what the lean one does not).
    """

    def receive_frames(self, data: Buffer) -> list[Event | DataArrived]:
        """
        C{receive_data(data)}: h2's events; L{LeanH2Connection} returns some
        DATA frames as L{DataArrived} triples instead.
        """
        return list(self.receive_data(bytes(data)))

    def send_data_parts(
        self, stream_id: int, parts: Sequence[Piece], end_stream: bool = False,
        size: int | None = None,
    ) -> None:
        """C{send_data(stream_id, b"".join(parts), end_stream)}; C{size}: the parts' total length, if known."""
        self.send_data(stream_id, b"".join(parts), end_stream=end_stream)

    def send_room(self, stream_id: int) -> int:
        """
        How many bytes one DATA frame on the stream may carry now: the
        smaller of the two windows and the peer's frame size.  Raises as
        C{local_flow_control_window} does for a stream that is not open.
        """
        return min(self.local_flow_control_window(stream_id), self.max_outbound_frame_size)

    def chunks_to_send(self) -> list[Piece]:
        """What L{data_to_send} returns, as the pieces it would join."""
        data = self.data_to_send()
        return [data] if data else []


class LeanH2Connection(PiecewiseH2Connection):
    """
    An C{H2Connection} that counts open streams in amortised constant time,
    reads frames with L{_FrameBuffer} and can send a DATA frame's payload
    without copying it (L{send_data_parts}, L{chunks_to_send}).

    h2 counts them, each time a stream opens, by walking every stream it
    knows (forgetting the closed ones on the way): with hundreds of idle
    C{Forward} calls that walk cost more than the rest of a request.  Here
    the number of streams known is used while it is below the
    C{MAX_CONCURRENT_STREAMS} that applies and below twice what the last walk
    left: it is an upper bound of the open ones, so a limit check it passes
    would pass with the exact count.  Otherwise h2's own walk counts them,
    exactly, and forgets the closed ones, so what it keeps stays bounded.
    """

    _walk_at = 64

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        # What goes out, in order, before what h2 has in its own buffer.
        self._chunks: list[Piece] = []

    def receive_frames(self, data: Buffer) -> list[Event | DataArrived]:
        """
        C{receive_data(data)}, with the plain DATA frames on open streams
        taken on a short path and returned as L{DataArrived} triples.

        A DATA frame without flags (no padding, no END_STREAM), whole in the
        buffer, within the frame size limit and both flow-control windows,
        on a stream that h2 would let receive it (open or half-closed by us,
        headers received, no content-length to check) changes h2's state
        exactly as h2's C{_receive_data_frame} would: both inbound windows
        shrink by its length and the stream counts the bytes.  Only the
        frame and event objects and the state-machine lookups (which leave
        the states as they are for such a frame) are skipped.  Every other
        frame, in order, goes through h2 unchanged, errors included.

        A payload taken straight from C{data} (bytes, nothing buffered
        before it) is a memoryview of it, not a copy; one gathered from
        several reads is the list of the pieces that carry it (see
        L{_FrameBuffer}), not joined.
        """
        buffer = cast(_FrameBuffer, self.incoming_buffer)
        buffer.max_frame_size = max_size = self.max_inbound_frame_size
        events: list[Event | DataArrived] = []
        streams = self.streams
        unpack = _DATA_HEADER.unpack_from
        # With nothing buffered, frames are read straight out of the bytes
        # read (C{view}, from C{pos}): a payload is a view of them, not a
        # copy.  What is left from the first frame not taken on the short
        # path goes to the buffer, and on from there.
        view: memoryview | None = None
        pos = 0
        if (
            type(data) is bytes and not buffer._data and buffer._gathering is None
            and not buffer._preamble_len
        ):
            view = memoryview(data)
        else:
            buffer.add_data(data)
        try:
            while True:
                if view is None and buffer._rest is not None:
                    view, pos = buffer.take_rest(), 0
                raw: memoryview | bytearray = buffer._data if view is None else view
                at = 0 if view is None else pos
                if (
                    len(raw) - at >= 13 and raw[at + 3] == 8 and raw[at + 2] == 4
                    and raw[at] == 0 and raw[at + 1] == 0 and raw[at + 4] == 0
                    and buffer._gathering is None and not buffer._headers_buffer
                    and self.state_machine.state in _OPEN_CONNECTION
                ):
                    _, _, _, _, stream_id, increment = _WINDOW_UPDATE.unpack_from(raw, at)
                    update = self._window_update(stream_id & 0x7FFFFFFF, increment)
                    if update is not None:
                        if view is None:
                            del buffer._data[:13]
                        else:
                            pos = at + 13
                        events.append(update)
                        continue
                if (
                    len(raw) - at >= 9 and raw[at + 3] == 0 and raw[at + 4] == 0
                    and buffer._gathering is None and not buffer._headers_buffer
                    and self.state_machine.state in _OPEN_CONNECTION
                ):
                    high, low, _, _, stream_id = unpack(raw, at)
                    length = high << 8 | low
                    end = at + 9 + length
                    stream = streams.get(stream_id & 0x7FFFFFFF)
                    if (
                        stream is not None
                        and len(raw) >= end
                        and length <= max_size
                        and self._can_take(stream, length)
                    ):
                        payload: bytes | memoryview
                        if view is None:
                            payload = bytes(memoryview(raw)[9:end])
                            del buffer._data[:end]
                        else:
                            payload = view[at + 9 : end]
                            pos = end
                        self._took(stream, length)
                        events.append((stream.stream_id, payload, length))
                        continue
                if view is not None:
                    if pos < len(view):
                        buffer.add_data(view[pos:])
                    view = None
                gathered = buffer.ready()
                if gathered is not None and not gathered.flags:
                    stream = streams.get(gathered.stream_id)
                    length = buffer._gather_length
                    if stream is not None and self._can_take(stream, length):
                        pieces = buffer.take_gathered()
                        self._took(stream, length)
                        events.append((stream.stream_id, pieces, length))
                        continue
                try:
                    frame = next(buffer)
                except StopIteration:
                    break
                events.extend(self._receive_frame(frame))
        except InvalidPaddingError as e:
            self._terminate_connection(ErrorCodes.PROTOCOL_ERROR)
            raise ProtocolError("Received frame with invalid padding.") from e
        except ProtocolError as e:
            self._terminate_connection(e.error_code)
            raise
        return events

    def _window_update(self, stream_id: int, increment: int) -> WindowUpdated | None:
        """
        What h2 does on receiving a WINDOW_UPDATE frame that changes no state
        (on the connection, or a stream open or half-closed) and leaves the
        window within bounds: the window grows, a L{WindowUpdated} event.
        None for any other frame: h2 reads it (and says what is wrong).
        """
        if not 1 <= increment <= _LARGEST_WINDOW:
            return None
        if not stream_id:
            window = self.outbound_flow_control_window + increment
            if window > _LARGEST_WINDOW:
                return None
            self.outbound_flow_control_window = window
            return WindowUpdated(stream_id=0, delta=increment)
        stream = self.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in _WINDOW_STATES:
            return None
        window = stream.outbound_flow_control_window + increment
        if window > _LARGEST_WINDOW:
            return None
        stream.outbound_flow_control_window = window
        return WindowUpdated(stream_id=stream_id, delta=increment)

    def _can_take(self, stream: H2Stream, length: int) -> bool:
        """Whether h2 would take a plain DATA frame of C{length} bytes on the stream without a word."""
        machine = stream.state_machine
        if (
            length <= self._inbound_flow_control_window_manager.current_window_size
            and length <= stream._inbound_window_manager.current_window_size
            and machine.state in _RECEIVING
            and machine.headers_received
            and stream._expected_content_length is None
        ):
            return True
        return False

    def _took(self, stream: H2Stream, length: int) -> None:
        """What h2 does on receiving such a frame: both windows shrink, the stream counts the bytes."""
        self._inbound_flow_control_window_manager.current_window_size -= length
        stream._inbound_window_manager.current_window_size -= length
        stream._actual_content_length += length

    def send_data_parts(
        self, stream_id: int, parts: Sequence[Piece], end_stream: bool = False,
        size: int | None = None,
    ) -> None:
        """
        C{send_data(stream_id, b"".join(parts), end_stream)} without the
        join, nor h2's copies of the payload into its output buffer: the
        parts go out as they are, after a DATA frame header.  The same
        checks, state changes and window accounting as h2's C{send_data}.
        C{size}, if given, is the parts' total length.

        In the states where sending DATA without END_STREAM changes nothing
        (an open connection; an open stream, or one half-closed by the peer)
        the state machines are not consulted.
        """
        if size is None:
            size = sum(map(len, parts))
        stream = self.streams.get(stream_id)
        if stream is None:
            # Let h2 say why (closed, never opened): it raises.
            window = self.local_flow_control_window(stream_id)
        else:
            window = min(self.outbound_flow_control_window, stream.outbound_flow_control_window)
        if size > window:
            raise FlowControlError(f"Cannot send {size} bytes, flow control window is {window}")
        if size > self.max_outbound_frame_size:
            raise FrameTooLargeError(
                f"Cannot send frame size {size}, max frame size is {self.max_outbound_frame_size}"
            )
        assert stream is not None
        if (
            end_stream
            or self.state_machine.state not in _OPEN_CONNECTION
            or stream.state_machine.state not in _SENDING
        ):
            self.state_machine.process_input(ConnectionInputs.SEND_DATA)
            stream.state_machine.process_input(StreamInputs.SEND_DATA)
        flags = 0
        if end_stream:
            stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
            flags = _END_STREAM
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        chunks = self._chunks
        if self._data_to_send:
            chunks.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        chunks.append(
            _DATA_HEADER.pack(size >> 8, size & 0xFF, 0, flags, stream_id & 0x7FFFFFFF)
        )
        chunks.extend(parts)

    def increment_flow_control_window(self, increment: int, stream_id: int | None = None) -> None:
        """
        H2Connection.increment_flow_control_window, without h2's frame object
        and state-machine lookups where sending WINDOW_UPDATE changes no
        state (an open connection; a stream open or half-closed): the same
        window accounting, the same frame bytes.
        """
        if 1 <= increment <= self.MAX_WINDOW_INCREMENT and self.state_machine.state in _OPEN_CONNECTION:
            if stream_id is None:
                self._inbound_flow_control_window_manager.window_opened(increment)
                self._data_to_send += _WINDOW_UPDATE.pack(0, 4, 8, 0, 0, increment)
                return
            stream = self.streams.get(stream_id)
            if stream is not None and stream.state_machine.state in _WINDOW_STATES:
                stream._inbound_window_manager.window_opened(increment)
                self._data_to_send += _WINDOW_UPDATE.pack(0, 4, 8, 0, stream_id, increment)
                return
        super().increment_flow_control_window(increment, stream_id)

    def send_room(self, stream_id: int) -> int:
        """
        How many bytes one DATA frame on the stream may carry now: the
        smaller of the two windows and the peer's frame size.  Raises as
        C{local_flow_control_window} does for a stream that is not open.
        """
        stream = self.streams.get(stream_id)
        if stream is None:
            window = self.local_flow_control_window(stream_id)
        else:
            window = min(self.outbound_flow_control_window, stream.outbound_flow_control_window)
        return min(window, self.max_outbound_frame_size)

    def chunks_to_send(self) -> list[Piece]:
        """What L{data_to_send} would return, as the pieces it would join."""
        chunks, self._chunks = self._chunks, []
        if self._data_to_send:
            chunks.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        return chunks

    def data_to_send(self, amount: int | None = None) -> bytes:
        """H2Connection.data_to_send, including what L{send_data_parts} queued."""
        if self._chunks:
            self._data_to_send[:0] = b"".join(self._chunks)
            self._chunks = []
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        """H2Connection.clear_outbound_data_buffer"""
        self._chunks = []
        super().clear_outbound_data_buffer()

    def _few(self, limit: int) -> bool:
        known = len(self.streams)
        return known < self._walk_at and known < limit

    def _walked(self, count: int) -> int:
        self._walk_at = max(64, 2 * len(self.streams))
        return count

    @property
    def open_outbound_streams(self) -> int:
        """An upper bound of the open outbound streams, exact near the peer's limit."""
        if self._few(self.remote_settings.max_concurrent_streams):
            return len(self.streams)
        return self._walked(super().open_outbound_streams)

    @property
    def open_inbound_streams(self) -> int:
        """An upper bound of the open inbound streams, exact near our limit."""
        if self._few(self.local_settings.max_concurrent_streams):
            return len(self.streams)
        return self._walked(super().open_inbound_streams)


def new_h2_connection(config: H2Configuration) -> PiecewiseH2Connection:
    """An HTTP/2 connection: the lean one when L{TRICK} is on, else the public-API one."""
    return LeanH2Connection(config) if TRICK.active else PiecewiseH2Connection(config)


# The private names of h2 (and hyperframe) the lean connection uses, by the
# object that must have them.
_PRIVATE = {
    "H2Connection": (
        "_inbound_flow_control_window_manager", "_data_to_send", "_receive_frame",
        "_terminate_connection", "incoming_buffer", "MAX_WINDOW_INCREMENT",
    ),
    "FrameBuffer": ("_data", "_preamble_len", "_headers_buffer", "_validate_frame_length", "max_frame_size"),
    "H2Stream": (
        "_inbound_window_manager", "_expected_content_length", "_actual_content_length",
    ),
    "DataFrame": ("_body_repr", "parse_body", "parse_frame_header"),
}
_REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"check")]


def _arrived(events: list[Event | DataArrived]) -> list[tuple[object, ...]]:
    """Events as comparable tuples: a DATA frame is (stream, payload, length) either way it came."""
    out: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, tuple):
            stream_id, payload, length = event
            pieces = payload if isinstance(payload, list) else [payload]
            out.append(("data", stream_id, b"".join(bytes(p) for p in pieces), length))
        elif type(event).__name__ == "DataReceived":
            out.append(("data", event.stream_id, event.data, event.flow_controlled_length))  # type: ignore[attr-defined]
        else:
            out.append((type(event).__name__, getattr(event, "stream_id", None)))
    return out


def _check() -> str | None:
    """
    h2 has the private names the lean connection uses, and a short exchange
    (headers; plain, padded, large and gathered DATA frames; a window update;
    a response sent in parts) leaves a lean and a stock h2 server with the
    same events, windows and output.
    """
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    for name, owner in (
        ("H2Connection", server), ("FrameBuffer", server.incoming_buffer), ("DataFrame", DataFrame(1)),
    ):
        missing = [attr for attr in _PRIVATE[name] if not hasattr(owner, attr)]
        if missing:
            return f"h2's {name} lacks {', '.join(missing)}"
    client.initiate_connection()
    client.send_headers(1, _REQUEST)
    preface = client.data_to_send()
    client.send_data(1, b"a" * 100)
    client.send_data(1, b"b" * 16_384)
    client.send_data(1, b"c" * 10, pad_length=5)
    client.increment_flow_control_window(1000, 1)
    client.send_data(1, b"d" * 7, end_stream=True)
    wire = client.data_to_send()
    cut = wire.index(b"b" * 64)  # inside the large frame: read in two parts
    outcomes = []
    for lean in (True, False):
        conn: PiecewiseH2Connection = (LeanH2Connection if lean else PiecewiseH2Connection)(
            H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        events = conn.receive_frames(preface)
        if lean:
            stream = conn.streams[1]
            missing = [attr for attr in _PRIVATE["H2Stream"] if not hasattr(stream, attr)]
            if missing:
                return f"h2's H2Stream lacks {', '.join(missing)}"
        events += conn.receive_frames(wire[:cut]) + conn.receive_frames(wire[cut:])
        conn.acknowledge_received_data(16_384, 1)
        conn.send_headers(1, [(b":status", b"200")])
        conn.send_data_parts(1, [b"x" * 10, memoryview(b"y" * 20)])
        room = conn.send_room(1)
        conn.send_data_parts(1, [b"z"], end_stream=True)
        output = b"".join(conn.chunks_to_send())
        outcomes.append((
            _arrived(events), room, conn.inbound_flow_control_window,
            conn.outbound_flow_control_window, output,
        ))
    if outcomes[0] != outcomes[1]:
        return "a lean and a stock h2 connection disagree on the same exchange"
    return None


TRICK = Trick(
    "lean_h2",
    touches="h2's frame buffer, window managers and stream bookkeeping (" + ", ".join(
        sorted({name for names in _PRIVATE.values() for name in names if name.startswith("_")})
    ) + ")",
    fallback="h2's public API",
    check=_check,
)
