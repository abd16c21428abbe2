"""
The public edge over HTTP/2 (cleartext with prior knowledge, and TLS with
ALPN), TLS termination with SNI and wildcard certificates, and gRPC through
the tunnel to an h2c upstream.  Real sockets on loopback port 0; curl,
h2load (Debian C{curl}, C{nghttp2-client}: C{scripts/setup} installs them)
and a stock grpcio client run as subprocesses.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import sys
from concurrent import futures
from typing import Any

from cryptography import x509
from h2 import events as h2events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
)
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from zope.interface import implementer

from tests.harness import Sampler, TunnelHarness, listen_upstream, sleep
from tests.public_certs import PublicTestCA
from tests.test_http1 import FakeLink, FakeRoute, FakeRouter, FakeStream
from tunneld.agent.service import AgentService
from tunneld.config import (
    AgentConfig,
    AgentSection,
    EdgeConfig,
    EdgeSection,
    LimitsSection,
    PublicTLSSection,
    SNICertificate,
    TunnelSection,
    load_edge_config,
)
from tunneld.edge.gateway import EdgeGateway
from tunneld.edge.http2 import PublicH2Factory, PublicH2Protocol, PublicH2Settings
from tunneld.edge.public_tls import public_tls_contexts
from tunneld.errors import ConfigError
from tunneld.model.reasons import Reason
from tunneld.registry import transport_options

HERE = os.path.dirname(os.path.abspath(__file__))
GRPC_CLIENT = os.path.join(HERE, "grpc_public_client.py")
CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")
MB = 1024 * 1024


def _need(tool: str | None, name: str, package: str) -> None:
    if tool is None:
        raise RuntimeError(f"{name} is missing: scripts/setup installs the Debian package {package}")


@implementer(IHandshakeListener)
class _Handshake(protocol.Protocol):
    """Completes a TLS handshake, notes what was negotiated, and hangs up."""

    def __init__(self) -> None:
        self.done: defer.Deferred[tuple[list[str], bytes | None, str]] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:  # noqa: N802
        transport: Any = self.transport
        peer = transport.getPeerCertificate().to_cryptography()
        san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
        version = transport.getHandle().get_protocol_version_name()
        self.done.callback((names, transport.negotiatedProtocol, version))
        transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        if not self.done.called:
            self.done.errback(reason)
        self.closed.callback(None)


class _Edge:
    """An edge with all three public listeners, an agent and an upstream."""

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.ca = PublicTestCA(case.mktemp())
        default = self.ca.server("default", "edge.test", "127.0.0.1")
        app = self.ca.server("app", "app.test")
        wild = self.ca.server("wild", "*.wild.test")
        grpc = self.ca.server("grpc", "grpc.test")
        self.tls = PublicTLSSection(
            default.certificate,
            default.private_key,
            [
                SNICertificate(app.certificate, app.private_key),  # names from the certificate
                SNICertificate(wild.certificate, wild.private_key, ["*.wild.test"]),
                SNICertificate(grpc.certificate, grpc.private_key),
            ],
        )
        self.harness = TunnelHarness(case, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})

    def active_streams(self) -> int:
        """Tunnel streams open on every agent link of the edge."""
        sessions = self.harness.edge.sessions.sessions.values()
        return sum(session.link.active_streams() for session in sessions)

    async def start(self, tunnels: list[tuple[str, int]], **settings: Any) -> None:
        edge = await self.harness.start_edge(
            public_h2c_listen=["tcp:0:interface=127.0.0.1"],
            public_tls_listen=["tcp:0:interface=127.0.0.1"],
            tls=self.tls,
            **settings,
        )
        self.h2c_port = edge.public_h2c[0].address.port
        self.tls_port = edge.public_tls[0].address.port
        address = self.harness.link_address()
        await self.harness.start_agent({"url": f"ws://127.0.0.1:{address.port}/tunnel"}, tunnels)

    async def h2c_agent(self, hostname: str, port: int) -> None:
        """An agent serving C{hostname} from an h2c upstream on C{port}."""
        section = AgentSection(id="h2c", transports=["websocket"])
        address = self.harness.link_address()
        config = AgentConfig(
            section,
            [
                TunnelSection(
                    hostname=hostname,
                    upstream=f"tcp:host=127.0.0.1:port={port}",
                    upstream_protocol="h2c",
                )
            ],
            {"websocket": {"url": f"ws://127.0.0.1:{address.port}/tunnel"}},
            "(test)",
        )
        transports = transport_options(
            section.transports, config.transports, config.source, edge=False
        )
        agent = AgentService(config, transports, reactor)
        agent.startService()
        self.case.addCleanup(agent.stopService)
        await agent.ready

    async def curl(self, *args: str) -> tuple[str, bytes]:
        """Run curl; the HTTP version and status it reports, and the body."""
        _need(CURL, "curl", "curl")
        out = self.case.mktemp()
        stdout, stderr, code = await getProcessOutputAndValue(
            CURL,
            ["-sS", "--max-time", "30", "-o", out, "-w", "%{http_version} %{http_code}",
             "--cacert", self.ca.path, *args],
            env=dict(os.environ),
        )
        self.case.assertEqual(code, 0, stderr.decode(errors="replace"))
        with open(out, "rb") as f:
            return stdout.decode(), f.read()

    def https(self, host: str, path: str) -> list[str]:
        port = self.tls_port
        return ["--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}{path}"]

    def h2c(self, host: str, path: str) -> list[str]:
        return ["-H", f"host: {host}", f"http://127.0.0.1:{self.h2c_port}{path}"]

    async def handshake(self, servername: str) -> tuple[list[str], bytes | None, str]:
        """A TLS handshake (SNI = C{servername}, none for an IP); names in the served cert."""
        with open(self.ca.path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        options = optionsForClientTLS(
            servername, trustRoot=trust, acceptableProtocols=[b"h2", b"http/1.1"]
        )
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.tls_port))
        client = _Handshake()
        await endpoint.connect(protocol.Factory.forProtocol(lambda: client))
        result = await client.done
        await client.closed
        return result


class PublicHTTP2Tests(TestCase):
    """HTTP/2 and HTTPS clients reach an HTTP/1.1 upstream through the tunnel."""

    timeout = 60

    async def edge(self) -> _Edge:
        port, _ = await listen_upstream(self)
        edge = _Edge(self)
        await edge.start([("app.test", port), ("*.wild.test", port), ("127.0.0.1", port)])
        return edge

    async def test_h2c_get_post_and_http1_on_one_port(self) -> None:
        """The h2c listener serves HTTP/2 with prior knowledge and HTTP/1.1 alike."""
        edge = await self.edge()
        version, body = await edge.curl("--http2-prior-knowledge", *edge.h2c("app.test", "/hello"))
        self.assertEqual((version, body), ("2 200", b"hello from upstream"))
        version, body = await edge.curl(
            "--http2-prior-knowledge", "--data-binary", "posted over h2c",
            *edge.h2c("app.test", "/echo"),
        )
        self.assertEqual((version, body), ("2 200", b"posted over h2c"))
        version, body = await edge.curl("--http1.1", *edge.h2c("app.test", "/hello"))
        self.assertEqual((version, body), ("1.1 200", b"hello from upstream"))

    async def test_tls_alpn_h2_and_http1(self) -> None:
        """Over TLS, ALPN picks HTTP/2 or HTTP/1.1; the upstream is told the scheme was https."""
        edge = await self.edge()
        version, body = await edge.curl("--http2", *edge.https("app.test", "/hello"))
        self.assertEqual((version, body), ("2 200", b"hello from upstream"))
        version, body = await edge.curl(
            "--http2", "--data-binary", "posted over h2", *edge.https("app.test", "/echo")
        )
        self.assertEqual((version, body), ("2 200", b"posted over h2"))
        version, body = await edge.curl(
            "--http2", "-H", "x-forwarded-for: 10.9.8.7", *edge.https("app.test", "/headers")
        )
        self.assertEqual(version, "2 200")
        lines = body.split(b"\n")
        self.assertIn(b"x-forwarded-proto: https", lines)
        self.assertIn(b"x-forwarded-for: 127.0.0.1", lines)  # the client's own is not believed
        self.assertIn(b"via: 2 tunneld", lines)
        self.assertIn(b"host: app.test:%d" % edge.tls_port, lines)
        version, body = await edge.curl("--http1.1", *edge.https("app.test", "/hello"))
        self.assertEqual((version, body), ("1.1 200", b"hello from upstream"))

    async def test_large_bodies_stream_both_ways(self) -> None:
        """20 MiB up and 40 MiB down over HTTP/2 arrive whole: windows are reopened as data moves."""
        edge = await self.edge()
        upload = os.path.join(self.mktemp())
        block = hashlib.sha256(b"seed").digest() * 2048
        with open(upload, "wb") as f:
            for _ in range(20 * MB // len(block)):
                f.write(block)
        with open(upload, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        version, body = await edge.curl(
            "--http2", "--data-binary", f"@{upload}", *edge.https("app.test", "/sha256")
        )
        self.assertEqual((version, body.decode()), ("2 200", digest))
        version, body = await edge.curl(
            "--http2-prior-knowledge", *edge.h2c("app.test", f"/bytes/{40 * MB}")
        )
        self.assertEqual((version, len(body)), ("2 200", 40 * MB))

    async def test_refusal_carries_reason(self) -> None:
        """An unknown host over HTTP/2 gets 404 with the Tunnel-Error header."""
        edge = await self.edge()
        head = self.mktemp()
        version, body = await edge.curl(
            "--http2-prior-knowledge", "-D", head, *edge.h2c("nowhere.test", "/")
        )
        self.assertEqual((version, body), ("2 404", b"no tunnel is registered for this host\n"))
        with open(head, "rb") as f:
            self.assertIn(b"tunnel-error: no_tunnel\r\n", f.read())

    async def test_sni_selects_certificates(self) -> None:
        """SNI picks the exact-name certificate, the wildcard one, or the default without SNI."""
        edge = await self.edge()
        names, alpn, version = await edge.handshake("app.test")
        self.assertEqual((names, alpn), (["app.test"], b"h2"))
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        names, _, _ = await edge.handshake("a.wild.test")
        self.assertEqual(names, ["*.wild.test"])
        names, _, _ = await edge.handshake("127.0.0.1")  # an IP: no SNI is sent
        self.assertEqual(names, ["edge.test", "127.0.0.1"])
        version, body = await edge.curl("--http2", *edge.https("a.wild.test", "/hello"))
        self.assertEqual((version, body), ("2 200", b"hello from upstream"))

    async def test_weak_ciphers_refused(self) -> None:
        """A client offering only CBC (non-AEAD) suites over TLS 1.2 gets no handshake."""
        edge = await self.edge()
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(b"ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA")

        @implementer(IOpenSSLClientConnectionCreator)
        class WeakClient:
            def clientConnectionForTLS(self, tls: Any) -> SSL.Connection:  # noqa: N802
                connection = SSL.Connection(context, None)
                connection.set_tlsext_host_name(b"app.test")
                connection.set_connect_state()
                return connection

        endpoint = wrapClientTLS(WeakClient(), TCP4ClientEndpoint(reactor, "127.0.0.1", edge.tls_port))
        client = _Handshake()
        await endpoint.connect(protocol.Factory.forProtocol(lambda: client))
        error = await self.assertFailure(client.done, SSL.Error)
        await client.closed
        self.assertIn("handshake failure", str(error))

    async def test_h2load_smoke(self) -> None:
        """h2load: 400 requests on 4 connections, 10 streams each, all succeed (h2c and TLS)."""
        _need(H2LOAD, "h2load", "nghttp2-client")
        edge = await self.edge()
        for url in (
            f"http://127.0.0.1:{edge.h2c_port}/hello",
            f"https://127.0.0.1:{edge.tls_port}/hello",
        ):
            stdout, stderr, code = await getProcessOutputAndValue(
                H2LOAD, ["-n", "400", "-c", "4", "-m", "10", url], env=dict(os.environ)
            )
            report = stdout.decode()
            self.assertEqual(code, 0, stderr.decode(errors="replace"))
            self.assertIn("400 succeeded, 0 failed, 0 errored", report, report)
            self.assertIn("status codes: 400 2xx", report, report)


class _EchoService:
    """The gRPC service behind the tunnel (generic handlers, bytes in and out)."""

    def __init__(self) -> None:
        import grpc

        self.grpc = grpc
        identity = bytes

        def unary(request: bytes, context: Any) -> bytes:
            context.set_trailing_metadata([("x-trailer", "t1")])
            if request == b"ping":
                return b"pong"
            return request[::-1]

        def chat(requests: Any, context: Any) -> Any:
            for message in requests:
                yield message.upper()
            yield b"done"

        def fail(request: bytes, context: Any) -> bytes:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you")
            return b""

        handler = grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary, identity, identity),
                "Chat": grpc.stream_stream_rpc_method_handler(chat, identity, identity),
                "Fail": grpc.unary_unary_rpc_method_handler(fail, identity, identity),
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None).wait(5)


class GrpcThroughTunnelTests(TestCase):
    """A stock grpcio client calls a grpcio server through edge, link and agent."""

    timeout = 90

    async def start(self) -> _Edge:
        service = _EchoService()
        self.addCleanup(service.stop)
        edge = _Edge(self)
        await edge.start([])
        await edge.h2c_agent("grpc.test", service.port)
        return edge

    async def run_client(self, *args: str) -> dict[str, list[str]]:
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable, [GRPC_CLIENT, *args], env=dict(os.environ)
        )
        self.assertEqual(code, 0, stderr.decode(errors="replace"))
        return {line.split()[0]: line.split()[1:] for line in stdout.decode().splitlines()}

    def check(self, seen: dict[str, list[str]]) -> None:
        self.assertEqual(seen["unary"], ["pong", "t1"])  # trailing metadata came back
        self.assertEqual(seen["unary-big"], [str(MB), "True"])
        self.assertEqual(seen["bidi"], ["A", "BB", "CCC", "DDDD", "|", "done"])
        self.assertEqual(seen["missing"], ["UNIMPLEMENTED"])  # trailers-only responses
        self.assertEqual(seen["fail"], ["PERMISSION_DENIED", "not_for_you"])

    async def test_grpc_over_h2c(self) -> None:
        """Unary, bidirectional streaming and error statuses over the h2c listener."""
        edge = await self.start()
        self.check(await self.run_client(str(edge.h2c_port), "grpc.test"))

    async def test_grpc_over_tls(self) -> None:
        """The same over the TLS listener, the client verifying the edge's certificate."""
        edge = await self.start()
        self.check(await self.run_client(str(edge.tls_port), "grpc.test", edge.ca.path))


class PublicTLSConfigTests(SynchronousTestCase):
    """Certificates are checked when the service maker loads the configuration."""

    def test_missing_default_certificate(self) -> None:
        """A TLS listener without [edge.tls] certificate stops the start, naming the key."""
        from tunneld.tap import load_edge

        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[edge]\npublic_tls_listen = ["tcp:0"]\n')
        error = self.assertRaises(ConfigError, load_edge, path)
        self.assertIn("edge.tls.certificate", str(error))

    def test_key_does_not_match(self) -> None:
        """A private key that is not the certificate's is refused with its key."""
        ca = PublicTestCA(self.mktemp())
        one, two = ca.server("one", "one.test"), ca.server("two", "two.test")
        section = PublicTLSSection(one.certificate, two.private_key)
        error = self.assertRaises(ConfigError, public_tls_contexts, section, "edge.toml")
        self.assertIn("edge.tls.private_key", str(error))

    def test_sni_table(self) -> None:
        """Exact names beat wildcards; a wildcard covers one label only; else the default."""
        ca = PublicTestCA(self.mktemp())
        default = ca.server("d", "d.test")
        exact = ca.server("e", "x.wild.test")
        wild = ca.server("w", "*.wild.test")
        contexts = public_tls_contexts(
            PublicTLSSection(
                default.certificate, default.private_key,
                [SNICertificate(wild.certificate, wild.private_key),
                 SNICertificate(exact.certificate, exact.private_key)],
            ),
            "edge.toml",
        )
        exact_context = contexts.for_hostname("x.wild.test")
        wild_context = contexts.for_hostname("y.wild.test")
        self.assertIsNot(exact_context, wild_context)
        self.assertIs(contexts.for_hostname("Y.Wild.Test."), wild_context)
        self.assertIs(contexts.for_hostname("a.b.wild.test"), contexts.default)
        self.assertIs(contexts.for_hostname("wild.test"), contexts.default)

    def test_edge_config_keys(self) -> None:
        """The new listener keys and [[edge.tls.sni]] parse from TOML."""
        ca = PublicTestCA(self.mktemp())
        default = ca.server("d", "d.test")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                '[edge]\npublic_h2c_listen = ["tcp:0"]\npublic_tls_listen = ["tcp:0"]\n'
                f'[edge.tls]\ncertificate = "{default.certificate}"\n'
                f'private_key = "{default.private_key}"\n'
                f'[[edge.tls.sni]]\ncertificate = "{default.certificate}"\n'
                f'private_key = "{default.private_key}"\nhostnames = ["*.d.test"]\n'
            )
        config = load_edge_config(path)
        self.assertIsInstance(config, EdgeConfig)
        self.assertIsInstance(config.edge, EdgeSection)
        self.assertEqual(config.edge.tls.sni[0].hostnames, ["*.d.test"])
        self.assertEqual(config.edge.public_h2c_listen, ["tcp:0"])


class _RawH2Client(protocol.Protocol):
    """
    A bare HTTP/2 client (the h2 library) that controls its own windows: it
    reopens the connection window as data arrives, but a stream's window only
    for streams it is reading.
    """

    def __init__(self, window: int = 65535) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.local_settings = Settings(
            client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.reading: set[int] = set()
        self.received: dict[int, int] = {}
        self.status: dict[int, bytes] = {}
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.ended: dict[int, defer.Deferred[None]] = {}
        self.uploads: dict[int, tuple[int, bytes]] = {}  # stream -> (bytes left, chunk)
        self.sent: dict[int, int] = {}
        self.trailers_out: dict[int, list[tuple[bytes, bytes]]] = {}
        self.trailers_in: dict[int, dict[bytes, bytes]] = {}
        self.goaway: Any = None  # the edge's GOAWAY
        self.said_goaway = False  # ours
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.h2.initiate_connection()
        self.flush()
        self.ready.callback(None)

    def request(
        self, method: bytes, path: bytes, read: bool = True, upload: int = 0,
        headers: list[tuple[bytes, bytes]] | None = None,
        trailers: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", b"http"), (b":authority", b"app.test"),
                   (b":path", path), *(headers or [])]
        if trailers:
            self.trailers_out[stream_id] = trailers
        self.h2.send_headers(stream_id, headers, end_stream=not upload)
        self.ended[stream_id] = defer.Deferred()
        self.received[stream_id] = 0
        if read:
            self.reading.add(stream_id)
        if upload:
            self.uploads[stream_id] = (upload, b"u" * 16384)
            self.sent[stream_id] = 0
            self.pump()
        self.flush()
        return stream_id

    def pump(self) -> None:
        for stream_id, (left, chunk) in list(self.uploads.items()):
            while left:
                room = min(self.h2.local_flow_control_window(stream_id), len(chunk), left)
                if room <= 0:
                    break
                left -= room
                trailers = self.trailers_out.get(stream_id)
                self.h2.send_data(stream_id, chunk[:room], end_stream=not left and not trailers)
                if not left and trailers:
                    self.h2.send_headers(stream_id, trailers, end_stream=True)
                self.sent[stream_id] += room
            self.uploads[stream_id] = (left, chunk)
        self.flush()

    def read(self, stream_id: int) -> None:
        """Start reading a stalled stream: reopen its window by what it holds."""
        self.reading.add(stream_id)
        self.h2.acknowledge_received_data(self.received[stream_id], stream_id)
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)  # type: ignore[union-attr]

    def send_goaway(self) -> None:
        """Say GOAWAY; what the edge sent before reading it is then dropped unread."""
        self.h2.close_connection()
        self.flush()
        self.said_goaway = True

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.said_goaway:
            return  # h2 takes no frame after its own GOAWAY, not even those in flight
        for event in self.h2.receive_data(data):
            if isinstance(event, h2events.ResponseReceived):
                self.headers[event.stream_id] = dict(event.headers)
                self.status[event.stream_id] = self.headers[event.stream_id][b":status"]
            elif isinstance(event, h2events.DataReceived):
                self.received[event.stream_id] += len(event.data)
                if event.stream_id in self.reading:
                    self.h2.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                else:
                    self.h2.increment_flow_control_window(event.flow_controlled_length)
            elif isinstance(event, h2events.TrailersReceived):
                self.trailers_in[event.stream_id] = dict(event.headers)
            elif isinstance(event, h2events.StreamEnded | h2events.StreamReset):
                done = self.ended.get(event.stream_id)
                if done is not None and not done.called:
                    done.callback(None)
            elif isinstance(event, h2events.WindowUpdated):
                self.pump()
            elif isinstance(event, h2events.ConnectionTerminated):
                self.goaway = event.error_code
        self.flush()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.closed.callback(None)


async def connect_h2c(case: TestCase, edge: _Edge, window: int = 65535) -> _RawH2Client:
    """
    A L{_RawH2Client} on the edge's h2c listener, closed when C{case} ends;
    C{window} is each stream's, and the connection's too.
    """
    client = _RawH2Client(window)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", edge.h2c_port)
    await endpoint.connect(protocol.Factory.forProtocol(lambda: client))
    if window > 65535:
        client.h2.increment_flow_control_window(window - 65535)
        client.flush()

    async def close() -> None:
        if client.transport is not None and client.transport.connected:  # type: ignore[attr-defined]
            client.transport.loseConnection()
            await client.closed

    case.addCleanup(close)
    return client


class _Events:
    """The log events of a test; a test can wait for one."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiting: list[tuple[str, dict[str, Any], defer.Deferred[dict[str, Any]]]] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    @staticmethod
    def _matches(event: dict[str, Any], fmt: str, fields: dict[str, Any]) -> bool:
        return event.get("log_format") == fmt and all(event.get(k) == v for k, v in fields.items())

    def _observe(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for entry in list(self._waiting):
            fmt, fields, waiter = entry
            if self._matches(event, fmt, fields):
                self._waiting.remove(entry)
                # On a later turn: the test must not run inside the logging call.
                reactor.callLater(0, waiter.callback, event)

    def wait(self, fmt: str, **fields: Any) -> defer.Deferred[dict[str, Any]]:
        """The first event with this format and these fields (perhaps already logged)."""
        for event in self.events:
            if self._matches(event, fmt, fields):
                return defer.succeed(event)
        waiter: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiting.append((fmt, fields, waiter))
        return waiter


_AGENT_RESET = "stream to upstream {endpoint} reset by the edge ({reason}): {message}"


class _Sink(protocol.Protocol):
    """An upstream that accepts a connection and never reads from it."""

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.factory.connections.append(self)  # type: ignore[attr-defined]


class HTTP2BackpressureTests(TestCase):
    """HTTP/2 flow control is the backpressure across the whole path."""

    timeout = 60

    async def connect(self, edge: _Edge) -> _RawH2Client:
        return await connect_h2c(self, edge)

    async def test_stalled_stream_stalls_only_itself(self) -> None:
        """A stream whose window stays shut holds back its download, not its connection's other streams."""
        port, _ = await listen_upstream(self)
        edge = _Edge(self)
        await edge.start([("app.test", port)])
        client = await self.connect(edge)
        sampler = Sampler()
        big = 200 * MB
        stalled = client.request(b"GET", b"/bytes/%d" % big, read=False)
        await sleep(1.0)
        for _ in range(5):
            other = client.request(b"GET", b"/hello")
            await client.ended[other]
            self.assertEqual((client.status[other], client.received[other]), (b"200", 19))
        self.assertLessEqual(client.received[stalled], 65535)  # the stream's window, no more
        growth = sampler.stop()
        self.assertLess(growth, 40 * MB, f"memory grew by {growth / MB:.0f} MiB")
        # Reading resumes the stream where it stopped.
        client.read(stalled)
        while client.received[stalled] < 4 * MB:
            await sleep(0.05)
        self.assertFalse(client.ended[stalled].called)

    async def test_client_reading_nothing_is_dropped(self) -> None:
        """
        A client with large windows that stops reading its socket is dropped
        once the socket stays full for idle_timeout; the agent hears
        idle_timeout and the tunnel stream is gone.
        """
        events = _Events(self)
        port, _ = await listen_upstream(self)
        edge = _Edge(self)
        await edge.start([("app.test", port)], idle_timeout=0.5)
        client = await self.connect_reader(edge)
        client.request(b"GET", b"/bytes/%d" % (200 * MB))
        client.transport.pauseProducing()  # type: ignore[union-attr]
        dropped = await events.wait(
            "dropping HTTP/2 client {peer} ({reason}): it read nothing for {timeout}s"
        )
        self.assertEqual(dropped["reason"], "idle_timeout")
        await events.wait(_AGENT_RESET, reason=Reason.IDLE_TIMEOUT.value)
        while edge.active_streams():
            await sleep(0.01)
        client.transport.resumeProducing()  # type: ignore[union-attr]
        await client.closed

    async def test_client_flooding_while_reading_nothing_is_dropped(self) -> None:
        """
        A client that stops reading its socket and sends PINGs is dropped as
        saturated once 1 MiB of answers wait, long before idle_timeout.
        """
        events = _Events(self)
        port, _ = await listen_upstream(self)
        edge = _Edge(self)
        await edge.start([("app.test", port)])  # idle_timeout: 300 s
        client = await self.connect_reader(edge)
        client.request(b"GET", b"/bytes/%d" % (200 * MB))
        client.transport.pauseProducing()  # type: ignore[union-attr]
        dropped = events.wait(
            "dropping HTTP/2 client {peer} ({reason}): {size} bytes of answers unread"
        )
        pings = 0
        while not dropped.called and pings < 500_000:  # 8 MiB of answers
            for _ in range(1000):
                client.h2.ping(b"%08d" % pings)
                pings += 1
            client.flush()
            await sleep(0.001)  # a turn for the edge to read them
        self.assertTrue(dropped.called, f"{pings} PINGs unread, and the client is still served")
        event = await dropped
        self.assertEqual(event["reason"], "saturated")
        await events.wait(_AGENT_RESET, reason=Reason.SATURATED.value)
        while edge.active_streams():
            await sleep(0.01)
        client.transport.resumeProducing()  # type: ignore[union-attr]
        await client.closed

    async def connect_reader(self, edge: _Edge) -> _RawH2Client:
        """A client whose windows let the edge send as fast as the socket takes it."""
        return await connect_h2c(self, edge, window=2**31 - 1)

    async def test_upload_into_stalled_upstream_is_bounded(self) -> None:
        """An upload to an upstream that reads nothing stops the client at its windows."""
        sink = protocol.Factory.forProtocol(_Sink)
        sink.connections = []  # type: ignore[attr-defined]
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(sink)
        self.addCleanup(listening.stopListening)
        self.addCleanup(
            lambda: [c.transport.abortConnection() for c in sink.connections]  # type: ignore[attr-defined]
        )
        edge = _Edge(self)
        await edge.start([("app.test", listening.getHost().port)])
        client = await self.connect(edge)
        total = 256 * MB
        upload = client.request(b"POST", b"/upload", upload=total)
        previous = -1
        while client.sent[upload] != previous:  # until the client is held at its windows
            previous = client.sent[upload]
            await sleep(0.5)
        self.assertGreater(client.sent[upload], 0)
        self.assertLess(client.sent[upload], 64 * MB)


class _EchoH2Upstream(protocol.Protocol):
    """
    An h2c upstream that echoes each request body, and answers with trailers
    naming what it saw: the request's C{te} and its trailers.
    """

    def connectionMade(self) -> None:  # noqa: N802
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.te: dict[int, bytes] = {}
        self.trailers: dict[int, dict[bytes, bytes]] = {}
        self.waiting: dict[int, list[tuple[bytes, int]]] = {}
        self.ended: set[int] = set()
        self.transport.write(self.h2.data_to_send())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        h2 = self.h2
        for event in h2.receive_data(data):
            if isinstance(event, h2events.RequestReceived):
                headers = dict(event.headers)
                self.te[event.stream_id] = headers.get(b"te", b"-")
                h2.send_headers(event.stream_id, [(b":status", b"200")])
            elif isinstance(event, h2events.DataReceived):
                # Acknowledged once echoed: the echo's window paces the upload.
                self.waiting.setdefault(event.stream_id, []).append(
                    (event.data, event.flow_controlled_length)
                )
            elif isinstance(event, h2events.TrailersReceived):
                self.trailers[event.stream_id] = dict(event.headers)
            elif isinstance(event, h2events.StreamEnded):
                self.ended.add(event.stream_id)
        for stream_id in list(self.waiting):
            self.echo(stream_id)
        self.transport.write(h2.data_to_send())  # type: ignore[union-attr]

    def echo(self, stream_id: int) -> None:
        h2 = self.h2
        waiting = self.waiting[stream_id]
        while waiting:
            data, length = waiting[0]
            room = min(h2.local_flow_control_window(stream_id), len(data))
            if room <= 0:
                return
            h2.send_data(stream_id, data[:room])
            if room < len(data):
                waiting[0] = (data[room:], length)
                return
            waiting.pop(0)
            h2.acknowledge_received_data(length, stream_id)
        if stream_id in self.ended:
            del self.waiting[stream_id]
            seen = self.trailers.get(stream_id, {})
            h2.send_headers(
                stream_id,
                [(b"x-te", self.te[stream_id]),
                 (b"x-request-checksum", seen.get(b"x-checksum", b"-"))],
                end_stream=True,
            )


class HTTP2EdgeBehaviourTests(TestCase):
    """Trailers both ways, and how the edge defends and tidies its HTTP/2 connections."""

    timeout = 60

    async def connect(self, edge: _Edge) -> _RawH2Client:
        return await connect_h2c(self, edge)

    async def test_trailers_both_ways_to_h2c_upstream(self) -> None:
        """Request trailers and te: trailers reach an h2c upstream; its trailers reach the client."""
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(_EchoH2Upstream)
        )
        self.addCleanup(listening.stopListening)
        edge = _Edge(self)
        await edge.start([])
        await edge.h2c_agent("app.test", listening.getHost().port)
        client = await self.connect(edge)
        upload = 3 * MB
        stream_id = client.request(
            b"POST", b"/echo", upload=upload, headers=[(b"te", b"trailers")],
            trailers=[(b"x-checksum", b"abc123")],
        )
        await client.ended[stream_id]
        self.assertEqual(client.status[stream_id], b"200")
        self.assertEqual(client.received[stream_id], upload)
        self.assertEqual(
            client.trailers_in[stream_id], {b"x-te": b"trailers", b"x-request-checksum": b"abc123"}
        )

    async def test_h2c_upstream_down(self) -> None:
        """An h2c upstream refusing connections gets the client 502 upstream_refused."""
        edge = _Edge(self)
        await edge.start([])
        await edge.h2c_agent("app.test", 1)
        head = self.mktemp()
        version, body = await edge.curl(
            "--http2-prior-knowledge", "-D", head, *edge.h2c("app.test", "/")
        )
        self.assertEqual(version, "2 502")
        self.assertEqual(body, Reason.UPSTREAM_REFUSED.description.encode() + b"\n")
        with open(head, "rb") as f:
            self.assertIn(b"tunnel-error: upstream_refused\r\n", f.read())

    async def test_idle_connection_closed(self) -> None:
        """A connection with no stream open is closed (GOAWAY) after the idle timeout."""
        port, _ = await listen_upstream(self)
        edge = _Edge(self)
        await edge.start([("app.test", port)], idle_timeout=0.3)
        client = await self.connect(edge)
        stream_id = client.request(b"GET", b"/hello")
        await client.ended[stream_id]
        await client.closed
        self.assertEqual(client.received[stream_id], 19)

    async def test_goaway_ends_streams_in_flight(self) -> None:
        """
        After the client's GOAWAY nothing more can be sent (h2 refuses), so a
        download in flight ends at once, its tunnel stream too, and the
        connection closes instead of waiting on a window that never reopens.
        """
        port, _ = await listen_upstream(self)
        edge = _Edge(self)
        await edge.start([("app.test", port)])
        client = await connect_h2c(self, edge)
        stalled = client.request(b"GET", b"/bytes/%d" % (200 * MB), read=False)
        while stalled not in client.status:
            await sleep(0.01)
        self.assertEqual(edge.active_streams(), 1)
        client.send_goaway()
        await client.closed
        while edge.active_streams():
            await sleep(0.01)

    async def test_rapid_reset_dropped(self) -> None:
        """A client resetting streams faster than the limit gets GOAWAY ENHANCE_YOUR_CALM."""
        port, _ = await listen_upstream(self)
        edge = _Edge(self)
        await edge.start([("app.test", port)], h2_max_concurrent_streams=10)  # limit: 100/s
        client = await self.connect(edge)
        for _ in range(300):
            stream_id = client.request(b"GET", b"/hello")
            client.h2.reset_stream(stream_id)
        client.flush()
        await client.closed
        self.assertEqual(client.goaway, ErrorCodes.ENHANCE_YOUR_CALM)


class HTTP2PolicyTests(TestCase):
    """Public HTTP/2 passes the same policy gate as HTTP/1.1: rate limits, caps, draining."""

    timeout = 60

    async def edge(self, **limits: Any) -> _Edge:
        port, _ = await listen_upstream(self)
        edge = _Edge(self)
        await edge.start([("app.test", port)], limits=LimitsSection(**limits))
        return edge

    async def connect(self, edge: _Edge) -> _RawH2Client:
        return await connect_h2c(self, edge)

    def policy(self, edge: _Edge) -> Any:
        assert edge.harness.edge is not None
        return edge.harness.edge.policy

    async def test_rate_limit_over_h2(self) -> None:
        """A burst of 10 streams over burst 3: exactly 3 answered, 7 refused 429 with Retry-After."""
        edge = await self.edge(rate=0.01, burst=3)
        client = await self.connect(edge)
        streams = [client.request(b"GET", b"/hello") for _ in range(10)]
        await defer.gatherResults([client.ended[s] for s in streams])
        statuses = sorted(client.status[s] for s in streams)
        self.assertEqual(statuses, [b"200"] * 3 + [b"429"] * 7)
        for stream_id in streams:
            if client.status[stream_id] == b"429":
                self.assertEqual(client.headers[stream_id][b"tunnel-error"], b"rate_limited")
                self.assertGreaterEqual(int(client.headers[stream_id][b"retry-after"]), 1)
        self.assertEqual(self.policy(edge).snapshot()["tunnel_streams"], 0)
        self.assertEqual(self.policy(edge).snapshot()["refusals"], {"rate_limited": 7})

    async def test_connection_cap_answers_then_goaway(self) -> None:
        """Over the per-client connection cap, the first stream hears cap_reached, then GOAWAY and close."""
        edge = await self.edge(max_connections_per_client=1)
        first = await self.connect(edge)
        ok = first.request(b"GET", b"/hello")
        await first.ended[ok]
        self.assertEqual(first.status[ok], b"200")
        second = await self.connect(edge)
        refused = second.request(b"GET", b"/hello")
        await second.ended[refused]
        self.assertEqual(second.status[refused], b"503")
        self.assertEqual(second.headers[refused][b"tunnel-error"], b"cap_reached")
        await second.closed
        self.assertEqual(second.goaway, 0)  # NO_ERROR: a refusal, not a protocol fault
        self.assertEqual(self.policy(edge).snapshot()["connections"], 1)  # the first is still open
        again = first.request(b"GET", b"/hello")
        await first.ended[again]
        self.assertEqual(first.status[again], b"200")

    async def test_draining_refuses_new_streams(self) -> None:
        """While draining, a new HTTP/2 stream hears 503 draining and the connection says GOAWAY."""
        edge = await self.edge()
        client = await self.connect(edge)
        self.policy(edge).draining = True
        stream_id = client.request(b"GET", b"/hello")
        await client.ended[stream_id]
        self.assertEqual(client.status[stream_id], b"503")
        self.assertEqual(client.headers[stream_id][b"tunnel-error"], b"draining")
        await client.closed
        self.assertEqual(client.goaway, 0)


class _NoRoutes:
    def route(self, host: str, path: str) -> Reason:
        return Reason.NO_TUNNEL


class _FillingTransport(StringTransport):
    """
    A L{StringTransport} that pauses its streaming producer from inside
    C{write()} while it holds more than C{size} bytes, as Twisted's TCP
    sockets do (at every such write, not only the first), and resumes it
    when the test drains it (the client read it all).
    """

    def __init__(self, size: int = 65536) -> None:
        super().__init__()
        self.size = size
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.size:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.full:
            self.full = False
            self.producer.resumeProducing()
        return data


class HTTP2FloodUnitTests(SynchronousTestCase):
    """L{PublicH2Protocol} alone, on a fake transport and clock."""

    def test_client_reading_nothing_is_dropped(self) -> None:
        """PINGs keep coming while the socket is full: past the cap the connection is aborted."""
        factory = PublicH2Factory(EdgeGateway(_NoRoutes()), PublicH2Settings(max_unread=65536), Clock())
        server = factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        client = H2Connection(H2Configuration(client_side=True))
        client.initiate_connection()
        server.dataReceived(client.data_to_send())
        self.assertIs(transport.producer, server)
        server.pauseProducing()  # what the socket does when its buffer is full
        for i in range(20_000):
            client.ping(b"%08d" % i)
            server.dataReceived(client.data_to_send())
            if transport.disconnected:
                break
        self.assertTrue(transport.disconnected)  # aborted, not closed gracefully
        self.assertGreater(i, 3000)  # 17-byte answers: about 65536 bytes of them

    def test_bodies_wait_while_socket_full(self) -> None:
        """While the socket is full, answers' bodies wait in the stream's outbox."""
        factory = PublicH2Factory(EdgeGateway(_NoRoutes()), PublicH2Settings(), Clock())
        server = factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        server.dataReceived(client.data_to_send())
        client.receive_data(transport.value())
        transport.clear()
        server.pauseProducing()
        client.send_headers(
            1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x.test"),
                (b":path", b"/")], end_stream=True,
        )
        server.dataReceived(client.data_to_send())
        events = client.receive_data(transport.value())
        self.assertEqual([type(e) for e in events], [h2events.ResponseReceived])
        transport.clear()
        server.resumeProducing()
        events = client.receive_data(transport.value())
        self.assertEqual(
            [type(e) for e in events], [h2events.DataReceived, h2events.StreamEnded]
        )  # one DATA frame, with END_STREAM
        self.assertEqual(events[0].data, Reason.NO_TUNNEL.description.encode() + b"\n")


    def download(
        self, settings: PublicH2Settings
    ) -> tuple[PublicH2Protocol, _FillingTransport, H2Connection, FakeStream, Clock]:
        """A client with large windows asks for a download; the tunnel stream has answered 200."""
        link = FakeLink()
        clock = Clock()
        factory = PublicH2Factory(
            EdgeGateway(FakeRouter({"app.test": FakeRoute("app.test", link)})), settings, clock
        )
        server = factory.buildProtocol(None)
        transport = _FillingTransport()
        server.makeConnection(transport)
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.local_settings = Settings(
            client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}
        )
        client.initiate_connection()
        client.increment_flow_control_window(2**31 - 1 - 65535)
        client.send_headers(
            1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app.test"),
                (b":path", b"/big")], end_stream=True,
        )
        server.dataReceived(client.data_to_send())
        client.receive_data(transport.drain())
        [stream] = link.streams
        stream.reply(200)
        return server, transport, client, stream, clock

    def test_write_that_fills_the_socket_is_not_unread(self) -> None:
        """
        Two MiB of body in one write fill the socket, which pauses the
        protocol from inside write(): those bytes are not "unread", so the
        client is not dropped; the tunnel stream waits until the client reads.
        """
        server, transport, client, stream, _ = self.download(PublicH2Settings(max_unread=65536))
        stream.send(b"b" * (2 * MB))
        self.assertTrue(transport.full)
        self.assertFalse(transport.disconnected)
        self.assertIsNone(stream.reset_with)
        self.assertTrue(stream.paused)
        events = client.receive_data(transport.drain())
        received = sum(len(e.data) for e in events if isinstance(e, h2events.DataReceived))
        self.assertEqual(received, 2 * MB)
        self.assertFalse(stream.paused)

    def test_flood_after_the_socket_filled_is_dropped_as_saturated(self) -> None:
        """
        The socket full after a body, the client reads nothing and sends
        PINGs: past max_unread bytes of answers it is dropped, and the tunnel
        stream is reset as saturated.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        server, transport, client, stream, _ = self.download(PublicH2Settings(max_unread=65536))
        stream.send(b"b" * (2 * MB))
        self.assertTrue(transport.full)
        for i in range(20_000):
            client.ping(b"%08d" % i)
            server.dataReceived(client.data_to_send())
            if transport.disconnected:
                break
        self.assertTrue(transport.disconnected)
        self.assertGreater(i, 3000)  # 17-byte answers: about 65536 bytes of them
        assert stream.reset_with is not None
        self.assertEqual(stream.reset_with[0], Reason.SATURATED)
        formats = [e["log_format"] for e in logged]
        self.assertIn(
            "dropping HTTP/2 client {peer} ({reason}): {size} bytes of answers unread", formats
        )

    def test_socket_full_for_idle_timeout_is_dropped(self) -> None:
        """
        A client that reads nothing for idle_timeout while its socket is full
        is dropped, the tunnel stream reset as idle_timeout; reading in time
        starts the count again.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        server, transport, client, stream, clock = self.download(PublicH2Settings(idle_timeout=10))
        stream.send(b"b" * (2 * MB))
        clock.advance(9)
        client.receive_data(transport.drain())  # the client reads just in time
        stream.send(b"b" * (2 * MB))
        clock.advance(9)
        self.assertFalse(transport.disconnected)
        clock.advance(1)
        self.assertTrue(transport.disconnected)
        assert stream.reset_with is not None
        self.assertEqual(stream.reset_with[0], Reason.IDLE_TIMEOUT)
        formats = [e["log_format"] for e in logged]
        self.assertIn("dropping HTTP/2 client {peer} ({reason}): it read nothing for {timeout}s", formats)
        self.assertEqual(clock.getDelayedCalls(), [])


# The bodies of the large downloads: a pseudo-random sequence whose period is
# odd, so a frame lost, repeated or misplaced changes the hash.
_NOISE_PERIOD = MB + 4099
_NOISE = random.Random(18).randbytes(_NOISE_PERIOD)
_NOISE_TWICE = _NOISE + _NOISE
_NOISE_CHUNK = 256 * 1024


def _noise_digest(size: int) -> str:
    """The SHA-256 of the first C{size} bytes of the sequence."""
    digest = hashlib.sha256()
    whole, rest = divmod(size, _NOISE_PERIOD)
    for _ in range(whole):
        digest.update(_NOISE)
    digest.update(_NOISE[:rest])
    return digest.hexdigest()


@implementer(IPushProducer)
class _NoiseProducer:
    """Writes C{size} bytes of the sequence into a response as fast as its socket takes them."""

    def __init__(self, request: server.Request, size: int) -> None:
        self.request = request
        self.left = size
        self.offset = 0
        self.paused = False
        self.done = False
        request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        while not self.paused and self.left and not self.done:
            size = min(_NOISE_CHUNK, self.left)
            chunk = _NOISE_TWICE[self.offset : self.offset + size]
            self.offset = (self.offset + size) % _NOISE_PERIOD
            self.left -= size
            self.request.write(chunk)
        if not self.left and not self.done:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:  # noqa: N802
        self.done = True


class _NoiseUpstream(resource.Resource):
    """C{GET /noise/N}: N bytes of the sequence, generated as they are sent."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> Any:  # noqa: N802
        size = int(request.path.rsplit(b"/", 1)[1])
        request.setHeader(b"content-length", b"%d" % size)
        request.setHeader(b"content-type", b"application/octet-stream")
        _NoiseProducer(request, size)
        return server.NOT_DONE_YET


class _CurlDownload(protocol.ProcessProtocol):
    """One curl download: the body (curl's stdout) is hashed as it arrives."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.stderr = b""
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.digest.update(data)
        self.size += len(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.ended.callback(reason.value.exitCode)


class LargeDownloadTests(TestCase):
    """
    Large downloads over public HTTP/2 with curl and h2load, which open large
    windows: every body arrives whole (issue 18: one write that filled the
    socket was counted as unread and the client dropped mid-body).
    """

    timeout = 600
    sizes = (MB, 16 * MB, 64 * MB)
    downloads = 20  # of each size, all at once
    streams = 5  # h2load: streams at once on each connection

    async def edge(self) -> _Edge:
        site = server.Site(_NoiseUpstream())
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        edge = _Edge(self)
        await edge.start([("app.test", port), ("127.0.0.1", port)])
        return edge

    async def curl(self, size: int, options: list[str], url: str) -> None:
        """C{downloads} curls at once, one download each: all whole, all intact."""
        _need(CURL, "curl", "curl")
        # One download per curl: curl 7.88 cannot reuse an HTTP/2 connection
        # made with prior knowledge ("Error in the HTTP2 framing layer",
        # curl issue 10634, fixed in curl 8.0).
        argv = [CURL, "-sS", "--max-time", "300", "-w", "%{stderr}%{http_version} %{response_code}",
                *options, f"{url}/noise/{size}"]
        curls = [_CurlDownload() for _ in range(self.downloads)]
        for curl in curls:
            reactor.spawnProcess(curl, CURL, argv, env=dict(os.environ))
        codes = await defer.gatherResults([curl.ended for curl in curls])
        digest = _noise_digest(size)
        for curl, code in zip(curls, codes, strict=True):
            report = curl.stderr.decode(errors="replace")
            self.assertEqual((code, report), (0, "2 200"))
            self.assertEqual((curl.size, curl.digest.hexdigest()), (size, digest))

    async def h2load(self, size: int, url: str) -> None:
        """h2load, C{downloads} at once, C{streams} on each connection: every byte arrives."""
        _need(H2LOAD, "h2load", "nghttp2-client")
        total = self.downloads
        stdout, stderr, code = await getProcessOutputAndValue(
            H2LOAD,
            ["-n", str(total), "-c", str(total // self.streams), "-m", str(self.streams),
             f"{url}/noise/{size}"],
            env=dict(os.environ),
        )
        report = stdout.decode()
        self.assertEqual(code, 0, stderr.decode(errors="replace"))
        self.assertIn(f"{total} succeeded, 0 failed, 0 errored", report, report)
        self.assertIn(f"status codes: {total} 2xx", report, report)
        data = re.search(r"\((\d+)\) data", report)
        assert data is not None, report
        self.assertEqual(int(data.group(1)), total * size, report)

    async def test_curl_h2c(self) -> None:
        """curl --http2-prior-knowledge on the h2c listener: 20 downloads each of 1, 16 and 64 MiB."""
        edge = await self.edge()
        for size in self.sizes:
            await self.curl(
                size, ["--http2-prior-knowledge", "-H", "host: app.test"],
                f"http://127.0.0.1:{edge.h2c_port}",
            )

    async def test_curl_tls(self) -> None:
        """curl --http2 on the TLS listener (ALPN h2): 20 downloads each of 1, 16 and 64 MiB."""
        edge = await self.edge()
        port = edge.tls_port
        for size in self.sizes:
            await self.curl(
                size, ["--http2", "--cacert", edge.ca.path, "--resolve", f"app.test:{port}:127.0.0.1"],
                f"https://app.test:{port}",
            )

    async def test_h2load_h2c(self) -> None:
        """h2load on the h2c listener: 20 downloads each of 1, 16 and 64 MiB, 5 at once per connection."""
        edge = await self.edge()
        for size in self.sizes:
            await self.h2load(size, f"http://127.0.0.1:{edge.h2c_port}")

    async def test_h2load_tls(self) -> None:
        """h2load on the TLS listener (ALPN h2): 20 downloads each of 1, 16 and 64 MiB, 5 at once per connection."""
        edge = await self.edge()
        for size in self.sizes:
            await self.h2load(size, f"https://127.0.0.1:{edge.tls_port}")
