"""A tiny HTTP/1.1 keep-alive load loop: the smoke mode's stand-in for wrk.

Usage: python bench/pyload.py URL HOST CONNECTIONS SECONDS [close]
       python bench/pyload.py --workload FILE.json [--close-permille N] URL HOST CONNECTIONS SECONDS
("close": a new connection for every request, as wrk with "Connection: close";
--workload: the requests of a varied workload, built by bench/workload.py's
RequestGenerator, the reference bench/varied.lua follows: the same bytes wrk sends.)
Prints one line "BENCH-JSON {...}" with the same fields as bench/report.lua,
plus what the responses were (chunked, closed, distinct request ids) so the
harness can check that the varied workload really varied.
Slow and single-threaded on purpose: it exercises the harness, it does not
measure anything worth publishing.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workload  # noqa: E402


class ResponseError(Exception):
    pass


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], int, bool]:
    """One response: status, headers (last of each name), body bytes, chunked or not."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    size = len(head)
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            length = int(line.split(b";")[0], 16)
            await reader.readexactly(length + 2)
            size += len(line) + length + 2
            if length == 0:
                return status, headers, size, True
    remaining = int(headers.get(b"content-length", b"0"))
    size += remaining
    while remaining:
        chunk = await reader.read(min(remaining, 1 << 20))
        if not chunk:
            raise ResponseError("closed mid-body")
        remaining -= len(chunk)
    return status, headers, size, False


async def connection(host: str, port: int, next_request: Callable[[], tuple[bytes, bool]], until: float,
                     stats: dict, latencies: list[float]) -> bool:
    """
    Requests over one connection until C{until} or a request that closes it;
    False on an error.  The first request is made whatever the clock says: on a
    loaded machine a short window can pass before the connection is open.
    """
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        stats["errors"]["connect"] += 1
        return False
    try:
        first = True
        while first or time.monotonic() < until:
            first = False
            request, close = next_request()
            start = time.monotonic()
            writer.write(request)
            status, headers, size, chunked = await read_response(reader)
            latencies.append(time.monotonic() - start)
            stats["requests"] += 1
            stats["bytes"] += size
            stats["chunked"] += chunked
            request_id = headers.get(b"x-request-id")
            if request_id is not None and b"set-cookie" in headers:
                stats["ids"].add(request_id)
            if status >= 400:
                stats["errors"]["status"] += 1
            if close or headers.get(b"connection", b"").lower() == b"close":
                stats["closed"] += 1
                return True
        return True
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError,
            ResponseError):
        stats["errors"]["read"] += 1
        return False
    finally:
        writer.close()


async def client(host: str, port: int, next_request: Callable[[], tuple[bytes, bool]], until: float,
                 stats: dict, latencies: list[float]) -> None:
    """One of the load's clients: a new connection whenever the last one closed (one at least)."""
    while True:
        if not await connection(host, port, next_request, until, stats, latencies):
            await asyncio.sleep(0.01)
        if time.monotonic() >= until:
            return


async def run(url: str, next_request: Callable[[], tuple[bytes, bool]], connections: int,
              seconds: float) -> dict:
    parts = urlsplit(url)
    stats: dict = {"requests": 0, "bytes": 0, "chunked": 0, "closed": 0, "ids": set(),
                   "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}}
    latencies: list[float] = []
    start = time.monotonic()
    until = start + seconds
    await asyncio.gather(*(client(parts.hostname or "127.0.0.1", parts.port or 80, next_request, until,
                                  stats, latencies)
                           for _ in range(connections)))
    stats["duration_us"] = int((time.monotonic() - start) * 1e6)
    stats["distinct_ids"] = len(stats.pop("ids"))
    latencies.sort()

    def percentile(p: float) -> int:
        if not latencies:
            return 0
        return int(latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1e6)

    stats["p50_us"] = percentile(50)
    stats["p99_us"] = percentile(99)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", help="a workload-NAME.json of bench/workload.py")
    parser.add_argument("--close-permille", type=int, help="override the workload's Connection: close share")
    parser.add_argument("url")
    parser.add_argument("vhost")
    parser.add_argument("connections", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("close", nargs="?", choices=["close"])
    args = parser.parse_args()
    if args.workload:
        generator = workload.RequestGenerator(workload.load_workload(args.workload),
                                              close_permille=args.close_permille)
        # wrk calls request() once to check it before the run and never sends that
        # one; do the same, so both send the same requests.
        generator.next_request()
        next_request = generator.next_request
    else:
        path = urlsplit(args.url).path or "/"
        close = args.close == "close"
        request = (f"GET {path} HTTP/1.1\r\nHost: {args.vhost}\r\n"
                   + ("Connection: close\r\n" if close else "") + "\r\n").encode()

        def next_request() -> tuple[bytes, bool]:
            return request, close

    stats = asyncio.run(run(args.url, next_request, args.connections, args.seconds))
    print("BENCH-JSON " + json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
