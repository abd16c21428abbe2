# -*- test-case-name: tests.test_observe -*-
"""
C{tunneld status}: the edge's admin API as tables for a person.

A command-line tool, so it blocks: one C{urllib} request per table, no reactor.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

DEFAULT_ADMIN = "http://127.0.0.1:8090"


def fetch(admin: str, path: str, timeout: float = 5.0) -> Any:
    """The JSON at C{path} of the admin API at C{admin}."""
    with urllib.request.urlopen(admin.rstrip("/") + path, timeout=timeout) as response:
        return json.load(response)


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


def main(argv: list[str], stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """C{tunneld status [--admin URL]}; returns the exit status."""
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
    try:
        agents = fetch(admin, "/api/agents")["agents"]
        tunnels = fetch(admin, "/api/tunnels")["tunnels"]
        refusals = fetch(admin, "/api/refusals")
        try:
            ready = bool(fetch(admin, "/readyz")["ready"])
        except urllib.error.HTTPError as e:
            ready = e.code == 200
    except (OSError, ValueError) as e:
        stderr.write(f"tunneld status: cannot read the admin API at {admin}: {e}\n")
        return 1
    stdout.write(render(agents, tunnels, refusals, ready))
    return 0
