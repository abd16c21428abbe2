"""
Several edges sharing one real redis-server (issue 20): separate `twistd
tunneld` processes on loopback, started from the shipped etc/ configs with
[edge.state] pointed at Redis, and agents as separate processes.

The registry: an edge registers its record (with the URLs agents dial it
by), holds the tunnels of its agents' sessions, releases them on a clean
disconnect and on stop, and an edge killed with SIGKILL is forgotten within
its TTL.  The single-process default still needs no Redis and no setting.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import log
from twisted.trial.unittest import TestCase
from twisted.web import client

from tests import redis_servers, test_processes
from tests.harness import free_port, listen_upstream, open_fds
from tests.redis_servers import eventually, redis_cli, sleep, start_server
from tests.test_processes import TwistdProcess
from tunneld import certs
from tunneld.config import EdgeStateSection, load_agent_config, load_edge_config
from tunneld.interfaces import IStateBackend
from tunneld.state.redis import RedisStateBackend

DEMO = "demo.localhost"
READY = r"tunnel ready: http://demo\.localhost:8080/"
PORTS = {
    'public_listen = ["tcp:8080:interface=127.0.0.1"]': 'public_listen = ["tcp:0:interface=127.0.0.1"]',
    'listen = "tcp:8081:interface=127.0.0.1"': 'listen = "tcp:0:interface=127.0.0.1"',
    'admin_listen = "tcp:8090:interface=127.0.0.1"': 'admin_listen = "tcp:0:interface=127.0.0.1"',
}
STATE = 'backend = "memory"\n'
TTLS = "edge_ttl = 15.0\nheartbeat_interval = 5.0\n"
# Short enough that a test waits a few seconds for an expiry, long enough
# that a busy machine does not miss a heartbeat (under half the TTL).
EDGE_TTL = 4.0
HEARTBEAT = 0.5


class ClusterProcesses(TestCase):
    """Helpers: Redis, edges and agents as processes, and a view of the registry."""

    # A hang guard, not a speed bound: a test here starts several edges, Redis and agents
    # as processes, about 20 s on a quiet machine and up to 175 s seen at load 15 on 2 cores.
    timeout = 480

    spawn = test_processes.ProcessTests.spawn
    shipped = test_processes.ProcessTests.shipped
    harness = test_processes.ProcessTests.harness

    def setUp(self) -> None:
        if redis_servers.MISSING:
            raise self.skipTest(redis_servers.MISSING)

    async def redis(self) -> redis_servers.RedisServer:
        self.server = await start_server(self)
        return self.server

    async def registry(self) -> IStateBackend:
        """A backend in this process reading what the edges wrote."""
        # The edges' busy-machine allowance (see edge()), for this reader too.
        options = EdgeStateSection(backend="redis", redis_url=self.server.url, command_timeout=2.0)
        backend = RedisStateBackend.from_options(reactor, options)
        await backend.start()
        self.addCleanup(backend.close)
        return backend

    async def edge(
        self, name: str, *, redis: bool = True, **replacements: str
    ) -> tuple[TwistdProcess, int, int, str]:
        """An edge process: it, its public and agent-link ports, and its cluster id."""
        changes = {**PORTS, **replacements}
        if redis:
            changes[STATE] = 'backend = "redis"\n'
            changes['redis_url = "redis://127.0.0.1:6379/0"'] = f'redis_url = "{self.server.url}"'
            changes['edge_name = ""'] = f'edge_name = "{name}"'
            changes[TTLS] = f"edge_ttl = {EDGE_TTL}\nheartbeat_interval = {HEARTBEAT}\n"
            # A busy machine can hold a reply up past the default half second;
            # an outage the test makes is a lost connection, seen at once.
            changes["command_timeout = 0.5"] = "command_timeout = 2.0"
        edge = self.spawn("tunneld", self.shipped("tunneld.toml", changes))
        public = await edge.wait_for(r"public HTTP listening on 127\.0\.0\.1:(\d+)")
        link = await edge.wait_for(r"websocket agent link listening on 127\.0\.0\.1:(\d+)")
        admin = await edge.wait_for(r"admin API listening on 127\.0\.0\.1:(\d+)")
        edge.admin_port = int(admin.group(1))  # type: ignore[attr-defined]
        joined = await edge.wait_for(r"edge (\S+) joins the cluster")
        return edge, int(public.group(1)), int(link.group(1)), joined.group(1)

    async def agent(self, link_port: int, **replacements: str) -> tuple[TwistdProcess, Any]:
        upstream_port, upstream = await listen_upstream(self)
        agent = self.spawn("tunneld-agent", self.shipped("agent.toml", {
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "ws://127.0.0.1:{link_port}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
            **replacements,
        }))
        await agent.wait_for(r"tunnel ready: http://demo\.localhost:8080/")
        return agent, upstream


async def _terminated(process: TwistdProcess) -> int | None:
    """SIGTERM; the exit status (None: ended by the signal)."""
    process.process.signalProcess(signal.SIGTERM)
    await process.ended
    code = process.end_reason.value.exitCode
    return None if code is None else int(code)


class RegistryTests(ClusterProcesses):
    async def test_edges_register_and_hold_their_agents_tunnels(self) -> None:
        """Two edges on one Redis: records with agent URLs; a session's tunnel held while up, released on clean disconnect and on stop."""
        await self.redis()
        registry = await self.registry()
        a, _, a_link, a_id = await self.edge("edge-a")
        b, _, b_link, b_id = await self.edge("edge-b")
        self.assertNotEqual(a_id, b_id)

        async def both_advertised() -> bool:
            records = {r.edge_id: r for r in await registry.live_edges()}
            return set(records) == {a_id, b_id} and all(r.agent_urls for r in records.values())

        await eventually(both_advertised, "both edges registered with their agent URLs")
        records = {r.edge_id: r for r in await registry.live_edges()}
        self.assertEqual(records[a_id].agent_urls, (f"ws://127.0.0.1:{a_link}/tunnel",))
        self.assertEqual(records[b_id].agent_urls, (f"ws://127.0.0.1:{b_link}/tunnel",))
        self.assertEqual(records[a_id].name, "edge-a")
        self.assertEqual(len(records[a_id].public_addresses), 1)

        agent, _ = await self.agent(a_link)

        async def held_by(*edges: str) -> bool:
            return await registry.tunnel_edges(DEMO) == sorted(edges)

        await eventually(lambda: held_by(a_id), "edge-a holding demo.localhost")
        self.assertEqual(await registry.edge_tunnels(a_id), [DEMO])
        self.assertEqual(await registry.edge_tunnels(b_id), [])
        # Held past twice the TTL: the heartbeat refreshes it (a wait for an
        # expiry that must not happen has no event to wait for).
        await sleep(EDGE_TTL * 2)
        self.assertEqual(await registry.tunnel_edges(DEMO), [a_id])
        await _terminated(agent)
        await a.wait_for(r"agent link from .* down")
        await eventually(lambda: held_by(), "demo.localhost released on a clean disconnect")

        # Again, then the edge stops (SIGTERM): its record and tunnel go at
        # once, and its GoAway sends the agent to edge-b, which holds it then.
        agent, _ = await self.agent(a_link)
        await eventually(lambda: held_by(a_id), "edge-a holding demo.localhost again")
        self.assertEqual(await _terminated(a), 0)
        self.assertIn(f"edge {a_id} left the cluster", a.output)
        self.assertNotIn(a_id, await registry.tunnel_edges(DEMO))
        self.assertEqual([r.edge_id for r in await registry.live_edges()], [b_id])
        await agent.wait_for(rf"moving to a new link to ws://127\.0\.0\.1:{b_link}/tunnel")
        await eventually(lambda: held_by(b_id), "the agent moved to edge-b")
        self.assertEqual(await _terminated(b), 0)
        self.assertEqual(await registry.live_edges(), [])

    async def test_killed_edge_is_forgotten_within_its_ttl(self) -> None:
        """SIGKILL of an edge (three times): its record and tunnel expire within edge_ttl of its last beat; the other edge stays."""
        await self.redis()
        registry = await self.registry()
        _, _, _, b_id = await self.edge("edge-b")
        for round in range(3):
            a, _, a_link, a_id = await self.edge(f"edge-a{round}")
            agent, _ = await self.agent(a_link)

            async def held(a_id: str = a_id) -> bool:
                return a_id in await registry.tunnel_edges(DEMO)

            await eventually(held, "the killed edge's tunnel registered")
            a.process.signalProcess(signal.SIGKILL)
            await a.ended
            # Redis's own clock bounds the expiry: no entry of the dead edge
            # outlives its last heartbeat by more than edge_ttl.
            now_s, now_us = (await redis_cli(self.server.port, "TIME")).split()
            now_ms = int(now_s) * 1000 + int(now_us) // 1000
            for key in ("tunneld:edges", f"tunneld:tunnel:{DEMO}"):
                score = await redis_cli(self.server.port, "ZSCORE", key, a_id)
                if score.strip():
                    self.assertLessEqual(float(score) - now_ms, EDGE_TTL * 1000, key)

            async def forgotten(a_id: str = a_id) -> bool:
                live = [r.edge_id for r in await registry.live_edges()]
                return a_id not in live and a_id not in await registry.tunnel_edges(DEMO)

            await eventually(forgotten, f"edge {a_id} forgotten after SIGKILL")
            self.assertIn(b_id, [r.edge_id for r in await registry.live_edges()])
            agent.process.signalProcess(signal.SIGKILL)
            await agent.ended
        self.assertEqual([r.edge_id for r in await registry.live_edges()], [b_id])
        self.assertEqual(await registry.tunnel_edges(DEMO), [])


class SingleProcessTests(ClusterProcesses):
    def setUp(self) -> None:
        pass  # no Redis needed

    async def test_default_edge_needs_no_redis_and_no_setting(self) -> None:
        """The shipped config, unchanged but for ports: memory state, an edge that serves, no Redis client loaded."""
        edge, public, link, edge_id = await self.edge("unused", redis=False)
        self.assertIn("(memory state)", edge.output)
        await self.agent(link)
        code, _, body = await self.harness(public).request(DEMO, "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))
        # (not counting the interpreter's path, which may be a checkout named "redis…")
        self.assertNotIn("redis", edge.output.replace(sys.executable, "").lower())
        self.assertEqual(await _terminated(edge), 0)
        self.assertIn(f"edge {edge_id} left the cluster", edge.output)



class ReservationTests(ClusterProcesses):
    """Hostname reservations keyed by the certificate's agent id, on every edge."""

    def pki(self) -> dict[str, str]:
        """A CA, an edge certificate, and agents web1 and web2 both allowed demo.localhost."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        ca = certs.make_ca()
        files: dict[str, str] = {}
        for stem, issued in (
            ("ca", ca),
            ("edge", certs.issue_edge(ca, ["localhost", "127.0.0.1"])),
            ("web1", certs.issue_agent(ca, "web1", [DEMO])),
            ("web2", certs.issue_agent(ca, "web2", [DEMO])),
        ):
            files[stem], files[f"{stem}-key"] = (
                os.path.join(d, f"{stem}.pem"), os.path.join(d, f"{stem}.key")
            )
            issued.write(files[stem], files[f"{stem}-key"])
        return files

    def edge_tls(self, files: dict[str, str]) -> dict[str, str]:
        return {
            'certificate = ""\nkey = ""':
                f'certificate = "{files["edge"]}"\nkey = "{files["edge-key"]}"',
            'client_ca = ""': f'client_ca = "{files["ca"]}"',
        }

    async def cert_agent(
        self, files: dict[str, str], who: str, link: int
    ) -> tuple[TwistdProcess, Any]:
        """Agent C{who} over wss with its certificate; started, not yet welcomed."""
        upstream_port, upstream = await listen_upstream(self)
        agent = self.spawn("tunneld-agent", self.shipped("agent.toml", {
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "wss://127.0.0.1:{link}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
            'id = "demo"\n': "",
            "reconnect_initial = 0.5\nreconnect_max = 30.0":
                "reconnect_initial = 0.1\nreconnect_max = 1.0",
            'ca = ""\ncertificate = ""\nkey = ""\nserver_hostname = ""':
                f'ca = "{files["ca"]}"\ncertificate = "{files[who]}"\n'
                f'key = "{files[who + "-key"]}"\nserver_hostname = "localhost"',
        }))
        return agent, upstream

    async def test_reserved_name_refused_to_another_identity_on_every_edge(self) -> None:
        """web1 holds demo.localhost through edge A; web2 is refused it on A and on B, also after A restarts (and web1 moves to B, named by A's GoAway); web1 still serves it."""
        await self.redis()
        registry = await self.registry()
        files = self.pki()
        a_link = free_port()
        a_changes = {
            **self.edge_tls(files),
            'listen = "tcp:8081:interface=127.0.0.1"': f'listen = "tcp:{a_link}:interface=127.0.0.1"',
        }
        a, a_public, _, a_id = await self.edge("edge-a", **a_changes)
        b, b_public, b_link, b_id = await self.edge("edge-b", **self.edge_tls(files))
        web1, _ = await self.cert_agent(files, "web1", a_link)
        await web1.wait_for(READY)
        self.assertEqual(await registry.name_owner(DEMO), "web1")
        publics = {a_id: a_public, b_id: b_public}
        for rounds in range(2):
            for edge, link in ((b, b_link), (a, a_link)):
                web2, _ = await self.cert_agent(files, "web2", link)
                refused = await web2.wait_for(r"edge refused tunnel demo\.localhost: (\w+) \((.*)\)")
                self.assertEqual(refused.group(1), "unauthorized")
                self.assertIn("reserved by another agent identity", refused.group(2))
                await edge.wait_for(
                    r"(?s)" + r"hostname demo\.localhost is reserved by agent identity web1: "
                    r"refused to web2.*" * (2 if edge is b and rounds else 1)
                )
                web2.process.signalProcess(signal.SIGKILL)
                await web2.ended
            # Public requests reach web1 through the edge holding it, never web2.
            [holder] = await registry.tunnel_edges(DEMO)
            code, _, body = await self.harness(publics[holder]).request(DEMO, "/hello")
            self.assertEqual((code, body), (200, b"hello from upstream"))
            if rounds == 0:
                # The owner's edge restarts (its GoAway sends web1 to edge-b):
                # the reservation is in Redis, not in either edge.
                self.assertEqual(await _terminated(a), 0)
                a, a_public, _, a_id = await self.edge("edge-a", **a_changes)
                publics[a_id] = a_public
                await web1.wait_for(rf"link up over websocket to 127\.0\.0\.1:{b_link}")
                self.assertEqual(await registry.name_owner(DEMO), "web1")

    async def test_reservation_outlives_its_last_session_by_reservation_ttl(self) -> None:
        """With reservation_ttl = 8: web1's last session ends, the reservation lives 8 s more (Redis's TTL), refusing web2 meanwhile, then expires and web2 is granted the name."""
        await self.redis()
        registry = await self.registry()
        files = self.pki()
        ttl = {"reservation_ttl = 0.0": "reservation_ttl = 8.0"}
        a, _, a_link, _ = await self.edge("edge-a", **self.edge_tls(files), **ttl)
        b, b_public, b_link, _ = await self.edge("edge-b", **self.edge_tls(files), **ttl)
        web1, _ = await self.cert_agent(files, "web1", a_link)
        await web1.wait_for(READY)
        # While the session lives the reservation is refreshed with the edge's
        # heartbeat: reservation_ttl plus edge_ttl.
        left = int(await redis_cli(self.server.port, "PTTL", f"tunneld:name:{DEMO}"))
        self.assertTrue(8000 < left <= (8 + EDGE_TTL) * 1000, left)
        web1.process.signalProcess(signal.SIGTERM)
        await a.wait_for(r"agent link from .* down")
        left = int(await redis_cli(self.server.port, "PTTL", f"tunneld:name:{DEMO}"))
        self.assertTrue(0 < left <= 8000, left)
        claim = await registry.claim_name(DEMO, "web2", None)
        self.assertEqual((claim.granted, claim.owner), (False, "web1"))

        async def expired() -> bool:
            return await registry.name_owner(DEMO) is None

        await eventually(expired, "the reservation expired")
        web2, _ = await self.cert_agent(files, "web2", b_link)
        await web2.wait_for(READY)
        self.assertEqual(await registry.name_owner(DEMO), "web2")
        code, _, body = await self.harness(b_public).request(DEMO, "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))


async def admin_get(edge: TwistdProcess, path: str) -> tuple[int, bytes]:
    """GET C{path} from C{edge}'s admin API: status and body."""
    response = await client.Agent(reactor).request(
        b"GET", f"http://127.0.0.1:{edge.admin_port}{path}".encode()  # type: ignore[attr-defined]
    )
    return response.code, await client.readBody(response)


async def metric(edge: TwistdProcess, name: str, default: float | None = None) -> float:
    """One sample of the edge's own metrics (labels included in C{name})."""
    _, body = await admin_get(edge, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if default is not None:
        return default
    raise AssertionError(f"no metric {name} in:\n{body.decode()}")


async def redis_time(port: int) -> float:
    seconds, micros = (await redis_cli(port, "TIME")).split()
    return int(seconds) + int(micros) / 1e6


RATE = 20
LIMITS = {
    "rate = 0.0\n# Requests a tunnel may take at once above its rate (0 = one second's worth).\nburst = 0\n":
        f"rate = {RATE}.0\nburst = {RATE}\n",
}


class SharedLimitTests(ClusterProcesses):
    """Per-tunnel rate limits held for the cluster in Redis, and what happens without it."""

    async def cluster(self, count: int, **changes: str) -> list[tuple[TwistdProcess, int, Any]]:
        """C{count} edges, each with an agent of its own serving demo.localhost."""
        edges = []
        for i in range(count):
            edge, public, link, _ = await self.edge(f"edge-{i}", **LIMITS, **changes)
            _, upstream = await self.agent(link)
            edges.append((edge, public, upstream))
        return edges

    async def test_rate_holds_across_three_edges(self) -> None:
        """rate = 20/s on demo.localhost, load far above it spread over three edges: the requests admitted over the window (Redis's clock) are burst + 20/s x window within 5 %, counted by the clients and by the edges' own metrics alike."""
        await self.redis()
        edges = await self.cluster(3)
        codes: dict[int, int] = {}
        admitted_by: list[int] = [0, 0, 0]
        target = 12 * RATE  # admitted requests to stop at (about 11 s of load)
        start = await redis_time(self.server.port)

        async def worker(index: int) -> None:
            _, public, _ = edges[index]
            harness = self.harness(public)
            while codes.get(200, 0) < target:
                code, headers, _ = await harness.request(DEMO, "/hello")
                codes[code] = codes.get(code, 0) + 1
                if code == 200:
                    admitted_by[index] += 1
                else:
                    self.assertEqual(headers.getRawHeaders(b"tunnel-error"), [b"rate_limited"])

        await defer.gatherResults(
            [defer.ensureDeferred(worker(i % 3)) for i in range(12)], consumeErrors=True
        )
        end = await redis_time(self.server.port)
        admitted = codes[200]
        expected = RATE + RATE * (end - start)
        log.msg(f"cluster rate: admitted {admitted}, expected {expected:.1f} over {end - start:.2f}s "
                f"(Redis clock), by edge {admitted_by}, refused {codes.get(429, 0)}")
        self.assertEqual(set(codes), {200, 429})
        self.assertGreater(codes[429], admitted)  # the load was well above the limit throughout
        self.assertLessEqual(abs(admitted - expected), 0.05 * expected, (admitted, expected, codes))
        self.assertTrue(all(admitted_by), admitted_by)  # every edge admitted some
        by_metrics = [
            await metric(edge, 'tunneld_http_responses_total{code="200"}') for edge, _, _ in edges
        ]
        self.assertEqual(sum(by_metrics), admitted)
        for edge, _, _ in edges:
            self.assertEqual(await metric(edge, "tunneld_state_fallback_decisions_total"), 0)
        self.assertTrue(
            await redis_cli(self.server.port, "EXISTS", f"tunneld:bucket:tunnel-rate:{DEMO}")
        )

    async def test_redis_lost_mid_run_degrades_and_recovers(self) -> None:
        """Redis stopped under two edges (twice): a download in flight finishes, requests are still served with local limits, the edges say so (log, /readyz detail, metrics) and stay ready; Redis back: shared limits and the registry resume without a restart; no agent session dropped."""
        await self.redis()
        registry = await self.registry()
        edges = await self.cluster(2)
        (a, a_public, a_upstream), _ = edges
        for outage in range(1, 3):
            hanging = len(a_upstream.hanging)
            download = defer.ensureDeferred(self.harness(a_public).request(DEMO, "/hang"))
            while len(a_upstream.hanging) <= hanging:
                await sleep(0.01)
            flowing = a_upstream.hanging[-1]
            flowing.setHeader(b"content-length", str(2 << 20).encode())
            flowing.write(b"x" * (1 << 20))
            await self.server.stop()
            for edge, public, _ in edges:
                await edge.wait_for(
                    r"(?s)" + r"state store \S+ unreachable: .*?deciding locally.*?" * outage
                )
                code, _, body = await self.harness(public).request(DEMO, "/hello")
                self.assertEqual((code, body), (200, b"hello from upstream"))
                self.assertEqual(await metric(edge, 'tunneld_state_backend_up{backend="redis"}'), 0)
                self.assertGreater(await metric(edge, "tunneld_state_fallback_decisions_total"), 0)
                self.assertGreaterEqual(await metric(edge, "tunneld_state_outages_total"), outage)
                code, body = await admin_get(edge, "/readyz")
                ready = json.loads(body)
                self.assertEqual((code, ready["ready"]), (200, True), ready)
                self.assertEqual(ready["backends"], {"redis": False})
                [detail] = ready["degraded"]
                self.assertIn("degraded: state store redis unreachable", detail)
            flowing.write(b"y" * (1 << 20))
            flowing.finish()
            code, _, body = await download
            self.assertEqual((code, len(body)), (200, 2 << 20))

            await self.server.start(self.server.port)  # back empty: no persistence
            for edge, public, _ in edges:
                await edge.wait_for(r"(?s)" + r"state store \S+ reachable again.*?" * outage)
                self.assertEqual(await metric(edge, 'tunneld_state_backend_up{backend="redis"}'), 1)
                fallback = await metric(edge, "tunneld_state_fallback_decisions_total")
                for _ in range(3):
                    await self.harness(public).request(DEMO, "/hello")
                self.assertEqual(await metric(edge, "tunneld_state_fallback_decisions_total"), fallback)
                code, body = await admin_get(edge, "/readyz")
                self.assertEqual(json.loads(body)["degraded"], [])
            bucket = await redis_cli(self.server.port, "EXISTS", f"tunneld:bucket:tunnel-rate:{DEMO}")
            self.assertEqual(bucket.strip(), "1")  # the bank decides again

            async def registered_again() -> bool:
                return len(await registry.live_edges()) == 2 and len(
                    await registry.tunnel_edges(DEMO)
                ) == 2

            await eventually(registered_again, "both edges and their tunnels back in Redis")
        for edge, _, _ in edges:
            self.assertEqual(await metric(edge, 'tunneld_agent_sessions{transport="websocket"}'), 1)
            self.assertNotRegex(edge.output, r"agent link from \S+ down")

    async def test_sentinel_failover_is_followed_by_the_edges(self) -> None:
        """Two edges on a Sentinel trio: the primary killed (SIGKILL), a replica promoted, the edges follow without a restart: they re-register there, serve, and the bank there decides their rate."""
        primary = await start_server(self)
        replica = await start_server(self, "--replicaof", "127.0.0.1", str(primary.port))
        assert replica.process is not None
        await replica.process.wait_for("MASTER <-> REPLICA sync: Finished with success")
        sentinels = []
        for _ in range(3):
            sentinels.append(await start_server(
                self,
                f"sentinel monitor main 127.0.0.1 {primary.port} 2",
                "sentinel down-after-milliseconds main 1000",
                "sentinel failover-timeout main 4000",
                "sentinel parallel-syncs main 1",
                kind="sentinel",
            ))
        for sentinel in sentinels:
            assert sentinel.process is not None
            await sentinel.process.wait_for(r"\+slave slave 127\.0\.0\.1:%d" % replica.port)
            await sentinel.process.wait_for(r"\+sentinel sentinel ", count=2)
        self.server = primary
        addresses = ", ".join(f'"127.0.0.1:{s.port}"' for s in sentinels)
        changes = {
            "sentinels = []": f"sentinels = [{addresses}]",
            'sentinel_master = ""': 'sentinel_master = "main"',
        }
        edges = await self.cluster(2, **changes)
        for edge, _, _ in edges:
            await edge.wait_for(rf"connected to 127\.0\.0\.1:{primary.port}")
        assert primary.process is not None
        primary.process.signal("KILL")
        await sentinels[0].process.wait_for(  # type: ignore[union-attr]
            r"\+switch-master main 127\.0\.0\.1 %d 127\.0\.0\.1 %d" % (primary.port, replica.port)
        )
        self.server = replica
        registry = await self.registry()

        async def followed() -> bool:
            return len(await registry.live_edges()) == 2 and len(
                await registry.tunnel_edges(DEMO)
            ) == 2

        await eventually(followed, "both edges registered on the promoted replica")
        for edge, public, _ in edges:
            await edge.wait_for(rf"connected to 127\.0\.0\.1:{replica.port}")

            async def up(edge: TwistdProcess = edge) -> bool:
                # Connected first, then reachable once the store answers: wait for it.
                return await metric(edge, 'tunneld_state_backend_up{backend="redis"}') == 1

            await eventually(up, "the edge to report the store up")
            code, _, body = await self.harness(public).request(DEMO, "/hello")
            self.assertEqual((code, body), (200, b"hello from upstream"))
            self.assertNotRegex(edge.output, r"agent link from \S+ down")
        await redis_cli(replica.port, "DEL", f"tunneld:bucket:tunnel-rate:{DEMO}")
        for _, public, _ in edges:
            for _ in range(3):
                await self.harness(public).request(DEMO, "/hello")
        bucket = await redis_cli(replica.port, "EXISTS", f"tunneld:bucket:tunnel-rate:{DEMO}")
        self.assertEqual(bucket.strip(), "1")


class DrainTests(ClusterProcesses):
    """A drained edge's GoAway names another live edge; its agents move there."""

    async def test_drains_move_agents_with_no_failed_request(self) -> None:
        """Three drains in a row (SIGTERM) of an edge serving agents, under clients that retry on a refused connection or a 503 draining: zero failed requests, the in-flight download finishes on the old edge, the agents go where the GoAway says, the drained edge exits 0; afterwards two sessions, no leaked fds, no reconnect storm."""
        await self.redis()
        registry = await self.registry()
        drain = {"drain_timeout = 30.0": "drain_timeout = 20.0"}
        a, a_public, a_link, a_id = await self.edge("edge-a", **drain)
        b, b_public, b_link, b_id = await self.edge("edge-b", **drain)
        quick = {"reconnect_initial = 0.5\nreconnect_max = 30.0":
                 "reconnect_initial = 0.2\nreconnect_max = 2.0"}
        agents = [await self.agent(a_link, **quick), await self.agent(b_link, **quick)]
        upstreams = [upstream for _, upstream in agents]
        serving = [a_public, b_public]  # where the clients send (edges holding the tunnel)
        failures: list[str] = []
        codes: dict[int, int] = {}
        stop = [False]

        async def retrying_client(turn: int) -> None:
            while not stop[0]:
                for attempt in range(400):
                    port = serving[(turn + attempt) % len(serving)]
                    try:
                        code, headers, body = await self.harness(port).request(DEMO, "/hello")
                    except Exception as e:  # refused, or closed before an answer: try again
                        await sleep(0.02)
                        last = repr(e)
                        continue
                    if code == 503 and headers.getRawHeaders(b"tunnel-error") == [b"draining"]:
                        last = "503 draining"
                        await sleep(0.02)
                        continue
                    codes[code] = codes.get(code, 0) + 1
                    if (code, body) != (200, b"hello from upstream"):
                        failures.append(f"{code} {headers.getRawHeaders(b'tunnel-error')} {body!r}")
                    break
                else:
                    failures.append(f"gave up after 400 tries: {last}")
                turn += 1

        clients = [defer.ensureDeferred(retrying_client(i)) for i in range(4)]

        async def stop_clients() -> None:
            stop[0] = True
            await defer.gatherResults(clients, consumeErrors=True)

        self.addCleanup(lambda: defer.ensureDeferred(stop_clients()))
        fds = [open_fds(agent.process.pid) for agent, _ in agents]
        live = {a_id: (a, a_public, a_link), b_id: (b, b_public, b_link)}
        old_id, new_id = a_id, b_id
        for round in range(3):
            # Drain the edge serving agents; the other one (with no agent
            # after the first round) takes them.
            old, old_public, _ = live[old_id]
            new, new_public, new_link = live[new_id]
            await eventually(
                lambda old_id=old_id: self._held_by(registry, old_id),  # type: ignore[misc]
                f"round {round}: {old_id} holds demo",
            )
            marks = [len(agent.output) for agent, _ in agents]
            hanging = sum(len(u.hanging) for u in upstreams)
            in_flight = defer.ensureDeferred(self.harness(old_public).request(DEMO, "/hang"))
            while sum(len(u.hanging) for u in upstreams) <= hanging:
                await sleep(0.01)
            [request] = [r for u in upstreams for r in u.hanging if not r.finished][-1:]
            old.process.signalProcess(signal.SIGTERM)
            await old.wait_for(r"draining: \d+ streams in flight")
            # Clients learn of an edge once it holds the tunnel (a request
            # for a tunnel held only elsewhere is for the relay, issue 20's
            # next part); the drained edge refuses connections meanwhile.
            await eventually(
                lambda new_id=new_id: self._held_by(registry, new_id),  # type: ignore[misc]
                f"round {round}: {new_id} holds demo",
            )
            if new_public not in serving:
                serving.append(new_public)
            request.write(b"finished on the old edge")
            request.finish()
            code, _, body = await in_flight
            self.assertEqual((code, body), (200, b"finished on the old edge"))
            await old.ended
            serving.remove(old_public)
            self.assertEqual(old.end_reason.value.exitCode, 0)
            self.assertIn("drained: every stream in flight finished", old.output)
            await eventually(
                lambda new_id=new_id: self._held_by(registry, new_id, only=True),  # type: ignore[misc]
                f"round {round}: only {new_id} holds demo",
            )
            # Every agent of the drained edge was told where to go, and went there.
            for (agent, _), mark in zip(agents, marks, strict=True):
                since = agent.output[mark:]
                if "edge is draining" in since:
                    self.assertIn(f"moving to a new link to ws://127.0.0.1:{new_link}/tunnel", since)
                    self.assertIn(f"link up over websocket to 127.0.0.1:{new_link}", since)
                    # One dial to the named edge: no reconnect storm.
                    self.assertLessEqual(since.count("connecting to the edge"), 2, since)
            del live[old_id]
            # A new edge joins for the next round.
            edge, public, link, edge_id = await self.edge(f"edge-{round + 3}", **drain)
            live[edge_id] = (edge, public, link)
            old_id, new_id = new_id, edge_id
        await stop_clients()
        self.assertEqual(failures, [])
        self.assertGreater(codes.get(200, 0), 0)
        sessions = 0
        for edge, _, _ in live.values():
            sessions += int(await metric(edge, 'tunneld_agent_sessions{transport="websocket"}', 0))
        self.assertEqual(sessions, 2)
        for (agent, _), before in zip(agents, fds, strict=True):
            self.assertLessEqual(open_fds(agent.process.pid), before + 4)
        log.msg(f"drains: {codes} with no failure")

    async def _held_by(self, registry: IStateBackend, edge_id: str, only: bool = False) -> bool:
        holders = await registry.tunnel_edges(DEMO)
        return holders == [edge_id] if only else edge_id in holders


class EdgeListTests(ClusterProcesses):
    async def test_agent_with_several_edges_moves_when_one_is_killed(self) -> None:
        """An agent listing a dead edge, A and B (edge_urls) skips the dead one; A killed with SIGKILL: it reconnects to B and traffic continues there; the registry forgets A."""
        await self.redis()
        registry = await self.registry()
        a, _, a_link, a_id = await self.edge("edge-a")
        b, b_public, b_link, b_id = await self.edge("edge-b")
        nowhere = free_port()
        urls = ", ".join(
            f'"ws://127.0.0.1:{port}/tunnel"' for port in (nowhere, a_link, b_link)
        )
        agent, _ = await self.agent(0, **{
            "edge_urls = []": f"edge_urls = [{urls}]",
            "reconnect_initial = 0.5\nreconnect_max = 30.0":
                "reconnect_initial = 0.2\nreconnect_max = 2.0",
        })
        self.assertIn(f"cannot connect to ws://127.0.0.1:{nowhere}/tunnel", agent.output)
        await a.wait_for(r"agent demo registered demo\.localhost")
        self.assertNotIn(f"to 127.0.0.1:{b_link}", agent.output)
        a.process.signalProcess(signal.SIGKILL)
        await a.ended
        await agent.wait_for(rf"link up over websocket to 127\.0\.0\.1:{b_link}")
        code, _, body = await self.harness(b_public).request(DEMO, "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))

        async def only_b() -> bool:
            live = [r.edge_id for r in await registry.live_edges()]
            return live == [b_id] and await registry.tunnel_edges(DEMO) == [b_id]

        await eventually(only_b, "the registry to forget the killed edge")
        self.assertEqual(await registry.edge_tunnels(a_id), [])


class ClusterViewTests(ClusterProcesses):
    async def test_api_cluster_and_status_show_edges_agents_and_tunnels(self) -> None:
        """GET /api/cluster on either edge lists both edges, each one's agents and the edges serving demo.localhost; `tunneld status` prints the same; with Redis gone the view is this edge alone, saying why."""
        await self.redis()
        a, _, a_link, a_id = await self.edge("edge-a")
        b, _, b_link, b_id = await self.edge("edge-b")
        await self.agent(a_link)
        await self.agent(b_link)

        async def complete() -> bool:
            for edge in (a, b):
                view = json.loads((await admin_get(edge, "/api/cluster"))[1])
                if len(view["edges"]) != 2 or not all(e["agents"] for e in view["edges"]):
                    return False
            return True

        await eventually(complete, "both edges' agents in the cluster view")
        for edge, me in ((a, a_id), (b, b_id)):
            code, body = await admin_get(edge, "/api/cluster")
            view = json.loads(body)
            self.assertEqual((code, view["backend"], view["reachable"]), (200, "redis", True))
            self.assertEqual(view["this_edge"], me)
            self.assertEqual([e["edge_id"] for e in view["edges"]], sorted([a_id, b_id]))
            for record in view["edges"]:
                self.assertEqual(record["this"], record["edge_id"] == me)
                self.assertEqual([agent["agent"] for agent in record["agents"]], ["demo"])
                self.assertEqual(record["tunnels"], [DEMO])
            self.assertEqual(view["tunnels"], [{"tunnel": DEMO, "edges": sorted([a_id, b_id])}])
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tunneld.cli", "status", "--admin",
                             f"127.0.0.1:{a.admin_port}"],  # type: ignore[attr-defined]
            env=dict(os.environ, PYTHONPATH=test_processes.ROOT),
        )
        text = out.decode()
        self.assertEqual(code, 0, err)
        self.assertIn("cluster (redis state, reachable): 2 edge(s)", text)
        self.assertRegex(text, rf"{re.escape(a_id)} \*\s+edge-a\s+live\s+1\s+{re.escape(DEMO)}")
        self.assertRegex(text, rf"{re.escape(DEMO)}\s+{re.escape(', '.join(sorted([a_id, b_id])))}")

        await self.server.stop()
        await a.wait_for(r"state store \S+ unreachable")
        code, body = await admin_get(a, "/api/cluster")
        view = json.loads(body)
        self.assertEqual((code, view["reachable"]), (200, False))
        self.assertEqual([e["edge_id"] for e in view["edges"]], [a_id])
        self.assertTrue(view["error"])


class OperationsDocTests(TestCase):
    """docs/operations.md's cluster configs are ones the tools accept, as written."""

    def section(self) -> str:
        with open(os.path.join(test_processes.ROOT, "docs", "operations.md")) as f:
            text = f.read()
        return text[text.index("## Several edges behind HAProxy"):]

    def test_tunneld_configs_load(self) -> None:
        """Every TOML block loads as an edge (or agent) configuration, with the certificate paths made real."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        ca = certs.make_ca()
        files = {}
        for stem, issued in (
            ("agents-ca", ca), ("edges-ca", ca),
            ("edge", certs.issue_edge(ca, ["tunnel.example.com"])),
            ("wildcard.example.com", certs.issue_edge(ca, ["*.example.com"])),
            ("web1", certs.issue_agent(ca, "web1", ["app.example.com"])),
        ):
            cert, key = os.path.join(d, f"{stem}.pem"), os.path.join(d, f"{stem}.key")
            issued.write(cert, key)
            files[f"/etc/tunneld/{stem}.pem"], files[f"/etc/tunneld/{stem}.key"] = cert, key
        blocks = re.findall(r"```toml\n(.*?)```", self.section(), re.S)
        self.assertEqual(len(blocks), 3)
        for i, block in enumerate(blocks):
            for old, new in files.items():
                block = block.replace(old, new)
            path = os.path.join(d, f"block{i}.toml")
            with open(path, "w") as f:
                f.write(block)
            if "[agent]" in block:
                agent = load_agent_config(path)
                self.assertEqual(len(agent.agent.edge_urls), 4)
            else:
                edge = load_edge_config(path)
                self.assertEqual(edge.edge.state.backend, "redis")

    def test_haproxy_config_is_valid(self) -> None:
        """haproxy -c accepts the HAProxy block."""
        haproxy = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
        )
        if haproxy is None:
            raise self.skipTest("haproxy is not installed (scripts/setup-tests installs it)")
        [block] = re.findall(r"```haproxy\n(.*?)```", self.section(), re.S)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(block.replace("log /dev/log local0", "log stdout local0"))
        result = subprocess.run([haproxy, "-c", "-f", path], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
