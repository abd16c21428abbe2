"""
The cross-edge relay (issue 20): a request entering an edge that does not
hold its tunnel is carried to the edge that does, over a relay link.

Process tests: `twistd tunneld` edges on loopback sharing a real
redis-server, each with a cluster certificate (`tunneld.certs`), an agent
with its own certificate on one edge, and real clients (curl for HTTP/1.1
and HTTP/2, Autobahn for WebSocket) on the other.  Unit tests of the pieces
that need no process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from cryptography import x509
from OpenSSL.crypto import X509
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python import log
from twisted.trial.unittest import TestCase

from tests.harness import Upstream, free_port, listen_upstream
from tests.redis_servers import eventually
from tests.tcp_peers import EchoUpstream, connect_tcp, listen_tcp_upstream
from tests.test_cluster import DEMO, ClusterProcesses, admin_get
from tests.test_processes import TwistdProcess, spawn
from tunneld import certs
from tunneld.edge.relay import (
    RELAY_PREFIX,
    RelayDialer,
    RelayPeers,
    _Toward,
    relay_options,
    spec_of_key,
    splice_streams,
)
from tunneld.interfaces import EdgeRecord
from tunneld.model.keys import held_key, tcp_of_key
from tunneld.model.messages import Hello, TunnelSpec
from tunneld.model.reasons import Reason
from tunneld.plugins.tunneld_transports import grpc, websocket
from tunneld.router import Router
from tunneld.state.memory import MemoryStateBackend
from tunneld.tls import certificate_proves_edge

CURL = shutil.which("curl")


class KeysAndOptionsTests(TestCase):
    def test_spec_of_key(self) -> None:
        """A registry key names the HTTP tunnel it came from (hostname, then path prefix)."""
        self.assertEqual(spec_of_key("demo.localhost"), TunnelSpec("demo.localhost"))
        self.assertEqual(spec_of_key("*.x.test/api"), TunnelSpec("*.x.test", "/api"))

    def test_tcp_tunnels_are_held_with_their_port(self) -> None:
        """A TCP tunnel is held in the registry as NAME:PORT (a hostname has no colon), an HTTP one by its key."""
        self.assertEqual(held_key(TunnelSpec("db", protocol="tcp", port=10005), 10005), "db:10005")
        self.assertEqual(held_key(TunnelSpec("x.test", "/api")), "x.test/api")
        self.assertEqual(tcp_of_key("db:10005"), ("db", 10005))
        self.assertIsNone(tcp_of_key("x.test/api:1"))
        self.assertIsNone(tcp_of_key("demo.localhost"))

    def test_relay_options_dial_an_agent_url(self) -> None:
        """An agent URL in an edge's record becomes the agent options of the transport that dials it, or None."""
        options: Any = relay_options(websocket, "wss://127.0.0.1:9/tunnel")
        self.assertEqual(options.url, "wss://127.0.0.1:9/tunnel")
        options = relay_options(grpc, "grpcs://127.0.0.1:9")
        self.assertEqual((options.address, options.tls), ("127.0.0.1:9", True))
        self.assertIsNone(relay_options(websocket, "grpc://127.0.0.1:9"))


class EdgeCertificateTests(TestCase):
    def test_cluster_certificate_proves_its_edge_only(self) -> None:
        """A cluster certificate names its edge (service_identity URI-ID); an agent's certificate names none."""
        ca = certs.make_ca()
        edge = X509.from_cryptography(certs.issue_cluster_edge(ca, "edge-a", ["127.0.0.1"]).certificate)
        self.assertIsNone(certificate_proves_edge(edge, "edge-a"))
        problem = certificate_proves_edge(edge, "edge-b")
        self.assertIn("does not name edge tunneld-edge://edge-b", problem or "")
        agent = X509.from_cryptography(certs.issue_agent(ca, "edge-a", [DEMO]).certificate)
        self.assertIsNotNone(certificate_proves_edge(agent, "edge-a"))


class _Echo(WebSocketServerProtocol):  # type: ignore[misc]
    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803
        self.sendMessage(payload, isBinary)


class _EchoingUpstream(Upstream):
    """The harness upstream, with a WebSocket echo at C{/ws}."""

    def __init__(self) -> None:
        super().__init__()
        factory = WebSocketServerFactory()
        factory.protocol = _Echo
        self.ws = WebSocketResource(factory)

    def render(self, request: Any) -> Any:
        if request.path == b"/ws":
            return self.ws.render(request)
        return super().render(request)


class _Client(WebSocketClientProtocol):  # type: ignore[misc]
    waiting: defer.Deferred[bytes] | None = None

    def onOpen(self) -> None:  # noqa: N802
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.callback(payload)

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:  # noqa: N802,N803
        if not self.factory.closed.called:
            self.factory.closed.callback(None)
        if not self.factory.opened.called:
            self.factory.opened.errback(Exception(f"closed before opening: {code} {reason}"))

    def ask(self, payload: bytes) -> defer.Deferred[bytes]:
        self.waiting = defer.Deferred()
        self.sendMessage(payload, isBinary=True)
        return self.waiting


async def websocket_echo(public_port: int, host: str, payload: bytes) -> bytes:
    """Open a WebSocket to C{host}/ws through an edge, send one message, return the echo."""
    factory = WebSocketClientFactory(f"ws://{host}/ws")
    factory.protocol = _Client
    factory.opened = defer.Deferred()
    factory.closed = defer.Deferred()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", public_port)
    await endpoint.connect(factory)
    client: _Client = await factory.opened
    try:
        return await client.ask(payload)
    finally:
        client.sendClose(1000)
        await factory.closed  # the close handshake's timers end with it


class RelayProcesses(ClusterProcesses):
    """Edges with cluster certificates (mTLS relay links), agents with their own."""

    def pki(self, *edges: str) -> dict[str, str]:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        ca = certs.make_ca()
        files: dict[str, str] = {}
        issued = [("ca", ca), ("web1", certs.issue_agent(ca, "web1", [DEMO, "ghost.localhost", "db"]))]
        issued += [(name, certs.issue_cluster_edge(ca, name, ["localhost", "127.0.0.1"])) for name in edges]
        for stem, one in issued:
            files[stem], files[f"{stem}-key"] = (
                os.path.join(d, f"{stem}.pem"), os.path.join(d, f"{stem}.key")
            )
            one.write(files[stem], files[f"{stem}-key"])
        return files

    def keep_log(self, name: str, process: TwistdProcess) -> None:
        """The process's output in the test's temporary directory, for a person reading a failure."""
        def write() -> None:
            with open(os.path.join(os.path.dirname(self.mktemp()), f"{name}.log"), "w") as f:
                f.write(process.output)
        self.addCleanup(write)

    async def tls_edge(self, files: dict[str, str], name: str, **more: str) -> tuple[TwistdProcess, int, int, str]:
        return await self.edge(name, **{
            'certificate = ""\nkey = ""':
                f'certificate = "{files[name]}"\nkey = "{files[name + "-key"]}"',
            'client_ca = ""': f'client_ca = "{files["ca"]}"',
            **more,
        })

    async def cert_agent(
        self, files: dict[str, str], link: int, *more_links: int, **more: str
    ) -> tuple[TwistdProcess, Upstream]:
        upstream_port, upstream = await listen_upstream(self, _EchoingUpstream())
        urls = ", ".join(f'"wss://127.0.0.1:{port}/tunnel"' for port in (link, *more_links))
        agent = self.spawn("tunneld-agent", self.shipped("agent.toml", {
            "edge_urls = []": f"edge_urls = [{urls}]" if more_links else "edge_urls = []",
            "reconnect_initial = 0.5\nreconnect_max = 30.0":
                "reconnect_initial = 0.1\nreconnect_max = 1.0",
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "wss://127.0.0.1:{link}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
            'id = "demo"\n': "",
            'ca = ""\ncertificate = ""\nkey = ""\nserver_hostname = ""':
                f'ca = "{files["ca"]}"\ncertificate = "{files["web1"]}"\n'
                f'key = "{files["web1-key"]}"\nserver_hostname = "localhost"',
            **more,
        }))
        self.keep_log("agent", agent)
        await agent.wait_for(r"tunnel ready: http://demo\.localhost:8080/")
        return agent, upstream

    async def curl(self, *args: str) -> tuple[int, str, bytes]:
        """curl's exit status, its "HTTP-version status" line, and the body."""
        if CURL is None:
            raise self.skipTest("curl is not installed (scripts/setup-tests installs it)")
        out, err, code = await getProcessOutputAndValue(
            CURL, ["-s", "-S", "--max-time", "60", "-w", r"\n%{http_version} %{http_code}", *args],
            env=dict(os.environ),
        )
        body, _, status = out.rpartition(b"\n")
        return code, status.decode(), body


HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
)


class KilledEdgeTests(RelayProcesses):
    timeout = 120

    async def haproxy(self, *ports: int) -> int:
        """HAProxy in TCP mode with PROXY v2 in front of C{ports}; its port once it answers."""
        if HAPROXY is None:
            raise self.skipTest("haproxy is not installed (scripts/setup-tests installs it)")
        front = free_port()
        servers = "".join(f"    server e{i} 127.0.0.1:{port}\n" for i, port in enumerate(ports))
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                "global\n    maxconn 1000\n"
                "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 2m\n"
                "    timeout server 2m\n    retries 3\n    option redispatch\n"
                f"frontend public\n    bind 127.0.0.1:{front}\n    default_backend edges\n"
                "backend edges\n    balance roundrobin\n"
                "    default-server check inter 300ms fall 1 rise 2 send-proxy-v2\n" + servers
            )
        spawn(self, [HAPROXY, "-db", "-f", path])

        async def answers() -> bool:
            code, status, _ = await self.curl("-H", f"Host: {DEMO}", f"http://127.0.0.1:{front}/hello")
            return status.endswith(" 200")

        await eventually(answers, "HAProxy to answer")
        return front

    async def test_kill_an_edge_behind_haproxy(self) -> None:
        """Three edges behind HAProxy (TCP, PROXY v2); the agent on edge B; six requests in flight through HAProxy; B killed with SIGKILL: those relayed through A or C fail with 502 agent_gone (Tunnel-Error), those on B's own connections with a reset; the agent moves to C and every later request through HAProxy answers, also those entering A (relayed to C now)."""
        await self.redis()
        files = self.pki("edge-a", "edge-b", "edge-c")
        proxy = {
            "proxy_protocol = false": "proxy_protocol = true",
            "trusted_proxies = []": 'trusted_proxies = ["127.0.0.1"]',
        }
        a, a_public, _, a_id = await self.tls_edge(files, "edge-a", **proxy)
        b, b_public, b_link, b_id = await self.tls_edge(files, "edge-b", **proxy)
        c, c_public, c_link, c_id = await self.tls_edge(files, "edge-c", **proxy)
        for edge, name in ((a, "edge-a"), (b, "edge-b"), (c, "edge-c")):
            self.keep_log(name, edge)
        agent, upstream = await self.cert_agent(files, b_link, c_link)
        for edge in (a, c):
            await edge.wait_for(rf"relay link up from edge {b_id}")

            async def knows(edge: TwistdProcess = edge) -> bool:
                return ["demo.localhost"] in [p["tunnels"] for p in (await _cluster(edge))["relays"]]

            await eventually(knows, "edges A and C to learn that B holds the tunnel")
        front = await self.haproxy(a_public, b_public, c_public)
        # Six requests the upstream holds (no answer yet), spread over the edges.
        before = len(upstream.hanging)
        held = [
            defer.ensureDeferred(
                self.curl("-i", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{front}/hang")
            )
            for _ in range(6)
        ]

        async def all_held() -> bool:
            return len(upstream.hanging) - before == 6

        await eventually(all_held, "six requests held by the upstream")
        b.process.signalProcess("KILL")
        await b.ended
        named = reset = 0
        for code, status, body in [await one for one in held]:
            if code == 0:
                self.assertEqual(status, "1.1 502", body)
                self.assertIn(b"tunnel-error: agent_gone", body.lower())
                named += 1
            else:
                self.assertIn(code, (52, 56), body)  # empty reply / connection reset: B's own
                reset += 1
        self.assertGreater(named, 0)
        self.assertEqual(named + reset, 6)
        await agent.wait_for(rf"link up over websocket to 127\.0\.0\.1:{c_link}")

        async def relayed_to_c() -> bool:
            _, status, _ = await self.curl("-H", f"Host: {DEMO}", "--haproxy-protocol",
                                           f"http://127.0.0.1:{a_public}/hello")
            return status.endswith(" 200")

        await eventually(relayed_to_c, "edge A to relay to edge C")
        for _ in range(30):
            code, status, body = await self.curl(
                "-H", f"Host: {DEMO}", f"http://127.0.0.1:{front}/hello"
            )
            self.assertEqual((code, status, body), (0, "1.1 200", b"hello from upstream"))
        log.msg(f"edge killed behind HAProxy: {named} streams named agent_gone, {reset} reset")
        # A keeps a relay link from C only, with no stream left on it; B's is gone.
        view = await _cluster(a)
        self.assertEqual([(p["edge"], p["streams"]) for p in view["relays"]], [(c_id, 0)])


class RepeatedKillTests(RelayProcesses):
    timeout = 300

    async def test_the_holding_edge_killed_five_times(self) -> None:
        """Edge B, holding the agent's tunnel, is killed with SIGKILL five times in a row (restarted on the same agent port each time) while requests enter edge A: each request held through A when B dies fails 502 agent_gone, every other request answers or names its reason; afterwards A has as many fds as after the first kill, no relay link and no stream left."""
        await self.redis()
        files = self.pki("edge-a", "edge-b")
        a, a_public, _, a_id = await self.tls_edge(files, "edge-a")
        self.keep_log("edge-a", a)
        b_link = free_port()
        fixed = {'listen = "tcp:8081:interface=127.0.0.1"': f'listen = "tcp:{b_link}:interface=127.0.0.1"'}
        agent = upstream = None
        reasons: dict[str, int] = {}
        fds: list[int] = []
        pid = a.process.pid

        async def ask(path: str) -> None:
            code, status, body = await self.curl(
                "-i", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{a_public}{path}"
            )
            if status.endswith(" 200"):
                reasons["200"] = reasons.get("200", 0) + 1
                return
            self.assertEqual(code, 0, body)
            named = [line for line in body.lower().splitlines() if line.startswith(b"tunnel-error:")]
            self.assertTrue(named, body)
            reason = named[0].split(b":", 1)[1].strip().decode()
            reasons[reason] = reasons.get(reason, 0) + 1

        for round in range(5):
            b, _, _, b_id = await self.tls_edge(files, "edge-b", **fixed)
            self.keep_log(f"edge-b-{round}", b)
            if agent is None:
                agent, upstream = await self.cert_agent(files, b_link)
            else:
                await b.wait_for(r"agent \S+ registered demo\.localhost")
            await _knows(a, b_id)
            before = len(upstream.hanging)
            held = [defer.ensureDeferred(self.curl(
                "-i", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{a_public}/hang"
            )) for _ in range(3)]
            await eventually(
                _async(lambda before=before, upstream=upstream: len(upstream.hanging) - before == 3),
                "three requests held",
            )
            others = [defer.ensureDeferred(ask("/hello")) for _ in range(3)]
            b.process.signalProcess("KILL")
            await b.ended
            for code, status, body in [await one for one in held]:
                self.assertEqual((code, status), (0, "1.1 502"), body)
                self.assertIn(b"tunnel-error: agent_gone", body.lower())
            for one in others:
                await one

            async def settled() -> bool:
                view = await _cluster(a)
                return not view["relays"] and not view["relay_links"]

            await eventually(settled, "edge A to drop its relay links to the dead edge")
            fds.append(len(os.listdir(f"/proc/{pid}/fd")))
        log.msg(f"holding edge killed 5 times: A's fds after each {fds}; other requests {reasons}")
        # (A dials the dead edge's record until it expires: a failing dial's socket may be open at a look.)
        await eventually(
            _async(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= fds[0]), "A's fds back to the first count"
        )
        view = await _cluster(a)
        self.assertEqual((view["relays"], view["relay_links"]), ([], []))
        code, body = await admin_get(a, "/api/agents")
        self.assertEqual(json.loads(body).get("agents", []), [], body)


class RelayTests(RelayProcesses):
    timeout = 180  # a guard against a hang, never a speed assertion (the suite runs on a loaded machine)

    async def test_every_tunnel_answers_from_every_edge(self) -> None:
        """An agent on edge B only: its tunnel answers through edge A too, relayed (HTTP/1.1 and HTTP/2 with curl, WebSocket with Autobahn, a 1 MiB upload and download), the same as through B."""
        await self.redis()
        files = self.pki("edge-a", "edge-b")
        h2c = {"public_h2c_listen = []": 'public_h2c_listen = ["tcp:0:interface=127.0.0.1"]'}
        a, a_public, _, a_id = await self.tls_edge(files, "edge-a", **h2c)
        self.keep_log("edge-a", a)
        a_h2c = int((await a.wait_for(r"public HTTP/2 \(h2c\) listening on 127\.0\.0\.1:(\d+)")).group(1))
        b, b_public, b_link, b_id = await self.tls_edge(files, "edge-b")
        self.keep_log("edge-b", b)
        web1, upstream = await self.cert_agent(files, b_link)
        await a.wait_for(rf"relay link up from edge {b_id}")
        await b.wait_for(rf"relay link to edge {a_id} up over websocket")

        async def a_knows() -> bool:
            # A reads which tunnels B holds each heartbeat (or on a miss, once a second at most).
            return ["demo.localhost"] in [p["tunnels"] for p in (await _cluster(a))["relays"]]

        await eventually(a_knows, "edge A to learn that edge B holds the tunnel")
        for port in (a_public, b_public):
            self.assertEqual(await websocket_echo(port, DEMO, b"x" * 70000), b"x" * 70000)
            code, status, body = await self.curl(
                "--http1.1", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{port}/hello"
            )
            self.assertEqual((code, status, body), (0, "1.1 200", b"hello from upstream"))
        code, status, body = await self.curl(
            "--http2-prior-knowledge", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{a_h2c}/hello"
        )
        self.assertEqual((code, status, body), (0, "2 200", b"hello from upstream"))
        # Bodies both ways, streamed across both hops.
        blob = os.path.abspath(self.mktemp())
        with open(blob, "wb") as f:
            f.write(os.urandom(1 << 20))
        code, status, body = await self.curl(
            "--http1.1", "-H", f"Host: {DEMO}", "--data-binary", f"@{blob}",
            f"http://127.0.0.1:{a_public}/sha256",
        )
        with open(blob, "rb") as f:
            self.assertEqual(body.decode(), hashlib.sha256(f.read()).hexdigest())
        code, status, body = await self.curl(
            "--http1.1", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{a_public}/bytes/1048576"
        )
        self.assertEqual((code, status, len(body)), (0, "1.1 200", 1 << 20))
        self.assertEqual(await websocket_echo(a_public, DEMO, b"x" * 70000), b"x" * 70000)

    async def test_a_relayed_stream_is_never_relayed_again(self) -> None:
        """The registry says edge A holds ghost.localhost and edge B does too, while neither has an agent for it: a request entering either edge is relayed once, refused by the other edge with no_tunnel (naming it), never bounced back; the relay links carry no stream afterwards."""
        await self.redis()
        registry = await self.registry()
        files = self.pki("edge-a", "edge-b")
        a, a_public, a_link, a_id = await self.tls_edge(files, "edge-a")
        b, b_public, b_link, b_id = await self.tls_edge(files, "edge-b")
        await a.wait_for(rf"relay link up from edge {b_id}")
        await b.wait_for(rf"relay link up from edge {a_id}")
        # A lie in the registry that would make a loop if a relayed stream were routed like a public one.
        for edge_id in (a_id, b_id):
            await registry.hold_tunnels(edge_id, ["ghost.localhost"], 60.0)
        for edge in (a, b):
            async def believed(edge: TwistdProcess = edge) -> bool:
                return ["ghost.localhost"] in [p["tunnels"] for p in (await _cluster(edge))["relays"]]
            await eventually(believed, "the edges believe the other holds ghost.localhost")
        for port in (a_public, b_public):
            for _ in range(3):
                code, status, body = await self.curl(
                    "--http1.1", "-i", "-H", "Host: ghost.localhost", f"http://127.0.0.1:{port}/x"
                )
                self.assertEqual(status, "1.1 404", body)
                self.assertIn(b"tunnel-error: no_tunnel", body.lower())
        # Each edge refused the three requests the other relayed to it, by name, and was
        # brought exactly three streams: none came back, none went round.
        for edge, other in ((a, "edge-b"), (b, "edge-a")):
            view = await _cluster(edge)
            self.assertEqual(view["relayed_here"], {"brought": 3, "served": 0})
            self.assertEqual([p["streams"] for p in view["relays"]], [0])
            self.assertEqual([p["streams"] for p in view["relay_links"]], [0])
            await edge.wait_for(
                rf"(?s)(relayed to edge {other}/\S+: no tunnel is registered.*){{3}}"
            )

    async def test_drains_over_relay_links(self) -> None:
        """Three edges, the agent on B: a request entering A (relayed to B) is in flight when B drains; B's GoAway moves the agent, the held request still answers 200, every request entering A or C meanwhile answers or names its reason, and B exits 0.  Then a request relayed out by the edge that enters it, which drains: its drain waits for it (200), and it exits 0."""
        await self.redis()
        files = self.pki("edge-a", "edge-b", "edge-c")
        started = [await self.tls_edge(files, name) for name in ("edge-a", "edge-b", "edge-c")]
        (a, a_public, a_link, a_id), (b, _, b_link, b_id), (c, c_public, c_link, c_id) = started
        for edge, name in ((a, "edge-a"), (b, "edge-b"), (c, "edge-c")):
            self.keep_log(name, edge)
        agent, upstream = await self.cert_agent(files, b_link, a_link, c_link)
        for edge in (a, c):
            await _knows(edge, b_id)
        held = defer.ensureDeferred(
            self.curl("-i", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{a_public}/hang")
        )
        await eventually(_async(lambda: len(upstream.hanging) == 1), "the request held upstream")
        b.process.signalProcess(signal.SIGTERM)
        await b.wait_for(r"draining: 1 streams in flight on 1 agent sessions")
        moved = await agent.wait_for(
            rf"link up over websocket to 127\.0\.0\.1:({a_link}|{c_link})"
        )
        holder, enter, enter_public, holder_id, enter_id = (
            (a, c, c_public, a_id, c_id) if int(moved.group(1)) == a_link
            else (c, a, a_public, c_id, a_id)
        )
        refused: list[str] = []

        async def answers(public: int) -> bool:
            code, status, body = await self.curl(
                "-i", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{public}/hello"
            )
            if status.endswith(" 200"):
                return True
            self.assertEqual(code, 0)
            error = [line for line in body.lower().splitlines() if line.startswith(b"tunnel-error:")]
            self.assertTrue(error, body)  # not served: a named reason
            refused.append(error[0].decode().strip())
            return False

        for public in (a_public, c_public):
            await eventually(lambda public=public: answers(public), "requests during B's drain to answer")
        upstream.hanging[0].write(b"late")
        upstream.hanging[0].finish()
        code, status, body = await held
        self.assertEqual((code, status), (0, "1.1 200"), body)
        self.assertTrue(body.endswith(b"late"), body)
        self.assertEqual(await _exit_code(b), 0)
        # The edge entered drains with a request it relays out to the holder.
        await _knows(enter, holder_id)
        held = defer.ensureDeferred(
            self.curl("-i", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{enter_public}/hang")
        )
        await eventually(_async(lambda: len(upstream.hanging) == 2), "the request held upstream")
        enter.process.signalProcess(signal.SIGTERM)
        await enter.wait_for(r"draining: 1 streams in flight on 0 agent sessions and [12] relay links")
        upstream.hanging[1].write(b"later")
        upstream.hanging[1].finish()
        code, status, body = await held
        self.assertEqual((code, status), (0, "1.1 200"), body)
        self.assertTrue(body.endswith(b"later"), body)
        self.assertEqual(await _exit_code(enter), 0)
        await holder.wait_for(rf"relay link to edge {enter_id} down")
        log.msg(f"drains over relay links: refused meanwhile {refused or 'none'}")

    async def test_a_relay_link_is_not_one_agent(self) -> None:
        """Edge A (max_streams_per_agent 1, relay_max_streams 2) relays to B (max_streams_per_agent 2): two streams on the relay link pass A (not one agent's), a third is refused at A, cap_reached (the pair's cap); B caps the agent's own session: a relayed stream past its 2 is refused by B, cap_reached, named."""
        await self.redis()
        files = self.pki("edge-a", "edge-b")
        a, a_public, _, a_id = await self.tls_edge(files, "edge-a", **{
            "max_streams_per_agent = 10000": "max_streams_per_agent = 1",
            "relay_max_streams = 10000": "relay_max_streams = 2",
        })
        b, b_public, b_link, b_id = await self.tls_edge(files, "edge-b", **{
            "max_streams_per_agent = 10000": "max_streams_per_agent = 2",
        })
        for edge, name in ((a, "edge-a"), (b, "edge-b")):
            self.keep_log(name, edge)
        _, upstream = await self.cert_agent(files, b_link)
        await _knows(a, b_id)

        def hang(port: int) -> defer.Deferred[tuple[int, str, bytes]]:
            return defer.ensureDeferred(
                self.curl("-i", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{port}/hang")
            )

        held = [hang(a_public), hang(a_public)]
        await eventually(_async(lambda: len(upstream.hanging) == 2), "two relayed requests held")
        code, status, body = await self.curl("-i", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{a_public}/x")
        self.assertEqual(status, "1.1 503", body)
        self.assertIn(b"tunnel-error: cap_reached", body.lower())
        upstream.hanging[0].finish()  # (whichever of the two it is)
        first, index = await defer.DeferredList(held, fireOnOneCallback=True, consumeErrors=True)
        self.assertEqual(first[1], "1.1 200")
        held.pop(index)
        held.append(hang(b_public))  # on B directly: the agent's session carries 2 again
        await eventually(_async(lambda: len(upstream.hanging) == 3), "the direct request held")
        code, status, body = await self.curl("-i", "-H", f"Host: {DEMO}", f"http://127.0.0.1:{a_public}/x")
        self.assertEqual(status, "1.1 503", body)
        self.assertIn(b"tunnel-error: cap_reached", body.lower())
        # (The reset's text, from B, is in A's log of the refusal.)
        await a.wait_for(r"relayed to edge edge-b/\S+: the agent session carries 2 streams already")
        for request in upstream.hanging[1:]:
            request.finish()
        for one in held:
            self.assertEqual((await one)[1], "1.1 200")

    async def test_a_tcp_tunnel_answers_on_the_other_edge(self) -> None:
        """A TCP tunnel whose agent is on edge B: edge A (its own tcp_listen_interface) listens on the same port once it learns B holds it, and a raw TCP client entering A reaches the agent's upstream through the relay link, bytes both ways (a 256 KiB echo), half-close included."""
        await self.redis()
        files = self.pki("edge-a", "edge-b")
        a, _, _, a_id = await self.tls_edge(files, "edge-a", **{
            'tcp_listen_interface = "127.0.0.1"': 'tcp_listen_interface = "127.0.0.2"',
        })
        b, _, b_link, b_id = await self.tls_edge(files, "edge-b")
        for edge, name in ((a, "edge-a"), (b, "edge-b")):
            self.keep_log(name, edge)
        echo, _ = await listen_tcp_upstream(self, EchoUpstream)
        agent, _ = await self.cert_agent(files, b_link, **{
            '# [[tunnels]]\n# hostname = "ssh"\n# upstream = "tcp:host=127.0.0.1:port=22"\n'
            '# protocol = "tcp"\n# remote_port = 10022':
                f'[[tunnels]]\nhostname = "db"\nupstream = "tcp:host=127.0.0.1:port={echo}"\n'
                'protocol = "tcp"\nremote_port = 0',
        })
        port = int((await agent.wait_for(r"tunnel ready: tcp://127\.0\.0\.1:(\d+)")).group(1))
        await a.wait_for(rf"tcp tunnel listening on 127\.0\.0\.2:{port}")
        client = await connect_tcp(self, port, "127.0.0.2")
        payload = os.urandom(256 * 1024)
        client.transport.write(payload)
        await client.wait_for(payload)
        client.transport.loseWriteConnection()
        await client.got_eof  # the upstream saw the half-close and closed its side
        await client.lost
        self.assertFalse(client.was_reset())
        view = await _cluster(b)
        self.assertEqual(view["relayed_here"], {"brought": 1, "served": 1})


def _async(check: Any) -> Any:
    async def asked() -> bool:
        return bool(check())
    return asked


async def _knows(edge: TwistdProcess, holder: str) -> None:
    """Wait until C{edge} has learnt that edge C{holder} holds the demo tunnel."""
    async def knows() -> bool:
        return any(
            p["edge"] == holder and p["tunnels"] == ["demo.localhost"]
            for p in (await _cluster(edge))["relays"]
        )
    await eventually(knows, f"the edge to learn that {holder} holds the tunnel")


async def _exit_code(process: TwistdProcess) -> int | None:
    await process.ended
    code = process.end_reason.value.exitCode
    return None if code is None else int(code)


async def _cluster(edge: TwistdProcess) -> dict[str, Any]:
    """The edge's /api/cluster."""
    code, body = await admin_get(edge, "/api/cluster")
    assert code == 200, body
    view: dict[str, Any] = json.loads(body)
    return view



class CertsCommandTests(TestCase):
    def test_certs_edge_with_edge_name(self) -> None:
        """`tunneld certs edge --edge-name` issues a cluster certificate that proves the edge; a bad name is refused by option."""
        import io
        from contextlib import redirect_stderr, redirect_stdout

        d = os.path.abspath(self.mktemp())
        with redirect_stdout(io.StringIO()):
            self.assertEqual(certs.main(["ca", "--dir", d]), 0)
            self.assertEqual(
                certs.main(["edge", "--dir", d, "--edge-name", "edge-a", "--host", "127.0.0.1"]), 0
            )
        with open(os.path.join(d, "edge-edge-a.pem"), "rb") as f:
            issued = X509.from_cryptography(x509.load_pem_x509_certificate(f.read()))
        self.assertIsNone(certificate_proves_edge(issued, "edge-a"))
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(
                certs.main(["edge", "--dir", d, "--edge-name", "a.b", "--host", "127.0.0.1"]), 2
            )
        self.assertIn("--edge-name: edge name 'a.b'", err.getvalue())


class _Link:
    """A relay link as L{RelayPeers} sees it: a certificate, controls sent, streams counted."""

    transport_name = "fake"
    peer = "127.0.0.1:1"

    def __init__(self, certificate: Any) -> None:
        self.peer_certificate = certificate
        self.sent: list[Any] = []

    def send_control(self, message: Any) -> None:
        self.sent.append(message)

    def active_streams(self) -> int:
        return 0


class _CountingBackend(MemoryStateBackend):
    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.asked = 0

    def edge_tunnels(self, edge_id: str) -> defer.Deferred[list[str]]:
        self.asked += 1
        return super().edge_tunnels(edge_id)


class RelayPeersTests(TestCase):
    def peers(self) -> tuple[RelayPeers, _CountingBackend, Clock, Any]:
        clock = Clock()
        backend = _CountingBackend(clock)
        ca = certs.make_ca()
        certificate = X509.from_cryptography(
            certs.issue_cluster_edge(ca, "edge-b", ["127.0.0.1"]).certificate
        )
        record = EdgeRecord("edge-b/1", "edge-b")
        return RelayPeers(backend, clock, lambda: [record], certificate_proves_edge), backend, clock, certificate

    def test_hello_checks_the_edge_and_its_certificate(self) -> None:
        """A relay hello is accepted from a live edge whose certificate names it; refused, by name, from an unknown edge, without a certificate, or with another edge's."""
        peers, _, _, certificate = self.peers()
        self.assertIn("not a live edge", peers.hello(_Link(certificate), Hello(RELAY_PREFIX + "edge-x/1", ())) or "")
        self.assertIn("needs the edge's client certificate",
                      peers.hello(_Link(None), Hello(RELAY_PREFIX + "edge-b/1", ())) or "")
        ca = certs.make_ca()
        other = X509.from_cryptography(certs.issue_cluster_edge(ca, "edge-c", ["127.0.0.1"]).certificate)
        self.assertIn("does not name edge tunneld-edge://edge-b",
                      peers.hello(_Link(other), Hello(RELAY_PREFIX + "edge-b/1", ())) or "")
        link = _Link(certificate)
        self.assertIsNone(peers.hello(link, Hello(RELAY_PREFIX + "edge-b/1", ())))
        self.assertEqual([type(m).__name__ for m in link.sent], ["Welcome"])

    def test_misses_ask_the_registry_at_most_once_a_second(self) -> None:
        """A peer's tunnels come from the registry; requests for names nobody serves ask it at most once a second, however many arrive; a held tunnel then routes to the peer's link."""
        peers, backend, clock, certificate = self.peers()
        link = _Link(certificate)
        peers.hello(link, Hello(RELAY_PREFIX + "edge-b/1", ()))
        asked = backend.asked
        for _ in range(100):
            self.assertEqual(peers.route("nobody.test", "/"), Reason.NO_TUNNEL)
        self.assertEqual(backend.asked, asked)
        self.successResultOf(backend.hold_tunnels("edge-b/1", ["app.test/api"], 60.0))
        clock.advance(1.0)
        found = self.successResultOf(defer.maybeDeferred(peers.route, "app.test", "/api/x"))
        self.assertEqual((found.tunnel, found.link), ("app.test/api", link))
        self.assertEqual(backend.asked, asked + 1)
        self.assertEqual(peers.route("app.test", "/other"), Reason.NO_TUNNEL)
        peers.forget(link)
        self.assertEqual(peers.route("app.test", "/api/x"), Reason.NO_TUNNEL)


class _Stream:
    """One end of a stream as splice_streams uses it: what it was told, and its producer."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.producer: Any = None
        self.receiver: Any = None

    def attach(self, receiver: Any) -> None:
        self.receiver = receiver

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def send_reply(self, reply: Any) -> None:
        self.events.append(("reply", reply))

    def write(self, data: bytes) -> None:
        self.events.append(("data", bytes(data)))

    def end(self, trailers: Any = ()) -> None:
        self.events.append(("end", trailers))

    def reset(self, reason: Reason, message: str) -> None:
        self.events.append(("reset", reason))


class SpliceTests(TestCase):
    def test_events_cross_and_each_stream_produces_for_the_other(self) -> None:
        """A relayed stream and its local stream: each is the other's push producer (backpressure both ways); data, ends, the reply and resets cross over."""
        relayed, local = _Stream(), _Stream()
        splice_streams(relayed, local)  # type: ignore[arg-type]
        self.assertIs(relayed.producer, local)
        self.assertIs(local.producer, relayed)
        relayed.receiver.data_received(b"request body")
        relayed.receiver.end_received(())
        self.assertEqual(local.events, [("data", b"request body"), ("end", ())])
        self.assertIsNone(local.producer)
        toward_relayed = _Toward(relayed, relayed=True)  # type: ignore[arg-type]
        toward_relayed.reply_received("head")  # type: ignore[arg-type]
        toward_relayed.data_received(b"response")
        toward_relayed.reset_received(Reason.AGENT_GONE, "gone")
        self.assertEqual(relayed.events, [("reply", "head"), ("data", b"response"),
                                          ("reset", Reason.AGENT_GONE)])
        self.assertIsNone(relayed.producer)


class _FailingPlugin:
    """A transport whose dials fail, saying why (what the test says)."""

    name = "websocket"

    def __init__(self) -> None:
        self.why = "Connection was refused by other side: 111: Connection refused."
        self.dials = 0

    def agent_options(self, table: dict[str, object], where: str) -> Any:
        return table

    def connect(self, options: Any, setup: Any) -> defer.Deferred[Any]:
        self.dials += 1
        return defer.fail(ConnectionRefusedError(self.why))


class DialerLogTests(TestCase):
    def test_a_failing_dial_is_logged_when_it_changes(self) -> None:
        """An edge whose relay dial fails every heartbeat is warned about once, again only when the reason changes, and once more after it was gone from the registry and came back."""
        clock = Clock()
        record = EdgeRecord("edge-b/1", "edge-b", agent_urls=("wss://127.0.0.1:9/tunnel",))
        edges = [record]
        plugin = _FailingPlugin()
        dialer = RelayDialer(
            Router(), clock, lambda: "edge-a/1", lambda: list(edges),
            [(plugin, None)], None, 1.0,  # type: ignore[list-item,arg-type]
        )
        events: list[dict[str, Any]] = []
        dialer.log = Logger(observer=events.append)
        dialer.startService()
        self.addCleanup(dialer.stopService)

        def warned() -> list[str]:
            return [e["problem"] for e in events if "problem" in e]

        for _ in range(10):
            clock.advance(1.0)
        self.assertEqual(plugin.dials, 10)
        self.assertEqual(len(warned()), 1)
        plugin.why = "a TLS handshake failure"
        for _ in range(10):
            clock.advance(1.0)
        self.assertEqual(len(warned()), 2)
        self.assertIn("a TLS handshake failure", warned()[-1])
        edges.clear()
        clock.advance(1.0)
        edges.append(record)
        clock.advance(1.0)
        self.assertEqual(len(warned()), 3)
