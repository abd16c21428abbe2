"""
A stock grpcio client speaking to the tunneld edge, for tests/test_grpc_interop.py.

Run in a subprocess (the generated modules must not meet tunneld's own
tunnel_pb2 in one process): C{python grpc_stock_agent.py MODE PORT GENERATED_DIR
[HOSTNAME [WINDOW]]}.  It prints one line per observation; the test reads them.

Modes:
  - agent: Control + Hello, read Welcome, one Forward call: read Open, answer
    Reply + Data + End, read the rest and the call's status.
  - data-end-stream: the same, answered Reply + Data(end_stream), then a
    half-close (version 2: no End).
  - reply-end-stream: the same, answered Reply(204, end_stream) and no
    half-close until the edge has ended the call.
  - opens: serve three streams, each on its own Forward call: print each
    Open (method, target, end_stream), read the request to its end, answer
    Reply(200, end_stream).
  - hold-upload: one Forward call that reads its Open and then nothing; with
    WINDOW as grpcio's stream window (BDP probing off).  Prints how the call
    ended once it has.
  - hold-end: two Forward calls in turn, each answered Reply (Content-Length
    5) + Data and no End; prints how each call ended and what it read (the
    edge resets it when the client goes).
  - unknown: call a method the service does not have.
  - garbage: send bytes that are no protobuf Frame as the first Control message.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc

TIMEOUT = 20


def _requests(q: queue.Queue[Any]) -> Iterator[Any]:
    while True:
        item = q.get()
        if item is None:
            return
        yield item


def say(*words: object) -> None:
    print(*words, flush=True)


def hello(stub: Any, pb: Any, hostname: str) -> tuple[Any, queue.Queue[Any]]:
    """Open Control, say Hello, print the Welcome; the call and its request queue."""
    control_q: queue.Queue[Any] = queue.Queue()
    control_q.put(
        pb.Frame(
            hello=pb.Hello(
                version=2, agent_id="stock", token="t", software="grpcio",
                tunnels=[pb.TunnelSpec(hostname=hostname)],
            )
        )
    )
    control = stub.Control(_requests(control_q), timeout=TIMEOUT)
    welcome = next(control)
    w = welcome.welcome
    say("WELCOME", welcome.WhichOneof("body"), w.session_id, w.version, w.heartbeat_ms,
        w.max_frame_size)
    return control, control_q


def ended(call: Any) -> str:
    """Wait (without reading a message) until the call ends; how it did."""
    done = threading.Event()
    call.add_callback(done.set)
    if not done.wait(TIMEOUT):
        return "NOT-ENDED"
    return call.code().name


def agent(channel: grpc.Channel, pb: Any, pb_grpc: Any, mode: str, hostname: str) -> None:
    stub = pb_grpc.TunnelAgentStub(channel)
    control, control_q = hello(stub, pb, hostname)
    forward_q: queue.Queue[Any] = queue.Queue()
    forward = stub.Forward(_requests(forward_q), timeout=TIMEOUT)
    opening = next(forward)
    o = opening.open
    say("OPEN", opening.WhichOneof("body"), o.kind, o.method, o.target, o.end_stream)
    if mode == "reply-end-stream":
        forward_q.put(pb.Frame(reply=pb.Reply(status=204, reason=b"No Content", end_stream=True)))
        code = ended(forward)  # no half-close: the edge ends the call by itself
        forward_q.put(None)
        rest = [frame.WhichOneof("body") for frame in forward]
        say("FORWARD", ",".join(rest) or "-", code)
    else:
        forward_q.put(
            pb.Frame(
                reply=pb.Reply(
                    status=201, reason=b"Created",
                    headers=[pb.Header(name=b"x-agent", value=b"stock")],
                )
            )
        )
        body = b"hello from a stock grpc agent"
        if mode == "data-end-stream":
            forward_q.put(pb.Frame(data=pb.Data(data=body, end_stream=True)))
        else:
            forward_q.put(pb.Frame(data=pb.Data(data=body)))
            forward_q.put(pb.Frame(end=pb.End()))
        forward_q.put(None)
        rest = [frame.WhichOneof("body") for frame in forward]
        say("FORWARD", ",".join(rest) or "-", forward.code().name)
    control_q.put(None)
    try:
        for _ in control:
            pass
        say("CONTROL", control.code().name)
    except grpc.RpcError as e:
        say("CONTROL", e.code().name)


def opens(channel: grpc.Channel, pb: Any, pb_grpc: Any, hostname: str, count: int) -> None:
    stub = pb_grpc.TunnelAgentStub(channel)
    control, control_q = hello(stub, pb, hostname)
    lock = threading.Lock()

    def serve() -> None:
        q: queue.Queue[Any] = queue.Queue()
        call = stub.Forward(_requests(q), timeout=TIMEOUT)
        frames = iter(call)
        o = next(frames).open
        body = 0
        ended = o.end_stream
        while not ended:
            frame = next(frames)
            kind = frame.WhichOneof("body")
            if kind == "data":
                body += len(frame.data.data)
                ended = frame.data.end_stream
            else:
                ended = kind == "end"
        with lock:
            say("OPEN", o.method, o.target, o.end_stream, body)
        q.put(pb.Frame(reply=pb.Reply(status=200, reason=b"OK", end_stream=True)))
        q.put(None)
        try:
            for _ in frames:
                pass
        except grpc.RpcError as e:
            say("CALL", e.code().name)

    # One idle call at a time: the test sends its requests one after another.
    for _ in range(count):
        serve()
    control_q.put(None)
    for _ in control:
        pass


def hold(channel: grpc.Channel, pb: Any, pb_grpc: Any, mode: str, hostname: str) -> None:
    stub = pb_grpc.TunnelAgentStub(channel)
    control, control_q = hello(stub, pb, hostname)
    for _ in range(2 if mode == "hold-end" else 1):
        forward_q: queue.Queue[Any] = queue.Queue()
        forward = stub.Forward(_requests(forward_q), timeout=60)
        opening = next(forward)
        say("OPEN", opening.open.method, opening.open.target)
        if mode == "hold-end":
            length = pb.Header(name=b"content-length", value=b"5")
            forward_q.put(pb.Frame(reply=pb.Reply(status=200, headers=[length])))
            forward_q.put(pb.Frame(data=pb.Data(data=b"hello")))
            try:
                read = [frame.WhichOneof("body") for frame in forward]
                say("ENDED", forward.code().name, ",".join(read))
            except grpc.RpcError as e:
                say("ENDED", e.code().name)
        else:
            say("ENDED", ended(forward))
        forward_q.put(None)
    control_q.put(None)


def unknown(channel: grpc.Channel) -> None:
    call = channel.unary_unary(
        "/tunneld.v1.TunnelAgent/Teleport",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    try:
        call(b"", timeout=TIMEOUT)
        say("STATUS OK")
    except grpc.RpcError as e:
        say("STATUS", e.code().name)


def garbage(channel: grpc.Channel) -> None:
    call = channel.stream_stream(
        "/tunneld.v1.TunnelAgent/Control",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    responses = call(iter([b"\xff\xff\xff\xff not a protobuf frame"]), timeout=TIMEOUT)
    try:
        for _ in responses:
            pass
        say("STATUS", responses.code().name)
    except grpc.RpcError as e:
        say("STATUS", e.code().name)


def main() -> None:
    mode, port, generated = sys.argv[1], sys.argv[2], sys.argv[3]
    hostname = sys.argv[4] if len(sys.argv) > 4 else "stock.test"
    options: list[tuple[str, Any]] = []
    if len(sys.argv) > 5:
        options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", int(sys.argv[5]))]
    sys.path.insert(0, generated)
    import tunnel_pb2
    import tunnel_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        if mode in ("agent", "data-end-stream", "reply-end-stream"):
            agent(channel, tunnel_pb2, tunnel_pb2_grpc, mode, hostname)
        elif mode == "opens":
            opens(channel, tunnel_pb2, tunnel_pb2_grpc, hostname, 5)
        elif mode in ("hold-upload", "hold-end"):
            hold(channel, tunnel_pb2, tunnel_pb2_grpc, mode, hostname)
        elif mode == "unknown":
            unknown(channel)
        elif mode == "garbage":
            garbage(channel)
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
