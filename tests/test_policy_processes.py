"""
Policy with real twistd processes started from the shipped etc/ configs:
kill -STOP of an agent (eviction on heartbeat timeout, traffic moves to the
other agent), SIGTERM drain with downloads in flight, SIGHUP reload of a rate
limit (and rejection of a bad file).
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from tests import test_processes
from tests.harness import free_port, listen_upstream, sleep
from tests.test_processes import TwistdProcess

DEMO = "demo.localhost"
# Every listener on port 0: a fixed admin port shared with another edge on
# the machine now stops this one at start, as it should.
PORTS = {
    'public_listen = ["tcp:8080:interface=127.0.0.1"]': 'public_listen = ["tcp:0:interface=127.0.0.1"]',
    'listen = "tcp:8081:interface=127.0.0.1"': 'listen = "tcp:0:interface=127.0.0.1"',
    'admin_listen = "tcp:8090:interface=127.0.0.1"': 'admin_listen = "tcp:0:interface=127.0.0.1"',
}
HEARTBEAT = "heartbeat_interval = 10.0\nheartbeat_timeout = 30.0"


class PolicyProcessTests(TestCase):
    # Each test starts several twistd processes (an edge restart drains and
    # starts again): on a 2-core machine kept busy by other work a test's
    # process starts alone can take a minute.  The bound is for a hang, not a
    # speed limit; the assertions wait for events.
    timeout = 300

    spawn = test_processes.ProcessTests.spawn
    shipped = test_processes.ProcessTests.shipped
    harness = test_processes.ProcessTests.harness

    async def edge(self, **replacements: str) -> tuple[TwistdProcess, int, int, str]:
        config = self.shipped("tunneld.toml", {**PORTS, **replacements})
        edge = self.spawn("tunneld", config)
        public = await edge.wait_for(r"public HTTP listening on 127\.0\.0\.1:(\d+)")
        link = await edge.wait_for(r"websocket agent link listening on 127\.0\.0\.1:(\d+)")
        return edge, int(public.group(1)), int(link.group(1)), config

    async def agent(self, link_port: int, **replacements: str) -> tuple[TwistdProcess, Any]:
        upstream_port, upstream = await listen_upstream(self)
        agent = self.spawn("tunneld-agent", self.shipped("agent.toml", {
            **replacements,
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "ws://127.0.0.1:{link_port}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
        }))
        await agent.wait_for(r"tunnel ready: http://demo\.localhost:8080/")
        return agent, upstream

    async def test_stopped_agent_is_evicted_and_traffic_moves(self) -> None:
        """kill -STOP of one agent: evicted at heartbeat_timeout after its last ping (the edge's own ping tick is far off); requests go to the other."""
        # The edge pings once in ten minutes; only a deadline armed on the
        # last sign of life (the agents' pings every 0.3 s) can evict in time.
        edge, public, link, _ = await self.edge(**{
            HEARTBEAT: "heartbeat_interval = 600.0\nheartbeat_timeout = 3.0"
        })
        pinging = {HEARTBEAT: "heartbeat_interval = 0.3\nheartbeat_timeout = 30.0"}
        stopped, stopped_upstream = await self.agent(link, **pinging)
        running, running_upstream = await self.agent(link, **pinging)
        await edge.wait_for(r"(?s)registered demo\.localhost.*registered demo\.localhost")
        stopped.process.signalProcess(signal.SIGSTOP)  # type: ignore[attr-defined]
        await edge.wait_for(r"silent for [\d.]+s: closing")
        await edge.wait_for(r"agent link from .* down \(agent_gone")
        before = stopped_upstream.requests
        harness = self.harness(public)
        codes = [(await harness.request(DEMO, "/hello"))[0] for _ in range(10)]
        self.assertEqual(codes, [200] * 10)
        self.assertEqual(stopped_upstream.requests, before)
        self.assertGreaterEqual(running_upstream.requests, 10)
        # Only the stopped agent went silent: the running one's pings kept it alive.
        self.assertEqual(len(re.findall(r"silent for [\d.]+s: closing", edge.output)), 1)

    async def test_sigterm_drains_in_flight_downloads(self) -> None:
        """SIGTERM: listeners close, agents get GOAWAY, a download in flight completes, one past the deadline gets 503 draining, exit 0."""
        edge, public, link, _ = await self.edge(**{"drain_timeout = 30.0": "drain_timeout = 3.0"})
        agent, upstream = await self.agent(link)
        harness = self.harness(public)
        download = defer.ensureDeferred(harness.request(DEMO, "/hang"))
        while len(upstream.hanging) < 1:  # one at a time: hanging[0] is the download
            await sleep(0.01)
        stuck = defer.ensureDeferred(harness.request(DEMO, "/hang"))
        while len(upstream.hanging) < 2:
            await sleep(0.01)
        flowing = upstream.hanging[0]
        flowing.setHeader(b"content-length", b"2097152")
        flowing.write(b"x" * (1 << 20))
        edge.process.signalProcess(signal.SIGTERM)  # type: ignore[attr-defined]
        await edge.wait_for(r"draining: 2 streams in flight on 1 agent sessions")
        await agent.wait_for(r"edge is draining")
        with self.assertRaises(ConnectionRefusedError):
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", public), Protocol())
        flowing.write(b"y" * (1 << 20))
        flowing.finish()
        code, _, body = await download
        self.assertEqual((code, len(body)), (200, 2 << 20))
        code, headers, _ = await stuck
        self.assertEqual((code, headers.getRawHeaders(b"tunnel-error")), (503, [b"draining"]))
        await edge.ended
        self.assertEqual(edge.end_reason.value.exitCode, 0)  # type: ignore[attr-defined]
        self.assertIn("drain deadline passed: closing 1 streams with draining", edge.output)
        # Every policy slot was given back, and the summary is a sentence, not a dict.
        self.assertRegex(edge.output, r"edge stopped; refusals since start: \S")
        self.assertNotIn("policy slots still held", edge.output)
        self.assertNotIn("{'", edge.output)

    async def restarted_edges(self, transport: str) -> None:
        """
        Three times: SIGTERM an edge serving two agents with a request in
        flight, then start a new edge on the same ports.  Count the agents'
        link set-ups over each drain and look for links closed by a stale
        welcome timer.
        """
        public, link = free_port(), free_port()
        edge_changes = {
            'public_listen = ["tcp:8080:interface=127.0.0.1"]':
                f'public_listen = ["tcp:{public}:interface=127.0.0.1"]',
            'listen = "tcp:8081:interface=127.0.0.1"': f'listen = "tcp:{link}:interface=127.0.0.1"',
            'admin_listen = "tcp:8090:interface=127.0.0.1"': 'admin_listen = "tcp:0:interface=127.0.0.1"',
            "drain_timeout = 30.0": "drain_timeout = 2.0",
        }
        agent_changes = {
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "ws://127.0.0.1:{link}/tunnel"',
            "reconnect_initial = 0.5\nreconnect_max = 30.0":
                "reconnect_initial = 0.2\nreconnect_max = 2.0",
            "welcome_timeout = 15.0": "welcome_timeout = 2.0",
        }
        if transport == "grpc":
            edge_changes['transports = ["websocket"]'] = 'transports = ["grpc"]'
            edge_changes["[transports.websocket]"] = (
                f'[transports.grpc]\nlisten = "tcp:{link}:interface=127.0.0.1"\n\n'
                "[transports.websocket]"
            )
            agent_changes['transports = ["websocket"]'] = 'transports = ["grpc"]'
            agent_changes["[transports.websocket]"] = (
                f'[transports.grpc]\naddress = "127.0.0.1:{link}"\n\n[transports.websocket]'
            )

        async def start_edge() -> TwistdProcess:
            edge = self.spawn("tunneld", self.shipped("tunneld.toml", edge_changes))
            await edge.wait_for(rf"{transport} agent link listening on 127\.0\.0\.1:{link}")
            return edge

        edge = await start_edge()
        agents, upstreams = [], []
        for _ in range(2):
            upstream_port, upstream = await listen_upstream(self)
            agent = self.spawn("tunneld-agent", self.shipped("agent.toml", {
                **agent_changes,
                'upstream = "tcp:host=127.0.0.1:port=8000"':
                    f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
            }))
            await agent.wait_for(r"tunnel ready: http://demo\.localhost:8080/")
            agents.append(agent)
            upstreams.append(upstream)
        harness = self.harness(public)
        for restart in range(1, 4):
            hanging = sum(len(u.hanging) for u in upstreams)
            in_flight = defer.ensureDeferred(harness.request(DEMO, "/hang"))
            while sum(len(u.hanging) for u in upstreams) <= hanging:
                await sleep(0.01)
            marks = [len(agent.output) for agent in agents]
            edge_mark = len(edge.output)
            edge.process.signalProcess(signal.SIGTERM)  # type: ignore[attr-defined]
            await edge.wait_for(r"draining: 1 streams in flight on 2 agent sessions")
            code, headers, _ = await in_flight
            self.assertEqual((code, headers.getRawHeaders(b"tunnel-error")), (503, [b"draining"]))
            await edge.ended
            self.assertEqual(edge.end_reason.value.exitCode, 0)  # type: ignore[attr-defined]
            # The draining edge stopped accepting agent links before its GoAway.
            self.assertNotIn("agent link up from", edge.output[edge_mark:])
            edge = await start_edge()
            for agent in agents:
                await agent.wait_for(
                    r"(?s)" + r"tunnel ready: http://demo\.localhost:8080/.*" * (restart + 1)
                )
            for agent, mark in zip(agents, marks, strict=True):
                since = agent.output[mark:]
                setups = since.count(f"connecting to the edge over {transport}")
                # Over the drain (drain_timeout, 2 s) and the restart: a
                # handful of backed-off dials (about 6; the bound leaves room
                # for a slow restart on a busy machine), where an edge that
                # kept answering hellos with draining saw 60 to 110 per agent.
                self.assertLessEqual(setups, 25, since[-3000:])
                self.assertGreaterEqual(setups, 1)
                self.assertNotIn("no welcome in time", since)
            codes = [(await harness.request(DEMO, "/hello"))[0] for _ in range(4)]
            self.assertEqual(codes, [200] * 4)
        # Give any welcome timer left over from a drain time to fire: none may.
        mark = len(edge.output)
        await sleep(2.5)
        for agent in agents:
            self.assertNotIn("no welcome in time", agent.output)
            self.assertEqual(agent.output.count("link up over"), 4)
        self.assertNotIn("agent link from", edge.output[mark:])
        self.assertEqual((await harness.request(DEMO, "/hello"))[0], 200)

    async def test_sigterm_restarts_without_a_storm_websocket(self) -> None:
        """SIGTERM drain and restart in place, three times, websocket agents: a handful of link set-ups per drain, every agent back, no link closed by a stale welcome timer."""
        await self.restarted_edges("websocket")

    async def test_sigterm_restarts_without_a_storm_grpc(self) -> None:
        """The same over grpc agent links."""
        await self.restarted_edges("grpc")

    async def test_sighup_reloads_a_rate_limit(self) -> None:
        """SIGHUP applies a changed rate limit to new requests; a file that fails validation is rejected and the old limit stays."""
        limited = "client_rate = 0.001\nclient_burst = 3"
        edge, public, link, config = await self.edge(**{
            "client_rate = 0.0\nclient_burst = 0": limited
        })
        await self.agent(link)
        harness = self.harness(public)
        codes = [(await harness.request(DEMO, "/hello"))[0] for _ in range(4)]
        self.assertEqual(codes, [200, 200, 200, 429])

        def rewrite(new: str) -> None:
            with open(config) as f:
                text = f.read()
            with open(config, "w") as f:
                f.write(text.replace(limited, new))

        rewrite("client_rate = -5.0\nclient_burst = 3")
        edge.process.signalProcess(signal.SIGHUP)  # type: ignore[attr-defined]
        await edge.wait_for(r"configuration reload rejected, keeping the old one: .*limits\.client_rate")
        self.assertEqual((await harness.request(DEMO, "/hello"))[0], 429)
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace("client_rate = -5.0", "client_rate = 1000.0"))
        edge.process.signalProcess(signal.SIGHUP)  # type: ignore[attr-defined]
        await edge.wait_for(r"configuration reloaded from ")
        await sleep(0.01)
        codes = [(await harness.request(DEMO, "/hello"))[0] for _ in range(3)]
        self.assertEqual(codes, [200, 200, 200])
        self.assertFalse(edge.ended.called)
        self.assertTrue(os.path.exists(config))
