# -*- test-case-name: tests.test_probes -*-
"""
C{/healthz} and C{/readyz} for load balancers and orchestrators.

C{/healthz} answers 200 while the process runs its reactor (liveness).
C{/readyz} answers 200 only while the edge should be sent traffic: every
public listener is listening and the edge is not draining; otherwise 503 with
the reasons, one a line.  What is degraded without making the edge unready
(a state store that cannot be reached: the edge decides locally) follows
the C{ok} of a 200, one a line, starting C{degraded:}.  Served on their own (loopback by default) endpoint,
C{[edge] health_listen}, so probes never compete with tunnel hostnames; the
resources are plain C{twisted.web} leaves that an admin API can mount too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web import resource, server
from twisted.web.server import Request

__all__ = ["ProbeRoot", "probe_site"]


class _Probe(resource.Resource):
    isLeaf = True

    def __init__(
        self, problems: Callable[[], list[str]], notes: Callable[[], list[str]] = list
    ) -> None:
        super().__init__()
        self._problems = problems
        self._notes = notes

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        problems = self._problems()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if problems:
            request.setResponseCode(503)
            return ("\n".join(problems) + "\n").encode("utf-8")
        return ("".join(f"{line}\n" for line in ["ok", *self._notes()])).encode("utf-8")

    render_HEAD = render_GET  # noqa: N815


class ProbeRoot(resource.Resource):
    """C{/healthz} (alive) and C{/readyz} (ready for traffic)."""

    def __init__(
        self, not_ready: Callable[[], list[str]], notes: Callable[[], list[str]] = list
    ) -> None:
        super().__init__()
        self.putChild(b"healthz", _Probe(lambda: []))
        self.putChild(b"readyz", _Probe(not_ready, notes))


class _ProbeSite(server.Site):
    """Probes arrive every few seconds and change nothing: no access log lines."""

    noisy = False  # its listener logs where it listens

    def log(self, request: Any) -> None:
        """Not logged (see the class)."""


def probe_site(
    not_ready: Callable[[], list[str]], notes: Callable[[], list[str]] = list
) -> server.Site:
    site = _ProbeSite(ProbeRoot(not_ready, notes))
    site.displayTracebacks = False
    return site
