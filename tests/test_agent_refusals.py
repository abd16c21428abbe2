"""
Refusals an agent cannot fix by retrying, with real twistd processes and real
certificates made by the test: a wrong token or an id that is not its
certificate's stops the agent with a message saying what to fix (a refusal
from the edge: exit status 78 after one try; a mismatch the agent can see in
its own files: at start, before it dials), and an agent whose configuration
leaves the id out takes its certificate's.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tests import test_processes
from tests.harness import listen_upstream
from tests.test_processes import TwistdProcess
from tunneld import certs
from tunneld.exitstatus import EX_CONFIG

EDGE_PORTS = {
    'public_listen = ["tcp:8080:interface=127.0.0.1"]': 'public_listen = ["tcp:0:interface=127.0.0.1"]',
    'listen = "tcp:8081:interface=127.0.0.1"': 'listen = "tcp:0:interface=127.0.0.1"',
    'admin_listen = "tcp:8090:interface=127.0.0.1"': 'admin_listen = "tcp:0:interface=127.0.0.1"',
}
READY = r"tunnel ready: http://demo\.localhost:8080/"
GAVE_UP = "Retrying cannot change this, so the agent stops"


class AgentRefusalProcessTests(TestCase):
    timeout = 60

    spawn = test_processes.ProcessTests.spawn
    shipped = test_processes.ProcessTests.shipped
    harness = test_processes.ProcessTests.harness

    def pki(self) -> dict[str, str]:
        """A CA, an edge certificate for the loopback names and agent web1's, as files."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        ca = certs.make_ca()
        files: dict[str, str] = {}
        for stem, issued in (
            ("ca", ca),
            ("edge", certs.issue_edge(ca, ["localhost", "127.0.0.1"])),
            ("web1", certs.issue_agent(ca, "web1", ["demo.localhost"])),
        ):
            files[stem], files[f"{stem}-key"] = os.path.join(d, f"{stem}.pem"), os.path.join(d, f"{stem}.key")
            issued.write(files[stem], files[f"{stem}-key"])
        return files

    async def edge(self, **changes: str) -> tuple[TwistdProcess, int, int]:
        edge = self.spawn("tunneld", self.shipped("tunneld.toml", {**EDGE_PORTS, **changes}))
        public = await edge.wait_for(r"public HTTP listening on 127\.0\.0\.1:(\d+)")
        link = await edge.wait_for(r"websocket agent link listening on 127\.0\.0\.1:(\d+)")
        return edge, int(public.group(1)), int(link.group(1))

    async def agent(self, link: int, scheme: str = "ws", **changes: str) -> TwistdProcess:
        upstream_port, _ = await listen_upstream(self)
        return self.spawn("tunneld-agent", self.shipped("agent.toml", {
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "{scheme}://127.0.0.1:{link}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
            "reconnect_initial = 0.5": "reconnect_initial = 0.05",
            **changes,
        }))

    def mutual_tls(self) -> tuple[dict[str, str], dict[str, str]]:
        """Edge and agent replacements for agent links over TLS with client certificates."""
        files = self.pki()
        edge = {
            'certificate = ""\nkey = ""':
                f'certificate = "{files["edge"]}"\nkey = "{files["edge-key"]}"',
            'client_ca = ""': f'client_ca = "{files["ca"]}"',
        }
        agent = {
            'ca = ""\ncertificate = ""\nkey = ""\nserver_hostname = ""':
                f'ca = "{files["ca"]}"\ncertificate = "{files["web1"]}"\n'
                f'key = "{files["web1-key"]}"\nserver_hostname = "localhost"',
        }
        return edge, agent

    async def test_wrong_token_stops_the_agent(self) -> None:
        """An agent with a wrong token is refused once, says retrying cannot help and what to check, and exits 78 (no reconnect loop)."""
        edge, _, link = await self.edge()
        agent = await self.agent(link, **{'token = "demo-token-change-me"': 'token = "wrong"'})
        await agent.ended
        self.assertEqual(agent.end_reason.value.exitCode, EX_CONFIG, agent.output)  # type: ignore[attr-defined]
        self.assertIn("the edge refused agent 'demo': unauthorized: wrong token for agent 'demo'",
                      agent.output)
        self.assertIn(GAVE_UP, agent.output)
        self.assertEqual(agent.output.count("connecting to the edge over websocket"), 1)
        self.assertEqual(edge.output.count("refused: wrong token for agent 'demo'"), 1)
        self.assertFalse(edge.ended.called)

    async def test_agent_id_comes_from_its_certificate(self) -> None:
        """With no id in its file, the agent says hello as its certificate's agent (web1) and serves."""
        edge_tls, agent_tls = self.mutual_tls()
        edge, public, link = await self.edge(**edge_tls)
        agent = await self.agent(link, "wss", **agent_tls, **{'id = "demo"\n': ""})
        await agent.wait_for(READY)
        await edge.wait_for(r"agent web1 registered demo\.localhost over websocket")
        code, _, body = await self.harness(public).request("demo.localhost", "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))
        self.assertNotIn("refused", edge.output)

    async def test_agent_id_not_its_certificate_stops_at_start(self) -> None:
        """An id that is not the certificate's stops the agent at start, naming the key and the certificate's id; it never dials."""
        edge_tls, agent_tls = self.mutual_tls()
        _, _, link = await self.edge(**edge_tls)
        agent = await self.agent(link, "wss", **agent_tls)  # id = "demo" stays
        await agent.ended
        self.assertNotEqual(agent.end_reason.value.exitCode, 0)  # type: ignore[attr-defined]
        self.assertIn("agent.id", agent.output)
        self.assertIn(
            "is 'demo' but the certificate", agent.output,
        )
        self.assertIn("is for agent 'web1': set id = 'web1', or leave id out", agent.output)
        self.assertNotIn("connecting to the edge", agent.output)
