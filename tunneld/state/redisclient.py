# -*- test-case-name: tests.test_state_redis -*-
"""
The Redis connection of the state backend: the one module that touches
txredisapi.

txredisapi (Twisted-native, so the edge keeps its reactor) connects,
reconnects with backoff and, with Sentinel, asks the Sentinels for the
primary before every connection and refuses a server whose ROLE is not
master.  Around it this module adds what an edge on the request path needs:

  - a command never waits for a connection: with none up it fails at once
    with L{StateUnavailable} (txredisapi would queue it until one comes back),
    and a connected command fails after C{command_timeout} (txredisapi then
    drops that connection and reconnects);
  - one flag, L{RedisClient.reachable}, with the outage's start, count and
    last error, logged once when it flips either way; while down, a probe
    write every C{probe_interval} notices the return even without traffic,
    and the callbacks given to L{RedisClient.on_recovered} run;
  - scripts run by C{EVALSHA}, falling back to C{EVAL} on C{NOSCRIPT} (a
    restarted or failed-over Redis has no scripts cached);
  - every reply reaches the command it answers: a connection whose command
    timed out is never used again, since its late replies would answer the
    next commands sent on it (see L{_InStep}).

Commands issued in one reactor turn leave in one write (Twisted buffers a
turn's writes), so the backend's independent commands pipeline by themselves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.config.values import RedisTarget
from tunneld.interfaces import StateUnavailable
from tunneld.state.scripts import Script

__all__ = ["RedisClient", "RedisRefused"]

# Errors with which a reachable Redis says it cannot serve now.
_UNAVAILABLE_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN", "NOREPLICAS")


class RedisRefused(Exception):
    """Redis refused the connection for good (credentials, database): a person must fix it."""


class _Watched:
    """Tells the L{RedisClient} when a factory's pool gains or loses a connection."""

    client: RedisClient
    pool: list[Any]

    def addConnection(self, conn: Any) -> None:  # noqa: N802
        super().addConnection(conn)  # type: ignore[misc]
        if conn in self.pool:
            self.client._connection_added(conn)

    def delConnection(self, conn: Any) -> None:  # noqa: N802
        super().delConnection(conn)  # type: ignore[misc]
        self.client._connection_removed()

    def connectionError(self, why: str) -> None:  # noqa: N802
        super().connectionError(why)  # type: ignore[misc]
        self.client._refused(why)


class _InStep:
    """
    A command connection whose replies stay in step with its commands.

    txredisapi pairs each reply with the oldest command waiting for one.
    When a command's C{replyTimeout} passes it fails every waiting command
    and aborts the connection, but the connection only counts as lost (its
    C{connected} flag drops) a reactor turn later, and replies already read
    may still be parsed: the rest of a read after a bulk string is parsed a
    turn later.  Those late replies would wait in the queue for the next
    command sent on it, which would take another command's reply.  So a
    connection that timed out (or that L{RedisClient} closes) is retired:
    it is never handed a command again.  A reply no command waits for is
    dropped, and it ends the connection.
    """

    retired = False
    replyQueue: Any
    transport: Any

    def retire(self) -> None:
        """Send nothing more on this connection, and close it."""
        self.retired = True
        if self.transport is not None:
            self.transport.abortConnection()

    def replyReceived(self, reply: Any) -> None:  # noqa: N802
        if not self.replyQueue.waiting:
            if not self.retired:
                RedisClient.log.warn("state store: a reply no command waits for; dropping the connection")
                self.retire()
            return
        super().replyReceived(reply)  # type: ignore[misc]


class _Protocol(_InStep, txredisapi.RedisProtocol):
    pass


class _PlainFactory(_Watched, txredisapi.RedisFactory):
    protocol = _Protocol


class _SentinelProtocol(_InStep, txredisapi.SentinelRedisProtocol):
    """
    txredisapi's Sentinel protocol, whose connection may die during its ROLE
    check (a Sentinel kills the clients of an instance it reconfigures): the
    check's failure is the end of that attempt, not an unhandled error.
    """

    def connectionMade(self) -> Any:  # noqa: N802
        return defer.maybeDeferred(super().connectionMade).addErrback(self._check_failed)

    def _check_failed(self, failure: Failure) -> None:
        failure.trap(txredisapi.ConnectionError)
        if self.transport is not None:
            self.transport.loseConnection()


class _Announced(txredisapi.SubscriberProtocol):
    """A connection that only listens to pub/sub announcements (C{RedisClient(listen=…)})."""

    factory: Any
    retired = False

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:  # noqa: N802
        self.factory.client._announced(channel)


class _SentinelAnnounced(_Announced, _SentinelProtocol):
    """The same through Sentinel: the ROLE check first, then only announcements."""


class _PlainAnnouncedFactory(_PlainFactory):
    protocol = _Announced


class _SentinelFactory(_Watched, txredisapi.SentinelConnectionFactory):
    protocol = _SentinelProtocol

    def __init__(self, *args: Any, client: RedisClient, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = client
        self.maxDelay = client.reconnect_max  # also its connect timeout, in txredisapi
        client._factory = self


class _SentinelAnnouncedFactory(_SentinelFactory):
    protocol = _SentinelAnnounced


class _Sentinels(txredisapi.Sentinel):
    """
    Keeps every primary lookup until its own timer has ended, so that
    closing can wait for them: a lookup the connection attempt gave up on
    (cancelled) still has txredisapi's timeout pending.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight: set[Deferred[Any]] = set()

    def discover_master(self, service_name: str) -> Deferred[Any]:
        lookup: Deferred[Any] = super().discover_master(service_name)
        self.in_flight.add(lookup)
        answer: Deferred[Any] = Deferred()  # cancelling it leaves the lookup running out

        def settled(result: Any) -> None:
            self.in_flight.discard(lookup)
            if not answer.called:
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)

        lookup.addBoth(settled)
        return answer


class RedisClient:
    """
    A pool of connections to one Redis primary (given directly, or found
    through Sentinel), with the reachability the state backend reports.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        target: RedisTarget,
        *,
        sentinels: Sequence[tuple[str, int]] = (),
        sentinel_master: str = "",
        sentinel_password: str = "",
        probe_key: str = "tunneld:probe",
        command_timeout: float = 0.5,
        connect_timeout: float = 5.0,
        probe_interval: float = 1.0,
        pool_size: int = 2,
        reconnect_max: float = 5.0,
        listen: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        # A client made with `listen` only subscribes to channels (see
        # listener()): each announcement calls it with the channel; it keeps
        # no reachability of its own (the commanding client reports that).
        self.listen = listen
        self._on_connected: list[Callable[[], None]] = []
        self.target = target
        self.sentinels = tuple(sentinels)
        self.sentinel_master = sentinel_master
        self.sentinel_password = sentinel_password
        self.probe_key = probe_key
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.probe_interval = probe_interval
        self.pool_size = pool_size
        self.reconnect_max = reconnect_max
        self.where = (
            f"sentinel master {sentinel_master!r} via "
            + ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
            if self.sentinels else target.describe()
        )
        self.reachable = False
        self.down_since: float | None = None
        self.outages = 0
        self.last_error = ""  # the last error that told something (not "no connection")
        self.script_loads = 0  # EVALs after NOSCRIPT, for tests and metrics
        self.peer = ""  # the server the newest connection reached
        self._factory: Any = None
        self._sentinel: _Sentinels | None = None
        self._turn = itertools.count()
        self._listeners: list[Callable[[], None]] = []
        self._starting = False  # from start() until Redis answers, refuses or times out
        self._start_waiters: list[Deferred[None]] = []
        self._start_outcome: Failure | None = None
        self._start_timeout: Any = None
        self._closing = False
        self._probe = LoopingCall(self._probe_once)
        self._probe.clock = reactor

    # Lifecycle

    def start(self) -> Deferred[None]:
        """
        Start connecting.  Fires when Redis first answers, or after
        C{connect_timeout} in degraded mode; fails with L{RedisRefused}.
        A second call connects nothing more and fires with the first.
        """
        if self._factory is not None:
            return self._when_started()
        connection = {
            "charset": "utf-8",  # txredisapi's Sentinel ROLE check compares str
            "convertNumbers": False,  # a record "12" stays the bytes it was
            "password": self.target.password,
            "username": self.target.username,
            "replyTimeout": self.command_timeout,
            "isLazy": True,
        }
        if self.sentinels:
            extra = {"password": self.sentinel_password} if self.sentinel_password else {}
            self._sentinel = _Sentinels(
                list(self.sentinels), connectTimeout=self.connect_timeout,
                replyTimeout=self.command_timeout, **extra,
            )
            # How long to wait for a Sentinel naming a healthy primary; the
            # attempt is then retried with backoff (during a failover they name none).
            self._sentinel.discovery_timeout = self.command_timeout
            self._sentinel.master_for(
                self.sentinel_master,
                factory_class=_SentinelFactory if self.listen is None else _SentinelAnnouncedFactory,
                client=self,
                dbid=self.target.db or None, poolsize=self.pool_size, **connection,
            )
        else:
            factory_class = _PlainFactory if self.listen is None else _PlainAnnouncedFactory
            factory = factory_class(
                None, self.target.db or None, self.pool_size, handler=txredisapi.ConnectionHandler,
                **connection,
            )
            factory.client = self
            factory.initialDelay = 0.2
            factory.maxDelay = self.reconnect_max
            self._factory = factory
            factory.startConnecting(self._endpoint())
        # The pool's "all connected" Deferred fails on a refusal, which _refused reports.
        pool: Any = self._factory
        pool.deferred.addErrback(lambda _: None)
        self._starting = True
        self._start_timeout = self.reactor.callLater(self.connect_timeout, self._not_up_at_start)
        return self._when_started()

    def _when_started(self) -> Deferred[None]:
        if not self._starting:
            if isinstance(self._start_outcome, Failure):
                return defer.fail(self._start_outcome)
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._start_waiters.append(d)
        return d

    def _endpoint(self) -> Any:
        target = self.target
        if target.scheme == "unix":
            return UNIXClientEndpoint(self.reactor, target.path, timeout=self.connect_timeout)
        endpoint = HostnameEndpoint(
            self.reactor, target.host, target.port, timeout=self.connect_timeout
        )
        if target.scheme == "rediss":
            return wrapClientTLS(optionsForClientTLS(target.host), endpoint)
        return endpoint

    def _not_up_at_start(self) -> None:
        self._start_timeout = None
        if self._starting:
            self._starting = False
            self._mark_down(f"no answer within {self.connect_timeout}s of start ({self.last_error or 'no connection'})")
            self._finish_start(None)

    def _finish_start(self, failure: Failure | None) -> None:
        self._starting = False
        if self._start_timeout is not None and self._start_timeout.active():
            self._start_timeout.cancel()
        self._start_timeout = None
        self._start_outcome = failure
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            d.errback(failure) if failure is not None else d.callback(None)

    async def close(self) -> None:
        """Drop every connection and timer; waits for Sentinel lookups in flight."""
        self._closing = True
        if self._probe.running:
            self._probe.stop()
        self._finish_start(self._start_outcome)
        waits = []
        if self._factory is not None:
            waits.append(self._factory.disconnect())
        if self._sentinel is not None:
            waits.append(self._sentinel.disconnect())
            waits.extend(self._sentinel.in_flight)
        await defer.DeferredList(waits, consumeErrors=True)

    def on_recovered(self, callback: Callable[[], None]) -> None:
        """Call C{callback} whenever Redis answers again after an outage."""
        self._listeners.append(callback)

    # Announcements (pub/sub)

    def listener(self, listen: Callable[[str], None]) -> RedisClient:
        """
        A second client to the same Redis (or Sentinel group), with one
        connection that only subscribes: C{listen(channel)} for each message
        on a channel it subscribed to.  Pub/sub takes a connection of its
        own, so it never delays the commands of this one.
        """
        return RedisClient(
            self.reactor, self.target, sentinels=self.sentinels,
            sentinel_master=self.sentinel_master, sentinel_password=self.sentinel_password,
            probe_key=self.probe_key, command_timeout=self.command_timeout,
            connect_timeout=self.connect_timeout, probe_interval=self.probe_interval,
            pool_size=1, reconnect_max=self.reconnect_max, listen=listen,
        )

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call C{callback} each time a connection is ready (a listener subscribes again then)."""
        self._on_connected.append(callback)

    @property
    def connected(self) -> bool:
        """Whether a connection is up now."""
        return self._connection() is not None

    def subscribe(self, channels: Sequence[str]) -> Deferred[Any]:
        """SUBSCRIBE on the listener's connection (fails when it has none)."""
        conn = self._connection()
        if conn is None or not channels:
            return defer.fail(StateUnavailable("no announcement connection"))
        return defer.maybeDeferred(conn.subscribe, list(channels))

    def unsubscribe(self, channels: Sequence[str]) -> Deferred[Any]:
        """UNSUBSCRIBE on the listener's connection, if it has one."""
        conn = self._connection()
        if conn is None or not channels:
            return defer.succeed(None)
        return defer.maybeDeferred(conn.unsubscribe, list(channels))

    def _announced(self, channel: Any) -> None:
        if self.listen is not None:
            self.listen(channel.decode() if isinstance(channel, bytes) else str(channel))

    # Commands

    def _connection(self) -> Any:
        pool = [
            conn for conn in (self._factory.pool if self._factory else ())
            if conn.connected and not conn.retired
        ]
        if not pool:
            return None
        return pool[next(self._turn) % len(pool)]

    def call(self, *args: Any) -> Deferred[Any]:
        """
        One command; its reply (bulk strings as C{str} when they are UTF-8,
        else C{bytes}), or L{StateUnavailable}.
        """
        conn = self._connection()
        if conn is None:
            why = self.last_error or "not connected yet"
            self._mark_down(why)
            return defer.fail(
                StateUnavailable(f"redis unavailable: no connection to {self.where} ({why})")
            )
        d = defer.maybeDeferred(conn.execute_command, *args)
        d.addCallbacks(self._answered, self._failed, errbackArgs=(conn,))
        return d

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Deferred[Any]:
        """Run C{script} by its SHA1, sending its source once Redis says it does not know it."""
        d = self.call("EVALSHA", script.sha, len(keys), *keys, *args)

        def unknown(failure: Failure) -> Any:
            failure.trap(txredisapi.ResponseError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            self.script_loads += 1
            return self.call("EVAL", script.source, len(keys), *keys, *args)

        return d.addErrback(unknown)

    def _unavailable(self, why: str) -> Deferred[Any]:
        self._mark_down(why)
        return defer.fail(StateUnavailable(f"redis unavailable: {why}"))

    def _answered(self, reply: Any) -> Any:
        self._mark_up()
        return reply

    def _failed(self, failure: Failure, conn: Any) -> Any:
        if failure.check(txredisapi.ConnectionError):  # lost, or no reply in time
            if failure.check(txredisapi.TimeoutError):
                # txredisapi is aborting it; its late replies would answer
                # later commands until it is gone (see _InStep).
                conn.retired = True
            return self._unavailable(f"{self.where}: {failure.getErrorMessage()}")
        if failure.check(txredisapi.ResponseError):
            message = str(failure.value)
            if message.startswith(_UNAVAILABLE_REPLIES):
                if message.startswith("READONLY") and self.sentinels:
                    # A demoted primary: reconnecting asks the Sentinels anew.
                    conn.retired = True
                    conn.transport.loseConnection()
                return self._unavailable(f"{self.where}: {message}")
            self._mark_up()  # it answered; the error is the caller's
        return failure

    # Reachability

    def _mark_down(self, why: str) -> None:
        self.last_error = why
        # While starting, the start timeout reports an absent Redis, once.
        if self._closing or self._starting or self.down_since is not None or self.listen:
            return
        self.reachable = False
        self.outages += 1
        self.down_since = self.reactor.seconds()
        self.log.warn(
            "state store {where} unreachable: {why}; deciding locally until it returns",
            where=self.where, why=why,
        )
        if not self._probe.running:
            self._probe.start(self.probe_interval, now=False)

    def _mark_up(self) -> None:
        if self.listen is not None and self._starting:
            self._finish_start(None)
        if self.reachable or self._closing or self.listen is not None:
            return
        self.reachable = True
        if self._probe.running:
            self._probe.stop()
        outage_began, self.down_since = self.down_since, None
        if outage_began is None:
            self.log.info("state store {where} reachable", where=self.where)
        else:
            self.log.info(
                "state store {where} reachable again after {seconds:.1f}s",
                where=self.where, seconds=self.reactor.seconds() - outage_began,
            )
        if self._starting:
            self._finish_start(None)
        if outage_began is not None:
            for callback in list(self._listeners):
                try:
                    callback()
                except Exception:
                    self.log.failure("state store recovery callback failed")

    def _probe_once(self) -> Deferred[Any] | None:
        if self._connection() is None:
            return None
        d = self.call("SET", self.probe_key, "1", "PX", 60_000)
        d.addErrback(lambda _: None)  # call() has recorded it
        return None

    def _connection_added(self, conn: Any) -> None:
        for callback in list(self._on_connected):
            callback()
        if self.listen is not None:
            if self._starting:
                self._finish_start(None)
            return
        peer = conn.transport.getPeer()
        address = getattr(peer, "host", None)
        peer_text = f"{address}:{peer.port}" if address is not None else str(peer)
        if peer_text != self.peer:
            self.peer = peer_text
            self.log.info("state store {where}: connected to {peer}", where=self.where, peer=peer_text)
        if not self.reachable:
            self._probe_once()

    def _connection_removed(self) -> None:
        if self._factory is not None and not self._connection():
            self._mark_down(f"{self.where}: connection lost")

    def _refused(self, why: str) -> None:
        self.last_error = why
        self.log.error("state store {where} refused the connection: {why}", where=self.where, why=why)
        if self._starting:
            self._finish_start(Failure(RedisRefused(f"{self.where}: {why}")))
        else:
            self._mark_down(why)
