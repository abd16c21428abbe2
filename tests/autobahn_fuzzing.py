"""
Autobahn|Testsuite's C{fuzzingclient} against an Autobahn echo upstream,
once directly and once through an edge and an agent, and the comparison of
the two verdicts of every case.

Autobahn|Testsuite is Python 2 only: C{scripts/setup-autobahn} installs it
into C{.venv-autobahn}.  Each run (direct, tunnel) is its own C{wstest}
process with its own time budget, because the report is only written at the
end of a run.  Used by C{tests/test_autobahn.py} (the core cases) and
C{bench/autobahn_compression.py} (the permessage-deflate cases).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import serverFromString

from tests.websocket_peers import EchoServerFactory
from tunneld.agent.service import AgentService
from tunneld.config import (
    AgentConfig,
    AgentSection,
    EdgeConfig,
    EdgeSection,
    TunnelSection,
)
from tunneld.edge.service import EdgeService
from tunneld.registry import transport_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WSTEST = os.path.join(ROOT, ".venv-autobahn", "bin", "wstest")
CORE_CASES = [f"{n}.*" for n in range(1, 11)]
COMPRESSION_CASES = ["12.*", "13.*"]
# The name the tunnel serves; resolves to loopback everywhere (/etc/hosts).
TUNNEL_HOST = "localhost"


def find_python2() -> str | None:
    """A Python 2.7 interpreter, as C{scripts/setup-autobahn} would find it."""
    candidates = sorted(glob.glob("/root/.pyenv/versions/2.7*/bin/python2.7"))
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(root, "versions", "2.7*", "bin", "python2.7")))
    found = shutil.which("python2.7")
    if found:
        candidates.append(found)
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


@dataclass
class Verdicts:
    """One fuzzingclient run: case id → (behavior, behaviorClose)."""

    agent: str
    cases: dict[str, tuple[str, str]] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> Counter[str]:
        return Counter(behavior for behavior, _ in self.cases.values())


class _Wstest(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.ended.callback(reason.value)


async def run_wstest(
    reactor: Any, agent: str, url: str, cases: list[str], workdir: str, budget: float
) -> Verdicts:
    """Run the fuzzingclient on C{cases} against C{url}; kill it after C{budget} seconds."""
    outdir = os.path.join(workdir, agent)
    spec = {
        "outdir": outdir,
        "servers": [{"agent": agent, "url": url}],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    spec_path = os.path.join(workdir, f"{agent}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    process = _Wstest()
    started = reactor.seconds()
    transport = reactor.spawnProcess(
        process, WSTEST, [WSTEST, "-m", "fuzzingclient", "-s", spec_path],
        env={"PATH": os.environ.get("PATH", "")}, path=workdir,
    )
    timer = reactor.callLater(budget, transport.signalProcess, "KILL")
    ended = await process.ended
    if timer.active():
        timer.cancel()
    seconds = reactor.seconds() - started
    index = os.path.join(outdir, "index.json")
    if not isinstance(ended, error.ProcessDone) or not os.path.exists(index):
        tail = b"".join(process.output)[-2000:].decode("utf-8", "replace")
        raise RuntimeError(f"wstest ({agent}) failed after {seconds:.0f}s: {ended}\n{tail}")
    with open(index) as f:
        report = json.load(f)[agent]
    verdicts = Verdicts(agent, seconds=seconds)
    for case, result in report.items():
        verdicts.cases[case] = (result["behavior"], result["behaviorClose"])
    return verdicts


class Stack:
    """The echo upstream, an edge and an agent serving it as C{localhost}, in this reactor."""

    def __init__(self, reactor: Any, transport: str = "websocket") -> None:
        self.reactor = reactor
        self.transport = transport
        self.echo = EchoServerFactory()
        self._stops: list[Any] = []

    async def start(self) -> None:
        reactor = self.reactor
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.echo)
        self._stops.append(port.stopListening)
        self.echo_port = port.getHost().port
        section = EdgeSection(
            public_listen=["tcp:0:interface=127.0.0.1"], transports=[self.transport],
            public_url="http://{host}/", admin_listen="",  # no fixed admin port in a test
        )
        tables = {self.transport: {"listen": "tcp:0:interface=127.0.0.1"}}
        config = EdgeConfig(section, [], tables, "(autobahn)")
        edge = EdgeService(
            config, transport_options(section.transports, tables, config.source, edge=True),
            reactor,
        )
        edge.startService()
        self._stops.append(edge.stopService)
        await defer.gatherResults([listener.listening for listener in edge.public])
        link = edge.transports[self.transport]
        await link.listening
        self.edge_port = edge.public[0].address.port
        agent_section = AgentSection(transports=[self.transport])
        agent_tables = {self.transport: {"url": f"ws://127.0.0.1:{link.address.port}/tunnel"}}
        agent_config = AgentConfig(
            agent_section,
            [TunnelSection(TUNNEL_HOST, f"tcp:host=127.0.0.1:port={self.echo_port}")],
            agent_tables, "(autobahn)",
        )
        agent = AgentService(
            agent_config,
            transport_options(
                agent_section.transports, agent_tables, agent_config.source, edge=False
            ),
            reactor,
        )
        agent.startService()
        self._stops.append(agent.stopService)
        await agent.ready

    @property
    def direct_url(self) -> str:
        return f"ws://127.0.0.1:{self.echo_port}"

    @property
    def tunnel_url(self) -> str:
        return f"ws://{TUNNEL_HOST}:{self.edge_port}"

    async def stop(self) -> None:
        while self._stops:
            await self._stops.pop()()
        for conn in list(self.echo.connections):
            conn.transport.abortConnection()
        await self.echo.all_closed()


def differences(direct: Verdicts, tunnel: Verdicts) -> list[str]:
    """Cases whose verdicts differ between the two runs, or that failed either way."""
    problems = []
    for case in sorted(set(direct.cases) | set(tunnel.cases), key=_case_key):
        a, b = direct.cases.get(case), tunnel.cases.get(case)
        if a != b:
            problems.append(f"{case}: direct {a}, tunnel {b}")
        elif a is not None and "FAILED" in a:
            problems.append(f"{case}: FAILED both ways {a}")
    return problems


def _case_key(case: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case.split(".") if part.isdigit())


async def compare(
    reactor: Any, cases: list[str], workdir: str, budget: float, side_by_side: bool = True
) -> tuple[Verdicts, Verdicts]:
    """
    Both runs of C{cases}, each its own process with its own C{budget}
    seconds: side by side (quick, for the core cases) or one after the other,
    so that on a 2-core machine each long run has the cores to itself.
    """
    stack = Stack(reactor)
    await stack.start()
    try:
        def run(agent: str, url: str) -> defer.Deferred[Verdicts]:
            return defer.ensureDeferred(run_wstest(reactor, agent, url, cases, workdir, budget))

        if side_by_side:
            direct, tunnel = await defer.gatherResults(
                [run("direct", stack.direct_url), run("tunnel", stack.tunnel_url)],
                consumeErrors=True,
            )
        else:
            direct = await run("direct", stack.direct_url)
            tunnel = await run("tunnel", stack.tunnel_url)
    finally:
        await stack.stop()
    return direct, tunnel
