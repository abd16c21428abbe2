"""
The agent's check of the edge's certificate: the hostname it dials (or its
C{server_hostname}) must match the certificate, checked with
C{service_identity}, and anything that goes wrong while checking is a
refusal named in the agent's log.  Real edges and agents over TLS on
loopback, over both built-in TLS transports, with certificates the test
makes (the invalid ones with the C{cryptography} package directly, as
C{tunneld certs} refuses to make them).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509
from twisted.internet import defer, reactor
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import TunnelHarness, listen_upstream
from tunneld import certs
from tunneld.config import AgentTLS, EdgeAgentTLS
from tunneld.tls import EdgeCertificateRefused, EdgeIdentityCheck

EDGE_REFUSED = "refused the edge at {peer}: {check}"
LINK_DOWN = "link down ({why}); reconnecting in {delay:.1f}s"
CANNOT_CONNECT = "cannot connect to the edge ({why}); retrying in {delay:.1f}s"
HANDSHAKE_REFUSED = "{purpose} TLS handshake from {peer} refused: {check}"


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def raw_edge_certificate(ca: certs.Issued, names: list[str]) -> certs.Issued:
    """A server certificate for C{names}, whatever they are: no checks of ours in the way."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_san(name) for name in names]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return certs.Issued(key, certificate)


class LogWaiter:
    """Collects log events during a test; fires a Deferred when one matches."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiting: list[tuple[Callable[[dict[str, Any]], bool], defer.Deferred[Any]]] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for entry in list(self._waiting):
            if entry[0](event):
                self._waiting.remove(entry)
                # On a later turn: the test must not run inside the logger's caller.
                reactor.callLater(0, entry[1].callback, event)

    def first(self, *formats: str) -> defer.Deferred[dict[str, Any]]:
        """The first event with one of these formats, now or when it comes."""
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        for event in self.events:
            if event.get("log_format") in formats:
                reactor.callLater(0, d.callback, event)
                return d
        self._waiting.append((lambda e: e.get("log_format") in formats, d))
        return d


class EdgeHostnameTests(TestCase):
    """The agent refuses an edge whose certificate does not prove the name it dialled."""

    timeout = 60
    transport = "websocket"

    def setUp(self) -> None:
        self.log = LogWaiter(self)
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca = certs.make_ca()
        self.ca_path = self._write("ca", self.ca)[0]
        self.agent_pair = self._write("agent", certs.issue_agent(self.ca, "alpha", ["a.example"]))

    def _write(self, stem: str, issued: certs.Issued) -> tuple[str, str]:
        cert, key = os.path.join(self.dir, f"{stem}.pem"), os.path.join(self.dir, f"{stem}.key")
        issued.write(cert, key)
        return cert, key

    def link_table(self, harness: TunnelHarness) -> dict[str, Any]:
        port = harness.link_address().port
        if self.transport == "grpc":
            return {"address": f"127.0.0.1:{port}", "tls": True}
        return {"url": f"wss://127.0.0.1:{port}/tunnel"}

    async def link(self, edge_names: list[str], server_hostname: str) -> tuple[TunnelHarness, Any]:
        """An edge with a certificate for C{edge_names}; an agent dialling it as C{server_hostname}."""
        return await self.link_with(self.ca, edge_names, server_hostname)

    async def link_with(self, agent_ca: certs.Issued, edge_names: list[str],
                        server_hostname: str) -> tuple[TunnelHarness, Any]:
        """L{link}, the edge's certificate signed by C{self.ca}, the agent trusting C{agent_ca}."""
        edge_pair = self._write("edge", raw_edge_certificate(self.ca, edge_names))
        harness = TunnelHarness(self, self.transport, {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge(
            agent_tls=EdgeAgentTLS(certificate=edge_pair[0], key=edge_pair[1], client_ca=self.ca_path),
            open_loopback_registration=False,
        )
        port, _ = await listen_upstream(self)
        trusted = self._write("trusted-ca", agent_ca)[0]
        tls = AgentTLS(ca=trusted, certificate=self.agent_pair[0], key=self.agent_pair[1],
                       server_hostname=server_hostname)
        agent = await harness.start_agent(
            self.link_table(harness), [("a.example", port)], agent_id="alpha", wait=False, tls=tls,
            reconnect_initial=30.0,
        )
        return harness, agent

    async def assertRefused(self, harness: TunnelHarness, agent: Any, hostname: str,  # noqa: N802
                            names: str) -> None:
        """The agent never links up, names the check that failed, and the edge holds no session."""
        # A refusal in the TLS handshake fails the dial ("cannot connect") or,
        # where the transport reports the link up first, drops it ("link down").
        down = self.log.first(CANNOT_CONNECT, LINK_DOWN)
        await defer.DeferredList([down, agent.ready], fireOnOneCallback=True, consumeErrors=True)
        self.assertFalse(agent.ready.called, "the agent linked up with the wrong edge")
        await down
        refused = [e for e in self.log.events if e.get("log_format") == EDGE_REFUSED]
        self.assertEqual(len(refused), 1, [e.get("log_format") for e in self.log.events])
        self.assertIn(repr(hostname), refused[0]["check"])
        self.assertIn(names, refused[0]["check"])
        assert harness.edge is not None
        self.assertEqual(harness.edge.sessions.sessions, {})
        edge = await self.log.first(HANDSHAKE_REFUSED)
        self.assertIn("closed the connection during the handshake", edge["check"])

    async def test_invalid_wildcard_certificate_is_refused(self) -> None:
        """An edge certificate for *.localhost (no valid DNS-ID) fails closed for 'wrong.example'."""
        harness, agent = await self.link(["*.localhost"], "wrong.example")
        await self.assertRefused(harness, agent, "wrong.example", "*.localhost")

    async def test_invalid_wildcard_certificate_is_refused_for_any_name(self) -> None:
        """Even a name the broken wildcard would seem to cover is refused: the certificate cannot be checked."""
        harness, agent = await self.link(["*.localhost"], "edge.localhost")
        await self.assertRefused(harness, agent, "edge.localhost", "*.localhost")

    async def test_mismatch_is_named(self) -> None:
        """A valid certificate for other names is refused, naming them and the name dialled."""
        harness, agent = await self.link(["edge.test", "*.edge.test"], "wrong.example")
        await self.assertRefused(harness, agent, "wrong.example", "edge.test, *.edge.test")

    async def test_matching_wildcard_links_up(self) -> None:
        """A name a valid wildcard covers links up and serves."""
        harness, agent = await self.link(["*.edge.test"], "link.edge.test")
        await agent.ready
        status, _, body = await harness.request("a.example", "/hello")
        self.assertEqual((status, body), (200, b"hello from upstream"))
        self.assertEqual([e for e in self.log.events if e.get("log_format") == EDGE_REFUSED], [])


    async def test_untrusted_edge_is_named(self) -> None:
        """An edge certificate from a CA the agent does not trust is refused, naming the chain check."""
        self.ca, theirs = certs.make_ca("impostor CA"), self.ca
        harness, agent = await self.link_with(theirs, ["edge.test"], "edge.test")
        await self.assertRefused(harness, agent, "edge.test", "not signed by the CA in")


class EdgeHostnameGrpcTests(EdgeHostnameTests):
    """The same over the gRPC transport's TLS link."""

    transport = "grpc"


class _Protocol:
    """The part of a TLS protocol the verify callback uses."""

    transport = None

    def __init__(self) -> None:
        self.failed: list[Any] = []

    def failVerification(self, reason: Any) -> None:  # noqa: N802
        self.failed.append(reason)


class FailClosedTests(SynchronousTestCase):
    """L{EdgeIdentityCheck}'s verify callback refuses whenever the identity is not proven."""

    def setUp(self) -> None:
        self.ca = certs.make_ca()
        self.protocol = _Protocol()

    def verify(self, names: list[str], hostname: str, ok: int = 1, depth: int = 0) -> bool:
        check = EdgeIdentityCheck(hostname, optionsForClientTLS("edge.test"))
        leaf = X509.from_cryptography(raw_edge_certificate(self.ca, names).certificate)
        return check._verifier(self.protocol)(None, leaf, 0 if ok else 20, depth, ok)  # type: ignore[arg-type]

    def refusal(self) -> str:
        [failure] = self.protocol.failed
        self.assertIsInstance(failure.value, EdgeCertificateRefused)
        return str(failure.value)

    def test_match(self) -> None:
        """A name the certificate proves passes; so does an address in an IP SAN."""
        self.assertTrue(self.verify(["edge.test"], "edge.test"))
        self.assertTrue(self.verify(["*.edge.test"], "a.edge.test"))
        self.assertTrue(self.verify(["edge.test", "127.0.0.1"], "127.0.0.1"))
        self.assertEqual(self.protocol.failed, [])
        self.assertFalse(self.verify(["edge.test", "127.0.0.1"], "127.0.0.2"))
        self.assertIn("not '127.0.0.2'", self.refusal())

    def test_mismatch(self) -> None:
        """Another name is refused and named."""
        self.assertFalse(self.verify(["edge.test"], "wrong.example"))
        self.assertIn("hostname mismatch", self.refusal())

    def test_unreadable_certificate(self) -> None:
        """Names service_identity refuses to read prove nothing, for any hostname."""
        for hostname in ("wrong.example", "a.localhost"):
            self.protocol.failed.clear()
            self.assertFalse(self.verify(["*.localhost"], hostname))
            self.assertIn("cannot be verified", self.refusal())

    def test_unusable_hostname(self) -> None:
        """A dialled name that is no valid DNS-ID is a refusal, not an exception."""
        self.assertFalse(self.verify(["edge.test"], "a b"))
        self.assertIn("'a b'", self.refusal())

    def test_chain_failure(self) -> None:
        """OpenSSL's own verdict against the chain stands, and is named."""
        self.assertFalse(self.verify(["edge.test"], "edge.test", ok=0, depth=1))
        self.assertIn("not signed by", self.refusal())

    def test_any_exception_refuses(self) -> None:
        """Whatever goes wrong while checking, the answer is no."""
        def broken(certificate: Any) -> str | None:
            raise RuntimeError("boom")

        check = EdgeIdentityCheck("edge.test", optionsForClientTLS("edge.test"))
        self.patch(check, "check", broken)
        leaf = X509.from_cryptography(raw_edge_certificate(self.ca, ["edge.test"]).certificate)
        self.assertFalse(check._verifier(self.protocol)(None, leaf, 0, 0, 1))  # type: ignore[arg-type]
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
