"""
The target for bench/slowloris: an upstream, an edge and an agent in one
process on loopback, as tests/harness.py wires them.  Writes the public
port to the file named by argv[1] once the tunnel is up; runs until killed.
"""

from __future__ import annotations

import sys

from twisted.internet import defer, reactor, task
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from tests.harness import TunnelHarness, listen_upstream


class _Case:
    """Just enough of a TestCase for the harness: cleanups are dropped at exit."""

    def addCleanup(self, *args: object) -> None:  # noqa: N802
        pass


async def main(port_file: str, header_timeout: float) -> None:
    case = _Case()
    harness = TunnelHarness(case, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
    await harness.start_edge(header_timeout=header_timeout)
    port, _ = await listen_upstream(case)
    await harness.start_agent(
        {"url": f"ws://127.0.0.1:{harness.link_address().port}/tunnel"}, [("app.test", port)]
    )
    with open(port_file, "w") as f:
        f.write(str(harness.public_port))
    await defer.Deferred()  # until killed


if __name__ == "__main__":
    info = LogLevelFilterPredicate(LogLevel.info)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [info])]
    )
    task.react(lambda _r: defer.ensureDeferred(main(sys.argv[1], float(sys.argv[2]))))
    _ = reactor
