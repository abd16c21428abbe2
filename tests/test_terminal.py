"""
Browser terminals through the edge to a PTY on the agent (issue 22), with a
real edge, agent, PTY and WebSocket client on loopback over the WebSocket
transport (tests/end_to_end.py carries one terminal over every transport;
tests/test_terminal_browser.py drives the page in headless Chromium).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.end_to_end import EventCollector
from tests.harness import Sampler, TunnelHarness, eventually, free_port, listen_upstream
from tests.terminal_peers import (
    admin,
    agent_terminal,
    children_of,
    connect_terminal,
    edge_terminal,
    terminal_tunnel,
    token_for,
)
from tunneld.agent.service import AgentService
from tunneld.config import ConfigError, load_agent_config, load_edge_config
from tunneld.edge.terminal_web import close_code
from tunneld.model.reasons import Reason

# What the flood may add to this process (edge and agent both): the session's
# queue (1 MiB), a credit window, socket buffers.  The flood itself is unbounded.
MEMORY_CEILING = 48 * 1024 * 1024


def _agent_table(address: Any) -> dict[str, Any]:
    return {"url": f"ws://127.0.0.1:{address.port}/tunnel"}


class TerminalTests(TestCase):
    timeout = 120

    async def tunnel(self, **kwargs: Any) -> TunnelHarness:
        return await terminal_tunnel(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"},
                                     _agent_table, **kwargs)

    def agent(self, harness: TunnelHarness, index: int = 0) -> AgentService:
        return harness.agents[index]

    async def session(self, harness: TunnelHarness, allocation: str = "node-a", **size: int) -> Any:
        token = await token_for(harness, allocation)
        client = await connect_terminal(self, harness, allocation, token, **size)
        await client.ready()
        return client

    async def no_terminals_left(self, harness: TunnelHarness) -> None:
        """Every PTY child reaped, no session live at the edge."""
        agent = self.agent(harness)
        assert agent.terminal is not None
        await eventually(lambda: not agent.terminal.sessions, "the agent's terminals to end")
        await eventually(lambda: not children_of(os.getpid()), "every child reaped")
        assert harness.edge is not None and harness.edge.terminal is not None
        await eventually(lambda: not harness.edge.terminal.live, "no live session at the edge")
        sessions = harness.edge.sessions.sessions.values()
        await eventually(
            lambda: all(s.link.active_streams() == 0 for s in sessions), "no stream left on a link"
        )
        link = agent.link
        if link is not None:  # (a dropped link has none by definition)
            await eventually(lambda: link.active_streams() == 0, "no stream left at the agent")

    async def test_echo_and_exit(self) -> None:
        """Keystrokes reach the shell, its output comes back; `exit` ends the session with exited."""
        harness = await self.tunnel()
        client = await self.session(harness)
        client.type("echo hi-$((40+2))\n")
        await client.sees(b"hi-42")
        client.type("exit 3\n")
        close = await client.close_message()
        self.assertEqual((close["reason"], close["message"]), ("exited", "status 3"))
        _, code, reason = await client.closed
        self.assertEqual((code, reason), (1000, "exited"))
        await self.no_terminals_left(harness)
        code, body = await admin(harness, b"GET", "/api/v1/terminal/sessions", credential=None)
        [listed] = body["sessions"]
        self.assertEqual(
            (listed["state"], listed["reason"], listed["identity"], listed["allocation"]),
            ("closed", "exited", "alice", "node-a"),
        )
        self.assertIsNotNone(listed["ready_at"])

    async def test_resize_reaches_the_pty(self) -> None:
        """The first size comes with the connection, later ones as resize messages: stty sees both."""
        harness = await self.tunnel()
        client = await self.session(harness, rows=33, cols=101)
        client.type("stty size\n")
        await client.sees(b"33 101")
        client.send_json({"type": "resize", "rows": 41, "cols": 132})
        client.type("stty size\n")
        await client.sees(b"41 132")

    async def test_token_refusals(self) -> None:
        """A reused, an expired, another allocation's, an unknown and a missing token: each refused with its reason."""
        events = EventCollector(self)
        harness = await self.tunnel(edge=edge_terminal(token_ttl=0.2))

        async def refused(allocation: str, token: str | None) -> dict[str, Any]:
            client = await connect_terminal(self, harness, allocation, token)
            close = await client.close_message()
            _, code, reason = await client.closed
            self.assertEqual((code, reason), (close_code(close["reason"]), close["reason"]))
            return close

        # Used once (the session is then closed), refused the second time.
        token = await token_for(harness, "node-a")
        client = await connect_terminal(self, harness, "node-a", token)
        await client.ready()
        client.send_json({"type": "close"})
        self.assertEqual((await client.close_message())["reason"], "browser_closed")
        self.assertEqual((await refused("node-a", token))["reason"], "token_reused")
        # Expired before use.
        token = await token_for(harness, "node-a")
        assert harness.edge is not None
        issued = harness.edge.reactor.seconds()
        await eventually(lambda: harness.edge.reactor.seconds() > issued + 0.3, "the token's TTL")
        self.assertEqual((await refused("node-a", token))["reason"], "token_expired")
        # Issued for another allocation (an agent connected under another id).
        await self._second_agent(harness, "node-b")
        token = await token_for(harness, "node-b")
        close = await refused("node-a", token)
        self.assertEqual(close["reason"], "token_other_allocation")
        self.assertIn("node-b", close["message"])
        # Never issued; none at all.
        self.assertEqual((await refused("node-a", "made-up"))["reason"], "token_unknown")
        self.assertEqual((await refused("node-a", None))["reason"], "token_missing")
        logged = [e["reason"] for e in events.matching(
            "terminal session for {allocation} from {peer} refused ({reason}: {message})"
        )]
        self.assertEqual(logged, [
            "token_reused", "token_expired", "token_other_allocation", "token_unknown",
            "token_missing",
        ])
        await self.no_terminals_left(harness)

    async def _second_agent(self, harness: TunnelHarness, agent_id: str) -> AgentService:
        port, _ = await listen_upstream(self)
        return await harness.start_agent(
            _agent_table(harness.link_address()), [(f"{agent_id}.test", port)],
            agent_id=agent_id, terminal=agent_terminal(),
        )

    async def test_token_api_needs_an_operator_and_a_connected_agent(self) -> None:
        """No or a wrong credential: 401; an allocation with no agent here: 404."""
        harness = await self.tunnel()
        path = "/api/v1/allocations/node-a/terminal-token"
        code, body = await admin(harness, b"POST", path, credential=None)
        self.assertEqual((code, body["error"]), (401, "unauthorized"))
        code, body = await admin(harness, b"POST", path, credential="wrong-credential-00000")
        self.assertEqual(code, 401)
        code, body = await admin(harness, b"POST", "/api/v1/allocations/nobody/terminal-token")
        self.assertEqual((code, body["error"]), (404, "agent_unavailable"))
        code, body = await admin(harness, b"GET", "/api/v1/allocations", credential=None)
        self.assertEqual([a["allocation"] for a in body["allocations"]], ["node-a"])

    async def test_second_session_refused(self) -> None:
        """second_session = refuse: the live session goes on, the newcomer is told session_live."""
        harness = await self.tunnel()
        first = await self.session(harness)
        token = await token_for(harness, "node-a")
        second = await connect_terminal(self, harness, "node-a", token)
        self.assertEqual((await second.close_message())["reason"], "session_live")
        first.type("echo still-here\n")
        await first.sees(b"still-here")

    async def test_second_session_replaces(self) -> None:
        """second_session = replace: the first is closed with replaced, the second works."""
        harness = await self.tunnel(edge=edge_terminal(second_session="replace"))
        first = await self.session(harness)
        second = await self.session(harness)
        self.assertEqual((await first.close_message())["reason"], "replaced")
        second.type("echo second-works\n")
        await second.sees(b"second-works")
        assert harness.edge is not None and harness.edge.terminal is not None
        await eventually(
            lambda: [s["state"] for s in harness.edge.terminal.listing()] == ["ready", "closed"],
            "one ready session and one closed",
        )
        agent = self.agent(harness)
        assert agent.terminal is not None
        await eventually(lambda: len(agent.terminal.sessions) == 1, "the first PTY reaped")

    async def test_browser_disconnect_repeated(self) -> None:
        """A browser that vanishes (TCP gone) ends its session with browser_gone, every time, leaving nothing."""
        events = EventCollector(self)
        harness = await self.tunnel()
        await self.session(harness)  # warm up: imports, first fds
        agent = self.agent(harness)
        assert agent.terminal is not None
        [first] = agent.terminal.sessions
        first.hang_up("test", "warm-up")
        await self.no_terminals_left(harness)
        before = os.listdir("/proc/self/fd")
        for _ in range(3):
            client = await self.session(harness)
            client.type("sleep 1000\n")
            client.transport.abortConnection()
            await client.lost
            await self.no_terminals_left(harness)
        # Nothing accumulates (what was closing at the start may be gone by now).
        await eventually(
            lambda: len(os.listdir("/proc/self/fd")) <= len(before), "the fds to be closed"
        )
        closes = [e["reason"] for e in events.matching(
            "terminal session {session} for {allocation} closed ({reason}: {message}); "
            "was {was}, {to_browser} bytes to the browser, {to_agent} to the agent"
        )]
        self.assertEqual(closes[-3:], ["browser_gone"] * 3)

    async def test_flood_to_a_browser_that_stops_reading(self) -> None:
        """`yes` to a browser reading nothing: closed with saturated within the bound; memory bounded."""
        events = EventCollector(self)
        harness = await self.tunnel(edge=edge_terminal(stall_timeout=2.0))
        client = await self.session(harness)
        sampler = Sampler()
        client.type("yes\n")
        await client.sees(b"y\r\ny\r\n")
        client.transport.pauseProducing()  # the browser reads nothing more
        assert harness.edge is not None and harness.edge.terminal is not None
        bridge = harness.edge.terminal
        await eventually(lambda: not bridge.live, "the session to close", timeout=60)
        [closed] = bridge.listing()
        self.assertEqual(closed["reason"], "saturated")
        [logged] = events.matching(
            "terminal session {session} for {allocation} saturated: {message} "
            "(queue {queued} bytes, largest {largest} bytes)"
        )
        self.assertLessEqual(logged["largest"], bridge.settings.max_queued_bytes)
        # Edge and agent (this process) hold the bounded queue, a credit window
        # and socket buffers, never the flood.
        self.assertLess(sampler.stop(), MEMORY_CEILING)
        client.transport.resumeProducing()
        close = await client.close_message()
        self.assertEqual(close["reason"], "saturated")
        await self.no_terminals_left(harness)

    async def test_agent_link_lost_and_agent_restart_repeated(self) -> None:
        """
        The agent's link dropped (agent_gone) and the agent restarted
        (agent_stopping), three times each: every session ends with its
        reason at the browser and in the log, every PTY child is reaped, no
        stream, session or fd is left.
        """
        events = EventCollector(self)
        harness = await self.tunnel(
            agent_settings={"reconnect_initial": 0.05, "reconnect_max": 0.2}
        )
        agent = self.agent(harness)
        client = await self.session(harness)
        client.type("exit\n")
        await client.close_message()
        await self.no_terminals_left(harness)
        before = len(os.listdir("/proc/self/fd"))
        reasons = []
        for round in range(6):
            client = await self.session(harness)
            client.type("sleep 1000\n")
            link = agent.link
            assert link is not None
            if round % 2:
                await agent.stopService()
                agent.startService()
            else:
                link.close(Reason.AGENT_GONE, "dropped by the test")
            close = await client.close_message()
            reasons.append(close["reason"])
            await self.no_terminals_left(harness)
            await eventually(
                lambda link=link: agent.link is not None and agent.link is not link  # type: ignore[misc]
                and harness.edge is not None and harness.edge.terminal is not None
                and harness.edge.terminal.agent_session("node-a") is not None,
                "the agent back",
            )
            await client.lost
        self.assertEqual(reasons, ["agent_gone", "agent_stopping"] * 3)
        await eventually(
            lambda: len(os.listdir("/proc/self/fd")) <= before, "the fds of the old links closed"
        )
        logged = [e["reason"] for e in events.matching(
            "terminal session {session} for {allocation} closed ({reason}: {message}); "
            "was {was}, {to_browser} bytes to the browser, {to_agent} to the agent"
        )]
        self.assertEqual(logged[1:], reasons)
        reaped = events.matching(
            "terminal for {allocation} ended ({reason}: {message}); pid {pid} reaped"
        )
        self.assertEqual(len(reaped), 7)

    async def test_edge_restart_repeated(self) -> None:
        """The edge stops under a live session (edge_stopping), three times; a new edge on the same ports takes the agent back; no fd accumulates."""
        events = EventCollector(self)
        link_port, admin_port = free_port(), free_port()
        table = {"listen": f"tcp:{link_port}:interface=127.0.0.1"}
        harness = await terminal_tunnel(
            self, "websocket", table, _agent_table,
            admin_listen=f"tcp:{admin_port}:interface=127.0.0.1",
        )
        agent = self.agent(harness)
        fds = []
        for _ in range(3):
            client = await self.session(harness)
            client.type("sleep 1000\n")
            assert harness.edge is not None
            await harness.edge.stopService()
            close = await client.close_message()
            self.assertEqual(close["reason"], "edge_stopping")
            _, code, reason = await client.closed
            self.assertEqual((code, reason), (4001, "edge_stopping"))
            assert agent.terminal is not None
            await eventually(lambda: not agent.terminal.sessions, "the agent's PTY to end")
            await eventually(lambda: not children_of(os.getpid()), "the child reaped")
            await harness.start_edge(
                terminal=edge_terminal(), admin_listen=f"tcp:{admin_port}:interface=127.0.0.1"
            )
            await eventually(
                lambda: harness.edge is not None and harness.edge.terminal is not None
                and harness.edge.terminal.agent_session("node-a") is not None,
                "the agent on the new edge", timeout=60,
            )
            await client.lost
            fds.append(len(os.listdir("/proc/self/fd")))
        # A restart leaves nothing behind: the third round holds what the second did.
        await eventually(
            lambda: len(os.listdir("/proc/self/fd")) <= fds[1], "the fds to settle"
        )
        logged = [e["reason"] for e in events.matching(
            "terminal session {session} for {allocation} closed ({reason}: {message}); "
            "was {was}, {to_browser} bytes to the browser, {to_agent} to the agent"
        )]
        self.assertEqual(logged, ["edge_stopping"] * 3)

    async def test_agent_with_another_nodes_certificate(self) -> None:
        """
        node-a's agent is replaced by one presenting node-b's certificate
        while claiming node-a: the live session ends (agent_stopping), the
        impostor is refused by the edge (the log names the check), and a
        token issued for node-a is refused with agent_unavailable; a link
        whose certificate is not the allocation's, should one ever be
        registered, is refused with agent_identity.  No child is left.
        """
        from OpenSSL import crypto

        from tests.test_identity import PKI
        from tunneld.router import AgentSession

        events = EventCollector(self)
        pki = PKI(self)
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge(
            terminal=edge_terminal(), agent_tls=pki.edge_tls(), open_loopback_registration=False
        )
        port, _ = await listen_upstream(self)
        url = f"wss://127.0.0.1:{harness.link_address().port}/tunnel"
        node_a, node_b = pki.agent("node-a", ["a.test"]), pki.agent("node-b", ["b.test"])
        agent = await harness.start_agent(
            {"url": url}, [("a.test", port)], agent_id="node-a", tls=pki.agent_tls(node_a),
            terminal=agent_terminal(),
        )
        client = await self.session(harness)
        token = await token_for(harness, "node-a")
        await agent.stopService()
        self.assertEqual((await client.close_message())["reason"], "agent_stopping")
        impostor = await harness.start_agent(
            {"url": url}, [("a.test", port)], agent_id="node-a", tls=pki.agent_tls(node_b),
            terminal=agent_terminal(), wait=False,
        )
        await eventually(
            lambda: events.matching("agent {agent} from {peer} refused: {check}"),
            "the impostor refused",
        )
        [refusal] = events.matching("agent {agent} from {peer} refused: {check}")
        self.assertIn("the certificate is for 'node-b'", refusal["check"])
        await impostor.stopService()
        refused = await connect_terminal(self, harness, "node-a", token)
        self.assertEqual((await refused.close_message())["reason"], "agent_unavailable")
        code, body = await admin(harness, b"POST", "/api/v1/allocations/node-a/terminal-token")
        self.assertEqual((code, body["error"]), (404, "agent_unavailable"))

        # Should a link with node-b's certificate ever serve node-a, the bridge
        # checks the certificate itself.
        with open(node_b[0], "rb") as f:
            certificate = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())

        class Link:
            peer_certificate = certificate
            transport_name = "test"

        assert harness.edge is not None
        fake = AgentSession("fake", "node-a", Link())  # type: ignore[arg-type]
        harness.edge.sessions.sessions["fake"] = fake
        self.addCleanup(harness.edge.sessions.sessions.pop, "fake", None)
        token = await token_for(harness, "node-a")
        refused = await connect_terminal(self, harness, "node-a", token)
        close = await refused.close_message()
        self.assertEqual(close["reason"], "agent_identity")
        harness.edge.sessions.sessions.pop("fake")
        await eventually(lambda: not children_of(os.getpid()), "every child reaped")
        assert harness.edge.terminal is not None
        self.assertEqual(harness.edge.terminal.live, {})

    async def test_heartbeats_and_errors(self) -> None:
        """
        A page that answers heartbeats keeps its session past three
        intervals; a message the edge does not understand gets an error and
        the session goes on; one that stops answering is closed with
        browser_silent.
        """
        harness = await self.tunnel(edge=edge_terminal(heartbeat_interval=0.1))
        client = await self.session(harness)
        await eventually(lambda: len(client.of_type("heartbeat")) >= 5, "five heartbeats")
        client.send_json({"type": "launch"})
        client.sendMessage(b"[1, 2]", isBinary=False)
        client.send_json({"type": "resize", "rows": 0, "cols": 80})
        await eventually(lambda: len(client.of_type("error")) == 3, "three errors")
        self.assertEqual(
            [e["reason"] for e in client.of_type("error")], ["protocol_error"] * 3
        )
        client.type("echo alive\n")
        await client.sees(b"alive")
        self.assertEqual(client.of_type("close"), [])
        client.answer_heartbeats = False
        close = await client.close_message()
        self.assertEqual(close["reason"], "browser_silent")
        await self.no_terminals_left(harness)

    async def test_user_environment_and_directory(self) -> None:
        """The program runs as the configured user, in its directory, with the configured environment."""
        import pwd

        if os.getuid() != 0:
            raise SkipTest("running the terminal as another user needs root")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chmod(directory, 0o755)
        harness = await self.tunnel(agent=agent_terminal(
            user="nobody", working_directory=directory,
            environment={"PS1": "$ ", "ENV": "", "GREETING": "hello-from-config"},
        ))
        client = await self.session(harness)
        client.type('echo "$(id -un) $(pwd) $GREETING $TERM $HOME"\n')
        home = pwd.getpwnam("nobody").pw_dir
        await client.sees(
            f"nobody {directory} hello-from-config xterm-256color {home}".encode()
        )

    async def test_agent_without_terminal(self) -> None:
        """An agent whose terminal is off answers terminal_disabled."""
        harness = await self.tunnel(agent=agent_terminal(enabled=False))
        token = await token_for(harness, "node-a")
        client = await connect_terminal(self, harness, "node-a", token)
        self.assertEqual((await client.close_message())["reason"], "terminal_disabled")


class TerminalConfigTests(TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults_are_off(self) -> None:
        self.assertFalse(load_agent_config(None).agent.terminal.enabled)
        self.assertFalse(load_edge_config(None).edge.terminal.enabled)

    def test_wrong_values_name_file_key_reason(self) -> None:
        """Each mistake fails at start naming the file, the key and why."""
        cases = [
            ("[agent.terminal]\nenabled = true\nuser = \"no-such-user-x\"\n",
             "agent.terminal.user", "no such user"),
            ("[agent.terminal]\nenabled = true\ncommand = [\"/no/such/shell\"]\n",
             "agent.terminal.command[0]", "no executable"),
            ("[agent.terminal]\nenabled = true\nworking_directory = \"/no/such/dir\"\n",
             "agent.terminal.working_directory", "no such directory"),
            ("[agent.terminal]\nmax_sessions = 0\n", "agent.terminal.max_sessions", "greater than 0"),
            ("[agent.terminal]\nenvironment = { \"A=B\" = \"x\" }\n",
             "agent.terminal.environment", "not an environment variable name"),
        ]
        for text, key, reason in cases:
            path = self.write(text)
            with self.assertRaises(ConfigError) as caught:
                load_agent_config(path)
            message = str(caught.exception)
            self.assertIn(path, message)
            self.assertIn(key, message)
            self.assertIn(reason, message)
        edge_cases = [
            ("[edge.terminal]\nenabled = true\n", "edge.terminal", "needs at least one operator"),
            ("[edge.terminal]\nsecond_session = \"both\"\n", "edge.terminal.second_session",
             "'refuse' or 'replace'"),
            ("[edge.terminal]\noperators = { bob = \"short\" }\n", "edge.terminal.operators",
             "at least 16 characters"),
        ]
        for text, key, reason in edge_cases:
            path = self.write(text)
            with self.assertRaises(ConfigError) as caught:
                load_edge_config(path)
            message = str(caught.exception)
            self.assertIn(path, message)
            self.assertIn(key, message)
            self.assertIn(reason, message)



class TerminalClusterTests(TestCase):
    """Two edges sharing a real Redis: tokens and session owners are the cluster's, bytes are not."""

    timeout = 120

    async def test_tokens_and_owners_across_edges(self) -> None:
        """
        A token issued at one edge is redeemed at the other (where the
        agent is), then refused there and at the first as reused; with
        node-a's agents on both edges, a second session at the other edge is
        refused with session_live.
        """
        from tests.redis_servers import start_server
        from tunneld.config import EdgeStateSection

        server = await start_server(self)
        state = EdgeStateSection(backend="redis", redis_url=server.url, key_prefix="tt:")
        edges = []
        for _ in range(2):
            harness = await terminal_tunnel(
                self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"}, _agent_table,
                state=state,
            )
            assert harness.edge is not None
            backend = harness.edge.state.backend
            await eventually(lambda b=backend: b.health().reachable, "Redis reachable")
            edges.append(harness)
        first, second = edges
        token = await token_for(first, "node-a")
        client = await connect_terminal(self, second, "node-a", token)
        await client.ready()
        client.type("echo across\n")
        await client.sees(b"across")
        for harness in edges:
            again = await connect_terminal(self, harness, "node-a", token)
            self.assertEqual((await again.close_message())["reason"], "token_reused")
        token = await token_for(second, "node-a")
        other = await connect_terminal(self, first, "node-a", token)
        close = await other.close_message()
        self.assertEqual(close["reason"], "session_live")
        self.assertIn("another edge", close["message"])
        client.send_json({"type": "close"})
        self.assertEqual((await client.close_message())["reason"], "browser_closed")
        # Its owner record gone, the allocation is free at either edge.
        token = await token_for(first, "node-a")
        await eventually(
            lambda: second.edge is not None and second.edge.terminal is not None
            and not second.edge.terminal.live, "the session closed",
        )
        from tests.harness import sleep
        from tunneld.edge.terminal import OWNERS

        for _ in range(1000):
            if await backend.get_record(OWNERS, "node-a") is None:
                break
            await sleep(0.02)
        fresh = await connect_terminal(self, first, "node-a", token)
        await self._ready_when_released(fresh)

    async def _ready_when_released(self, client: Any) -> None:
        message = await eventually_message(client)
        self.assertEqual(message["type"], "ready", message)


async def eventually_message(client: Any) -> dict[str, Any]:
    await eventually(lambda: client.of_type("ready") or client.of_type("close"), "ready or close")
    return (client.of_type("ready") or client.of_type("close"))[0]  # type: ignore[no-any-return]
