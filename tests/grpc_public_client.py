"""
A stock grpcio client calling a gRPC service through the edge's public
HTTP/2 listener, for tests/test_public_h2.py.  Generic (bytes in, bytes out)
methods, so no generated code.

C{python grpc_public_client.py PORT AUTHORITY [CA_PEM]}: without a CA it
speaks h2c (prior knowledge), with one TLS (ALPN h2).  It prints one line per
observation; the test reads them.
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterator

import grpc

TIMEOUT = 20


def _drain(q: queue.Queue[bytes | None]) -> Iterator[bytes]:
    while (item := q.get()) is not None:
        yield item


def main() -> None:
    port, authority = sys.argv[1], sys.argv[2]
    target = f"127.0.0.1:{port}"
    if len(sys.argv) > 3:
        with open(sys.argv[3], "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(
            target, credentials, options=[("grpc.ssl_target_name_override", authority)]
        )
    else:
        channel = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    with channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        reply, call = unary.with_call(b"ping", timeout=TIMEOUT, metadata=[("x-test", "yes")])
        print("unary", reply.decode(), dict(call.trailing_metadata()).get("x-trailer", "-"))

        big = bytes(range(256)) * 4096  # 1 MiB, several HTTP/2 windows on each hop
        reply = unary(big, timeout=TIMEOUT)
        print("unary-big", len(reply), reply == big[::-1])

        # Each reply is read before the next request is sent: a real
        # conversation, which no buffering hop could carry.
        outgoing: queue.Queue[bytes | None] = queue.Queue()
        chat = channel.stream_stream("/test.Echo/Chat")
        replies = chat(_drain(outgoing), timeout=TIMEOUT)
        heard = []
        for message in (b"a", b"bb", b"ccc", b"dddd"):
            outgoing.put(message)
            heard.append(next(replies).decode())
        outgoing.put(None)
        rest = [r.decode() for r in replies]
        print("bidi", " ".join(heard), "|", " ".join(rest) or "-")

        try:
            unary_fail = channel.unary_unary("/test.Echo/Missing")
            unary_fail(b"x", timeout=TIMEOUT)
        except grpc.RpcError as error:
            print("missing", error.code().name)
        try:
            channel.unary_unary("/test.Echo/Fail")(b"x", timeout=TIMEOUT)
        except grpc.RpcError as error:
            print("fail", error.code().name, error.details().replace(" ", "_"))


if __name__ == "__main__":
    main()
