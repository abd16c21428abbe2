"""A tiny HTTP/1.1 keep-alive load loop: the smoke mode's stand-in for wrk.

Usage: python bench/pyload.py URL HOST CONNECTIONS SECONDS [close]
("close": a new connection for every request, as wrk with "Connection: close")
Prints one line "BENCH-JSON {...}" with the same fields as bench/report.lua.
Slow and single-threaded on purpose: it exercises the harness, it does not
measure anything worth publishing.
"""

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def churn(host: str, port: int, path: str, vhost: str, until: float,
                stats: dict, latencies: list[float]) -> None:
    """One request per connection, until C{until}."""
    while time.monotonic() < until:
        await worker(host, port, path, vhost, until, stats, latencies, close=True)


async def worker(host: str, port: int, path: str, vhost: str, until: float,
                 stats: dict, latencies: list[float], close: bool = False) -> None:
    connection = "Connection: close\r\n" if close else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {vhost}\r\n{connection}\r\n".encode()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        stats["errors"]["connect"] += 1
        return
    try:
        while time.monotonic() < until:
            start = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            remaining = length
            while remaining:
                chunk = await reader.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionError("closed mid-body")
                remaining -= len(chunk)
            latencies.append(time.monotonic() - start)
            stats["requests"] += 1
            stats["bytes"] += len(head) + length
            if status >= 400:
                stats["errors"]["status"] += 1
            if close:
                break
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, ConnectionError):
        stats["errors"]["read"] += 1
    finally:
        writer.close()


async def run(url: str, vhost: str, connections: int, seconds: float, close: bool = False) -> dict:
    parts = urlsplit(url)
    stats: dict = {"requests": 0, "bytes": 0,
                   "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}}
    latencies: list[float] = []
    start = time.monotonic()
    until = start + seconds
    loop = churn if close else worker
    await asyncio.gather(*(
        loop(parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/", vhost, until,
               stats, latencies)
        for _ in range(connections)))
    stats["duration_us"] = int((time.monotonic() - start) * 1e6)
    latencies.sort()

    def percentile(p: float) -> int:
        if not latencies:
            return 0
        return int(latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1e6)

    stats["p50_us"] = percentile(50)
    stats["p99_us"] = percentile(99)
    return stats


def main() -> None:
    url, vhost, connections, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    close = sys.argv[5:6] == ["close"]
    stats = asyncio.run(run(url, vhost, connections, seconds, close))
    print("BENCH-JSON " + json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
