"""The records of a terminal stream (tunneld/wire/terminal.py): round trips, splits, bad input."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunneld.wire.terminal import (
    MAX_RECORD,
    Close,
    Heartbeat,
    Output,
    Ready,
    RecordError,
    RecordReader,
    Resize,
    encode,
    encode_output,
)

records = st.one_of(
    st.builds(Output, st.binary(max_size=100)),
    st.builds(Resize, st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(Close, st.text(max_size=20), st.text(max_size=50)),
    st.builds(Heartbeat, st.integers(0, 2**64 - 1), st.booleans()),
    st.builds(Ready, st.text(max_size=30)),
)


class RecordTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(records, max_size=12), st.integers(1, 50))
    def test_round_trip_in_any_pieces(self, sent: list[object], piece: int) -> None:
        """Records come back in order and unchanged, however the bytes are cut."""
        data = b"".join(encode(r) for r in sent)  # type: ignore[arg-type]
        reader = RecordReader()
        got = []
        for i in range(0, len(data), piece):
            got += reader.feed(data[i : i + piece])
        self.assertEqual(got, sent)
        self.assertEqual(reader.pending(), 0)

    def test_big_output_is_split(self) -> None:
        """Output larger than a record becomes several records, joined again by the reader."""
        data = bytes(range(256)) * (MAX_RECORD // 128)
        records = RecordReader().feed(encode_output(data))
        self.assertGreater(len(records), 1)
        self.assertEqual(b"".join(r.data for r in records), data)  # type: ignore[union-attr]

    def test_oversized_record_is_refused(self) -> None:
        with self.assertRaises(RecordError) as caught:
            RecordReader().feed(b"\x01" + (MAX_RECORD + 1).to_bytes(4, "big"))
        self.assertIn("at most", str(caught.exception))
        with self.assertRaises(ValueError):
            encode(Ready("x" * (MAX_RECORD + 1)))

    def test_unknown_and_malformed_records(self) -> None:
        with self.assertRaises(RecordError) as caught:
            RecordReader().feed(b"\x09\x00\x00\x00\x00")
        self.assertIn("unknown terminal record type 9", str(caught.exception))
        with self.assertRaises(RecordError):
            RecordReader().feed(b"\x02\x00\x00\x00\x01x")  # a resize of one byte
        with self.assertRaises(RecordError):
            RecordReader().feed(b"\x03\x00\x00\x00\x02{}")  # a close without a reason
