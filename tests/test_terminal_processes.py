"""
Browser terminals (issue 22) with the edge and the agent as a user runs
them: twistd processes from the shipped etc/ configs, terminals turned on.
An agent that goes silent (SIGSTOP) and an edge restarted mid-session
(SIGTERM, then started again), each repeated: the browser and the log hear
the named reason, nothing is left behind, and a new token works afterwards.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tests.harness import eventually, free_port, listen_upstream, open_fds
from tests.terminal_peers import CREDENTIAL, OPERATOR, children_of, connect_terminal
from tests.test_processes import ROOT, TWISTD, TwistdProcess, spawn

ALLOCATION = "demo"  # the shipped agent's id
EDGE_TERMINAL = f'''[edge.terminal]
enabled = true
operators = {{ {OPERATOR} = "{CREDENTIAL}" }}
heartbeat_interval = 1.0
'''
AGENT_TERMINAL = '''[agent.terminal]
enabled = true
command = ["/bin/sh"]
environment = { PS1 = "$ ", ENV = "" }
'''


def shipped(case: TestCase, name: str, replacements: dict[str, str]) -> str:
    """etc/NAME with C{replacements} made (each must be there), in a file of the test's."""
    with open(os.path.join(ROOT, "etc", name)) as f:
        text = f.read()
    for old, new in replacements.items():
        case.assertIn(old, text)
        text = text.replace(old, new)
    path = os.path.abspath(case.mktemp())
    with open(path, "w") as f:
        f.write(text)
    return path


class TerminalProcessTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = Agent(reactor, pool=self.pool)
        self.addCleanup(self.pool.closeCachedConnections)

    def shipped(self, name: str, replacements: dict[str, str], table: str) -> str:
        path = shipped(self, name, replacements)
        with open(path) as f:
            text = f.read()
        # The shipped table (off) is replaced by this one.
        start = text.index(table.splitlines()[0])
        end = text.index("\n[", start + 1)
        with open(path, "w") as f:
            f.write(text[:start] + table + text[end:])
        return path

    def start_edge(self, link_port: int, admin_port: int) -> TwistdProcess:
        path = self.shipped("tunneld.toml", {
            'public_listen = ["tcp:8080:interface=127.0.0.1"]':
                'public_listen = ["tcp:0:interface=127.0.0.1"]',
            'listen = "tcp:8081:interface=127.0.0.1"':
                f'listen = "tcp:{link_port}:interface=127.0.0.1"',
            'admin_listen = "tcp:8090:interface=127.0.0.1"':
                f'admin_listen = "tcp:{admin_port}:interface=127.0.0.1"',
        }, EDGE_TERMINAL)
        return spawn(self, [*TWISTD, "--nodaemon", "--pidfile=", "tunneld", "--config", path])

    async def start(self) -> tuple[TwistdProcess, TwistdProcess, int, int]:
        link_port, admin_port = free_port(), free_port()
        upstream_port, _ = await listen_upstream(self)
        edge = self.start_edge(link_port, admin_port)
        await edge.wait_for(r"admin API listening on 127\.0\.0\.1:(\d+)")
        path = self.shipped("agent.toml", {
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "ws://127.0.0.1:{link_port}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
            "reconnect_max = 30.0": "reconnect_max = 1.0",
        }, AGENT_TERMINAL)
        agent = spawn(self, [*TWISTD, "--nodaemon", "--pidfile=", "tunneld-agent", "--config", path])
        await agent.wait_for(r"tunnel ready: http://demo\.localhost:8080/")
        return edge, agent, link_port, admin_port

    async def admin(self, port: int, method: bytes, path: str) -> tuple[int, Any]:
        headers = Headers({
            b"host": [b"127.0.0.1"], b"authorization": [b"Bearer " + CREDENTIAL.encode()],
        })
        response = await self.client.request(method, f"http://127.0.0.1:{port}{path}".encode(), headers)
        return response.code, json.loads(await readBody(response))

    async def session(self, port: int, busy: bool = True) -> Any:
        """A new token from the admin API, a browser-like client on it, ready (running sleep if C{busy})."""
        code, body = await self.admin(port, b"POST", f"/api/v1/allocations/{ALLOCATION}/terminal-token")
        self.assertEqual(code, 201, body)
        client = await connect_terminal(self, None, ALLOCATION, body["token"], port=port)
        await client.ready()
        client.type("echo hi-$((40+2))\n")
        await client.sees(b"hi-42")
        if busy:
            client.type("sleep 1000\n")
        return client

    async def live_sessions(self, port: int) -> list[Any]:
        _, body = await self.admin(port, b"GET", "/api/v1/terminal/sessions")
        return [s for s in body["sessions"] if s["state"] != "closed"]

    async def test_silent_agent_ends_the_session_by_heartbeat(self) -> None:
        """
        The agent stopped with SIGSTOP under a live session, twice: the
        session closes with agent_silent on the WebSocket and in the edge's
        log; once the agent runs again its PTY child is reaped; no live
        session and no fd is left at the edge.
        """
        edge, agent, _, port = await self.start()
        agent_pid = agent.process.pid
        edge_pid = edge.process.pid
        baseline: tuple[int, int] | None = None
        for round in range(2):
            client = await self.session(port)
            await eventually(lambda: children_of(agent_pid), "the PTY's child")
            agent.process.signalProcess(signal.SIGSTOP)
            try:
                close = await client.close_message()
            finally:
                agent.process.signalProcess(signal.SIGCONT)
            self.assertEqual(close["reason"], "agent_silent")
            _, code, reason = await client.closed
            self.assertEqual(reason, "agent_silent")
            await client.lost
            await edge.wait_for(
                r"(?s)" + r"closed \(agent_silent: nothing from the agent for \d+s\).*" * (round + 1)
            )
            await eventually(lambda: not children_of(agent_pid), "the PTY's child reaped")
            self.assertEqual(await self.live_sessions(port), [])
            _, body = await self.admin(port, b"GET", "/api/v1/terminal/sessions")
            closed = [s["reason"] for s in body["sessions"]]
            self.assertEqual(closed, ["agent_silent"] * (round + 1))
            if baseline is None:
                baseline = (open_fds(edge_pid), open_fds(agent_pid))
        # The second round left what the first did, at the edge and at the agent.
        assert baseline is not None
        await eventually(lambda: open_fds(edge_pid) <= baseline[0], "the edge's fds to settle")
        await eventually(lambda: open_fds(agent_pid) <= baseline[1], "the agent's fds to settle")
        # The agent's link survived the pause: a new session works.
        client = await self.session(port, busy=False)
        client.type("exit\n")
        close = await client.close_message()
        self.assertEqual(close["reason"], "exited")

    async def test_edge_restarted_mid_session(self) -> None:
        """
        The twistd edge stopped (SIGTERM) under a live session and started
        again on the same ports, twice: the browser hears edge_stopping, the
        agent's PTY child is reaped, the agent comes back, and a new token
        from the new edge opens a working session.
        """
        edge, agent, link_port, port = await self.start()
        agent_pid = agent.process.pid
        agent_fds = []
        for round in range(2):
            client = await self.session(port)
            await eventually(lambda: children_of(agent_pid), "the PTY's child")
            edge.process.signalProcess(signal.SIGTERM)
            close = await client.close_message()
            self.assertEqual(close["reason"], "edge_stopping")
            _, code, reason = await client.closed
            self.assertEqual((code, reason), (4001, "edge_stopping"))
            await client.lost
            await edge.ended
            self.assertIn("terminal session", edge.output)
            self.assertRegex(edge.output, r"closed \(edge_stopping: ")
            await eventually(lambda: not children_of(agent_pid), "the PTY's child reaped")
            edge = self.start_edge(link_port, port)
            await edge.wait_for(r"agent demo registered demo\.localhost over websocket")
            await agent.wait_for(r"(?s)" + r"tunnel ready: http://demo\.localhost:8080/.*" * (round + 2))
            agent_fds.append(open_fds(agent_pid))
        # The second restart left the agent what the first did.
        await eventually(lambda: open_fds(agent_pid) <= agent_fds[0], "the agent's fds to settle")
        client = await self.session(port, busy=False)
        client.type("exit\n")
        close = await client.close_message()
        self.assertEqual(close["reason"], "exited")
        self.assertFalse(agent.ended.called, "the agent kept running throughout")
