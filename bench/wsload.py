"""
WebSocket load for the bench: echo round trips, or many idle connections held open.

Usage:
  python bench/wsload.py echo PORT VHOST CONNECTIONS SECONDS
      prints "BENCH-JSON {...}" with messages, p50_us, p99_us, errors
  python bench/wsload.py idle PORT VHOST COUNT
      opens COUNT WebSockets, prints "OPEN n" (how many completed the handshake),
      then holds them until stdin closes
"""

import asyncio
import base64
import json
import os
import resource
import struct
import sys
import time

PAYLOAD = b"x" * 64


async def connect(port: int, vhost: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET / HTTP/1.1\r\nHost: {vhost}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        writer.close()
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    return reader, writer


def frame(payload: bytes) -> bytes:
    # A client frame must be masked; a zero key leaves the payload as it is.
    return bytes((0x82, 0x80 | len(payload))) + b"\0\0\0\0" + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return await reader.readexactly(length)


async def echo(port: int, vhost: str, connections: int, seconds: float) -> dict:
    """
    Open every connection first, then time the echoes alone: the window
    starts once the handshakes are done (a loaded machine can take longer
    than a short window to finish them), and each connection makes at least
    one round trip.
    """
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0}
    opened = await asyncio.gather(*(connect(port, vhost) for _ in range(connections)),
                                  return_exceptions=True)
    links = [link for link in opened if not isinstance(link, BaseException)]
    errors["connect"] = len(opened) - len(links)
    until = time.monotonic() + seconds

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = frame(PAYLOAD)
        try:
            while True:
                start = time.monotonic()
                writer.write(message)
                if await read_frame(reader) != PAYLOAD:
                    raise ConnectionError("echo differs")
                latencies.append(time.monotonic() - start)
                if start >= until:
                    break
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            errors["read"] += 1
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(one(reader, writer) for reader, writer in links))
    elapsed = time.monotonic() - start
    latencies.sort()

    def percentile(p: float) -> int:
        if not latencies:
            return 0
        return int(latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1e6)

    return {"messages": len(latencies), "duration_us": int(elapsed * 1e6),
            "p50_us": percentile(50), "p99_us": percentile(99), "errors": errors}


async def idle(port: int, vhost: str, count: int) -> None:
    held = []
    failed = 0
    for start in range(0, count, 200):
        results = await asyncio.gather(*(connect(port, vhost) for _ in range(start, min(count, start + 200))),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                failed += 1
            else:
                held.append(r)
    print(f"OPEN {len(held)} FAILED {failed}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for _, writer in held:
        writer.close()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode, port, vhost = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "echo":
        result = asyncio.run(echo(port, vhost, int(sys.argv[4]), float(sys.argv[5])))
        print("BENCH-JSON " + json.dumps(result), flush=True)
    else:
        asyncio.run(idle(port, vhost, int(sys.argv[4])))


if __name__ == "__main__":
    main()
