"""
The Redis state backend against real redis-server and redis-sentinel
processes: the contract (the same mixin as the memory backend), what it
writes as redis-cli sees it, and its faults: Redis stopped, hung, restarted
empty, unreachable at start, refusing credentials, and a Sentinel failover;
and every reply reaching its own command around reply timeouts.
"""

from __future__ import annotations

import json
import os
import select
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.redis_servers import MISSING, candidate_port, eventually, redis_cli, start_server
from tests.state_behaviour import StateBackendBehaviour
from tunneld.config.values import parse_redis_url
from tunneld.interfaces import EdgeRecord, IStateBackend, StateUnavailable
from tunneld.state.redis import RedisStateBackend
from tunneld.state.redisclient import RedisClient, RedisRefused
from tunneld.state.scripts import LIVE_EDGES


def redis_backend(case: Any, url: str, start: bool = True, **options: Any) -> Any:
    """A backend on C{url} (started unless told), closed when the test ends."""
    settings: dict[str, Any] = {
        # generous for a busy machine; the fault tests shorten what they exercise
        "command_timeout": 2.0, "connect_timeout": 5.0, "probe_interval": 0.1,
    }
    settings.update(options)
    prefix = settings.pop("key_prefix", "tunneld:")
    client = RedisClient(reactor, parse_redis_url(url), probe_key=prefix + "probe", **settings)
    backend = RedisStateBackend(reactor, client, prefix)
    case.addCleanup(backend.close)
    return backend


class RedisBackendTests(StateBackendBehaviour, TestCase):
    """The contract over one real redis-server, each edge with its own connections."""

    skip = MISSING
    timeout = 120

    async def backend(self) -> IStateBackend:
        if not hasattr(self, "_backend"):
            self.server = await start_server(self)
            self._backend = redis_backend(self, self.server.url)
            await self._backend.start()
        return self._backend

    async def other_edge(self) -> IStateBackend:
        await self.backend()
        backend = redis_backend(self, self.server.url)
        await backend.start()
        return backend


def _logged(events: Any, prefix: str, source: Any = None) -> list[Any]:
    """The log events whose format starts with C{prefix} (from C{source}, if given)."""
    return [
        e for e in events
        if e.get("log_format", "").startswith(prefix)
        and (source is None or e.get("log_source") is source)
    ]


class RedisFaultTests(TestCase):
    """What the Redis backend writes, and how it behaves when Redis misbehaves."""

    skip = MISSING
    timeout = 180

    async def test_redis_cli_sees_keys_and_ttls(self) -> None:
        """redis-cli finds the registry, reservation and record keys with the lifetimes given."""
        server = await start_server(self)
        backend = redis_backend(self, server.url, key_prefix="t1:")
        await backend.start()
        record = EdgeRecord("edge-a/5", "edge-a", "10.0.0.1:9443", ("203.0.113.1:443",))
        await backend.register_edge(record, 20)
        await backend.hold_tunnels("edge-a/5", ["app.example"], 20)
        await backend.claim_name("app.example", "agent-a", 30)
        await backend.claim_name("kept.example", "agent-a", None)
        await backend.put_record("terminal", "tok", b"x", 40)
        await backend.take_tokens("app.example", 1, 0.01, 20)  # full again (and gone) in 100 s
        keys = set((await redis_cli(server.port, "--scan", "--pattern", "t1:*")).split())
        self.assertEqual(keys, {
            "t1:edges", "t1:edge-records", "t1:tunnel:app.example", "t1:edge-tunnels:edge-a/5",
            "t1:name:app.example", "t1:name:kept.example", "t1:record:terminal:tok",
            "t1:bucket:app.example", "t1:probe",
        })
        now_s, now_us = (await redis_cli(server.port, "TIME")).split()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        for key in ("t1:edges", "t1:tunnel:app.example"):
            member = "edge-a/5"
            score = float(await redis_cli(server.port, "ZSCORE", key, member))
            self.assertTrue(0 < score - now_ms <= 20_000, (key, score - now_ms))
        stored = json.loads(await redis_cli(server.port, "HGET", "t1:edge-records", "edge-a/5"))
        self.assertEqual(stored["relay_address"], "10.0.0.1:9443")
        self.assertEqual((await redis_cli(server.port, "GET", "t1:name:app.example")).strip(), "agent-a")
        self.assertTrue(0 < int(await redis_cli(server.port, "PTTL", "t1:name:app.example")) <= 30_000)
        self.assertEqual(int(await redis_cli(server.port, "PTTL", "t1:name:kept.example")), -1)
        self.assertTrue(0 < int(await redis_cli(server.port, "TTL", "t1:record:terminal:tok")) <= 40)
        tokens = float(await redis_cli(server.port, "HGET", "t1:bucket:app.example", "t"))
        self.assertTrue(19 <= tokens < 20)
        # A bucket lives until it would be full again (plus a second): then it is a new one.
        self.assertTrue(90_000 < int(await redis_cli(server.port, "PTTL", "t1:bucket:app.example")) <= 101_000)
        # What another client writes, the backend reads.
        await redis_cli(server.port, "SET", "t1:name:cli.example", "agent-cli")
        self.assertEqual(await backend.name_owner("cli.example"), "agent-cli")
        await backend.remove_edge("edge-a/5")
        self.assertEqual(await redis_cli(server.port, "EXISTS", "t1:edge-tunnels:edge-a/5"), "0\n")

    async def test_scripts_reload_after_script_flush(self) -> None:
        """After SCRIPT FLUSH (as after a restart or failover) EVALSHA's NOSCRIPT falls back to EVAL."""
        server = await start_server(self)
        backend = redis_backend(self, server.url)
        await backend.start()
        await backend.take_tokens("b", 1, 0.001, 5)
        loads = backend.client.script_loads
        self.assertEqual(loads, 1)  # the first run of a script on a fresh server
        await backend.take_tokens("b", 1, 0.001, 5)
        self.assertEqual(backend.client.script_loads, loads)  # cached: EVALSHA alone
        await redis_cli(server.port, "SCRIPT", "FLUSH")
        verdict = await backend.take_tokens("b", 1, 0.001, 5)
        self.assertFalse(verdict.degraded)
        self.assertEqual(verdict.tokens // 1, 2)
        self.assertEqual(backend.client.script_loads, loads + 1)

    async def test_log_watchers_hear_of_appends_across_a_restart(self) -> None:
        """Appends are announced by pub/sub on a connection of its own; across a Redis restart watchers are called again (nothing announced meanwhile is missed) and the pub/sub connection comes back."""
        server = await start_server(self)
        backend = redis_backend(self, server.url, probe_interval=0.2)
        writer = redis_backend(self, server.url)
        await backend.start()
        await writer.start()
        heard: list[defer.Deferred[None]] = []

        def called() -> None:
            while heard:
                heard.pop().callback(None)

        def next_call() -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            heard.append(d)
            return d

        backend.watch_log("sse", "w", called)
        announcements = backend._announcements

        async def subscribed() -> bool:
            return bool(announcements._subscribed)

        await eventually(subscribed, "the watcher to subscribe")
        waiting = next_call()
        await writer.append_log("sse", "w", b"one", 10, 30)
        await waiting
        await server.stop()
        waiting = next_call()
        await waiting  # while the announcement connection is down, watchers are polled
        await server.start(server.port)
        await eventually(subscribed, "the watcher to subscribe again")
        await eventually(lambda: defer.succeed(writer.health().reachable), "the writer to reconnect")
        waiting = next_call()
        await writer.append_log("sse", "w", b"two", 10, 30)
        await waiting
        channels = await redis_cli(server.port, "PUBSUB", "CHANNELS")
        self.assertEqual(channels.split(), ["tunneld:log-news:sse:w"])

    async def test_outage_degrades_loudly_and_recovers_without_restart(self) -> None:
        """Redis stopped: limits decide locally, loudly; Redis back (empty): shared again, edge re-registered. Twice."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        server = await start_server(self)
        backend = redis_backend(self, server.url)
        other = redis_backend(self, server.url)
        await backend.start()
        await other.start()
        from tests.state_behaviour import StateBackendBehaviour

        membership = await StateBackendBehaviour.membership(
            self, backend, "edge-a", ttl=3.0, interval=0.2  # type: ignore[arg-type]
        )
        recovered: list[defer.Deferred[None]] = []
        backend.on_recovered(lambda: recovered.pop(0).callback(None) if recovered else None)
        for outage in (1, 2):
            # A second edge (whose own heartbeat would re-register it after an outage).
            await other.register_edge(EdgeRecord("edge-b/1", "edge-b"), 60)
            await membership.beat()
            self.assertEqual(backend.cluster_size, 2)
            waiting: defer.Deferred[None] = defer.Deferred()
            recovered.append(waiting)
            await server.stop()
            # (a rate so low that no token comes back while the test runs, however slow)
            verdicts = [await backend.take_tokens("app", 1, 0.001, 4) for _ in range(6)]
            self.assertTrue(all(v.degraded for v in verdicts))
            # This edge's share: half the rate and burst of the two-edge cluster.
            self.assertEqual([v.allowed for v in verdicts], [True, True, False, False, False, False])
            health = backend.health()
            self.assertFalse(health.reachable)
            self.assertEqual(health.outages, outage)
            self.assertIsNotNone(health.degraded_since)
            self.assertGreaterEqual(health.fallback_decisions, 6 * outage)
            self.assertLess(len(health.last_error), 200)  # one error, not one per decision
            with self.assertRaises(StateUnavailable):
                await backend.live_edges()
            self.assertGreaterEqual(backend.health().failed_operations, 1)
            self.assertEqual(
                len(_logged(events, "state store {where} unreachable", backend.client)), outage
            )
            await server.start(server.port)  # empty: no persistence
            await waiting  # on_recovered: the reconnect was noticed without any request
            self.assertTrue(backend.health().reachable)
            verdict = await backend.take_tokens("app", 1, 0.001, 4)
            self.assertFalse(verdict.degraded)
            self.assertEqual(verdict.tokens, 3)  # the shared bucket, new and full

            async def registered_again() -> bool:
                try:  # the other edge's connection comes back on its own backoff
                    return membership.edge_id in [e.edge_id for e in await other.live_edges()]
                except StateUnavailable:
                    return False

            await eventually(registered_again, "the edge to re-register after the outage")
            self.assertEqual(
                len(_logged(events, "state store {where} reachable again", backend.client)), outage
            )
        # Every pool slot reconnects, none twice: the outages leaked no connection.
        pool = backend.client._factory.pool
        expected = 2 * backend.client.pool_size + 1  # both backends' pools, and redis-cli

        async def pools_whole() -> bool:
            clients = len((await redis_cli(server.port, "CLIENT", "LIST")).splitlines())
            self.assertLessEqual(len(pool), backend.client.pool_size)
            self.assertLessEqual(clients, expected)
            return len(pool) == backend.client.pool_size and clients == expected

        await eventually(pools_whole, "the connection pools to be whole again")

    async def test_hung_redis_times_out_to_the_fallback(self) -> None:
        """A Redis that stops answering (SIGSTOP) costs one command timeout, then local decisions; SIGCONT recovers."""
        server = await start_server(self)
        backend = redis_backend(self, server.url, command_timeout=0.3)
        await backend.start()
        assert server.process is not None
        server.process.signal("STOP")
        try:
            first = await backend.take_tokens("app", 1, 5.0, 5)
            self.assertTrue(first.degraded)
            self.assertFalse(backend.health().reachable)
            self.assertIn("0.3 seconds", backend.health().last_error)
        finally:
            server.process.signal("CONT")

        async def shared_again() -> bool:
            return not (await backend.take_tokens("app", 1, 5.0, 5)).degraded

        await eventually(shared_again, "the shared bucket after SIGCONT")
        self.assertTrue(backend.health().reachable)

    async def test_unreachable_at_start_serves_degraded_then_connects(self) -> None:
        """No Redis at start: start() ends after connect_timeout, degraded and logged; a Redis appearing is used."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        port = candidate_port()
        backend = redis_backend(self, f"redis://127.0.0.1:{port}/0", connect_timeout=0.5)
        await backend.start()
        health = backend.health()
        self.assertEqual((health.reachable, health.outages), (False, 1))
        self.assertEqual(len(_logged(events, "state store {where} unreachable")), 1)
        self.assertTrue((await backend.take_tokens("x", 1, 1.0, 1)).degraded)
        back: defer.Deferred[None] = defer.Deferred()
        backend.on_recovered(lambda: back.callback(None))
        from tests.redis_servers import RedisServer

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        server = RedisServer(self, "server", directory, [])
        self.addCleanup(lambda: defer.ensureDeferred(server.stop()))
        await server.start(port)
        await back
        self.assertFalse((await backend.take_tokens("x", 1, 1.0, 1)).degraded)

    async def test_refused_credentials_fail_the_start(self) -> None:
        """Redis refusing the password is a start failure naming the cause, not a degraded mode."""
        server = await start_server(self, "--requirepass", "right")
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        backend = redis_backend(self, url)
        with self.assertRaises(RedisRefused) as raised:
            await backend.start()
        self.assertIn("auth", str(raised.exception).lower())
        self.flushLoggedErrors()
        good = redis_backend(self, f"redis://:right@127.0.0.1:{server.port}/0")
        await good.start()
        self.assertTrue(good.health().reachable)


class ReplyOrderTests(TestCase):
    """
    Every reply reaches the command it answers, also around reply timeouts:
    a reply handed to another command is wrong routing and wrong limits.
    Each command here has its own reply type (GET a string, INCR an integer,
    a script an array), so a reply out of step shows as the wrong type.
    """

    skip = MISSING
    timeout = 180

    async def client(self, server: Any, **options: Any) -> RedisClient:
        settings: dict[str, Any] = {"probe_key": "t:probe", "probe_interval": 0.1, "connect_timeout": 5.0}
        settings.update(options)
        client = RedisClient(reactor, parse_redis_url(server.url), **settings)
        self.addCleanup(lambda: defer.ensureDeferred(client.close()))
        await client.start()
        await client.call("SET", "t:s", "text")
        await client.call("ZADD", "t:z", "99999999999999", "e1")
        await client.call("HSET", "t:h", "e1", "record")
        return client

    def commands(self, client: RedisClient) -> list[tuple[defer.Deferred[Any], Any]]:
        """GET, INCR and a script at once, each with the reply it must get (a type, or the value)."""
        return [
            (client.call("GET", "t:s"), "text"),
            (client.call("INCR", "t:n"), int),
            (client.run(LIVE_EDGES, ["t:z", "t:h"], []), ["record"]),
        ]

    async def check(self, commands: list[tuple[defer.Deferred[Any], Any]]) -> int:
        """Each command got its own reply or L{StateUnavailable}; how many were answered."""
        answered = 0
        for d, expected in commands:
            try:
                reply = await d
            except StateUnavailable:
                continue
            answered += 1
            if isinstance(expected, type):
                self.assertIsInstance(reply, expected, "a reply out of step")
            else:
                self.assertEqual(reply, expected, "a reply out of step")
        return answered

    async def whole(self, client: RedisClient, server: Any) -> None:
        """Wait for the pool to be whole and the client reachable; no connection leaked."""

        async def up() -> bool:
            clients = len((await redis_cli(server.port, "CLIENT", "LIST")).splitlines())
            self.assertLessEqual(clients, client.pool_size + 1)  # and redis-cli
            pool = [conn for conn in client._factory.pool if conn.connected]
            return client.reachable and len(pool) == client.pool_size and clients == client.pool_size + 1

        await eventually(up, "the pool to be whole and reachable again")

    async def timed_out_among_replies(self, client: RedisClient) -> tuple[list[Any], list[Any]]:
        """
        GET, INCR and a script on the one connection; the reactor is held
        until their replies have come in and the reply timeout has passed.
        The commands, and those sent next as the INCR fails (none if it did not).
        """
        conn = client._factory.pool[0]
        first: list[tuple[defer.Deferred[Any], Any]] = []
        later: defer.Deferred[list[tuple[defer.Deferred[Any], Any]]] = defer.Deferred()

        def hold(issued: float) -> None:
            # A loaded machine: the reactor does not run while the replies
            # come in and the reply timeout passes (this blocks on purpose).
            select.select([conn.transport.fileno()], [], [], 30.0)
            left = issued + client.command_timeout - reactor.seconds()
            if left > 0:
                time.sleep(left + 0.1)

        def settled(result: Any) -> Any:
            if isinstance(result, Failure) and result.check(StateUnavailable):
                # The caller sends its next commands as soon as one has failed.
                reactor.callLater(0, lambda: later.callback(self.commands(client)))
            else:
                later.callback([])
            return result

        def issue() -> None:
            first.extend(self.commands(client))
            first[1][0].addBoth(settled)
            reactor.callLater(0, hold, reactor.seconds())

        reactor.callLater(0, issue)
        return first, await later

    async def test_late_replies_after_a_reply_timeout_reach_no_other_command(self) -> None:
        """
        The replies arrive while the reactor is busy and a command's reply
        timeout passes: that command and the ones after it fail, and their
        late replies go to no command sent afterwards.
        """
        server = await start_server(self)
        client = await self.client(server, pool_size=1, command_timeout=1.0)
        rounds = attempts = 0
        while rounds < 3:
            attempts += 1
            self.assertLess(attempts, 12, "the replies never came in together after a reply timeout")
            await self.whole(client, server)
            first, next_commands = await self.timed_out_among_replies(client)
            answered = await self.check(first)
            if answered != 1 or not next_commands:
                # Not the case sought (the GET's reply did not come in with the others): again.
                await self.check(next_commands)
                continue
            rounds += 1
            await self.check(next_commands)
        await self.whole(client, server)
        self.assertEqual(await self.check(self.commands(client)), 3)

    async def test_hung_redis_leaves_every_reply_in_step(self) -> None:
        """
        SIGSTOP for longer than the command timeout with commands of every
        reply type in flight on the pool, SIGCONT, repeated: every command
        after gets its own reply, and the pool is whole again.
        """
        server = await start_server(self)
        client = await self.client(server, pool_size=2, command_timeout=0.3)
        assert server.process is not None
        for _ in range(3):
            await self.whole(client, server)
            server.process.signal("STOP")
            try:
                in_flight = [c for _ in range(10) for c in self.commands(client)]
                self.assertEqual(await self.check(in_flight), 0)
                during = [c for _ in range(10) for c in self.commands(client)]
            finally:
                server.process.signal("CONT")
            await self.check(during)
            await self.whole(client, server)
            self.assertEqual(await self.check([c for _ in range(10) for c in self.commands(client)]), 30)
        clients = len((await redis_cli(server.port, "CLIENT", "LIST")).splitlines())
        self.assertEqual(clients, client.pool_size + 1)


class SentinelTests(TestCase):
    """A primary, a replica and three Sentinels, all real processes; the primary dies."""

    skip = MISSING
    timeout = 240

    async def test_failover_is_followed_without_restart(self) -> None:
        """The primary killed (SIGKILL): Sentinel promotes the replica and the backend follows it, data intact."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        primary = await start_server(self)
        replica = await start_server(self, "--replicaof", "127.0.0.1", str(primary.port))
        assert replica.process is not None
        await replica.process.wait_for("MASTER <-> REPLICA sync: Finished with success")
        sentinels = []
        for _ in range(3):
            sentinels.append(await start_server(
                self,
                f"sentinel monitor main 127.0.0.1 {primary.port} 2",
                "sentinel down-after-milliseconds main 1000",
                "sentinel failover-timeout main 4000",
                "sentinel parallel-syncs main 1",
                kind="sentinel",
            ))
        for sentinel in sentinels:  # each knows the replica and the two other Sentinels
            assert sentinel.process is not None
            await sentinel.process.wait_for(r"\+slave slave 127\.0\.0\.1:%d" % replica.port)
            await sentinel.process.wait_for(r"\+sentinel sentinel ", count=2)
        client = RedisClient(
            reactor, parse_redis_url("redis://127.0.0.1:1/0"),  # host ignored with Sentinel
            sentinels=[("127.0.0.1", s.port) for s in sentinels], sentinel_master="main",
            # start() fires as soon as the primary answers; the long limit is for a busy machine
            command_timeout=2.0, connect_timeout=60.0, probe_interval=0.1,
        )
        backend = RedisStateBackend(reactor, client)
        self.addCleanup(backend.close)
        await backend.start()
        self.assertTrue(client.reachable)
        self.assertEqual(client.peer, f"127.0.0.1:{primary.port}")
        self.assertTrue((await backend.claim_name("app.example", "agent-a", None)).granted)
        await backend.register_edge(EdgeRecord("edge-a/1", "edge-a"), 120)
        # The writes are on the replica before the primary dies (WAIT 1 replica, 5 s).
        self.assertEqual(await client.call("WAIT", 1, 5000), 1)

        assert primary.process is not None
        primary.process.signal("KILL")
        await sentinels[0].process.wait_for(  # type: ignore[union-attr]
            r"\+switch-master main 127\.0\.0\.1 %d 127\.0\.0\.1 %d" % (primary.port, replica.port)
        )

        async def on_new_primary() -> bool:
            try:
                await backend.register_edge(EdgeRecord("edge-a/1", "edge-a"), 120)
            except StateUnavailable:
                return False
            return client.peer == f"127.0.0.1:{replica.port}"

        await eventually(on_new_primary, "the backend to reach the promoted replica")
        refused = await backend.claim_name("app.example", "agent-b", None)
        self.assertEqual((refused.granted, refused.owner), (False, "agent-a"))
        self.assertTrue((await backend.take_tokens("app", 1, 1.0, 2)).allowed)
        self.assertEqual(
            (await redis_cli(replica.port, "GET", "tunneld:name:app.example")).strip(), "agent-a"
        )
        self.assertIn("master", await redis_cli(replica.port, "ROLE"))
        self.assertEqual(backend.health().outages, 1)
        self.assertTrue(backend.health().reachable)
        self.assertEqual(len(_logged(events, "state store {where}: connected to {peer}")), 2)
