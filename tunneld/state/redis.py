# -*- test-case-name: tests.test_state_redis -*-
"""
The state backend shared through Redis, so that several edges act as one.

Every operation is one command or one Lua script (L{tunneld.state.scripts}),
so each is atomic and costs one round trip.  Without Redis an operation
fails with L{StateUnavailable} and the caller decides locally, except
L{RedisStateBackend.take_tokens}, which never fails: it falls back to a
bucket in this process holding this edge's share of the cluster's rate (the
rate divided by the number of live edges last seen), counts the decision and
says C{degraded}.  When Redis answers again the shared buckets take over and
the local ones are dropped; nothing needs a restart.

Keys, all under the configured prefix (C{tunneld:} by default):

    epoch                      INCR counter of edge epochs
    edges, edge-records        zset edge id -> expiry ms; hash edge id -> record JSON
    tunnel:KEY                 zset edge id -> expiry ms (edges holding the tunnel)
    edge-tunnels:ID            zset tunnel key -> expiry ms (the edge's side)
    name:NAME                  string: the identity holding the reservation
    bucket:NAME                hash t (tokens), s (stamp, Redis TIME seconds)
    count:NAME, count-expiry:NAME   hash edge id -> value; zset edge id -> expiry ms
    edge-counters:ID           set of counters the edge contributes to
    record:NS:KEY              string with a TTL
    log:NS:KEY, log-seq:NS:KEY list of the newest entries; the last event id
    log-news:NS:KEY            pub/sub channel: the last event id after each append
    probe                      written by the reachability probe
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.config.values import parse_address, parse_redis_url
from tunneld.interfaces import (
    Claim,
    CountResult,
    EdgeRecord,
    ILogWatch,
    IStateBackend,
    LogEntry,
    LogRead,
    StateHealth,
    StateUnavailable,
    TokenVerdict,
)
from tunneld.state import scripts
from tunneld.state.buckets import LocalBuckets
from tunneld.state.checks import (
    check_bucket,
    check_key,
    check_keys,
    check_namespace,
    check_ttl,
    log_position,
    ttl_ms,
)
from tunneld.state.ids import redis_epoch
from tunneld.state.redisclient import RedisClient
from tunneld.state.settings import StateOptions

__all__ = ["RedisStateBackend"]

_EDGE_FIELDS = {f.name for f in dataclasses.fields(EdgeRecord)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    # txredisapi hands bulk strings over decoded when they are UTF-8.
    return value.encode() if isinstance(value, str) else bytes(value)


def edge_to_json(record: EdgeRecord) -> str:
    return json.dumps(dataclasses.asdict(record), sort_keys=True)


def edge_from_json(text: Any) -> EdgeRecord:
    raw = json.loads(_text(text))
    fields = {name: value for name, value in raw.items() if name in _EDGE_FIELDS}
    fields["public_addresses"] = tuple(fields.get("public_addresses", ()))
    fields["agent_urls"] = tuple(fields.get("agent_urls", ()))
    return EdgeRecord(**fields)


@implementer(ILogWatch)
class _Watch:
    """One watch_log registration."""

    def __init__(self, owner: _Announcements, channel: str, callback: Callable[[], None]) -> None:
        self.owner = owner
        self.channel = channel
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """ILogWatch.cancel"""
        if not self.cancelled:
            self.cancelled = True
            self.owner.forget(self)


class _Announcements:
    """
    Who watches which log, told by Redis pub/sub: the scripts that append
    PUBLISH on the log's C{log-news:} channel, and one connection of its own
    (L{RedisClient.listener}) subscribes to the channels watched.  Pub/sub
    delivers nothing sent while that connection is down, so each time it
    is (re)established every watcher is called once, and while it is down
    they are called every C{probe_interval}: a watcher that reads the log
    on each call misses nothing, only learns of it later.
    """

    log = Logger()

    def __init__(self, reactor: Any, client: RedisClient) -> None:
        self.reactor = reactor
        self.watches: dict[str, list[_Watch]] = {}
        self.listener = client.listener(self._heard)
        self.listener.on_connected(self._connected)
        self._poll = LoopingCall(self._everyone)
        self._poll.clock = reactor
        self._poll.start(client.probe_interval, now=False)
        self._subscribed = False
        self._closing = False
        self.listener.start().addErrback(lambda _: None)  # the commanding client reports problems

    def watch(self, channel: str, callback: Callable[[], None]) -> _Watch:
        watch = _Watch(self, channel, callback)
        first = channel not in self.watches
        self.watches.setdefault(channel, []).append(watch)
        if first and self._subscribed:
            self.listener.subscribe([channel]).addErrback(self._lost)
        return watch

    def forget(self, watch: _Watch) -> None:
        watches = self.watches.get(watch.channel, [])
        if watch in watches:
            watches.remove(watch)
        if not watches and self.watches.pop(watch.channel, None) is not None and self._subscribed:
            self.listener.unsubscribe([watch.channel]).addErrback(lambda _: None)

    def _heard(self, channel: str) -> None:
        for watch in list(self.watches.get(channel, ())):
            if not watch.cancelled:
                watch.callback()

    def _everyone(self) -> None:
        if self._subscribed and self.listener.connected:
            return
        self._subscribed = False
        for channel in list(self.watches):
            self._heard(channel)

    def _connected(self) -> None:
        # Called as the connection joins the pool, a turn after it is ready.
        self.reactor.callLater(0, self._subscribe_all)

    def _subscribe_all(self) -> None:
        if self._closing or not self.listener.connected:
            return
        channels = list(self.watches)

        def subscribed(_: Any) -> None:
            self._subscribed = True
            self._everyone_once()

        if not channels:
            subscribed(None)
            return
        self.listener.subscribe(channels).addCallbacks(subscribed, self._lost)

    def _everyone_once(self) -> None:
        for channel in list(self.watches):
            self._heard(channel)

    def _lost(self, failure: Failure) -> None:
        self._subscribed = False

    async def close(self) -> None:
        self._closing = True
        if self._poll.running:
            self._poll.stop()
        await self.listener.close()


@implementer(IStateBackend)
class RedisStateBackend:
    """State in Redis; see the module docstring."""

    name = "redis"
    log = Logger()

    def __init__(
        self, reactor: Any, client: RedisClient, key_prefix: str = "tunneld:",
        max_buckets: int = 100_000,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.prefix = key_prefix
        self.fallback = LocalBuckets(reactor, max_buckets)
        self.fallback_decisions = 0
        self.failed_operations = 0
        self.cluster_size = 1  # live edges at the last look, for the fallback share
        self._announcements: _Announcements | None = None  # made by the first watch_log
        client.on_recovered(self.fallback.clear)

    @classmethod
    def from_options(cls, reactor: Any, options: StateOptions) -> RedisStateBackend:
        """The backend the edge's [edge.state] table describes (already validated)."""
        client = RedisClient(
            reactor,
            parse_redis_url(options.redis_url),
            sentinels=[parse_address(text) for text in options.sentinels],
            sentinel_master=options.sentinel_master,
            sentinel_password=options.sentinel_password,
            probe_key=options.key_prefix + "probe",
            command_timeout=options.command_timeout,
            connect_timeout=options.connect_timeout,
            probe_interval=options.probe_interval,
            pool_size=options.pool_size,
        )
        return cls(reactor, client, options.key_prefix)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _counted(self, d: Deferred[Any]) -> Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            if failure.check(StateUnavailable):
                self.failed_operations += 1
            return failure

        return d.addErrback(failed)

    def _run(self, script: scripts.Script, keys: Sequence[str], args: Sequence[Any]) -> Deferred[Any]:
        return self._counted(self.client.run(script, keys, args))

    def _call(self, *args: Any) -> Deferred[Any]:
        return self._counted(self.client.call(*args))

    # Lifecycle

    def start(self) -> Deferred[None]:
        """IStateBackend.start"""
        return self.client.start()

    def close(self) -> Deferred[None]:
        """IStateBackend.close"""

        async def closing() -> None:
            if self._announcements is not None:
                await self._announcements.close()
            await self.client.close()

        return defer.ensureDeferred(closing())

    def health(self) -> StateHealth:
        """IStateBackend.health"""
        client = self.client
        return StateHealth(
            "redis", client.reachable, client.down_since, client.last_error, client.outages,
            self.fallback_decisions, self.failed_operations,
        )

    def on_recovered(self, callback: Callable[[], None]) -> None:
        """IStateBackend.on_recovered"""
        self.client.on_recovered(callback)

    def allocate_epoch(self) -> Deferred[int]:
        """IStateBackend.allocate_epoch"""
        return self._call("INCR", self._k("epoch")).addCallback(redis_epoch)

    # Edge registry

    def register_edge(self, record: EdgeRecord, ttl: float) -> Deferred[None]:
        """IStateBackend.register_edge"""
        check_key("edge id", record.edge_id)
        check_ttl(ttl)
        d = self._run(
            scripts.REGISTER_EDGE, [self._k("edges"), self._k("edge-records")],
            [record.edge_id, edge_to_json(record), ttl_ms(ttl)],
        )
        return d.addCallback(lambda _: None)

    def remove_edge(self, edge_id: str) -> Deferred[None]:
        """IStateBackend.remove_edge"""
        check_key("edge id", edge_id)
        keys = [
            self._k("edges"), self._k("edge-records"),
            self._k("edge-tunnels", edge_id), self._k("edge-counters", edge_id),
        ]
        return self._run(scripts.REMOVE_EDGE, keys, [edge_id, self.prefix]).addCallback(
            lambda _: None
        )

    def live_edges(self) -> Deferred[list[EdgeRecord]]:
        """IStateBackend.live_edges"""

        def parse(raw: list[Any]) -> list[EdgeRecord]:
            records = [edge_from_json(text) for text in raw]
            self.cluster_size = max(1, len(records))
            return records

        d = self._run(scripts.LIVE_EDGES, [self._k("edges"), self._k("edge-records")], [])
        return d.addCallback(parse)

    # Tunnel registry

    def hold_tunnels(self, edge_id: str, keys: Sequence[str], ttl: float) -> Deferred[None]:
        """IStateBackend.hold_tunnels"""
        check_key("edge id", edge_id)
        check_keys("tunnel key", keys)
        check_ttl(ttl)
        if not keys:
            return defer.succeed(None)
        redis_keys = [self._k("edge-tunnels", edge_id)] + [self._k("tunnel", key) for key in keys]
        d = self._run(scripts.HOLD_TUNNELS, redis_keys, [edge_id, ttl_ms(ttl), *keys])
        return d.addCallback(lambda _: None)

    def release_tunnels(self, edge_id: str, keys: Sequence[str]) -> Deferred[None]:
        """IStateBackend.release_tunnels"""
        check_key("edge id", edge_id)
        check_keys("tunnel key", keys)
        if not keys:
            return defer.succeed(None)
        redis_keys = [self._k("edge-tunnels", edge_id)] + [self._k("tunnel", key) for key in keys]
        d = self._run(scripts.RELEASE_TUNNELS, redis_keys, [edge_id, *keys])
        return d.addCallback(lambda _: None)

    def _live_members(self, key: str) -> Deferred[list[str]]:
        d = self._run(scripts.LIVE_MEMBERS, [key], [])
        return d.addCallback(lambda members: sorted(_text(m) for m in members))

    def tunnel_edges(self, key: str) -> Deferred[list[str]]:
        """IStateBackend.tunnel_edges"""
        check_key("tunnel key", key)
        return self._live_members(self._k("tunnel", key))

    def edge_tunnels(self, edge_id: str) -> Deferred[list[str]]:
        """IStateBackend.edge_tunnels"""
        check_key("edge id", edge_id)
        return self._live_members(self._k("edge-tunnels", edge_id))

    # Hostname reservations

    def claim_name(self, name: str, identity: str, ttl: float | None) -> Deferred[Claim]:
        """IStateBackend.claim_name"""
        check_key("name", name)
        check_key("identity", identity)
        if ttl is not None:
            check_ttl(ttl)

        def parse(reply: list[Any]) -> Claim:
            granted, owner, left = reply
            return Claim(bool(granted), _text(owner), None if left < 0 else left / 1000)

        d = self._run(
            scripts.CLAIM_NAME, [self._k("name", name)],
            [identity, 0 if ttl is None else ttl_ms(ttl)],
        )
        return d.addCallback(parse)

    def release_name(self, name: str, identity: str) -> Deferred[bool]:
        """IStateBackend.release_name"""
        check_key("name", name)
        d = self._run(scripts.RELEASE_NAME, [self._k("name", name)], [identity])
        return d.addCallback(bool)

    def name_owner(self, name: str) -> Deferred[str | None]:
        """IStateBackend.name_owner"""
        check_key("name", name)
        d = self._call("GET", self._k("name", name))
        return d.addCallback(lambda owner: None if owner is None else _text(owner))

    # Token buckets

    def take_tokens(
        self, bucket: str, cost: float, rate: float, burst: float
    ) -> Deferred[TokenVerdict]:
        """IStateBackend.take_tokens: never fails; see the module docstring."""
        check_key("bucket", bucket)
        check_bucket(cost, rate, burst)

        def parse(reply: list[Any]) -> TokenVerdict:
            allowed, wait, tokens, now = reply  # millionths (see the script)
            return TokenVerdict(bool(allowed), wait / 1e6, tokens / 1e6, now / 1e6)

        def locally(failure: Failure) -> TokenVerdict:
            failure.trap(StateUnavailable)
            self.fallback_decisions += 1
            share = self.cluster_size
            return self.fallback.take(
                bucket, cost, rate / share, max(cost, burst / share), degraded=True
            )

        d = self.client.run(
            scripts.TAKE_TOKENS, [self._k("bucket", bucket)], [repr(rate), repr(burst), repr(cost)]
        )
        return d.addCallbacks(parse, locally)

    # Counters

    def _counter_keys(self, counter: str, edge_id: str) -> list[str]:
        return [
            self._k("count", counter), self._k("count-expiry", counter),
            self._k("edge-counters", edge_id),
        ]

    def set_count(self, counter: str, edge_id: str, value: int, ttl: float) -> Deferred[int]:
        """IStateBackend.set_count"""
        check_key("counter", counter)
        check_key("edge id", edge_id)
        check_ttl(ttl)
        return self._run(
            scripts.SET_COUNT, self._counter_keys(counter, edge_id),
            [edge_id, max(0, int(value)), ttl_ms(ttl), counter],
        ).addCallback(int)

    def adjust_count(
        self, counter: str, edge_id: str, delta: int, ttl: float, cap: int | None = None
    ) -> Deferred[CountResult]:
        """IStateBackend.adjust_count"""
        check_key("counter", counter)
        check_key("edge id", edge_id)
        check_ttl(ttl)
        d = self._run(
            scripts.ADJUST_COUNT, self._counter_keys(counter, edge_id),
            [edge_id, int(delta), ttl_ms(ttl), counter, -1 if cap is None else int(cap)],
        )
        return d.addCallback(lambda reply: CountResult(bool(reply[0]), int(reply[1])))

    def count_total(self, counter: str) -> Deferred[int]:
        """IStateBackend.count_total"""
        check_key("counter", counter)
        d = self._run(
            scripts.COUNT_TOTAL, [self._k("count", counter), self._k("count-expiry", counter)], []
        )
        return d.addCallback(int)

    # Records

    def put_record(
        self, namespace: str, key: str, value: bytes, ttl: float, only_if_absent: bool = False
    ) -> Deferred[bool]:
        """IStateBackend.put_record"""
        check_namespace(namespace)
        check_key("key", key)
        check_ttl(ttl)
        args: list[Any] = ["SET", self._k("record", namespace, key), bytes(value), "PX", ttl_ms(ttl)]
        if only_if_absent:
            args.append("NX")
        return self._call(*args).addCallback(lambda reply: reply is not None)

    def _bytes_or_none(self, *args: Any) -> Deferred[bytes | None]:
        return self._call(*args).addCallback(lambda v: None if v is None else _bytes(v))

    def get_record(self, namespace: str, key: str) -> Deferred[bytes | None]:
        """IStateBackend.get_record"""
        check_namespace(namespace)
        check_key("key", key)
        return self._bytes_or_none("GET", self._k("record", namespace, key))

    def take_record(self, namespace: str, key: str) -> Deferred[bytes | None]:
        """IStateBackend.take_record: GETDEL, so one taker of many gets it."""
        check_namespace(namespace)
        check_key("key", key)
        return self._bytes_or_none("GETDEL", self._k("record", namespace, key))

    def delete_record(self, namespace: str, key: str) -> Deferred[bool]:
        """IStateBackend.delete_record"""
        check_namespace(namespace)
        check_key("key", key)
        return self._call("DEL", self._k("record", namespace, key)).addCallback(bool)

    # Bounded logs

    def _log_keys(self, namespace: str, key: str) -> list[str]:
        return [self._k("log", namespace, key), self._k("log-seq", namespace, key)]

    def append_log(
        self, namespace: str, key: str, data: bytes, max_entries: int, ttl: float
    ) -> Deferred[str]:
        """IStateBackend.append_log"""
        return self.extend_log(namespace, key, (data,), max_entries, ttl)

    def extend_log(
        self, namespace: str, key: str, items: Sequence[bytes], max_entries: int, ttl: float
    ) -> Deferred[str]:
        """IStateBackend.extend_log: one script, which also announces the appends."""
        check_namespace(namespace)
        check_key("key", key)
        check_ttl(ttl)
        if max_entries < 1:
            raise ValueError(f"a log keeps at least one entry: {max_entries!r}")
        if not items:
            raise ValueError("extend_log needs at least one item")
        d = self._run(
            scripts.EXTEND_LOG, self._log_keys(namespace, key),
            [int(max_entries), ttl_ms(ttl), self._k("log-news", namespace, key),
             *(bytes(item) for item in items)],
        )
        return d.addCallback(str)

    def trim_log(self, namespace: str, key: str, through: str) -> Deferred[None]:
        """IStateBackend.trim_log"""
        check_namespace(namespace)
        check_key("key", key)
        position = log_position(through)
        if position is None:
            raise ValueError(f"not an event id: {through!r}")
        d = self._run(scripts.TRIM_LOG, self._log_keys(namespace, key), [position])
        return d.addCallback(lambda _: None)

    def watch_log(self, namespace: str, key: str, callback: Callable[[], None]) -> _Watch:
        """IStateBackend.watch_log: see L{_Announcements}."""
        check_namespace(namespace)
        check_key("key", key)
        if self._announcements is None:
            self._announcements = _Announcements(self.reactor, self.client)
        return self._announcements.watch(self._k("log-news", namespace, key), callback)

    def read_log(
        self, namespace: str, key: str, after: str | None, limit: int
    ) -> Deferred[LogRead]:
        """IStateBackend.read_log"""
        check_namespace(namespace)
        check_key("key", key)
        position = log_position(after)
        if position is None:
            return defer.succeed(LogRead((), False))

        def parse(reply: list[Any]) -> LogRead:
            complete, start, items = reply
            entries = tuple(
                LogEntry(str(int(start) + i), _bytes(item)) for i, item in enumerate(items)
            )
            return LogRead(entries, bool(complete))

        d = self._run(scripts.READ_LOG, self._log_keys(namespace, key), [position, int(limit)])
        return d.addCallback(parse)

    def delete_log(self, namespace: str, key: str) -> Deferred[None]:
        """IStateBackend.delete_log"""
        check_namespace(namespace)
        check_key("key", key)
        return self._call("DEL", *self._log_keys(namespace, key)).addCallback(lambda _: None)
