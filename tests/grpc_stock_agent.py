"""
A stock grpcio client speaking to the tunneld edge, for tests/test_grpc_interop.py.

Run in a subprocess (the generated modules must not meet tunneld's own
tunnel_pb2 in one process): C{python grpc_stock_agent.py MODE PORT GENERATED_DIR}.
It prints one line per observation; the test reads them.

Modes:
  - agent: Control + Hello, read Welcome, one Forward call: read Open, answer
    Reply + Data + End, read the rest and the call's status.
  - unknown: call a method the service does not have.
  - garbage: send bytes that are no protobuf Frame as the first Control message.
"""

from __future__ import annotations

import queue
import sys
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


def agent(channel: grpc.Channel, pb: Any, pb_grpc: Any) -> None:
    stub = pb_grpc.TunnelAgentStub(channel)
    control_q: queue.Queue[Any] = queue.Queue()
    control_q.put(
        pb.Frame(
            hello=pb.Hello(
                version=1, agent_id="stock", token="t", software="grpcio",
                tunnels=[pb.TunnelSpec(hostname="stock.test")],
            )
        )
    )
    control = stub.Control(_requests(control_q), timeout=TIMEOUT)
    welcome = next(control)
    print("WELCOME", welcome.WhichOneof("body"), welcome.welcome.session_id, flush=True)

    forward_q: queue.Queue[Any] = queue.Queue()
    forward = stub.Forward(_requests(forward_q), timeout=TIMEOUT)
    opening = next(forward)
    o = opening.open
    print("OPEN", opening.WhichOneof("body"), o.kind, o.method, o.target, flush=True)
    forward_q.put(
        pb.Frame(
            reply=pb.Reply(
                status=201, reason=b"Created", headers=[pb.Header(name=b"x-agent", value=b"stock")]
            )
        )
    )
    forward_q.put(pb.Frame(data=pb.Data(data=b"hello from a stock grpc agent")))
    forward_q.put(pb.Frame(end=pb.End()))
    forward_q.put(None)
    rest = [frame.WhichOneof("body") for frame in forward]
    print("FORWARD", ",".join(rest), forward.code().name, flush=True)
    control_q.put(None)
    try:
        for _ in control:
            pass
        print("CONTROL", control.code().name, flush=True)
    except grpc.RpcError as e:
        print("CONTROL", e.code().name, flush=True)


def unknown(channel: grpc.Channel) -> None:
    call = channel.unary_unary(
        "/tunneld.v1.TunnelAgent/Teleport",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    try:
        call(b"", timeout=TIMEOUT)
        print("STATUS OK", flush=True)
    except grpc.RpcError as e:
        print("STATUS", e.code().name, flush=True)


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
        print("STATUS", responses.code().name, flush=True)
    except grpc.RpcError as e:
        print("STATUS", e.code().name, flush=True)


def main() -> None:
    mode, port, generated = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, generated)
    import tunnel_pb2
    import tunnel_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if mode == "agent":
            agent(channel, tunnel_pb2, tunnel_pb2_grpc)
        elif mode == "unknown":
            unknown(channel)
        elif mode == "garbage":
            garbage(channel)
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
