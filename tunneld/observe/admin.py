# -*- test-case-name: tests.test_observe -*-
"""
The admin API: a small JSON web service on its own, loopback-by-default listener.

    GET  /healthz                      the process is alive
    GET  /readyz                       every listener is up, not draining (a state backend
                                       that cannot be reached is reported, as degraded)
    GET  /metrics                      Prometheus text exposition
    GET  /api/tunnels                  tunnels and the sessions serving each
    GET  /api/agents                   agent sessions: transport, peer, RTT, streams, health
    GET  /api/refusals                 recent refusals (newest first) and totals by reason
    GET  /api/cluster                  every live edge (state backend), its agents and tunnels,
                                       and the edges serving each tunnel
    GET  /api/transports               the tables transports keep on this edge (streamable HTTP:
                                       its connections and event streams), the SSE replay buffers
    POST /api/agents/SESSION/drain     GOAWAY one session (naming another live edge to move
                                       to): no new streams, in-flight ones finish

Everything is read from the live edge when asked; nothing here is on the
request path of public traffic.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.server import Request

from tunneld.model.keys import tunnel_key
from tunneld.observe.metrics import CONTENT_TYPE, EdgeMetrics
from tunneld.observe.stats import EdgeStats


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


class EdgeView:
    """What the admin API shows of one edge, and the one thing it can do (drain)."""

    def __init__(
        self,
        sessions: Any,
        stats: EdgeStats,
        metrics: EdgeMetrics,
        ready: Callable[[], bool],
        backends: Callable[[], dict[str, bool]] = lambda: {"memory": True},
        policy: Callable[[], dict[str, Any]] = dict,
        problems: Callable[[], list[str]] = list,
        notes: Callable[[], list[str]] = list,
        cluster: Callable[[], Deferred[dict[str, Any]]] | None = None,
        transports: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.sessions = sessions
        self.stats = stats
        self.metrics = metrics
        self.ready = ready
        self.backends = backends
        self.policy = policy
        self.problems = problems  # why the edge should get no traffic (draining, …)
        self.notes = notes  # what is degraded without making the edge unready (a lost Redis)
        self.cluster = cluster  # the cluster view, read from the state backend when asked
        self.transports = transports  # the transports' own tables (streamable HTTP's connections)

    def agents(self) -> list[dict[str, Any]]:
        now = self.sessions.reactor.seconds()
        out = []
        for session in self.sessions.sessions.values():
            link = session.link
            rtt = link.round_trip_time()
            since = self.sessions.connected_at.get(session.session_id, now)
            out.append({
                "session": session.session_id,
                "agent": session.agent_id,
                "transport": link.transport_name,
                "peer": link.peer,
                "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
                "streams": link.active_streams(),
                "healthy": session.healthy,
                "draining": session.draining,
                "tunnels": [tunnel_key(spec) for spec in session.tunnels],
                "connected_seconds": round(now - since, 3),
            })
        out.sort(key=lambda a: (a["agent"], a["session"]))
        return out

    def tunnels(self) -> list[dict[str, Any]]:
        by_key: dict[str, list[dict[str, Any]]] = {}
        for session in self.sessions.sessions.values():
            for spec in session.tunnels:
                by_key.setdefault(tunnel_key(spec), []).append({
                    "session": session.session_id,
                    "agent": session.agent_id,
                    "transport": session.link.transport_name,
                    "usable": session.healthy and not session.draining,
                })
        return [{"tunnel": key, "sessions": sessions} for key, sessions in sorted(by_key.items())]

    def refusals(self) -> dict[str, Any]:
        totals: dict[str, dict[str, int]] = {}
        for (kind, reason), count in self.stats.refusals.items():
            totals.setdefault(kind, {})[reason] = count
        return {"recent": list(reversed(self.stats.recent_refusals)), "totals": totals}


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, view: EdgeView) -> None:
        super().__init__()
        self.view = view


class Healthz(_Leaf):
    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        return _json(request, 200, {"status": "alive"})


class Readyz(_Leaf):
    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        listeners = self.view.ready()
        backends = self.view.backends()
        problems = self.view.problems()
        # A state backend that cannot be reached degrades the edge (local
        # decisions) but leaves it ready: were it otherwise, every edge would
        # leave the load balancer at once when Redis goes.
        ready = listeners and not problems
        return _json(request, 200 if ready else 503, {
            "ready": ready, "listeners": listeners, "backends": backends, "problems": problems,
            "degraded": self.view.notes(),
        })


class Metrics(_Leaf):
    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return self.view.metrics.render()


class Tunnels(_Leaf):
    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        return _json(request, 200, {"tunnels": self.view.tunnels()})


class Refusals(_Leaf):
    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        return _json(request, 200, self.view.refusals())


class Policy(_Leaf):
    """C{GET /api/policy}: the rate-limit and cap counters in use now."""

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        streams = {
            session.session_id: session.link.active_streams()
            for session in self.view.sessions.sessions.values()
        }
        return _json(request, 200, {"counters": self.view.policy(), "agent_streams": streams})


class Cluster(_Leaf):
    """C{GET /api/cluster}: every live edge, its agents and tunnels, and where each tunnel is served."""

    log = Logger()

    def render_GET(self, request: Request) -> Any:  # noqa: N802
        cluster = self.view.cluster
        if cluster is None:
            return _json(request, 404, {"error": "this edge has no cluster view"})

        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(body: dict[str, Any]) -> None:
            if not gone:
                request.write(_json(request, 200, body))
                request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("reading the cluster view failed", failure)
            if not gone:
                request.write(_json(request, 500, {"error": failure.getErrorMessage()}))
                request.finish()

        cluster().addCallbacks(answer, failed)
        return server.NOT_DONE_YET


class Transports(_Leaf):
    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        return _json(request, 200, {"transports": {}, "sse_replay": [], **self.view.transports()})


class Agents(_Leaf):
    """C{GET /api/agents}, and C{POST /api/agents/SESSION/drain}."""

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        if request.postpath and request.postpath != [b""]:
            return _json(request, 404, {"error": "not found"})
        return _json(request, 200, {"agents": self.view.agents()})

    def render_POST(self, request: Request) -> bytes:  # noqa: N802
        path = request.postpath or []
        if len(path) != 2 or path[1] != b"drain":
            return _json(request, 404, {"error": "POST /api/agents/SESSION/drain"})
        session_id = path[0].decode("ascii", "replace")
        session = self.view.sessions.drain(session_id, "drained by an operator")
        if session is None:
            return _json(request, 404, {"error": f"no agent session {session_id}"})
        return _json(request, 200, {
            "session": session.session_id, "agent": session.agent_id, "draining": True,
        })


def _put(parent: resource.Resource, name: bytes, child: resource.Resource) -> resource.Resource:
    parent.putChild(name, child)
    return child


def _is_loopback_name(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.strip("[]").split("]")[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _AdminSite(server.Site):
    """
    Logs only requests that change something (scrapes every few seconds are
    not news).  On a loopback listener it answers only requests addressed to a
    loopback name, so a web page cannot reach it through DNS rebinding.
    """

    def getResourceFor(self, request: Any) -> Any:  # noqa: N802
        local = request.getHost()
        if _is_loopback_name(getattr(local, "host", "")):
            host = (request.getHeader(b"host") or b"").decode("latin-1")
            if not _is_loopback_name(host):
                return resource.ErrorPage(
                    421, "Misdirected Request",
                    "the admin API answers only requests addressed to a loopback name",
                )
        return super().getResourceFor(request)

    def log(self, request: Any) -> None:
        if request.method != b"GET":
            super().log(request)


def admin_site(
    view: EdgeView, mounts: Mapping[tuple[bytes, ...], resource.Resource] | None = None
) -> server.Site:
    """
    The admin API's web site; C{mounts} adds resources other parts of the
    edge serve here, by path (the terminal's C{/api/v1}, page and WebSocket).
    """
    root = resource.Resource()
    root.putChild(b"healthz", Healthz(view))
    root.putChild(b"readyz", Readyz(view))
    root.putChild(b"metrics", Metrics(view))
    api = resource.Resource()
    root.putChild(b"api", api)
    api.putChild(b"tunnels", Tunnels(view))
    api.putChild(b"agents", Agents(view))
    api.putChild(b"policy", Policy(view))
    api.putChild(b"refusals", Refusals(view))
    api.putChild(b"cluster", Cluster(view))
    api.putChild(b"transports", Transports(view))
    for path, child in (mounts or {}).items():
        parent = root
        for name in path[:-1]:
            parent = parent.children.get(name) or _put(parent, name, resource.Resource())
        parent.putChild(path[-1], child)
    site = _AdminSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
