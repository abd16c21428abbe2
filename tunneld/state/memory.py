# -*- test-case-name: tests.test_state -*-
"""
The one-process state backend: the default, with nothing to set up.

Everything lives in dictionaries on the reactor clock.  Entries with a
lifetime are dropped when it ends: a heap of expiry times is consumed at the
start of every operation, so no timer runs and nothing outlives its TTL by
more than the time to the next call.  Nothing survives a restart, so
reservations last as long as the process; several edges need the Redis
backend.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from tunneld.interfaces import (
    Claim,
    CountResult,
    EdgeRecord,
    ILogWatch,
    IStateBackend,
    LogEntry,
    LogRead,
    StateHealth,
    TokenVerdict,
)
from tunneld.state.buckets import LocalBuckets
from tunneld.state.checks import (
    check_bucket,
    check_key,
    check_keys,
    check_namespace,
    check_ttl,
    log_position,
)
from tunneld.state.ids import random_epoch

__all__ = ["MemoryStateBackend"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _TTLMap(Generic[K, V]):
    """A dictionary whose entries may have a lifetime; C{expire} drops the ended ones."""

    def __init__(self, on_expire: Callable[[K, V], None] | None = None) -> None:
        self._entries: dict[K, tuple[V, float | None, int]] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._on_expire = on_expire

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    def set(self, key: K, value: V, expires_at: float | None) -> None:
        seq = next(self._seq)
        self._entries[key] = (value, expires_at, seq)
        if expires_at is not None:
            heapq.heappush(self._heap, (expires_at, seq, key))

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def expires_at(self, key: K) -> float | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[0]

    def expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            # A refreshed entry left its old heap item behind: only the
            # item of the current value ends it.
            if entry is not None and entry[2] == seq:
                del self._entries[key]
                if self._on_expire is not None:
                    self._on_expire(key, entry[0])


class _Index:
    """Both directions of a many-to-many relation (tunnel ↔ edge, counter ↔ edge)."""

    def __init__(self) -> None:
        self.by_left: dict[str, set[str]] = {}
        self.by_right: dict[str, set[str]] = {}

    def add(self, left: str, right: str) -> None:
        self.by_left.setdefault(left, set()).add(right)
        self.by_right.setdefault(right, set()).add(left)

    def discard(self, left: str, right: str) -> None:
        for table, a, b in ((self.by_left, left, right), (self.by_right, right, left)):
            members = table.get(a)
            if members is not None:
                members.discard(b)
                if not members:
                    del table[a]

    def pairs(self, key: str, members: dict[str, set[str]]) -> list[str]:
        return sorted(members.get(key, ()))


class _Log:
    __slots__ = ("entries", "last")

    def __init__(self) -> None:
        self.entries: deque[bytes] = deque()
        self.last = 0  # the event id of the newest entry


@implementer(ILogWatch)
class _Watch:
    """One watch_log registration; cancelling drops it from the table."""

    def __init__(
        self, table: dict[tuple[str, str], list[_Watch]], log: tuple[str, str],
        callback: Callable[[], None],
    ) -> None:
        self._table = table
        self._log = log
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """ILogWatch.cancel"""
        if self.cancelled:
            return
        self.cancelled = True
        watches = self._table.get(self._log, [])
        if self in watches:
            watches.remove(self)
        if not watches:
            self._table.pop(self._log, None)


@implementer(IStateBackend)
class MemoryStateBackend:
    """State for one edge process; see the module docstring."""

    name = "memory"

    def __init__(self, clock: IReactorTime, max_buckets: int = 100_000) -> None:
        self._clock = clock
        self._edges: _TTLMap[str, EdgeRecord] = _TTLMap()
        self._tunnels = _Index()  # tunnel key <-> edge id
        self._held: _TTLMap[tuple[str, str], None] = _TTLMap(
            lambda pair, _: self._tunnels.discard(*pair)
        )
        self._counters = _Index()  # counter <-> edge id
        self._counts: _TTLMap[tuple[str, str], int] = _TTLMap(
            lambda pair, _: self._counters.discard(*pair)
        )
        self._names: _TTLMap[str, str] = _TTLMap()
        self._records: _TTLMap[tuple[str, str], bytes] = _TTLMap()
        self._logs: _TTLMap[tuple[str, str], _Log] = _TTLMap()
        self._maps: tuple[_TTLMap, ...] = (  # type: ignore[type-arg]
            self._edges, self._held, self._counts, self._names, self._records, self._logs,
        )
        self.buckets = LocalBuckets(clock, max_buckets)
        # watch_log: the watchers of each log, and the logs announced on the next turn.
        self._watchers: dict[tuple[str, str], list[_Watch]] = {}
        self._announcing: set[tuple[str, str]] = set()

    def _now(self) -> float:
        now = self._clock.seconds()
        for table in self._maps:
            table.expire(now)
        return now

    def _until(self, ttl: float | None) -> float | None:
        return None if ttl is None else self._now() + ttl

    # Lifecycle

    def start(self) -> Deferred[None]:
        """IStateBackend.start"""
        return succeed(None)

    def close(self) -> Deferred[None]:
        """IStateBackend.close"""
        return succeed(None)

    def health(self) -> StateHealth:
        """IStateBackend.health"""
        return StateHealth("memory", True)

    def on_recovered(self, callback: Callable[[], None]) -> None:
        """IStateBackend.on_recovered: this store is never unreachable."""

    def allocate_epoch(self) -> Deferred[int]:
        """IStateBackend.allocate_epoch"""
        return succeed(random_epoch())

    # Edge registry

    def register_edge(self, record: EdgeRecord, ttl: float) -> Deferred[None]:
        """IStateBackend.register_edge"""
        check_key("edge id", record.edge_id)
        check_ttl(ttl)
        self._edges.set(record.edge_id, record, self._until(ttl))
        return succeed(None)

    def remove_edge(self, edge_id: str) -> Deferred[None]:
        """IStateBackend.remove_edge"""
        check_key("edge id", edge_id)
        self._now()
        self._edges.pop(edge_id)
        for key in self._tunnels.pairs(edge_id, self._tunnels.by_right):
            self._held.pop((key, edge_id))
            self._tunnels.discard(key, edge_id)
        for counter in self._counters.pairs(edge_id, self._counters.by_right):
            self._counts.pop((counter, edge_id))
            self._counters.discard(counter, edge_id)
        return succeed(None)

    def live_edges(self) -> Deferred[list[EdgeRecord]]:
        """IStateBackend.live_edges"""
        self._now()
        return succeed([record for key in self._edges if (record := self._edges.get(key))])

    # Tunnel registry

    def hold_tunnels(self, edge_id: str, keys: Sequence[str], ttl: float) -> Deferred[None]:
        """IStateBackend.hold_tunnels"""
        check_key("edge id", edge_id)
        check_keys("tunnel key", keys)
        check_ttl(ttl)
        until = self._until(ttl)
        for key in keys:
            self._held.set((key, edge_id), None, until)
            self._tunnels.add(key, edge_id)
        return succeed(None)

    def release_tunnels(self, edge_id: str, keys: Sequence[str]) -> Deferred[None]:
        """IStateBackend.release_tunnels"""
        check_key("edge id", edge_id)
        check_keys("tunnel key", keys)
        self._now()
        for key in keys:
            self._held.pop((key, edge_id))
            self._tunnels.discard(key, edge_id)
        return succeed(None)

    def tunnel_edges(self, key: str) -> Deferred[list[str]]:
        """IStateBackend.tunnel_edges"""
        check_key("tunnel key", key)
        self._now()
        return succeed(self._tunnels.pairs(key, self._tunnels.by_left))

    def edge_tunnels(self, edge_id: str) -> Deferred[list[str]]:
        """IStateBackend.edge_tunnels"""
        check_key("edge id", edge_id)
        self._now()
        return succeed(self._tunnels.pairs(edge_id, self._tunnels.by_right))

    # Hostname reservations

    def claim_name(self, name: str, identity: str, ttl: float | None) -> Deferred[Claim]:
        """IStateBackend.claim_name"""
        check_key("name", name)
        check_key("identity", identity)
        if ttl is not None:
            check_ttl(ttl)
        now = self._now()
        owner = self._names.get(name)
        if owner is not None and owner != identity:
            until = self._names.expires_at(name)
            return succeed(Claim(False, owner, None if until is None else until - now))
        self._names.set(name, identity, self._until(ttl))
        return succeed(Claim(True, identity, ttl))

    def release_name(self, name: str, identity: str) -> Deferred[bool]:
        """IStateBackend.release_name"""
        check_key("name", name)
        self._now()
        if self._names.get(name) != identity:
            return succeed(False)
        self._names.pop(name)
        return succeed(True)

    def name_owner(self, name: str) -> Deferred[str | None]:
        """IStateBackend.name_owner"""
        check_key("name", name)
        self._now()
        return succeed(self._names.get(name))

    # Token buckets

    def take_tokens(
        self, bucket: str, cost: float, rate: float, burst: float
    ) -> Deferred[TokenVerdict]:
        """IStateBackend.take_tokens"""
        check_key("bucket", bucket)
        check_bucket(cost, rate, burst)
        return succeed(self.buckets.take(bucket, cost, rate, burst, degraded=False))

    # Counters

    def _total(self, counter: str) -> int:
        return sum(
            self._counts.get((counter, edge)) or 0
            for edge in self._counters.pairs(counter, self._counters.by_left)
        )

    def _contribute(self, counter: str, edge_id: str, value: int, ttl: float) -> None:
        self._counts.set((counter, edge_id), value, self._until(ttl))
        self._counters.add(counter, edge_id)

    def set_count(self, counter: str, edge_id: str, value: int, ttl: float) -> Deferred[int]:
        """IStateBackend.set_count"""
        check_key("counter", counter)
        check_key("edge id", edge_id)
        check_ttl(ttl)
        self._contribute(counter, edge_id, max(0, value), ttl)
        return succeed(self._total(counter))

    def adjust_count(
        self, counter: str, edge_id: str, delta: int, ttl: float, cap: int | None = None
    ) -> Deferred[CountResult]:
        """IStateBackend.adjust_count"""
        check_key("counter", counter)
        check_key("edge id", edge_id)
        check_ttl(ttl)
        self._now()
        total = self._total(counter)
        mine = self._counts.get((counter, edge_id)) or 0
        new = max(0, mine + delta)
        if delta > 0 and cap is not None and total - mine + new > cap:
            return succeed(CountResult(False, total))
        self._contribute(counter, edge_id, new, ttl)
        return succeed(CountResult(True, total - mine + new))

    def count_total(self, counter: str) -> Deferred[int]:
        """IStateBackend.count_total"""
        check_key("counter", counter)
        self._now()
        return succeed(self._total(counter))

    # Records

    def put_record(
        self, namespace: str, key: str, value: bytes, ttl: float, only_if_absent: bool = False
    ) -> Deferred[bool]:
        """IStateBackend.put_record"""
        check_namespace(namespace)
        check_key("key", key)
        check_ttl(ttl)
        self._now()
        if only_if_absent and self._records.get((namespace, key)) is not None:
            return succeed(False)
        self._records.set((namespace, key), bytes(value), self._until(ttl))
        return succeed(True)

    def get_record(self, namespace: str, key: str) -> Deferred[bytes | None]:
        """IStateBackend.get_record"""
        check_namespace(namespace)
        check_key("key", key)
        self._now()
        return succeed(self._records.get((namespace, key)))

    def take_record(self, namespace: str, key: str) -> Deferred[bytes | None]:
        """IStateBackend.take_record"""
        check_namespace(namespace)
        check_key("key", key)
        self._now()
        return succeed(self._records.pop((namespace, key)))

    def delete_record(self, namespace: str, key: str) -> Deferred[bool]:
        """IStateBackend.delete_record"""
        check_namespace(namespace)
        check_key("key", key)
        self._now()
        return succeed(self._records.pop((namespace, key)) is not None)

    # Bounded logs

    def append_log(
        self, namespace: str, key: str, data: bytes, max_entries: int, ttl: float
    ) -> Deferred[str]:
        """IStateBackend.append_log"""
        return self.extend_log(namespace, key, (data,), max_entries, ttl)

    def extend_log(
        self, namespace: str, key: str, items: Sequence[bytes], max_entries: int, ttl: float
    ) -> Deferred[str]:
        """IStateBackend.extend_log"""
        check_namespace(namespace)
        check_key("key", key)
        check_ttl(ttl)
        if max_entries < 1:
            raise ValueError(f"a log keeps at least one entry: {max_entries!r}")
        if not items:
            raise ValueError("extend_log needs at least one item")
        self._now()
        log = self._logs.get((namespace, key)) or _Log()
        for data in items:
            log.entries.append(bytes(data))
        log.last += len(items)
        while len(log.entries) > max_entries:
            log.entries.popleft()
        self._logs.set((namespace, key), log, self._until(ttl))
        self._announce((namespace, key))
        return succeed(str(log.last))

    def trim_log(self, namespace: str, key: str, through: str) -> Deferred[None]:
        """IStateBackend.trim_log"""
        check_namespace(namespace)
        check_key("key", key)
        position = log_position(through)
        if position is None:
            raise ValueError(f"not an event id: {through!r}")
        self._now()
        log = self._logs.get((namespace, key))
        if log is not None:
            first = log.last - len(log.entries) + 1
            for _ in range(min(len(log.entries), max(0, position - first + 1))):
                log.entries.popleft()
        return succeed(None)

    def watch_log(
        self, namespace: str, key: str, callback: Callable[[], None]
    ) -> _Watch:
        """IStateBackend.watch_log: announced on the next reactor turn, never from inside an append."""
        check_namespace(namespace)
        check_key("key", key)
        watch = _Watch(self._watchers, (namespace, key), callback)
        self._watchers.setdefault((namespace, key), []).append(watch)
        return watch

    def _announce(self, log: tuple[str, str]) -> None:
        if log in self._watchers and log not in self._announcing:
            self._announcing.add(log)
            self._clock.callLater(0, self._announced, log)

    def _announced(self, log: tuple[str, str]) -> None:
        self._announcing.discard(log)
        for watch in list(self._watchers.get(log, ())):
            if not watch.cancelled:
                watch.callback()

    def read_log(
        self, namespace: str, key: str, after: str | None, limit: int
    ) -> Deferred[LogRead]:
        """IStateBackend.read_log"""
        check_namespace(namespace)
        check_key("key", key)
        self._now()
        log = self._logs.get((namespace, key)) or _Log()
        position = log_position(after)
        if position is None or position > log.last:
            return succeed(LogRead((), False))
        first = log.last - len(log.entries) + 1
        start = max(position + 1, first)
        picked = itertools.islice(log.entries, start - first, start - first + max(0, limit))
        entries = tuple(LogEntry(str(start + i), data) for i, data in enumerate(picked))
        return succeed(LogRead(entries, position + 1 >= first))

    def delete_log(self, namespace: str, key: str) -> Deferred[None]:
        """IStateBackend.delete_log"""
        check_namespace(namespace)
        check_key("key", key)
        self._now()
        self._logs.pop((namespace, key))
        return succeed(None)

