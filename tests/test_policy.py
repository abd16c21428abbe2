"""
Policy on the reactor clock: token buckets, caps whose slots cannot leak, the
public gate, and the public listener consulting it (status, Retry-After, and
every slot given back on every way an exchange ends).
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.test_http1 import FakeLink, FakeRoute, FakeRouter
from tunneld.config import LimitsSection, TunnelLimits
from tunneld.edge.gateway import EdgeGateway
from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPSettings
from tunneld.model.reasons import Reason
from tunneld.policy.caps import Cap, KeyedCap, Slots
from tunneld.policy.gate import PublicPolicy, Refused
from tunneld.policy.ratelimit import BucketTable, TokenBucket

HOST = "app.test"


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_refill(self) -> None:
        """A bucket grants its burst at once, then one token per 1/rate seconds."""
        bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
        self.assertEqual([bucket.take(0.0) for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(bucket.take(0.0), 0.5)
        self.assertAlmostEqual(bucket.take(0.25), 0.25)
        self.assertEqual(bucket.take(0.5), 0.0)
        self.assertAlmostEqual(bucket.take(0.5), 0.5)

    def test_never_above_burst(self) -> None:
        """A long idle time refills only up to the burst."""
        bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
        granted = [bucket.take(1000.0) for _ in range(3)]
        self.assertEqual(granted[:2], [0.0, 0.0])
        self.assertGreater(granted[2], 0)

    def test_refused_take_costs_nothing(self) -> None:
        """Refusals do not dig the bucket deeper: the wait stays the same."""
        bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
        bucket.take(0.0)
        self.assertEqual(bucket.take(0.0), bucket.take(0.0))

    def test_zero_rate_waits_forever(self) -> None:
        """A bucket with no rate, once empty, never refills."""
        bucket = TokenBucket(rate=0.0, burst=1, now=0.0)
        bucket.take(0.0)
        self.assertEqual(bucket.take(1e9), math.inf)


class BucketTableTests(SynchronousTestCase):
    def test_keys_are_separate(self) -> None:
        """Each key has its own bucket."""
        clock = Clock()
        table = BucketTable(clock, rate=1.0, burst=1)
        self.assertEqual(table.take("a"), 0.0)
        self.assertEqual(table.take("b"), 0.0)
        self.assertGreater(table.take("a"), 0)

    def test_unlimited_stores_nothing(self) -> None:
        """A rate of 0 means no limit and no bucket kept."""
        table = BucketTable(Clock(), rate=0, burst=0)
        for i in range(100):
            self.assertEqual(table.take(i), 0.0)
        self.assertEqual(len(table), 0)

    def test_idle_full_buckets_are_evicted(self) -> None:
        """Once a bucket has refilled it is dropped: the table shrinks on the reactor clock."""
        clock = Clock()
        table = BucketTable(clock, rate=10.0, burst=5)
        for i in range(50):
            table.take(i)
        self.assertEqual(len(table), 50)
        clock.advance(0.11)  # each used bucket needs 0.1 s to be full again
        table.take("new")
        self.assertEqual(len(table), 1)

    def test_bounded_size(self) -> None:
        """Past max_size the least recently used bucket goes, whatever its state."""
        table = BucketTable(Clock(), rate=1.0, burst=1, max_size=10)
        for i in range(1000):
            table.take(i)
        self.assertLessEqual(len(table), 10)

    def test_per_key_override(self) -> None:
        """A take with its own rate and burst uses them, and follows a change."""
        clock = Clock()
        table = BucketTable(clock, rate=1.0, burst=1)
        self.assertEqual([table.take("t", 5.0, 5) for _ in range(5)], [0.0] * 5)
        self.assertGreater(table.take("t", 5.0, 5), 0)
        clock.advance(1)
        self.assertEqual(table.take("t", 1.0, 1), 0.0)
        self.assertGreater(table.take("t", 1.0, 1), 0)


class CapTests(SynchronousTestCase):
    def test_cap_refuses_only_past_limit(self) -> None:
        """A cap of 2 gives two slots; the third waits for a release."""
        cap = Cap(2)
        a, b = cap.acquire(), cap.acquire()
        self.assertIsNotNone(a)
        self.assertIsNotNone(b)
        self.assertIsNone(cap.acquire())
        assert a is not None
        a.release()
        self.assertIsNotNone(cap.acquire())

    def test_release_is_idempotent(self) -> None:
        """Releasing a slot twice gives back one unit, not two."""
        cap = Cap(1)
        slot = cap.acquire()
        assert slot is not None
        slot.release()
        slot.release()
        self.assertEqual(cap.in_use, 0)
        self.assertIsNotNone(cap.acquire())
        self.assertIsNone(cap.acquire())

    def test_keyed_cap_forgets_idle_keys(self) -> None:
        """A key whose slots are all released leaves the table."""
        cap = KeyedCap(1)
        slot = cap.acquire("x")
        self.assertIsNone(cap.acquire("x"))
        self.assertIsNotNone(cap.acquire("y"))
        assert slot is not None
        slot.release()
        self.assertNotIn("x", cap.counts)

    def test_slots_release_together(self) -> None:
        """Slots gives every member back once."""
        cap, keyed = Cap(0), KeyedCap(0)
        both = Slots([cap.acquire(), keyed.acquire("k")])  # type: ignore[list-item]
        both.release()
        both.release()
        self.assertEqual((cap.in_use, keyed.total()), (0, 0))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["open", "close", "error", "double"]),
                              st.integers(0, 4)), max_size=200))
    def test_counters_return_to_zero(self, steps: list[tuple[str, int]]) -> None:
        """After any interleaving of open/close/error (and repeated releases), all counters are 0."""
        clock = Clock()
        policy = PublicPolicy(
            LimitsSection(max_connections=5, max_connections_per_client=2, max_streams=3,
                          client_rate=50.0, client_burst=3),
            clock, max_streams_per_session=4,
        )
        held: list[Any] = []
        for action, who in steps:
            clock.advance(0.01)
            client = f"192.0.2.{who}"
            if action == "open":
                got = policy.connection_opened(client)
                if not isinstance(got, Refused):
                    held.append(got)
                admitted = policy.admit(f"t{who % 2}.test", client, len(held))
                if not isinstance(admitted, Refused):
                    held.append(admitted)
            elif held and action == "close":
                held.pop(who % len(held)).release()
            elif held and action == "error":
                # An error path releases, and so does the normal path after it.
                slot = held.pop(0)
                slot.release()
                slot.release()
            elif held and action == "double":
                held[-1].release()
        for slot in held:
            slot.release()
        snapshot = policy.snapshot()
        for key in ("connections", "client_connections", "clients_with_connections",
                    "tunnel_streams", "tunnels_with_streams"):
            self.assertEqual(snapshot[key], 0, key)


class PublicPolicyTests(SynchronousTestCase):
    def policy(self, **limits: Any) -> tuple[PublicPolicy, Clock]:
        clock = Clock()
        return PublicPolicy(LimitsSection(**limits), clock), clock

    def test_client_rate_limit(self) -> None:
        """Each client has its own bucket on a tunnel; refusals say when to retry."""
        policy, clock = self.policy(client_rate=1.0, client_burst=2)
        self.assertNotIsInstance(policy.admit(HOST, "192.0.2.1", 0), Refused)
        self.assertNotIsInstance(policy.admit(HOST, "192.0.2.1", 0), Refused)
        refused = policy.admit(HOST, "192.0.2.1", 0)
        self.assertEqual(refused, Refused(Reason.RATE_LIMITED, 1))
        self.assertNotIsInstance(policy.admit(HOST, "192.0.2.2", 0), Refused)
        clock.advance(1)
        self.assertNotIsInstance(policy.admit(HOST, "192.0.2.1", 0), Refused)

    def test_tunnel_rate_limit_and_retry_after(self) -> None:
        """The tunnel bucket is shared by all clients; Retry-After rounds the wait up."""
        policy, clock = self.policy(rate=0.25, burst=1)
        self.assertNotIsInstance(policy.admit(HOST, "a", 0), Refused)
        self.assertEqual(policy.admit(HOST, "b", 0), Refused(Reason.RATE_LIMITED, 4))
        clock.advance(3.5)
        self.assertEqual(policy.admit(HOST, "b", 0), Refused(Reason.RATE_LIMITED, 1))

    def test_per_tunnel_override(self) -> None:
        """[limits.tunnels.HOST] overrides the defaults for that tunnel only."""
        policy, clock = self.policy(
            rate=100.0, tunnels={"slow.test": TunnelLimits(rate=1.0, burst=1, max_streams=1)}
        )
        self.assertNotIsInstance(policy.admit("slow.test", "a", 0), Refused)
        refused = policy.admit("slow.test", "a", 0)
        assert isinstance(refused, Refused)
        self.assertEqual(refused.reason, Reason.RATE_LIMITED)
        for _ in range(50):
            self.assertNotIsInstance(policy.admit("fast.test", "a", 0), Refused)

    def test_stream_caps(self) -> None:
        """Per-tunnel and per-session stream caps refuse the newcomer with cap_reached."""
        policy, clock = self.policy(max_streams=2)
        first, second = policy.admit(HOST, "a", 0), policy.admit(HOST, "a", 0)
        third = policy.admit(HOST, "a", 0)
        assert isinstance(third, Refused)
        self.assertEqual((third.reason, third.retry_after), (Reason.CAP_REACHED, 1))
        assert isinstance(first, Slots)
        first.release()
        self.assertNotIsInstance(policy.admit(HOST, "a", 0), Refused)
        policy.max_streams_per_session = 5
        refused = policy.admit("other.test", "a", 5)
        assert isinstance(refused, Refused)
        self.assertEqual(refused.reason, Reason.CAP_REACHED)
        self.assertIsInstance(second, Slots)

    def test_connection_caps(self) -> None:
        """Connections are capped in total and per client; a trusted proxy counts only in total."""
        policy, clock = self.policy(
            max_connections=3, max_connections_per_client=1, trusted_proxies=["10.0.0.0/8"]
        )
        self.assertIsInstance(policy.connection_opened("192.0.2.1"), Slots)
        self.assertEqual(policy.connection_opened("192.0.2.1").reason,  # type: ignore[union-attr]
                         Reason.CAP_REACHED)
        self.assertIsInstance(policy.connection_opened("10.0.0.1"), Slots)
        self.assertIsInstance(policy.connection_opened("10.0.0.1"), Slots)
        refused = policy.connection_opened("192.0.2.9")
        assert isinstance(refused, Refused)
        self.assertIn("3 public connections", refused.text)
        self.assertEqual(policy.snapshot()["connections"], 3)

    def test_draining_refuses_everything_new(self) -> None:
        """While draining, connections and requests are refused with draining."""
        policy, clock = self.policy()
        policy.draining = True
        self.assertEqual(policy.admit(HOST, "a", 0), Refused(Reason.DRAINING, 1))
        self.assertEqual(policy.connection_opened("a"), Refused(Reason.DRAINING, 1))

    def test_reconfigure_applies_to_new_work(self) -> None:
        """New limits apply to the next request; slots already held stay valid."""
        policy, clock = self.policy(max_streams=1)
        held = policy.admit(HOST, "a", 0)
        self.assertIsInstance(policy.admit(HOST, "a", 0), Refused)
        policy.configure(LimitsSection(max_streams=2, client_rate=1.0, client_burst=1))
        self.assertIsInstance(policy.admit(HOST, "a", 0), Slots)
        self.assertIsInstance(policy.admit(HOST, "b", 0), Refused)
        assert isinstance(held, Slots)
        held.release()
        self.assertEqual(policy.snapshot()["tunnel_streams"], 1)

    def test_client_of_uses_forwarded_for_only_from_trusted(self) -> None:
        """X-Forwarded-For names the client only when the peer is a trusted proxy."""
        policy, clock = self.policy(trusted_proxies=["10.0.0.0/8"])
        self.assertEqual(policy.client_of("10.1.1.1", [b"198.51.100.7, 10.2.2.2"]), "198.51.100.7")
        self.assertEqual(policy.client_of("192.0.2.1", [b"198.51.100.7"]), "192.0.2.1")


class ListenerPolicyTests(SynchronousTestCase):
    """PublicHTTPProtocol with a PublicPolicy, on StringTransports and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.link = FakeLink()
        router = FakeRouter({HOST: FakeRoute(HOST, self.link)})
        self.policy = PublicPolicy(
            LimitsSection(client_rate=1.0, client_burst=2, max_connections_per_client=2,
                          max_streams=1),
            self.clock,
        )
        self.factory = PublicHTTPFactory(
            EdgeGateway(router, admission=self.policy), PublicHTTPSettings(), self.clock
        )

    def connect(self, ip: str = "192.0.2.1") -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 4000))
        protocol.makeConnection(transport)
        return protocol, transport

    def get(self, protocol: Any, path: str = "/") -> None:
        protocol.dataReceived(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())

    def assertIdle(self) -> None:
        snapshot = self.policy.snapshot()
        self.assertEqual((snapshot["tunnel_streams"], snapshot["connections"],
                          snapshot["client_connections"]), (0, 0, 0))

    def test_rate_limited_answer(self) -> None:
        """Over the rate, the client gets 429 rate_limited with Retry-After, and keeps its connection."""
        protocol, transport = self.connect()
        for _ in range(2):
            self.get(protocol)
            stream = self.link.streams[-1]
            stream.reply(200, [(b"content-length", b"0")])
            stream.finish()
        transport.clear()
        self.get(protocol)
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), answer)
        self.assertIn(b"tunnel-error: rate_limited\r\n", answer)
        self.assertIn(b"retry-after: 1\r\n", answer)
        self.assertNotIn(b"connection: close", answer)
        self.assertEqual(len(self.link.streams), 2)
        protocol.connectionLost(None)
        self.assertIdle()

    def test_stream_cap_and_release_on_every_ending(self) -> None:
        """max_streams refuses a second exchange; reset, client loss and end all give the slot back."""
        first, t1 = self.connect("192.0.2.1")
        second, t2 = self.connect("192.0.2.2")
        self.get(first)
        self.get(second)
        self.assertIn(b"HTTP/1.1 503 ", t2.value())
        self.assertIn(b"tunnel-error: cap_reached\r\n", t2.value())
        self.assertIn(b"retry-after: 1\r\n", t2.value())
        self.link.streams[0].fail(Reason.AGENT_GONE, "gone")  # reset
        self.assertEqual(self.policy.snapshot()["tunnel_streams"], 0)
        self.clock.advance(5)
        self.get(first)
        first.connectionLost(None)  # client gone mid-exchange
        self.assertEqual(self.link.streams[-1].reset_with[0], Reason.CLIENT_GONE)  # type: ignore[index]
        self.assertEqual(self.policy.snapshot()["tunnel_streams"], 0)
        t2.clear()
        self.clock.advance(5)
        self.get(second)
        self.link.streams[-1].reply(204)
        self.link.streams[-1].finish()
        self.assertIn(b"HTTP/1.1 204 ", t2.value())
        second.connectionLost(None)
        self.assertIdle()

    def test_open_failure_releases(self) -> None:
        """A link that raises on open_stream leaves no slot behind."""
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

        self.link.open_stream = broken  # type: ignore[method-assign]
        protocol, transport = self.connect()
        self.get(protocol)
        self.assertIn(b"503 ", transport.value())
        self.flushLoggedErrors(RuntimeError)
        protocol.connectionLost(None)
        self.assertIdle()

    def test_connection_cap_answers_first_request_and_closes(self) -> None:
        """A connection over the per-client cap gets 503 cap_reached and is closed; others are untouched."""
        a, ta = self.connect()
        b, tb = self.connect()
        c, tc = self.connect()
        self.get(c)
        answer = tc.value()
        self.assertIn(b"HTTP/1.1 503 ", answer)
        self.assertIn(b"tunnel-error: cap_reached\r\n", answer)
        self.assertIn(b"retry-after: 1\r\n", answer)
        self.assertIn(b"connection: close\r\n", answer)
        self.clock.advance(3)  # the listener lingers briefly so the answer is read
        self.assertTrue(tc.disconnecting)
        d, td = self.connect()
        d.dataReceived(b"GET / HTTP/1.1\r\nHost: unknown.test\r\n\r\n")
        self.assertIn(b"tunnel-error: cap_reached\r\n", td.value())  # before any routing
        d.connectionLost(None)
        self.assertEqual(self.link.streams, [])
        self.get(a)
        self.assertEqual(len(self.link.streams), 1)
        for protocol in (a, b, c):
            protocol.connectionLost(None)
        self.assertIdle()
