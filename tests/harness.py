"""
Real parts on real sockets for end-to-end tests: an upstream web service, an
edge and an agent in the test's reactor, each listening on loopback port 0,
and an HTTP client that streams and hashes instead of buffering.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall, deferLater
from twisted.web import resource, server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from tunneld.agent.service import AgentService
from tunneld.config import (
    AgentConfig,
    AgentGrant,
    AgentSection,
    EdgeConfig,
    EdgeSection,
    LimitsSection,
    TunnelSection,
)
from tunneld.edge.service import EdgeService
from tunneld.registry import transport_options

CHUNK = 64 * 1024


def pattern_bytes(total: int, seed: int = 7) -> Any:
    """A deterministic stream of C{total} bytes, produced 64 KiB at a time."""
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        yield block[:n]
        sent += n


def pattern_digest(total: int, seed: int = 7) -> str:
    h = hashlib.sha256()
    for chunk in pattern_bytes(total, seed):
        h.update(chunk)
    return h.hexdigest()


class PatternFile:
    """A file-like object reading the pattern, for L{FileBodyProducer}."""

    def __init__(self, total: int, seed: int = 7) -> None:
        self._chunks = pattern_bytes(total, seed)
        self.total = total

    def read(self, n: int = -1) -> bytes:
        return next(self._chunks, b"")

    def close(self) -> None:
        pass


class _PatternProducer:
    """Writes the pattern into a twisted.web request as the consumer asks."""

    def __init__(self, request: server.Request, total: int) -> None:
        self.request = request
        self.chunks = pattern_bytes(total)
        request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        chunk = next(self.chunks, None)
        if chunk is None:
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.request.write(chunk)

    def stopProducing(self) -> None:
        self.chunks = iter(())


class Upstream(resource.Resource):
    """
    The private service behind the tunnel.  Paths: C{/hello}, C{/echo}
    (echoes the body), C{/sha256} (hash of the body), C{/bytes/N} (N pattern
    bytes, streamed), C{/hang} (never answers), C{/stall} (a head promising
    1000 bytes and the first 10, then nothing), C{/headers} (request headers).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.hanging: list[server.Request] = []

    def render(self, request: server.Request) -> Any:
        self.requests += 1
        path = request.path
        if path == b"/hello":
            request.setHeader(b"content-type", b"text/plain")
            return b"hello from upstream"
        if path == b"/echo":
            return request.content.read()
        if path == b"/sha256":
            h = hashlib.sha256()
            request.content.seek(0)
            while True:
                chunk = request.content.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
            return h.hexdigest().encode()
        if path.startswith(b"/bytes/"):
            total = int(path.split(b"/")[2])
            request.setHeader(b"content-length", str(total).encode())
            _PatternProducer(request, total)
            return server.NOT_DONE_YET
        if path == b"/headers":
            lines = [b"%s: %s" % (k.lower(), v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
            return b"\n".join(sorted(lines))
        if path == b"/hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        if path == b"/stall":
            request.setHeader(b"content-length", b"1000")
            request.write(b"0123456789")
            self.hanging.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found"


async def listen_upstream(case: Any, site_resource: resource.Resource | None = None) -> tuple[int, Upstream]:
    """Start an upstream on 127.0.0.1 port 0; returns its port and resource."""
    upstream = site_resource or Upstream()
    site = server.Site(upstream)
    site.displayTracebacks = False
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1:backlog=1024").listen(site)
    case.addCleanup(port.stopListening)
    return port.getHost().port, upstream  # type: ignore[return-value]


class Sampler:
    """Samples this process' resident memory so tests can bound its growth."""

    def __init__(self) -> None:
        self.baseline = self.rss()
        self.peak = self.baseline
        self._loop = LoopingCall(self._sample)
        self._loop.start(0.05)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        self.peak = max(self.peak, self.rss())

    def stop(self) -> int:
        """Growth over the baseline, in bytes."""
        self._sample()
        if self._loop.running:
            self._loop.stop()
        return self.peak - self.baseline


class _Ended:
    """How a response body ended."""

    def __init__(self, reason: Any) -> None:
        self.reason = reason

    def check(self, *types: Any) -> Any:
        return self.reason.check(*types)

    def __repr__(self) -> str:
        return f"<ended: {self.reason.getErrorMessage()} {self.reason.value!r}>"


class HashingBody(protocol.Protocol):
    """Receives a response body, hashing it; optionally stalls after the first bytes."""

    def __init__(self, stall: bool = False) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.start = b""
        self.stall = stall
        self.done: defer.Deferred[Any] = defer.Deferred()
        self.first: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.hash.update(data)
        if self.size < 4096:
            self.start += data[: 4096 - self.size]
        self.size += len(data)
        if not self.first.called:
            self.first.callback(None)
            if self.stall:
                self.transport.pauseProducing()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        # Fire with the reason as a value: a Failure passed to callback()
        # would turn into an errback.
        self.done.callback(_Ended(reason))

    def complete(self, reason: Any) -> bool:
        return reason.check(ResponseDone) is not None


class TunnelHarness:
    """An edge, agents and a client wired together for one test."""

    def __init__(self, case: Any, transport: str, edge_table: dict[str, Any]) -> None:
        self.case = case
        self.transport = transport
        self.edge_table = edge_table
        self.edge: EdgeService | None = None
        self.agents: list[AgentService] = []
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = Agent(reactor, pool=self.pool)
        case.addCleanup(self.pool.closeCachedConnections)

    async def start_edge(
        self, grants: list[AgentGrant] | None = None, limits: LimitsSection | None = None,
        **edge: Any,
    ) -> EdgeService:
        edge.setdefault("admin_listen", "tcp:0:interface=127.0.0.1")
        section = EdgeSection(
            public_listen=["tcp:0:interface=127.0.0.1:backlog=1024"],
            transports=[self.transport],
            public_url="http://{host}/",
            **edge,
        )
        config = EdgeConfig(
            section, grants or [], {self.transport: self.edge_table}, "(test)",
            limits or LimitsSection(),
        )
        transports = transport_options(
            section.transports, config.transports, config.source, edge=True
        )
        service = EdgeService(config, transports, reactor)
        service.startService()
        self.case.addCleanup(service.stopService)
        await defer.gatherResults([listener.listening for listener in service.public])
        for transport in service.transports.values():
            await transport.listening
        self.edge = service
        return service

    @property
    def public_port(self) -> int:
        assert self.edge is not None
        return self.edge.public[0].address.port  # type: ignore[no-any-return]

    def link_address(self) -> Any:
        assert self.edge is not None
        return self.edge.transports[self.transport].address

    async def start_agent(
        self,
        agent_table: dict[str, Any],
        tunnels: list[tuple[str, int] | TunnelSection],
        agent_id: str = "agent",
        token: str = "",
        wait: bool = True,
        welcome_timeout: float | None = None,
        **agent: Any,
    ) -> AgentService:
        section = AgentSection(id=agent_id, token=token, transports=[self.transport], **agent)
        config = AgentConfig(
            section,
            [
                tunnel if isinstance(tunnel, TunnelSection) else
                TunnelSection(hostname=tunnel[0], upstream=f"tcp:host=127.0.0.1:port={tunnel[1]}")
                for tunnel in tunnels
            ],
            {self.transport: agent_table},
            "(test)",
        )
        transports = transport_options(
            section.transports, config.transports, config.source, edge=False
        )
        if welcome_timeout is None:
            service = AgentService(config, transports, reactor)
        else:
            service = AgentService(config, transports, reactor, welcome_timeout=welcome_timeout)
        service.startService()
        self.case.addCleanup(service.stopService)
        self.agents.append(service)
        if wait:
            await service.ready
        return service

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.public_port}{path}".encode()

    async def request(
        self,
        host: str,
        path: str,
        method: bytes = b"GET",
        body: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> tuple[int, Headers, bytes]:
        """One request through the edge; the whole answer."""
        from twisted.web.client import readBody

        all_headers = Headers({b"host": [host.encode()], **(headers or {})})
        producer = FileBodyProducer(_BytesIO(body)) if body is not None else None
        response = await self.client.request(method, self.url(path), all_headers, producer)
        content = await readBody(response)
        return response.code, response.headers, content

    async def stream(
        self, host: str, path: str, method: bytes = b"GET", upload: int = 0, stall: bool = False
    ) -> tuple[Any, HashingBody]:
        """A request whose body (if any) and response are streamed and hashed."""
        producer = FileBodyProducer(PatternFile(upload), readSize=CHUNK) if upload else None
        if producer is not None:
            producer.length = upload
        response = await self.client.request(
            method, self.url(path), Headers({b"host": [host.encode()]}), producer
        )
        body = HashingBody(stall=stall)
        response.deliverBody(body)
        return response, body


class _BytesIO:
    def __init__(self, data: bytes) -> None:
        import io

        self._io = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._io.read(n)

    def seek(self, *args: Any) -> int:
        return self._io.seek(*args)

    def tell(self) -> int:
        return self._io.tell()

    def close(self) -> None:
        pass


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def eventually(predicate: Any, what: str, timeout: float = 30.0, step: float = 0.02) -> None:
    """Wait until C{predicate()} holds (polling the reactor), or fail naming C{what}."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"still waiting for {what} after {timeout}s of polling")
        await sleep(step)
        waited += step


def open_fds(pid: int | str = "self") -> int:
    """How many file descriptors process C{pid} has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def sockets_on_port(port: int, pid: int | str = "self") -> int:
    """
    How many of process C{pid}'s open descriptors are TCP sockets with
    C{port} at either end (a listener on it, connections to or from it).
    """
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            ends = (fields[1], fields[2])
            if any(int(end.rsplit(":", 1)[1], 16) == port for end in ends):
                inodes.add(fields[9])
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def tunneld_timers() -> dict[str, int]:
    """The reactor's pending timers that tunneld set, counted by function."""
    counts: dict[str, int] = {}
    for call in reactor.getDelayedCalls():  # type: ignore[attr-defined]
        func = call.func
        module = getattr(func, "__module__", "") or ""
        if module.startswith("tunneld"):
            name = getattr(func, "__qualname__", repr(func))
            counts[name] = counts.get(name, 0) + 1
    return counts


def free_port() -> int:
    """
    A loopback port free now, below Linux's ephemeral range: no outgoing
    connection is given it, so it stays free for a test that must listen on
    the same port again (an edge restarted in place).
    """
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port in 20000-29999")
