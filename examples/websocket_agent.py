#!/usr/bin/env python3
"""
A minimal tunneld agent over the WebSocket transport, written with the stock
C{websockets} client and aiohttp, from docs/protocol.md ("Writing your own
agent") and proto/tunnel.proto alone: it imports nothing from tunneld.

Generate the protobuf module once (grpcio-tools, or any protoc), then run it:

    python -m grpc_tools.protoc -I proto --python_out=stubs proto/tunnel.proto
    python examples/websocket_agent.py --stubs stubs --edge ws://127.0.0.1:8081/tunnel \\
        --token TOKEN --tunnel app.example.test=http://127.0.0.1:8000

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
import ssl
import sys
from typing import Any

import aiohttp
import websockets

PROTOCOL_VERSION = 2
# The credit this agent grants the edge per stream: the most of one request
# body it holds before the upstream has taken it.
WINDOW = 256 * 1024
# The largest frame this agent accepts (131072 is the least it may ask for).
MAX_FRAME = 128 * 1024
CHUNK = 64 * 1024
# Reason codes of proto/tunnel.proto used here.
UPSTREAM_REFUSED, UPSTREAM_TIMEOUT, DRAINING, PROTOCOL_ERROR, UNAUTHORIZED, UPSTREAM_ERROR = (
    4, 5, 9, 10, 11, 13,
)
# Fields meant for one hop only: never passed on (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection te transfer-encoding upgrade trailer".split()
)

pb: Any = None  # tunnel_pb2, imported from --stubs


def say(*words: object) -> None:
    print(*words, flush=True)


class Refused(Exception):
    """The edge will not take this agent: do not dial again."""


class Link:
    """One WebSocket to the edge: one binary message per Frame, many streams."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.ws: Any = None
        self.streams: dict[int, Stream] = {}
        self.draining = False
        self.moved = asyncio.Event()  # the edge sent GoAway(draining), or the link ended
        self.credit = 0  # what the edge grants per stream (Welcome.initial_window)
        self.max_data = 0  # the largest Data payload the edge accepts

    async def send(self, stream_id: int, **body: Any) -> None:
        await self.ws.send(pb.Frame(stream_id=stream_id, **body).SerializeToString())

    async def run(self) -> None:
        args = self.agent.args
        context = None
        if args.edge.startswith("wss:"):
            context = ssl.create_default_context(cafile=args.ca)
            if args.cert:
                context.load_cert_chain(args.cert, args.key)
        try:
            self.ws = await websockets.connect(
                args.edge, ssl=context, compression=None, max_size=2 * MAX_FRAME, open_timeout=10
            )
        except (OSError, websockets.WebSocketException) as e:
            raise ConnectionError(f"cannot reach {args.edge}: {e}") from None
        try:
            await self._hello()
            async for message in self.ws:
                await self.dispatch(pb.Frame.FromString(message))
        except websockets.ConnectionClosed as e:
            say("CLOSED", e.rcvd.code if e.rcvd else 1006, e.rcvd.reason if e.rcvd else "")
        finally:
            self.draining = True
            self.moved.set()
            for stream in list(self.streams.values()):
                stream.task.cancel()

    async def _hello(self) -> None:
        args = self.agent.args
        hello = pb.Hello(
            version=PROTOCOL_VERSION, agent_id=args.agent_id, token=args.token,
            software="websocket_agent.py", initial_window=WINDOW, max_frame_size=MAX_FRAME,
            tunnels=[pb.TunnelSpec(hostname=host) for host in self.agent.tunnels],
        )
        await self.send(0, hello=hello)
        try:
            first = pb.Frame.FromString(await self.ws.recv())
            if first.WhichOneof("body") == "goaway":
                await self.ws.recv()  # the Close that follows says why
        except websockets.ConnectionClosed as e:
            if e.rcvd is not None and e.rcvd.code == 4000 + UNAUTHORIZED:
                raise Refused(e.rcvd.reason) from None
            raise ConnectionError(f"the edge closed the link: {e}") from None
        if first.WhichOneof("body") != "welcome":
            raise ConnectionError(f"expected a Welcome, got {first.WhichOneof('body')}")
        welcome = first.welcome
        self.credit = welcome.initial_window
        self.max_data = (welcome.max_frame_size or 131072) - 64
        say("WELCOME", welcome.session_id, *welcome.public_urls)
        for refusal in welcome.refused:
            say("REFUSED", refusal.tunnel.hostname, refusal.message)

    async def dispatch(self, frame: Any) -> None:
        kind = frame.WhichOneof("body")
        sid = frame.stream_id
        if kind == "open":
            stream = Stream(self, sid, frame.open)
            self.streams[sid] = stream
            return
        stream = self.streams.get(sid)
        if kind == "data" and stream is not None:
            stream.body_arrived(frame.data.data, frame.data.end_stream)
        elif kind == "end" and stream is not None:
            stream.body_arrived(b"", True)
        elif kind == "window" and stream is not None:
            stream.credit += frame.window.increment
            stream.credit_came.set()
        elif kind == "reset" and stream is not None:
            say("RESET", frame.reset.reason, frame.reset.message)
            stream.task.cancel()
        elif kind == "ping":
            await self.send(0, pong=pb.Ping(opaque=frame.ping.opaque))
        elif kind == "goaway":
            say("GOAWAY", frame.goaway.reason, frame.goaway.message)
            if frame.goaway.reason == DRAINING:
                self.draining = True
                self.moved.set()

    async def leave(self) -> None:
        """Stop taking streams, let those in flight finish, close."""
        if self.ws is None:
            return
        if not self.draining:
            # The edge routes no new streams here (the agent is leaving).
            with contextlib.suppress(websockets.ConnectionClosed):
                await self.send(0, goaway=pb.GoAway(reason=DRAINING, message="agent stopping"))
        self.draining = True
        tasks = [stream.task for stream in self.streams.values()]
        if tasks:
            await asyncio.wait(tasks)
        await self.ws.close()


class Stream:
    """One public request: the Open, the request body (with credit), the response."""

    def __init__(self, link: Link, stream_id: int, opening: Any) -> None:
        self.link = link
        self.id = stream_id
        self.open = opening
        # Bounded by the credit this agent grants: no more than WINDOW unread.
        self.body: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.body_ended = opening.end_stream  # a request without a body says so
        self.credit = link.credit  # Data bytes this agent may still send
        self.credit_came = asyncio.Event()
        self.task = asyncio.ensure_future(self.serve())

    def body_arrived(self, data: bytes, last: bool) -> None:
        if data:
            self.body.put_nowait(data)
        if last:
            self.body.put_nowait(None)

    async def request_body(self) -> Any:
        taken = 0
        while (chunk := await self.body.get()) is not None:
            yield chunk
            # The upstream took it: grant the edge as much again (in quarters).
            taken += len(chunk)
            if taken >= WINDOW // 4:
                await self.link.send(self.id, window=pb.Window(increment=taken))
                taken = 0

    async def serve(self) -> None:
        try:
            await self.respond()
        except asyncio.CancelledError:
            pass  # the edge reset the stream, or the link is gone
        except websockets.ConnectionClosed:
            pass
        finally:
            self.link.streams.pop(self.id, None)

    async def respond(self) -> None:
        o = self.open
        upstream = self.link.agent.tunnels.get(o.tunnel.partition("/")[0])
        if o.kind != "http":
            await self.reset(PROTOCOL_ERROR, f"this agent serves no {o.kind} streams")
            return
        if upstream is None:
            await self.reset(UPSTREAM_REFUSED, f"no upstream for {o.tunnel}")
            return
        headers = [(h.name.decode("latin-1"), h.value.decode("latin-1")) for h in o.headers]
        try:
            async with self.link.agent.http.request(
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
            reply.end_stream = True  # no body: the Reply ends the response (version 2)
            await self.link.send(self.id, reply=reply)
            return
        await self.link.send(self.id, reply=reply)
        sent = 0
        async for chunk in response.content.iter_chunked(CHUNK):
            sent += len(chunk)
            await self.send_data(chunk, last=sent == length)
        if sent != length:
            await self.link.send(self.id, end=pb.End())

    async def send_data(self, chunk: bytes, last: bool) -> None:
        """Data within the credit the edge granted; the last piece may end the body."""
        view = memoryview(chunk)
        while view:
            while self.credit <= 0:
                self.credit_came.clear()
                await self.credit_came.wait()
            n = min(len(view), self.credit, self.link.max_data)
            end = last and n == len(view)
            await self.link.send(self.id, data=pb.Data(data=bytes(view[:n]), end_stream=end))
            self.credit -= n
            view = view[n:]

    async def reset(self, reason: int, message: str) -> None:
        say("UPSTREAM", reason, message)
        await self.link.send(self.id, reset=pb.Reset(reason=reason, message=message))


class Agent:
    """Keeps a link to the edge up; a draining edge gets a new link at once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tunnels = dict(spec.split("=", 1) for spec in args.tunnel)
        self.http: Any = None
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.args.upstream_timeout)
        # The request goes on as the edge sent it: no headers of aiohttp's own.
        self.http = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
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
                        return 2
                    say("LINK", f"{type(error).__name__}: {error}")
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
    global pb
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stubs", required=True, help="directory of tunnel_pb2.py (protoc)")
    parser.add_argument("--edge", required=True, help="ws:// or wss:// URL of the edge")
    parser.add_argument("--tunnel", action="append", required=True, help="HOSTNAME=http://upstream")
    parser.add_argument("--agent-id", default="websocket-example")
    parser.add_argument("--token", default="")
    parser.add_argument("--ca", help="CA certificate of the edge (wss://)")
    parser.add_argument("--cert", help="this agent's client certificate (PEM)")
    parser.add_argument("--key", help="its private key (PEM)")
    parser.add_argument("--upstream-timeout", type=float, default=60.0)
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    import tunnel_pb2

    pb = tunnel_pb2

    async def run() -> int:
        agent = Agent(args)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, agent.stopping.set)
        return await agent.run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
