#!/usr/bin/env python3
"""
A minimal tunneld agent written with stock grpcio (C{grpc.aio}) and aiohttp,
from docs/protocol.md ("Writing your own agent") and proto/tunnel.proto alone:
it imports nothing from tunneld.

Generate the stubs once (grpcio-tools), then run it:

    python -m grpc_tools.protoc -I proto --python_out=stubs --grpc_python_out=stubs \\
        proto/tunnel.proto
    python examples/grpc_agent.py --stubs stubs --edge 127.0.0.1:8082 --token TOKEN \\
        --tunnel app.example.test=http://127.0.0.1:8000

It serves HTTP tunnels only (no upgrades, no TCP tunnels) and prints one
line per event on stdout.  SIGTERM or SIGINT: stop taking streams, let those
in flight finish, leave.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
from typing import Any

import aiohttp
import grpc

PROTOCOL_VERSION = 2
# Data messages carry at most this much; well below any edge's max_frame_size.
CHUNK = 64 * 1024
# The receive window grpcio keeps per call (BDP probing off): with the
# largest message the edge may send (said in Hello; 131072 is the least an
# agent may ask for), the most it buffers of a request body the edge sends.
STREAM_WINDOW = 256 * 1024
MAX_MESSAGE = 128 * 1024
# Reason codes of proto/tunnel.proto used here.
UPSTREAM_REFUSED, UPSTREAM_TIMEOUT, DRAINING, PROTOCOL_ERROR, UPSTREAM_ERROR = 4, 5, 9, 10, 13
# Fields meant for one hop only: never passed on (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection te transfer-encoding upgrade trailer".split()
)

pb: Any = None  # tunnel_pb2, imported from --stubs
pb_grpc: Any = None  # tunnel_pb2_grpc


def say(*words: object) -> None:
    print(*words, flush=True)


class Refused(Exception):
    """The edge will not take this agent: do not dial again."""


class Link:
    """One HTTP/2 connection to the edge: Control, idle Forward calls, streams."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        # A channel of its own (local subchannel pool): a new link is a new
        # connection, and Forward calls share this one with Control.
        self.channel = agent.make_channel()
        self.stub = pb_grpc.TunnelAgentStub(self.channel)
        self.control: Any = None
        self.idle: set[Any] = set()  # Forward calls waiting for an Open
        self.target = agent.args.idle
        self.draining = False
        self.tasks: set[asyncio.Task[None]] = set()  # one per Forward call
        self.moved = asyncio.Event()  # the edge sent GoAway(draining)

    async def run(self) -> None:
        """Say hello, serve until the link ends, and return when it is over."""
        args = self.agent.args
        self.control = self.stub.Control()
        hello = pb.Hello(
            version=PROTOCOL_VERSION, agent_id=args.agent_id, token=args.token,
            software="grpc_agent.py", max_frame_size=MAX_MESSAGE,
            tunnels=[pb.TunnelSpec(hostname=host) for host in self.agent.tunnels],
        )
        await self.control.write(pb.Frame(hello=hello))
        welcome = await self._welcome()
        say("WELCOME", welcome.session_id, *welcome.public_urls)
        for refusal in welcome.refused:
            say("REFUSED", refusal.tunnel.hostname, refusal.message)
        self.top_up()
        try:
            while True:
                frame = await self.control.read()
                if frame is grpc.aio.EOF:
                    break
                kind = frame.WhichOneof("body")
                if kind == "goaway":
                    say("GOAWAY", frame.goaway.reason, frame.goaway.message)
                    if frame.goaway.reason == DRAINING:
                        self.draining = True
                        self.moved.set()
                elif kind == "ping":
                    await self.control.write(pb.Frame(pong=pb.Ping(opaque=frame.ping.opaque)))
        except grpc.aio.AioRpcError as e:
            say("CONTROL", e.code().name, e.details())
        finally:
            self.draining = True
            self.moved.set()

    async def _welcome(self) -> Any:
        """The Welcome; a refusal is a GoAway and then Control's status."""
        try:
            while (frame := await self.control.read()) is not grpc.aio.EOF:
                if frame.WhichOneof("body") == "welcome":
                    return frame.welcome
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Refused(e.details()) from None
            raise ConnectionError(f"{e.code().name}: {e.details()}") from None
        raise ConnectionError("the edge ended Control without a Welcome")

    async def leave(self) -> None:
        """Stop taking streams, let those in flight finish, end Control, hang up."""
        if not self.draining and self.control is not None:
            # The edge routes no new streams here (the agent is leaving).
            goaway = pb.GoAway(reason=DRAINING, message="agent stopping")
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self.control.write(pb.Frame(goaway=goaway))
        self.draining = True
        # Retire the idle calls: a half-close with nothing sent (the edge
        # ends each with OK, and sends an Open that crossed it elsewhere).
        for call in list(self.idle):
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=60)
        if self.control is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self.control.done_writing()
        await self.channel.close(grace=1.0)

    # -- the pool of idle Forward calls --------------------------------------

    def top_up(self) -> None:
        """Keep C{target} idle Forward calls open, so the edge never waits for one."""
        while not self.draining and len(self.idle) < self.target:
            call = self.stub.Forward()
            self.idle.add(call)
            task = asyncio.ensure_future(self.forward(call))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def forward(self, call: Any) -> None:
        """One Forward call: wait for its Open, then serve that stream."""
        try:
            opening = await call.read()
        except grpc.aio.AioRpcError:
            opening = grpc.aio.EOF
        finally:
            self.idle.discard(call)
        if opening is grpc.aio.EOF or opening.WhichOneof("body") != "open":
            return  # ended without a stream: retired, or the link is going away
        if not self.idle:
            # The edge used the last idle call: keep more open from now on.
            self.target = min(2 * self.target, self.agent.args.max_idle)
        self.top_up()
        await Stream(self.agent, call, opening.open).serve()


class Stream:
    """One public request: the Open, the request body, the upstream's response."""

    def __init__(self, agent: Agent, call: Any, opening: Any) -> None:
        self.agent = agent
        self.call = call
        self.open = opening
        # Request body chunks; few, so that a slow upstream holds grpcio's
        # window (and so the edge) back instead of filling memory.
        self.body: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=2)
        self.body_ended = opening.end_stream  # a request without a body says so
        self.answered = False

    async def serve(self) -> None:
        work = asyncio.ensure_future(self.respond())
        # Read the call all along: a Reset may come at any time (the public
        # client went away).  Cancelling a pending read would cancel the call.
        reader = asyncio.ensure_future(self.read_requests(work))
        try:
            await work
        except (asyncio.CancelledError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            reader.cancel()
            return
        # Everything is sent: half-close; the edge ends the call with status OK
        # once the request has ended too (a body still coming is dropped).
        self.answered = True
        while not self.body.empty():
            self.body.get_nowait()
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.done_writing()
        await reader

    async def read_requests(self, work: asyncio.Future[None]) -> None:
        """Pass the body on as it is taken; any Reset (or a cut call) stops the work."""
        try:
            while (frame := await self.call.read()) is not grpc.aio.EOF:
                kind = frame.WhichOneof("body")
                if kind == "reset":
                    say("RESET", frame.reset.reason, frame.reset.message)
                    work.cancel()
                    return
                if self.answered:
                    continue
                if kind == "data":
                    if frame.data.data:
                        await self.body.put(frame.data.data)
                    if frame.data.end_stream:
                        await self.body.put(None)
                elif kind == "end":
                    await self.body.put(None)
        except grpc.aio.AioRpcError as e:
            if not self.answered:
                say("RESET", e.code().name, e.details())
            work.cancel()

    async def request_body(self) -> Any:
        while (chunk := await self.body.get()) is not None:
            yield chunk

    async def respond(self) -> None:
        o = self.open
        upstream = self.agent.tunnels.get(o.tunnel.partition("/")[0])
        if o.kind != "http":
            await self.reset(PROTOCOL_ERROR, f"this agent serves no {o.kind} streams")
            return
        if upstream is None:
            await self.reset(UPSTREAM_REFUSED, f"no upstream for {o.tunnel}")
            return
        headers = [(h.name.decode("latin-1"), h.value.decode("latin-1")) for h in o.headers]
        try:
            async with self.agent.http.request(
                o.method, upstream + o.target, headers=headers,
                data=None if self.body_ended else self.request_body(),
                allow_redirects=False, auto_decompress=False,
            ) as response:
                await self.relay(response)
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as e:
            await self.reset(UPSTREAM_REFUSED, f"upstream refused: {e}")
        except TimeoutError:
            await self.reset(UPSTREAM_TIMEOUT, "upstream did not answer in time")
        except aiohttp.ClientError as e:
            await self.reset(UPSTREAM_ERROR, f"upstream: {e}")

    async def relay(self, response: aiohttp.ClientResponse) -> None:
        headers = [
            pb.Header(name=name, value=value)
            for name, value in response.raw_headers
            if name.lower() not in HOP_BY_HOP
        ]
        reply = pb.Reply(status=response.status, reason=(response.reason or "").encode(),
                         headers=headers)
        length = response.content_length
        if self.open.method == "HEAD" or response.status in (204, 304) or length == 0:
            # No body: the Reply ends the response by itself (version 2).
            reply.end_stream = True
            await self.call.write(pb.Frame(reply=reply))
            return
        await self.call.write(pb.Frame(reply=reply))
        sent = 0
        async for chunk in response.content.iter_chunked(CHUNK):
            sent += len(chunk)
            # The last bytes of a body of known length end it (version 2);
            # otherwise End follows once the upstream is done.
            await self.call.write(pb.Frame(data=pb.Data(data=chunk, end_stream=sent == length)))
        if sent != length:
            await self.call.write(pb.Frame(end=pb.End()))

    async def reset(self, reason: int, message: str) -> None:
        say("UPSTREAM", reason, message)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.write(pb.Frame(reset=pb.Reset(reason=reason, message=message)))


class Agent:
    """Keeps a link to the edge up; a draining edge gets a new link at once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tunnels = dict(spec.split("=", 1) for spec in args.tunnel)
        self.http: Any = None
        self.stopping = asyncio.Event()

    def make_channel(self) -> Any:
        options = [
            # grpcio grows its windows by itself (BDP probing): a slow
            # upstream would have it buffer tens of megabytes of an upload.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        args = self.args
        if args.ca:
            def read(path: str | None) -> bytes | None:
                if path is None:
                    return None
                with open(path, "rb") as f:
                    return f.read()

            credentials = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
            return grpc.aio.secure_channel(args.edge, credentials, options=options)
        return grpc.aio.insecure_channel(args.edge, options=options)

    async def run(self) -> int:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.args.upstream_timeout)
        connector = aiohttp.TCPConnector(limit=0)
        # The request goes on as the edge sent it: no headers of aiohttp's own.
        self.http = aiohttp.ClientSession(
            timeout=timeout, connector=connector,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        delay = 0.5
        old: list[asyncio.Task[None]] = []
        try:
            while not self.stopping.is_set():
                link = Link(self)
                running = asyncio.ensure_future(link.run())
                stop = asyncio.ensure_future(self.stopping.wait())
                moved = asyncio.ensure_future(link.moved.wait())
                await asyncio.wait({running, stop, moved}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                moved.cancel()
                if running.done() and running.exception() is not None:
                    error = running.exception()
                    if isinstance(error, Refused):
                        say("UNAUTHORIZED", error)
                        await link.channel.close()
                        return 2
                    say("LINK", f"{type(error).__name__}: {error}")
                    await link.channel.close()
                    # Jittered exponential backoff; a link that got a Welcome resets it.
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, 30.0)
                    continue
                delay = 0.5
                # Draining (or stopping): this link finishes its streams and
                # leaves while the next one, if any, is dialled at once.
                old.append(asyncio.ensure_future(self._leave(link, running)))
            return 0
        finally:
            await asyncio.gather(*old, return_exceptions=True)
            await self.http.close()

    async def _leave(self, link: Link, running: asyncio.Future[None]) -> None:
        await link.leave()
        with contextlib.suppress(Exception):
            await running
        say("LEFT")


def main() -> int:
    global pb, pb_grpc
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stubs", required=True, help="directory of tunnel_pb2*.py (grpc_tools)")
    parser.add_argument("--edge", required=True, help="host:port of the edge's gRPC listener")
    parser.add_argument("--tunnel", action="append", required=True, help="HOSTNAME=http://upstream")
    parser.add_argument("--agent-id", default="grpc-example")
    parser.add_argument("--token", default="")
    parser.add_argument("--ca", help="CA certificate of the edge (TLS); with --cert and --key")
    parser.add_argument("--cert", help="this agent's client certificate (PEM)")
    parser.add_argument("--key", help="its private key (PEM)")
    parser.add_argument("--idle", type=int, default=4, help="idle Forward calls kept open")
    parser.add_argument("--max-idle", type=int, default=64)
    parser.add_argument("--upstream-timeout", type=float, default=60.0)
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    import tunnel_pb2
    import tunnel_pb2_grpc

    pb, pb_grpc = tunnel_pb2, tunnel_pb2_grpc

    async def run() -> int:
        agent = Agent(args)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, agent.stopping.set)
        return await agent.run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
