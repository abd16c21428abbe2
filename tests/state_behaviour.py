"""
What every state backend does, as a mixin: tests.test_state runs it over the
memory backend, tests.test_state_redis over a real redis-server.

A subclass provides C{backend()} (this edge's backend, started) and
C{other_edge()} (the backend another edge would have: the same one for
memory, a second connection for Redis).  Expiry has no event to wait for,
so TTL tests use short TTLs and wait for the condition with a generous
deadline; rates are measured on the bucket's own clock, never the wall clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from zope.interface.verify import verifyObject

from tests.redis_servers import eventually, sleep
from tunneld.interfaces import EdgeRecord, IStateBackend, StateUnavailable
from tunneld.state.ids import IdMinter
from tunneld.state.membership import EdgeMembership
from tunneld.state.service import StateService


class StateBackendBehaviour:
    """The contract of L{IStateBackend}, for any backend."""

    # provided by the TestCase subclass
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIn: Any
    assertNotEqual: Any
    assertNotIn: Any
    assertIsNone: Any
    assertRaises: Any
    addCleanup: Any

    async def backend(self) -> IStateBackend:
        raise NotImplementedError

    async def other_edge(self) -> IStateBackend:
        raise NotImplementedError

    async def test_provides_interface(self) -> None:
        """The backend provides every method of IStateBackend and starts reachable."""
        backend = await self.backend()
        self.assertTrue(verifyObject(IStateBackend, backend))
        health = backend.health()
        self.assertTrue(health.reachable)
        self.assertEqual(health.backend, backend.name)

    # Edge registry

    async def test_edges_register_and_leave(self) -> None:
        """Registered edges are listed with their record; a removed edge is gone at once."""
        one, two = await self.backend(), await self.other_edge()
        a = EdgeRecord("a/1", "a", "10.0.0.1:9443", ("203.0.113.1:443",), False, 1.5)
        b = EdgeRecord("b/2", "b", "10.0.0.2:9443", (), True, 2.5)
        await one.register_edge(a, 30)
        await two.register_edge(b, 30)
        live = sorted(await one.live_edges(), key=lambda e: e.edge_id)
        self.assertEqual(live, [a, b])
        await two.remove_edge("b/2")
        self.assertEqual(await one.live_edges(), [a])
        await one.remove_edge("a/1")
        self.assertEqual(await two.live_edges(), [])

    async def test_edge_expires_without_heartbeat(self) -> None:
        """An edge that stops refreshing its record is forgotten after its TTL; a refreshed one stays."""
        backend = await self.backend()
        await backend.register_edge(EdgeRecord("gone/1", "gone"), 0.3)
        await backend.register_edge(EdgeRecord("kept/1", "kept"), 60)

        async def only_kept() -> bool:
            return [e.edge_id for e in await backend.live_edges()] == ["kept/1"]

        await eventually(only_kept, "the unrefreshed edge to expire")

    # Tunnel registry

    async def test_tunnel_registry(self) -> None:
        """Tunnel key → the edges holding it; release and remove_edge take an edge out."""
        one, two = await self.backend(), await self.other_edge()
        await one.hold_tunnels("a/1", ["app.example", "api.example/v1"], 30)
        await two.hold_tunnels("b/2", ["app.example"], 30)
        self.assertEqual(await one.tunnel_edges("app.example"), ["a/1", "b/2"])
        self.assertEqual(await two.tunnel_edges("api.example/v1"), ["a/1"])
        self.assertEqual(await one.edge_tunnels("a/1"), ["api.example/v1", "app.example"])
        self.assertEqual(await one.tunnel_edges("nobody.example"), [])
        await two.release_tunnels("b/2", ["app.example"])
        self.assertEqual(await one.tunnel_edges("app.example"), ["a/1"])
        self.assertEqual(await one.edge_tunnels("b/2"), [])
        await one.register_edge(EdgeRecord("a/1", "a"), 30)
        await one.remove_edge("a/1")
        self.assertEqual(await two.tunnel_edges("app.example"), [])
        self.assertEqual(await two.tunnel_edges("api.example/v1"), [])

    async def test_tunnel_entries_expire_per_edge(self) -> None:
        """Each edge's entry for a tunnel has its own lifetime: the unrefreshed one goes, the other stays."""
        one, two = await self.backend(), await self.other_edge()
        await one.hold_tunnels("dead/1", ["app.example"], 0.3)
        await two.hold_tunnels("live/2", ["app.example"], 60)

        async def only_live() -> bool:
            return await one.tunnel_edges("app.example") == ["live/2"]

        await eventually(only_live, "the dead edge's tunnel entry to expire")
        self.assertEqual(await one.edge_tunnels("dead/1"), [])

    # Reservations

    async def test_reservation_refuses_other_identities(self) -> None:
        """A claimed name is refused to another identity, on any edge, until its owner releases it."""
        one, two = await self.backend(), await self.other_edge()
        first = await one.claim_name("app.example", "agent-a", None)
        self.assertEqual((first.granted, first.owner, first.expires_in), (True, "agent-a", None))
        refused = await two.claim_name("app.example", "agent-b", 60)
        self.assertEqual((refused.granted, refused.owner, refused.expires_in), (False, "agent-a", None))
        again = await two.claim_name("app.example", "agent-a", None)
        self.assertTrue(again.granted)
        self.assertEqual(await two.name_owner("app.example"), "agent-a")
        self.assertFalse(await two.release_name("app.example", "agent-b"))
        self.assertTrue(await one.release_name("app.example", "agent-a"))
        self.assertIsNone(await one.name_owner("app.example"))
        self.assertTrue((await two.claim_name("app.example", "agent-b", None)).granted)

    async def test_reservation_expires_only_as_configured(self) -> None:
        """A claim with a TTL lapses after it; the owner's renewal without TTL makes it permanent."""
        backend = await self.backend()
        await backend.claim_name("short.example", "agent-a", 0.3)
        await backend.claim_name("kept.example", "agent-a", 0.3)
        renewed = await backend.claim_name("kept.example", "agent-a", None)
        self.assertIsNone(renewed.expires_in)
        held = await backend.claim_name("short.example", "agent-b", None)
        if not held.granted:  # the machine may be fast enough to ask before it lapsed
            self.assertEqual(held.owner, "agent-a")
            self.assertTrue(held.expires_in is not None and 0 < held.expires_in <= 0.3)

        async def lapsed() -> bool:
            return (await backend.claim_name("short.example", "agent-b", None)).granted

        await eventually(lapsed, "the reservation with a TTL to lapse")
        self.assertEqual(await backend.name_owner("kept.example"), "agent-a")

    # IDs

    async def test_epochs_and_ids_never_collide(self) -> None:
        """Epochs handed to edges differ, and so do the IDs minted from them."""
        one, two = await self.backend(), await self.other_edge()
        epochs = [await (one if i % 2 else two).allocate_epoch() for i in range(40)]
        self.assertEqual(len(set(epochs)), len(epochs))
        minters = [IdMinter(epoch) for epoch in epochs[:4]]
        ids = [m.next_id() for _ in range(500) for m in minters]
        ids += [m.secret_id() for _ in range(100) for m in minters]
        self.assertEqual(len(set(ids)), len(ids))

    # Token buckets

    async def test_bucket_burst_cost_and_retry_after(self) -> None:
        """A take of N tokens spends N; a refused take says how long until they are there."""
        backend = await self.backend()
        # (a rate so low that the test never waits for a refill, however slow the machine)
        first = await backend.take_tokens("t", 3, 0.01, 5)
        self.assertTrue(first.allowed)
        self.assertFalse(first.degraded)
        self.assertTrue(abs(first.tokens - 2) < 0.01, first)
        refused = await backend.take_tokens("t", 3, 0.01, 5)
        self.assertFalse(refused.allowed)
        # (3 - tokens) / rate, tokens being 2 plus the refill since the first take;
        # Redis answers in millionths, hence a little slack.
        self.assertTrue(0 < refused.retry_after <= 100.0, refused)
        self.assertTrue(abs(refused.retry_after - (3 - refused.tokens) / 0.01) < 1e-3, refused)
        other = await backend.take_tokens("other", 1, 0.01, 5)
        self.assertTrue(other.allowed)  # buckets are independent

    async def test_bucket_rate_holds_on_its_own_clock(self) -> None:
        """Two edges taking as fast as they can get rate × elapsed tokens, elapsed on the bucket's clock."""
        one, two = await self.backend(), await self.other_edge()
        # Empty the bucket first: from then on a stall of the test (a busy
        # machine) shorter than burst / rate cannot fill it up and waste refills.
        rate, burst = 20.0, 60.0
        drained = await one.take_tokens("shared", burst, rate, burst)
        self.assertTrue(drained.allowed)
        first, allowed, newest = drained.now, 0, drained
        while newest.now - first < 2.0:
            # two edges take from the one bucket, several takes in flight
            verdicts = await defer.gatherResults(
                [b.take_tokens("shared", 1, rate, burst) for b in (one, two, one, two)]
            )
            for verdict in verdicts:
                self.assertFalse(verdict.degraded)
                newest = max(newest, verdict, key=lambda v: v.now)
                allowed += verdict.allowed
            await sleep(0.002)
        refilled = rate * (newest.now - first)
        # Every token that came back was either taken or is still in the bucket.
        self.assertLessEqual(allowed, refilled + 1e-3)  # never more than the limit
        self.assertTrue(
            abs(allowed + newest.tokens - refilled) <= 0.01 * refilled,
            (allowed, newest.tokens, refilled),
        )

    # Counters

    async def test_counters_sum_live_contributions_under_a_cap(self) -> None:
        """A cluster counter sums each edge's part; a cap refuses an increase; a removed edge's part goes."""
        one, two = await self.backend(), await self.other_edge()
        self.assertEqual(await one.set_count("agents:app", "a/1", 3, 30), 3)
        self.assertEqual(await two.set_count("agents:app", "b/2", 2, 30), 5)
        refused = await two.adjust_count("agents:app", "b/2", 2, 30, cap=6)
        self.assertEqual((refused.granted, refused.total), (False, 5))
        granted = await two.adjust_count("agents:app", "b/2", 1, 30, cap=6)
        self.assertEqual((granted.granted, granted.total), (True, 6))
        floor = await one.adjust_count("agents:app", "a/1", -10, 30)
        self.assertEqual((floor.granted, floor.total), (True, 3))
        await one.set_count("agents:app", "a/1", 4, 30)
        await one.remove_edge("a/1")
        self.assertEqual(await two.count_total("agents:app"), 3)
        self.assertEqual(await two.count_total("nothing"), 0)

    async def test_counter_part_of_a_dead_edge_expires(self) -> None:
        """An edge that stops refreshing its part of a counter stops counting after the TTL."""
        one, two = await self.backend(), await self.other_edge()
        await one.set_count("streams:app", "dead/1", 7, 0.3)
        await two.set_count("streams:app", "live/2", 2, 60)

        async def only_live() -> bool:
            return await two.count_total("streams:app") == 2

        await eventually(only_live, "the dead edge's count to expire")

    # Records

    async def test_single_use_take(self) -> None:
        """Of many concurrent takers of a record exactly one gets it; it is then gone."""
        one, two = await self.backend(), await self.other_edge()
        self.assertTrue(await one.put_record("terminal", "tok1", b"\x00session\xff", 30))
        self.assertFalse(await two.put_record("terminal", "tok1", b"other", 30, only_if_absent=True))
        self.assertEqual(await two.get_record("terminal", "tok1"), b"\x00session\xff")
        takes = await defer.gatherResults(
            [(one if i % 2 else two).take_record("terminal", "tok1") for i in range(10)]
        )
        self.assertEqual(sorted(takes, key=lambda v: v or b""), [None] * 9 + [b"\x00session\xff"])
        self.assertIsNone(await one.get_record("terminal", "tok1"))
        self.assertTrue(await one.put_record("terminal", "tok1", b"12", 30, only_if_absent=True))
        self.assertEqual(await two.get_record("terminal", "tok1"), b"12")  # not the number 12
        self.assertTrue(await two.delete_record("terminal", "tok1"))
        self.assertFalse(await two.delete_record("terminal", "tok1"))

    async def test_record_expires(self) -> None:
        """A record is gone after its TTL."""
        backend = await self.backend()
        await backend.put_record("conn", "c1", b"owner=a", 0.3)

        async def gone() -> bool:
            return await backend.get_record("conn", "c1") is None

        await eventually(gone, "the record to expire")

    async def test_argument_mistakes_are_refused(self) -> None:
        """Empty keys, bad TTLs and impossible takes are refused at once, with what was wrong."""
        backend = await self.backend()
        with self.assertRaises(ValueError):
            backend.hold_tunnels("a/1", [""], 10)
        with self.assertRaises(ValueError):
            backend.put_record("a:b", "k", b"", 10)
        with self.assertRaises(ValueError):
            backend.put_record("ns", "k", b"", 0)
        with self.assertRaises(ValueError):
            backend.take_tokens("t", 6, 1.0, 5)
        with self.assertRaises(ValueError):
            backend.append_log("ns", "k", b"", 0, 10)

    # Bounded logs

    async def test_bounded_log_replays_from_an_event_id(self) -> None:
        """A log keeps its newest entries; a reader resumes after an event id and learns of any gap."""
        one, two = await self.backend(), await self.other_edge()
        ids = []
        for i in range(10):  # two edges append to one log, as behind a non-sticky balancer
            ids.append(await (one if i % 2 else two).append_log("sse", "c1", b"event %d" % i, 4, 30))
        self.assertEqual(ids, [str(n) for n in range(1, 11)])
        everything = await one.read_log("sse", "c1", None, 100)
        self.assertFalse(everything.complete)  # events 1-6 were trimmed
        self.assertEqual([e.event_id for e in everything.entries], ["7", "8", "9", "10"])
        self.assertEqual(everything.entries[0].data, b"event 6")
        resumed = await two.read_log("sse", "c1", "8", 100)
        self.assertTrue(resumed.complete)
        self.assertEqual([(e.event_id, e.data) for e in resumed.entries],
                         [("9", b"event 8"), ("10", b"event 9")])
        self.assertEqual(await two.read_log("sse", "c1", "10", 100), type(resumed)((), True))
        lost = await one.read_log("sse", "c1", "3", 100)
        self.assertFalse(lost.complete)
        self.assertEqual(len(lost.entries), 4)
        self.assertEqual(len((await one.read_log("sse", "c1", "6", 1)).entries), 1)
        self.assertFalse((await one.read_log("sse", "c1", "11", 100)).complete)
        self.assertFalse((await one.read_log("sse", "c1", "x", 100)).complete)
        fresh = await one.read_log("sse", "new", None, 100)
        self.assertEqual((fresh.entries, fresh.complete), ((), True))
        await one.delete_log("sse", "c1")
        self.assertFalse((await two.read_log("sse", "c1", "8", 100)).complete)

    async def test_extend_log_keeps_a_batch_together(self) -> None:
        """extend_log appends its items in order as one step: two edges' concurrent batches never interleave."""
        one, two = await self.backend(), await self.other_edge()
        batches = [[b"%s %d" % (name, i) for i in range(300)] for name in (b"one", b"two")]
        last = await defer.gatherResults([
            defer.ensureDeferred(self._extend(one, batches[0])),
            defer.ensureDeferred(self._extend(two, batches[1])),
        ])
        self.assertEqual(sorted(last), ["300", "600"])
        read = await one.read_log("sse", "batch", None, 1000)
        self.assertTrue(read.complete)
        data = [entry.data for entry in read.entries]
        self.assertIn(data, (batches[0] + batches[1], batches[1] + batches[0]))
        self.assertEqual([e.event_id for e in read.entries], [str(n) for n in range(1, 601)])
        self.assertEqual(await one.extend_log("sse", "batch", [b"x", b"y"], 3, 30), "602")
        kept = await two.read_log("sse", "batch", "598", 10)
        self.assertEqual(([e.data for e in kept.entries], kept.complete), ([data[-1], b"x", b"y"], False))
        with self.assertRaises(ValueError):
            one.extend_log("sse", "batch", [], 3, 30)

    async def test_trim_log_drops_what_every_reader_had(self) -> None:
        """trim_log drops the entries through an event id: later ones stay readable, a read from before says incomplete."""
        one, two = await self.backend(), await self.other_edge()
        await one.extend_log("sse", "trim", [b"e%d" % i for i in range(1, 11)], 100, 30)
        await two.trim_log("sse", "trim", "6")
        kept = await one.read_log("sse", "trim", "6", 100)
        self.assertEqual(([e.event_id for e in kept.entries], kept.complete),
                         (["7", "8", "9", "10"], True))
        self.assertFalse((await one.read_log("sse", "trim", "5", 100)).complete)
        await one.trim_log("sse", "trim", "6")  # again: nothing more goes
        await one.trim_log("sse", "absent", "3")
        self.assertEqual(await one.append_log("sse", "trim", b"e11", 100, 30), "11")
        await one.trim_log("sse", "trim", "99")  # past the end: everything goes, ids go on
        self.assertEqual(await one.read_log("sse", "trim", "11", 10), type(kept)((), True))
        self.assertEqual(await one.append_log("sse", "trim", b"e12", 100, 30), "12")
        with self.assertRaises(ValueError):
            one.trim_log("sse", "trim", "x")

    async def _extend(self, backend: IStateBackend, items: list[bytes]) -> str:
        return await backend.extend_log("sse", "batch", items, 1000, 30)

    async def test_watch_log_hears_appends_from_every_edge(self) -> None:
        """A watcher is called after appends by any edge (never from inside the append), and no more once cancelled."""
        one, two = await self.backend(), await self.other_edge()
        calls: list[int] = []
        heard: list[defer.Deferred[None]] = []

        def called() -> None:
            calls.append(1)
            while heard:
                heard.pop().callback(None)

        def next_call() -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            heard.append(d)
            return d

        watch = one.watch_log("sse", "watched", called)
        for writer in (one, two, two):
            waiting = next_call()
            before = len(calls)
            appended = writer.append_log("sse", "watched", b"x", 10, 30)
            self.assertEqual(len(calls), before)  # not from inside the append
            await appended
            await waiting
        waiting = next_call()
        await two.extend_log("sse", "watched", [b"y", b"z"], 10, 30)
        await waiting
        other = two.watch_log("sse", "watched", lambda: None)
        other.cancel()
        watch.cancel()
        watch.cancel()  # idempotent
        before = len(calls)
        await one.append_log("sse", "watched", b"after", 10, 30)
        await two.append_log("sse", "elsewhere", b"other log", 10, 30)
        await sleep(0.3)
        self.assertEqual(len(calls), before)

    # Membership

    async def membership(
        self, backend: IStateBackend, name: str, ttl: float = 3.0, interval: float = 0.2
    ) -> EdgeMembership:
        from twisted.internet import reactor

        state = StateService(reactor, backend)
        member = EdgeMembership(
            state, reactor, name, relay_address=f"{name}.internal:9443",
            public_addresses=(f"{name}.example:443",), ttl=ttl, interval=interval,
        )
        member.setServiceParent(state)
        # The backend's own cleanup closes it; the membership leaves first.
        state.startService()
        self.addCleanup(lambda: member.stopService() if member.running else None)

        async def joined() -> bool:
            return member.beats > 0

        await eventually(joined, f"{name} to register")
        return member

    async def test_membership_heartbeat(self) -> None:
        """An edge's membership registers it, its tunnels and counts, sees the others, and leaves on stop."""
        one, two = await self.backend(), await self.other_edge()
        a = await self.membership(one, "edge-a")
        b = await self.membership(two, "edge-b")
        self.assertNotEqual(a.edge_id, b.edge_id)
        self.assertTrue(a.edge_id.startswith("edge-a/"))
        a.hold("app.example")
        a.hold("app.example")  # a second session for the same tunnel
        b.hold("app.example")
        a.contribute("agents:app.example", 2)
        b.contribute("agents:app.example", 1)

        async def both_hold() -> bool:
            return await one.tunnel_edges("app.example") == sorted([a.edge_id, b.edge_id])

        await eventually(both_hold, "both edges to hold the tunnel")
        self.assertEqual(await one.count_total("agents:app.example"), 3)

        async def sees_b() -> bool:
            return [e.edge_id for e in a.other_edges()] == [b.edge_id]

        await eventually(sees_b, "edge a to see edge b")
        record = a.other_edges()[0]
        self.assertEqual(record.relay_address, "edge-b.internal:9443")
        self.assertEqual(record.public_addresses, ("edge-b.example:443",))
        a.release("app.example")  # one of a's two sessions ended: a still holds it
        await b.set_draining(True)

        async def b_draining() -> bool:
            await a.beat()
            return a.other_edges() == []

        await eventually(b_draining, "edge a to see edge b draining")
        a.release("app.example")

        async def only_b_holds() -> bool:
            return await one.tunnel_edges("app.example") == [b.edge_id]

        await eventually(only_b_holds, "edge a's last session to release the tunnel")
        await b.stopService()
        self.assertEqual([e.edge_id for e in await one.live_edges()], [a.edge_id])
        self.assertEqual(await one.tunnel_edges("app.example"), [])
        self.assertEqual(await one.count_total("agents:app.example"), 2)

    async def test_membership_of_a_killed_edge_expires(self) -> None:
        """An edge whose heartbeats stop without a goodbye (kill -9) disappears within its TTL."""
        backend = await self.backend()
        killed = await self.membership(backend, "killed", ttl=1.0, interval=0.2)
        killed.hold("app.example")
        await eventually(lambda: _holds(backend, "app.example", killed.edge_id), "the hold")
        killed._loop.stop()  # what SIGKILL does to the heartbeat: no goodbye follows
        killed.edge_id = ""  # nor does stopService reach the store

        async def forgotten() -> bool:
            return await backend.live_edges() == [] and await backend.tunnel_edges("app.example") == []

        await eventually(forgotten, "the killed edge to be forgotten")


async def _holds(backend: IStateBackend, key: str, edge_id: str) -> bool:
    return edge_id in await backend.tunnel_edges(key)


__all__ = ["StateBackendBehaviour", "StateUnavailable"]
