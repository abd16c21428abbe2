"""
Agent identity by mutual TLS, with real certificates made by L{tunneld.certs}
and real TLS sockets over the websocket transport: every refusal names the
check that failed in the edge's log.
"""

from __future__ import annotations

import datetime
import io
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.end_to_end import EventCollector
from tests.harness import TunnelHarness, listen_upstream, sleep
from tunneld import certs
from tunneld.config import AgentGrant, AgentTLS, EdgeAgentTLS
from tunneld.tls import certificate_identity

HANDSHAKE_REFUSED = "{purpose} TLS handshake from {peer} refused: {check}"
AGENT_REFUSED = "agent {agent} from {peer} refused: {check}"
MAY_NOT_REGISTER = "agent {agent} may not register {tunnel}: {problem}"
EDGE_HOSTS = ["localhost", "127.0.0.1"]


class PKI:
    """A CA, an edge certificate and any agent certificates, as files in a temp dir."""

    def __init__(self, case: TestCase) -> None:
        self.dir = case.mktemp()
        os.makedirs(self.dir)
        self.ca = certs.make_ca()
        self.ca_path = self._write("ca", self.ca)[0]
        self.edge = self._write("edge", certs.issue_edge(self.ca, EDGE_HOSTS))

    def _write(self, stem: str, issued: certs.Issued) -> tuple[str, str]:
        cert, key = os.path.join(self.dir, f"{stem}.pem"), os.path.join(self.dir, f"{stem}.key")
        issued.write(cert, key)
        return cert, key

    def agent(self, agent_id: str, hosts: list[str], ca: certs.Issued | None = None,
              **validity: Any) -> tuple[str, str]:
        issued = certs.issue_agent(ca or self.ca, agent_id, hosts, **validity)
        return self._write(f"agent-{agent_id}-{id(issued)}", issued)

    def edge_tls(self, require: bool = True) -> EdgeAgentTLS:
        return EdgeAgentTLS(
            certificate=self.edge[0], key=self.edge[1], client_ca=self.ca_path,
            require_client_certificate=require,
        )

    def agent_tls(self, pair: tuple[str, str] | None) -> AgentTLS:
        cert, key = pair or ("", "")
        return AgentTLS(ca=self.ca_path, certificate=cert, key=key, server_hostname="localhost")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class MutualTLSTests(TestCase):
    """Agent links over TLS with client certificates, end to end."""

    timeout = 60

    def setUp(self) -> None:
        self.pki = PKI(self)
        self.log = EventCollector(self)

    async def _edge(self, grants: list[AgentGrant] | None = None, **edge: Any) -> TunnelHarness:
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        edge.setdefault("agent_tls", self.pki.edge_tls())
        await harness.start_edge(grants, open_loopback_registration=False, **edge)
        return harness

    async def _agent(self, harness: TunnelHarness, pair: tuple[str, str] | None,
                     hosts: list[str], agent_id: str = "alpha", wait: bool = True) -> Any:
        port, _ = await listen_upstream(self)
        url = f"wss://127.0.0.1:{harness.link_address().port}/tunnel"
        return await harness.start_agent(
            {"url": url}, [(h, port) for h in hosts], agent_id=agent_id, wait=wait,
            tls=self.pki.agent_tls(pair), reconnect_initial=5.0,
        )

    async def _refused(self, fmt: str, timeout: float = 10.0) -> dict[str, Any]:
        for _ in range(int(timeout / 0.05)):
            found = self.log.matching(fmt)
            if found:
                return found[0]
            await sleep(0.05)
        self.fail(f"no {fmt!r} event; saw {sorted(set(self.log.formats()))}")

    async def test_valid_agent_serves_only_its_hostnames(self) -> None:
        """A valid certificate's agent registers the names its SANs allow, and only those."""
        harness = await self._edge()
        pair = self.pki.agent("alpha", ["a.example", "*.wild.example"])
        agent = await self._agent(harness, pair, ["a.example", "x.wild.example", "b.example"])
        welcome = agent.ready.result
        self.assertEqual(
            sorted(welcome.public_urls), ["http://a.example/", "http://x.wild.example/"]
        )
        self.assertEqual([r.tunnel.hostname for r in welcome.refused], ["b.example"])
        status, _, body = await harness.request("a.example", "/hello")
        self.assertEqual((status, body), (200, b"hello from upstream"))
        status, headers, _ = await harness.request("b.example", "/hello")
        self.assertEqual(status, 404)
        self.assertEqual(headers.getRawHeaders(b"tunnel-error"), [b"no_tunnel"])

    async def test_valid_agent_over_grpc(self) -> None:
        """The same certificate identity works over the gRPC transport's TLS link."""
        harness = TunnelHarness(self, "grpc", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge(agent_tls=self.pki.edge_tls(), open_loopback_registration=False)
        port, _ = await listen_upstream(self)
        pair = self.pki.agent("alpha", ["a.example"])
        agent = await harness.start_agent(
            {"address": f"127.0.0.1:{harness.link_address().port}", "tls": True},
            [("a.example", port), ("b.example", port)], agent_id="alpha",
            tls=self.pki.agent_tls(pair),
        )
        welcome = agent.ready.result
        self.assertEqual(welcome.public_urls, ("http://a.example/",))
        self.assertEqual([r.tunnel.hostname for r in welcome.refused], ["b.example"])
        status, _, body = await harness.request("a.example", "/hello")
        self.assertEqual((status, body), (200, b"hello from upstream"))

    async def test_agent_a_claiming_b_hostname(self) -> None:
        """A valid certificate for agent A cannot register a hostname granted to agent B."""
        grants = [AgentGrant(id="beta", hostnames=["b.example"])]
        harness = await self._edge(grants)
        pair = self.pki.agent("alpha", ["a.example"])
        agent = await self._agent(harness, pair, ["b.example"])
        self.assertEqual(agent.ready.result.public_urls, ())
        event = await self._refused(MAY_NOT_REGISTER)
        self.assertEqual(event["agent"], "alpha")
        self.assertIn("not in agent 'alpha''s certificate", event["problem"])
        status, headers, _ = await harness.request("b.example", "/hello")
        self.assertEqual(status, 503)  # reserved for beta, who is not connected
        self.assertEqual(headers.getRawHeaders(b"tunnel-error"), [b"agent_unavailable"])

    async def test_agent_a_claiming_to_be_b(self) -> None:
        """A hello naming another agent than the certificate does is refused, and the agent stops instead of asking again."""
        harness = await self._edge()
        pair = self.pki.agent("alpha", ["a.example"])
        agent = await self._agent(harness, pair, ["a.example"], agent_id="beta", wait=False)
        event = await self._refused(AGENT_REFUSED)
        self.assertIn("certificate is for 'alpha'", event["check"])
        message = await agent.gave_up
        self.assertIn("hello claims agent 'beta' but the certificate is for 'alpha'", message)
        self.assertEqual(self.log.formats().count("connecting to the edge over {transport}"), 1)

    async def test_no_client_certificate(self) -> None:
        """An agent without a client certificate fails the handshake: 'no client certificate'."""
        harness = await self._edge()
        await self._agent(harness, None, ["a.example"], wait=False)
        event = await self._refused(HANDSHAKE_REFUSED)
        self.assertEqual(event["check"], "no client certificate")

    async def test_certificate_from_another_ca(self) -> None:
        """A certificate signed by another CA is refused as not signed by the agent CA."""
        harness = await self._edge()
        pair = self.pki.agent("alpha", ["a.example"], ca=certs.make_ca("impostor CA"))
        await self._agent(harness, pair, ["a.example"], wait=False)
        event = await self._refused(HANDSHAKE_REFUSED)
        self.assertIn("not signed by the agent CA", event["check"])

    async def test_expired_certificate(self) -> None:
        """An expired certificate is refused as expired."""
        harness = await self._edge()
        day = datetime.timedelta(days=1)
        pair = self.pki.agent("alpha", ["a.example"], not_before=_now() - 10 * day,
                              not_after=_now() - day)
        await self._agent(harness, pair, ["a.example"], wait=False)
        event = await self._refused(HANDSHAKE_REFUSED)
        self.assertIn("certificate has expired", event["check"])

    async def test_not_yet_valid_certificate(self) -> None:
        """A certificate valid only from tomorrow is refused as not yet valid."""
        harness = await self._edge()
        day = datetime.timedelta(days=1)
        pair = self.pki.agent("alpha", ["a.example"], not_before=_now() + day,
                              not_after=_now() + 10 * day)
        await self._agent(harness, pair, ["a.example"], wait=False)
        event = await self._refused(HANDSHAKE_REFUSED)
        self.assertIn("not yet valid", event["check"])

    async def test_agent_refuses_wrong_edge_hostname(self) -> None:
        """The agent verifies the edge's certificate against the name it dials."""
        harness = await self._edge()
        pair = self.pki.agent("alpha", ["a.example"])
        port, _ = await listen_upstream(self)
        url = f"wss://127.0.0.1:{harness.link_address().port}/tunnel"
        tls = AgentTLS(ca=self.pki.ca_path, certificate=pair[0], key=pair[1],
                       server_hostname="not-the-edge.example")
        agent = await harness.start_agent(
            {"url": url}, [("a.example", port)], agent_id="alpha", wait=False, tls=tls,
            reconnect_initial=5.0,
        )
        await self._refused("cannot connect to the edge ({why}); retrying in {delay:.1f}s")
        self.assertFalse(agent.ready.called)
        self.assertEqual(harness.edge.sessions.sessions if harness.edge else {}, {})

    async def test_token_agent_on_plaintext_public_listener(self) -> None:
        """A token agent on a plaintext listener bound off loopback is refused, with a start warning."""
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=0.0.0.0"})
        grants = [AgentGrant(id="tok", token="s3cret", hostnames=["t.example"])]
        await harness.start_edge(grants)
        warned = [e for e in self.log.events if "is plaintext and not on loopback" in
                  e.get("log_format", "")]
        self.assertEqual(len(warned), 1)
        port, _ = await listen_upstream(self)
        url = f"ws://127.0.0.1:{harness.link_address().port}/tunnel"
        await harness.start_agent({"url": url}, [("t.example", port)], agent_id="tok",
                                  token="s3cret", wait=False, reconnect_initial=5.0)
        event = await self._refused(AGENT_REFUSED)
        self.assertIn("plaintext non-loopback listener is refused", event["check"])

    async def test_token_on_plaintext_when_allowed(self) -> None:
        """allow_token_on_plaintext lets a token agent in on a public plaintext listener."""
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=0.0.0.0"})
        grants = [AgentGrant(id="tok", token="s3cret", hostnames=["t.example"])]
        await harness.start_edge(grants, allow_token_on_plaintext=True)
        self.assertTrue(any("accepted in the clear" in f for f in self.log.formats()))
        port, _ = await listen_upstream(self)
        url = f"ws://127.0.0.1:{harness.link_address().port}/tunnel"
        agent = await harness.start_agent({"url": url}, [("t.example", port)], agent_id="tok",
                                          token="s3cret")
        self.assertEqual(agent.ready.result.public_urls, ("http://t.example/",))

    async def test_token_agent_over_tls_without_client_certificate(self) -> None:
        """With require_client_certificate off, a token agent may use a TLS link."""
        grants = [AgentGrant(id="tok", token="s3cret", hostnames=["t.example"])]
        harness = await self._edge(grants, agent_tls=self.pki.edge_tls(require=False))
        port, _ = await listen_upstream(self)
        url = f"wss://127.0.0.1:{harness.link_address().port}/tunnel"
        agent = await harness.start_agent(
            {"url": url}, [("t.example", port)], agent_id="tok", token="s3cret",
            tls=self.pki.agent_tls(None),
        )
        self.assertEqual(agent.ready.result.public_urls, ("http://t.example/",))


class CertsTests(SynchronousTestCase):
    """The certificates C{tunneld certs} makes."""

    def test_agent_identity_read_back(self) -> None:
        """An agent certificate's id and hostnames read back through service_identity."""
        ca = certs.make_ca()
        issued = certs.issue_agent(ca, "alpha", ["a.example", "*.w.example"])
        from OpenSSL.crypto import X509

        identity = certificate_identity(X509.from_cryptography(issued.certificate))
        self.assertEqual(identity.agent_id, "alpha")
        self.assertTrue(identity.is_agent("alpha"))
        self.assertFalse(identity.is_agent("beta"))
        self.assertTrue(identity.permits("a.example"))
        self.assertTrue(identity.permits("x.w.example"))
        self.assertFalse(identity.permits("x.y.w.example"))  # a wildcard covers one label
        self.assertFalse(identity.permits("b.example"))

    def _agent_file(self, agent_id: str, with_id: str | None) -> str:
        """An agent config file using a certificate for C{agent_id}; C{with_id}: its id line."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        ca = certs.make_ca()
        ca.write(os.path.join(d, "ca.pem"), os.path.join(d, "ca.key"))
        cert, key = os.path.join(d, "agent.pem"), os.path.join(d, "agent.key")
        certs.issue_agent(ca, agent_id, ["a.example"]).write(cert, key)
        path = os.path.join(d, "agent.toml")
        with open(path, "w") as f:
            f.write("[agent]\n")
            if with_id is not None:
                f.write(f'id = "{with_id}"\n')
            f.write(f'[agent.tls]\ncertificate = "{cert}"\nkey = "{key}"\n')
        return path

    def test_agent_id_from_the_certificate(self) -> None:
        """An agent file without an id takes its certificate's; one with the same id is accepted."""
        from tunneld.tap import load_agent

        self.assertEqual(load_agent(self._agent_file("web1", None))[0].agent.id, "web1")
        self.assertEqual(load_agent(self._agent_file("web1", "web1"))[0].agent.id, "web1")
        self.assertEqual(load_agent(None)[0].agent.id, "agent")

    def test_agent_id_not_the_certificates(self) -> None:
        """An id the certificate does not name fails at start, naming the key, both ids and the fix."""
        from tunneld.errors import ConfigError
        from tunneld.tap import load_agent

        path = self._agent_file("web1", "demo")
        with self.assertRaises(ConfigError) as caught:
            load_agent(path)
        text = str(caught.exception)
        self.assertIn(path, text)
        self.assertIn("agent.id", text)
        self.assertIn("is 'demo' but the certificate", text)
        self.assertIn("set id = 'web1', or leave id out", text)

    def test_cli_makes_ca_edge_agent_and_shows(self) -> None:
        """tunneld certs ca/edge/agent/show write usable files and describe them."""
        import sys

        d = self.mktemp()
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(certs.main(["ca", "--dir", d]), 0)
        self.assertEqual(certs.main(["edge", "--dir", d, "--host", "edge.example"]), 0)
        self.assertEqual(
            certs.main(["agent", "--dir", d, "--id", "alpha", "--host", "a.example"]), 0
        )
        self.assertEqual(os.stat(os.path.join(d, "agent-alpha.key")).st_mode & 0o777, 0o600)
        out.truncate(0)
        self.assertEqual(certs.main(["show", os.path.join(d, "agent-alpha.pem")]), 0)
        shown = out.getvalue()
        self.assertIn("agent id:  alpha", shown)
        self.assertIn("hostnames: a.example", shown)
        self.assertIn("usage:     clientAuth", shown)
        self.assertEqual(certs.main(["ca", "--dir", d]), 1)  # never overwrites a CA

    def test_tunneld_command_runs_certs(self) -> None:
        """`tunneld certs ...` reaches the certs command and exits with its status."""
        import sys

        from tunneld import cli

        d = self.mktemp()
        self.patch(sys, "stdout", io.StringIO())
        with self.assertRaises(SystemExit) as caught:
            cli.main(["certs", "ca", "--dir", d])
        self.assertEqual(caught.exception.code, 0)
        self.assertTrue(os.path.exists(os.path.join(d, "ca.pem")))

