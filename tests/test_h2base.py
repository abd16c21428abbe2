"""
L{tunneld.h2base}: the HTTP/2 driving the public listener, the gRPC link and
h2c upstreams share, on two h2 connections talking to each other in memory
(a unit test of the helpers; the speakers' own tests run them on sockets).
"""

from __future__ import annotations

from collections import deque

from h2 import events as h2events
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from twisted.trial.unittest import SynchronousTestCase

from tunneld import h2base
from tunneld.model.reasons import Reason
from tunneld.speedups.lean_h2 import PiecewiseH2Connection

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]


def pair(window: int = 65535) -> tuple[PiecewiseH2Connection, PiecewiseH2Connection]:
    """A client and a server, started, whose SETTINGS have crossed."""
    client = h2base.new_connection(client_side=True)
    server = h2base.new_connection(
        client_side=False, settings={SettingCodes.INITIAL_WINDOW_SIZE: window}
    )
    h2base.start(client, 65535)
    h2base.start(server, 1 << 20)
    exchange(client, server)
    return client, server


def exchange(a: PiecewiseH2Connection, b: PiecewiseH2Connection) -> list[h2events.Event]:
    """Move bytes both ways until neither has any; the events b saw."""
    seen: list[h2events.Event] = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_b and not to_a:
            return seen
        if to_b:
            seen.extend(b.receive_data(to_b))
        if to_a:
            a.receive_data(to_a)


class SendWithinWindowTests(SynchronousTestCase):
    def test_body_then_end_stream_on_its_last_frame(self) -> None:
        """Without trailers the last DATA frame carries END_STREAM; nothing else follows."""
        client, server = pair()
        client.send_headers(1, REQUEST)
        outbox = deque([b"a" * 1000, b"b" * 10])
        sent, ended = h2base.send_within_window(client, 1, outbox, ())
        self.assertEqual((sent, ended, len(outbox)), (1010, True, 0))
        events = exchange(client, server)
        data = [e for e in events if isinstance(e, h2events.DataReceived)]
        self.assertEqual(b"".join(e.data for e in data), b"a" * 1000 + b"b" * 10)
        self.assertIsNotNone(data[-1].stream_ended)

    def test_trailers_after_the_body(self) -> None:
        """Trailers end the stream once the body is out."""
        client, server = pair()
        client.send_headers(1, REQUEST)
        sent, ended = h2base.send_within_window(client, 1, deque([b"x"]), [(b"grpc-status", b"0")])
        self.assertEqual((sent, ended), (1, True))
        events = exchange(client, server)
        trailers = [e for e in events if isinstance(e, h2events.TrailersReceived)]
        self.assertEqual(trailers[0].headers, [(b"grpc-status", b"0")])

    def test_what_the_window_does_not_take_waits(self) -> None:
        """A body beyond the stream window stays queued, its end with it, until the window opens."""
        client, server = pair(window=100)
        client.send_headers(1, REQUEST)
        outbox = deque([b"z" * 250])
        sent, ended = h2base.send_within_window(client, 1, outbox, ())
        self.assertEqual((sent, ended, [len(c) for c in outbox]), (100, False, [150]))
        exchange(client, server)
        server.increment_flow_control_window(150, 1)
        exchange(client, server)
        sent, ended = h2base.send_within_window(client, 1, outbox, ())
        self.assertEqual((sent, ended, len(outbox)), (150, True, 0))

    def test_no_end_yet(self) -> None:
        """With no end given, the body goes and the stream stays open."""
        client, server = pair()
        client.send_headers(1, REQUEST)
        self.assertEqual(h2base.send_within_window(client, 1, deque([b"q"]), None), (1, False))
        self.assertEqual(h2base.send_within_window(client, 1, deque(), None), (0, False))


class ResetCodeTests(SynchronousTestCase):
    def test_codes(self) -> None:
        """A stream refused before its answer may be retried; a cut response is an error unless the client went."""
        self.assertEqual(h2base.rst_code(Reason.AGENT_UNAVAILABLE), ErrorCodes.REFUSED_STREAM)
        self.assertEqual(h2base.rst_code(Reason.UPSTREAM_ERROR), ErrorCodes.CANCEL)
        self.assertEqual(h2base.cut_code(Reason.CLIENT_GONE), ErrorCodes.CANCEL)
        self.assertEqual(h2base.cut_code(Reason.SATURATED), ErrorCodes.INTERNAL_ERROR)
        self.assertEqual(h2base.reason_for_rst(ErrorCodes.REFUSED_STREAM), Reason.AGENT_UNAVAILABLE)
        self.assertEqual(h2base.reason_for_rst(0x77), Reason.AGENT_GONE)
        self.assertEqual((h2base.code_name(8), h2base.code_name(0x77)), ("CANCEL", "119"))
