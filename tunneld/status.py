# -*- test-case-name: tests.test_observe -*-
"""
C{tunneld status}: the edge's admin API as tables for a person: this
edge's agents and tunnels, then the cluster (every live edge in the state
backend, its agents, and the edges serving each tunnel; with the default
memory backend, this edge alone), then the tables transports keep on this
edge (streamable HTTP's connections and event streams) and the SSE replay
buffers.

A command-line tool with a reactor of its own for its few requests (treq, the
HTTP client tunneld uses wherever it asks something over HTTP); it prints
the tables and exits.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react
from twisted.web.client import Agent, HTTPConnectionPool

DEFAULT_ADMIN = "http://127.0.0.1:8090"
TIMEOUT = 5.0


class AdminUnreadable(Exception):
    """The admin API did not answer, or not with what C{tunneld status} reads."""


async def fetch(
    client: HTTPClient, admin: str, path: str, accept: tuple[int, ...] = (200,),
    json_for: tuple[int, ...] | None = None,
) -> tuple[int, Any]:
    """
    The status and JSON body at C{path} of the admin API at C{admin}; a
    status in C{accept} but not in C{json_for} (default: all of C{accept})
    comes with None, whatever its body.
    """
    url = admin.rstrip("/") + path
    response = await client.get(url, timeout=TIMEOUT)
    body = await response.content()
    if response.code not in accept:
        raise AdminUnreadable(f"{path} answered {response.code}")
    if json_for is not None and response.code not in json_for:
        return response.code, None
    try:
        return response.code, json.loads(body)
    except ValueError:
        raise AdminUnreadable(f"{path} answered something other than JSON") from None


def table(headings: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell."""
    widths = [len(h) for h in headings]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in [headings, *rows]]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines) + "\n"


def _rtt(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def _state(agent: dict[str, Any]) -> str:
    if agent["draining"]:
        return "draining"
    return "healthy" if agent["healthy"] else "unhealthy"


def render(agents: list[dict[str, Any]], tunnels: list[dict[str, Any]],
           refusals: dict[str, Any], ready: bool) -> str:
    out = [f"edge: {'ready' if ready else 'NOT READY'}, {len(agents)} agent session(s), "
           f"{len(tunnels)} tunnel(s)\n\n"]
    out.append(table(
        ["AGENT", "SESSION", "TRANSPORT", "PEER", "RTT", "STREAMS", "STATE", "TUNNELS"],
        [[a["agent"], a["session"][:12], a["transport"], a["peer"], _rtt(a["rtt_ms"]),
          str(a["streams"]), _state(a), ", ".join(a["tunnels"])] for a in agents],
    ))
    out.append("\n")
    out.append(table(
        ["TUNNEL", "SERVED BY"],
        [[t["tunnel"], ", ".join(f"{s['agent']} ({s['transport']})" for s in t["sessions"])]
         for t in tunnels],
    ))
    recent = refusals.get("recent", [])[:10]
    if recent:
        out.append("\nrecent refusals:\n")
        out.append(table(
            ["KIND", "REASON", "HOST", "PEER", "MESSAGE"],
            [[r["kind"], r["reason"], r["host"] + r["target"], r["peer"], r["message"]]
             for r in recent],
        ))
    return "".join(out)


def render_cluster(cluster: dict[str, Any]) -> str:
    """The cluster tables: edges, every edge's agents, and the edges serving each tunnel."""
    edges = cluster["edges"]
    reach = "reachable" if cluster["reachable"] else f"UNREACHABLE: {cluster.get('error', '')}"
    out = [f"\ncluster ({cluster['backend']} state, {reach}): {len(edges)} edge(s)\n\n"]
    out.append(table(
        ["EDGE", "NAME", "STATE", "AGENTS", "TUNNELS", "AGENT URLS"],
        [[e["edge_id"] + (" *" if e["this"] else ""), e["name"],
          "draining" if e["draining"] else "live", str(len(e["agents"])),
          ", ".join(e["tunnels"]), ", ".join(e["agent_urls"])] for e in edges],
    ))
    out.append("\n")
    out.append(table(
        ["EDGE", "AGENT", "SESSION", "TRANSPORT", "TUNNELS"],
        [[e["edge_id"], a["agent"], a["session"][:12], a["transport"], ", ".join(a["tunnels"])]
         for e in edges for a in e["agents"]],
    ))
    out.append("\n")
    out.append(table(
        ["TUNNEL", "SERVED FROM EDGES"],
        [[t["tunnel"], ", ".join(t["edges"])] for t in cluster["tunnels"]],
    ))
    return "".join(out)


def _size(n: int) -> str:
    return f"{n / 1024:.1f}KiB" if n >= 1024 else f"{n}B"


def render_transports(body: dict[str, Any]) -> str:
    """
    The tables transports keep on this edge (streamable HTTP: its
    connections and the event streams held here) and the SSE replay buffers.
    """
    out = []
    for name, tables in sorted(body.get("transports", {}).items()):
        connections = tables.get("connections", [])
        out.append(f"\n{name} connections owned by this edge ({tables.get('edge', '')}): "
                   f"{len(connections)}\n\n")
        out.append(table(
            ["CONNECTION", "AGENT", "PEER", "EVENT STREAM", "NEXT", "ACKED", "HELD", "EARLY",
             "STREAMS", "STATE"],
            [[c["connection"][:12], c.get("agent") or "-", c["peer"], c["event_stream"],
              str(c["next_event"]), str(c["acked"]),
              f"{c['held_events']} ({_size(c['held_bytes'])})", _size(c["early_bytes"]),
              str(c["streams"]), "closing" if c["closing"] else "open"] for c in connections],
        ))
        streams = tables.get("event_streams", [])
        if streams:
            out.append(f"\n{name} event streams held by this edge: {len(streams)}\n\n")
            out.append(table(
                ["CONNECTION", "STREAM", "OWNER", "LAST SENT", "AGE", "PAUSED"],
                [[e["connection"][:12], e["stream"], "here" if e["owned_here"] else "elsewhere",
                  str(e["last_sent"]), f"{e['age_s']}s", "yes" if e["paused"] else "no"]
                 for e in streams],
            ))
    replay = body.get("sse_replay", [])
    if replay:
        out.append(f"\nSSE replay buffers: {len(replay)}\n\n")
        out.append(table(
            ["TUNNEL", "URL", "EVENTS", "BYTES", "OLDEST ID", "CLIENTS", "UPSTREAM"],
            [[r["tunnel"], r["host"] + r["target"], str(r["events"]), _size(r["bytes"]),
              r["oldest_id"] or "-", str(r["clients"]), r["upstream"]] for r in replay],
        ))
    return "".join(out)


def main(argv: list[str], stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """
    C{tunneld status [--admin URL]}: returns the exit status of C{--help} or
    a usage mistake; otherwise shows the tables and exits the process (0, or
    1 when the admin API cannot be read).
    """
    admin = DEFAULT_ADMIN
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            stdout.write("usage: tunneld status [--admin URL]   (default " + DEFAULT_ADMIN + ")\n")
            return 0
        if arg == "--admin" and args:
            admin = args.pop(0)
        elif arg.startswith("--admin="):
            admin = arg.partition("=")[2]
        else:
            stderr.write(f"tunneld status: unexpected argument {arg!r}\n")
            return 2
    if "://" not in admin:
        admin = "http://" + admin
    react(_run, [admin, stdout, stderr])


def _run(reactor: Any, admin: str, stdout: TextIO, stderr: TextIO) -> Deferred[None]:
    """L{show} on C{reactor}; a failure to read the admin API exits with status 1."""
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    async def run() -> None:
        if not await show(client, admin, stdout, stderr):
            raise SystemExit(1)

    return ensureDeferred(run())


async def show(client: HTTPClient, admin: str, stdout: TextIO, stderr: TextIO) -> bool:
    """Print the tables of the edge at C{admin}; False (said on C{stderr}) if it cannot."""
    try:
        agents = (await fetch(client, admin, "/api/agents"))[1]["agents"]
        tunnels = (await fetch(client, admin, "/api/tunnels"))[1]["tunnels"]
        refusals = (await fetch(client, admin, "/api/refusals"))[1]
        code, _ = await fetch(client, admin, "/readyz", accept=(200, 503))
        # An edge from before the cluster view answers 404: no cluster tables.
        cluster_code, cluster = await fetch(
            client, admin, "/api/cluster", accept=(200, 404), json_for=(200,)
        )
        transports_code, transports = await fetch(
            client, admin, "/api/transports", accept=(200, 404), json_for=(200,)
        )
    except Exception as e:  # noqa: BLE001 -- refused, timed out, not the admin API: say which
        stderr.write(f"tunneld status: cannot read the admin API at {admin}: {_why(e)}\n")
        return False
    stdout.write(render(agents, tunnels, refusals, code == 200))
    if cluster_code == 200:
        stdout.write(render_cluster(cluster))
    if transports_code == 200:
        stdout.write(render_transports(transports))
    return True


def _why(error: Exception) -> str:
    """What went wrong, for a person: the connection's own error inside treq's wrapping."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return str(reasons[0].getErrorMessage())
    return str(error) or type(error).__name__
