# -*- test-case-name: tests.test_state -*-
"""
This edge in the cluster registry, kept alive by a heartbeat.

On start the edge gets its epoch (so its id and every ID it mints are its
own), then registers its record; every C{interval} seconds on the reactor
clock it refreshes the record, the tunnels it holds sessions for and its
contributions to cluster-wide counters, all with C{ttl}, and reads the live
edges (for drains that name another edge, and the fallback share of rate
limits).  A clean stop removes it at once; an edge killed with SIGKILL stops
refreshing and is forgotten within C{ttl}.  When the store comes back from
an outage (perhaps empty: a Redis restarted without persistence) a beat runs
at once and puts everything back.

The router tells it which tunnels this edge holds (L{EdgeMembership.hold},
L{EdgeMembership.release}, counted, since several agent sessions may serve
one tunnel); the first hold and the last release reach the store at once,
without waiting for the next beat.  Hostname reservations of this edge's
sessions (L{EdgeMembership.reserve}, L{EdgeMembership.unreserve}) are
refreshed by the beat too, and the edge's own description of its agents
(C{describe}) is stored with it for the cluster view.
"""

from __future__ import annotations

import dataclasses
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.interfaces import Claim, EdgeRecord, IStateBackend, StateUnavailable
from tunneld.state.ids import IdMinter, random_epoch

__all__ = ["AGENTS_NAMESPACE", "EdgeMembership"]

# Records (one per live edge, with the edge's TTL): its agents, for the cluster view.
AGENTS_NAMESPACE = "edge-agents"


class EdgeMembership(Service):
    """Registers this edge with C{state.backend} while running; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        state: Any,  # a StateService: .backend and .when_started()
        reactor: Any,
        name: str = "",
        *,
        relay_address: str = "",
        public_addresses: Sequence[str] = (),
        agent_urls: Sequence[str] = (),
        ttl: float = 15.0,
        interval: float = 5.0,
        reservation_ttl: float = 0.0,
    ) -> None:
        if not 0 < interval < ttl / 2:
            raise ValueError(f"the heartbeat ({interval}s) must be under half the ttl ({ttl}s)")
        self.state = state
        self.backend: IStateBackend = state.backend
        self.reactor = reactor
        self.edge_name = name or socket.gethostname()
        self.relay_address = relay_address
        self.public_addresses = tuple(public_addresses)
        self.agent_urls = tuple(agent_urls)
        self.ttl = ttl
        self.reservation_ttl = reservation_ttl
        self.interval = interval
        self.edge_id = ""
        self.ids: IdMinter | None = None
        self.record: EdgeRecord | None = None
        self.cluster: list[EdgeRecord] = []  # the live edges at the last beat
        self.beats = 0  # completed heartbeats, for tests and the admin view
        self._tunnels: Counter[str] = Counter()
        self._counts: dict[str, int] = {}
        # Hostnames reserved by the identities of this edge's live sessions.
        self._names: Counter[tuple[str, str]] = Counter()
        self._pending: set[Deferred[Any]] = set()
        # What this edge says of its agents in the cluster view (JSON bytes),
        # stored with each beat for the other edges' `tunneld status`.
        self.describe: Callable[[], bytes] | None = None
        self._loop = LoopingCall(self.beat)
        self._loop.clock = reactor
        self._starting: Deferred[None] | None = None

    # Service

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._starting = ensureDeferred(self._start())

    async def _start(self) -> None:
        await self.state.when_started()
        try:
            epoch = await self.backend.allocate_epoch()
        except StateUnavailable as e:
            epoch = random_epoch()
            self.log.warn("edge epoch drawn at random, the state store being unreachable: {why}",
                          why=str(e))
        self.ids = IdMinter(epoch)
        self.edge_id = f"{self.edge_name}/{self.ids.prefix}"
        self.record = EdgeRecord(
            self.edge_id, self.edge_name, self.relay_address, self.public_addresses,
            started_at=self.reactor.seconds(), agent_urls=self.agent_urls,
        )
        self.backend.on_recovered(self._recovered)
        if self.running:
            self.log.info("edge {edge} joins the cluster ({backend} state)",
                          edge=self.edge_id, backend=self.backend.name)
            self._loop.start(self.interval, now=True).addErrback(
                lambda failure: self.log.failure("edge heartbeat stopped", failure)
            )

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        starting = self._starting
        if starting is not None:
            if not starting.called:
                # Still waiting for the store (or it refused us): nothing to undo.
                starting.cancel()
            try:
                await starting
            except CancelledError:
                pass
        await DeferredList(list(self._pending), consumeErrors=True)
        if not self.edge_id:
            return
        try:
            await self.backend.remove_edge(self.edge_id)
            if self.describe is not None:
                await self.backend.delete_record(AGENTS_NAMESPACE, self.edge_id)
            self.log.info("edge {edge} left the cluster", edge=self.edge_id)
        except StateUnavailable as e:
            self.log.warn("edge {edge} could not deregister ({why}); it expires within {ttl}s",
                          edge=self.edge_id, why=str(e), ttl=self.ttl)

    # What this edge holds

    def hold(self, key: str) -> None:
        """A session for tunnel C{key} registered here."""
        self._tunnels[key] += 1
        if self._tunnels[key] == 1 and self.edge_id:
            self._send(self.backend.hold_tunnels(self.edge_id, [key], self.ttl))

    def release(self, key: str) -> None:
        """A session for tunnel C{key} ended here."""
        if self._tunnels[key] <= 1:
            self._tunnels.pop(key, None)
            if self.edge_id:
                self._send(self.backend.release_tunnels(self.edge_id, [key]))
        else:
            self._tunnels[key] -= 1

    def held(self) -> list[str]:
        return sorted(self._tunnels)

    def advertise(
        self, public_addresses: Sequence[str], agent_urls: Sequence[str]
    ) -> Deferred[None] | None:
        """
        Where this edge's public listeners and agent links are, once they are
        listening (their ports may be chosen by the system): the record says
        so from the next beat on, and a beat is sent now if the edge is in.
        """
        self.public_addresses = tuple(public_addresses)
        self.agent_urls = tuple(agent_urls)
        if self.record is None:
            return None
        self.record = dataclasses.replace(
            self.record, public_addresses=self.public_addresses, agent_urls=self.agent_urls
        )
        return self.beat()

    # Hostname reservations

    def _hold_ttl(self) -> float | None:
        """
        A reservation's lifetime while a session here holds it: refreshed by
        every beat, it outlives a SIGKILLed edge by C{reservation_ttl} (and
        never expires when that is 0).
        """
        return self.reservation_ttl + self.ttl if self.reservation_ttl else None

    def reserve(self, name: str, identity: str) -> Deferred[Claim]:
        """
        Claim C{name} for C{identity} (an agent session's) while a session
        holds it: a L{Claim} (refused: another identity owns it).  Fails with
        L{StateUnavailable} when the store cannot be asked.
        """
        d = self.backend.claim_name(name, identity, self._hold_ttl())

        def claimed(claim: Claim) -> Claim:
            if claim.granted:
                self._names[name, identity] += 1
            return claim

        return d.addCallback(claimed)

    def unreserve(self, name: str, identity: str) -> None:
        """
        A session of C{identity} holding C{name} ended: with no other left
        here, the reservation lives C{reservation_ttl} more seconds (0: until
        released by hand).
        """
        if self._names[name, identity] > 1:
            self._names[name, identity] -= 1
            return
        if self._names.pop((name, identity), 0) and self.reservation_ttl:
            self._send(self.backend.claim_name(name, identity, self.reservation_ttl))

    def reserved(self) -> list[tuple[str, str]]:
        """The (hostname, identity) reservations this edge's sessions hold."""
        return sorted(self._names)

    def contribute(self, counter: str, value: int) -> None:
        """This edge's part of cluster-wide C{counter} is C{value} (refreshed by each beat)."""
        self._counts[counter] = value
        if self.edge_id:
            self._send(self.backend.set_count(counter, self.edge_id, value, self.ttl))

    def set_draining(self, draining: bool = True) -> Deferred[None]:
        """Say in the registry that this edge takes no new agents (GoAway targets skip it)."""
        self.record = self.record and dataclasses.replace(self.record, draining=draining)
        return self.beat()

    def other_edges(self) -> list[EdgeRecord]:
        """Live edges other than this one that are not draining, at the last beat."""
        return [e for e in self.cluster if e.edge_id != self.edge_id and not e.draining]

    # Heartbeat

    def beat(self) -> Deferred[None]:
        """Refresh everything this edge holds; never fails (the store logs its outages)."""
        return ensureDeferred(self._beat())

    async def _beat(self) -> None:
        record = self.record
        if record is None:
            return
        backend, ttl = self.backend, self.ttl
        # Independent operations leave together (one write, pipelined).
        writes: list[Deferred[Any]] = [backend.register_edge(record, ttl)]
        if self._tunnels:
            writes.append(backend.hold_tunnels(self.edge_id, sorted(self._tunnels), ttl))
        writes.extend(
            backend.set_count(counter, self.edge_id, value, ttl)
            for counter, value in sorted(self._counts.items())
        )
        if self.describe is not None:
            writes.append(backend.put_record(AGENTS_NAMESPACE, self.edge_id, self.describe(), ttl))
        # Reservations too (a Redis restarted without persistence lost them).
        hold = self._hold_ttl()
        writes.extend(
            backend.claim_name(name, identity, hold) for name, identity in sorted(self._names)
        )
        results = await DeferredList(writes, consumeErrors=True)
        failures: list[Failure] = [result for ok, result in results if not ok]  # type: ignore[misc]
        try:
            self.cluster = await backend.live_edges()
        except StateUnavailable:
            pass
        except Exception:
            self.log.failure("reading the cluster failed")
        for failure in failures:
            self._report(failure)
        if not failures:
            self.beats += 1

    def _recovered(self) -> None:
        if self.running and self.record is not None:
            self.log.info("edge {edge} re-registers after the state store's outage",
                          edge=self.edge_id)
            self._send(self.beat())

    def _send(self, d: Deferred[Any]) -> None:
        self._pending.add(d)

        def done(result: Any) -> None:
            self._pending.discard(d)
            if isinstance(result, Failure):
                self._report(result)

        d.addBoth(done)

    def _report(self, failure: Failure) -> None:
        if not failure.check(StateUnavailable):  # outages are logged once, by the store
            self.log.failure("state update failed", failure)
