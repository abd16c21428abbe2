# -*- test-case-name: tests.test_identity -*-
"""
TLS for every tunneld listener and dialler: one hardened policy, mutual TLS
for agent links, and reading an agent's identity from its certificate.

L{hardened_context_options} is the one place the cipher/curve/version policy
lives (Mozilla's "intermediate" profile: TLS 1.2 and 1.3, ECDHE with AEAD
ciphers only, curves X25519/P-256/P-384).  Twisted's default
C{CertificateOptions} still allows RSA key exchange and CBC suites, so every
server context in tunneld — agent links and public TLS alike — should be built
with it.

Handshake refusals are logged with the check that failed (no client
certificate, unknown CA, expired, not yet valid, ...) rather than surfacing as
a bare dropped connection: the verify callback records OpenSSL's verdict, and
the info callback logs it when the handshake's fatal alert goes out.

The agent's side (L{client_tls_for}) checks the edge's certificate against
the name it dialled itself, in the verify callback, and fails closed: a chain
OpenSSL does not trust, a name that does not match, a certificate
C{service_identity} cannot even read (an invalid wildcard such as
C{*.localhost}), or any other exception while checking, is a refusal,
logged with what failed.  (Twisted's own check catches only
C{VerificationError}; anything else it logs and lets the chain's verdict
stand, so such a certificate linked up for any name.)
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from service_identity.hazmat import (
    DNS_ID,
    URI_ID,
    DNSPattern,
    IPAddress_ID,
    URIPattern,
    verify_service_identity,
)
from service_identity.pyopenssl import extract_patterns
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.certs import AGENT_URI_SCHEME, EDGE_URI_SCHEME
from tunneld.speedups.tls_groups import restrict_groups

# Mozilla "intermediate" (server side TLS guidelines v5): the TLS 1.2 suites;
# TLS 1.3's are OpenSSL's defaults, all of which the profile allows.  No DHE:
# ECDHE covers every client the profile targets, and no DH parameters to ship.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
INTERMEDIATE_CURVES = "X25519:prime256v1:secp384r1"

# TLS alert descriptions a server sends when it refuses a client's certificate.
_ALERTS = {
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    48: "unknown_ca",
    49: "access_denied",
    116: "certificate_required",
}

# X509 verification errors, named for a log reader ({ca}: the CA trusted).
_VERIFY_ERRORS = {
    2: "issuer certificate unavailable",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate, not {ca}",
    19: "self-signed certificate in chain, not {ca}",
    20: "not signed by {ca} (unable to get local issuer certificate)",
    21: "not signed by {ca} (unable to verify the first certificate)",
    24: "invalid CA certificate",
    26: "unsuitable certificate purpose",
}


def verify_error_text(errno: int, ca: str = "the agent CA") -> str:
    """A readable name for an OpenSSL X509 verification error number."""
    return _VERIFY_ERRORS.get(errno, f"certificate verification error {errno}").format(ca=ca)


class HardenedCertificateOptions(CertificateOptions):
    """
    L{CertificateOptions} held to the hardened policy; with C{trustRoot} (and
    C{require_client_certificate}), a mutual-TLS server that logs why it refused a
    client.  Use L{hardened_context_options} to build one.
    """

    log = Logger()

    def __init__(self, *, purpose: str = "TLS", curves: str = INTERMEDIATE_CURVES,
                 **kwargs: Any) -> None:
        kwargs.setdefault("raiseMinimumTo", TLSVersion.TLSv1_2)
        kwargs.setdefault(
            "acceptableCiphers", AcceptableCiphers.fromOpenSSLCipherString(INTERMEDIATE_CIPHERS)
        )
        super().__init__(**kwargs)
        self.purpose = purpose
        self._curves = curves
        self._hardened: SSL.Context | None = None
        self.require_client_certificate = True
        self._handshakes: weakref.WeakKeyDictionary[Any, _Handshake] = weakref.WeakKeyDictionary()

    def getContext(self) -> SSL.Context:  # noqa: N802
        context = super().getContext()
        if context is not self._hardened:
            restrict_groups(context, self._curves)
            if self.verify:
                flags = SSL.VERIFY_PEER
                if self.require_client_certificate:
                    flags |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
                context.set_verify(flags, self._verify)
                context.set_info_callback(self._info)
            self._hardened = context
        return context

    # -- refusal reporting ---------------------------------------------------

    def _verify(self, connection: SSL.Connection, certificate: X509, errno: int,
                depth: int, ok: int) -> bool:
        if not ok:
            record = self._handshake(connection)
            if record is not None and record.failure is None:
                subject = certificate.get_subject().CN or "?"
                record.failure = f"{verify_error_text(errno)} (certificate {subject!r})"
        return bool(ok)

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_WRITE_ALERT != SSL.SSL_CB_WRITE_ALERT or ret >> 8 != 2:
            return  # only the fatal alerts we send
        record = self._handshake(connection)
        if record is None or record.reported:
            return
        record.reported = True
        alert = _ALERTS.get(ret & 0xFF, f"alert {ret & 0xFF}")
        check = record.failure
        if check is None and alert in ("certificate_required", "handshake_failure"):
            if connection.get_peer_certificate() is None:
                check = "no client certificate"
        if check is None and record.peer_left():
            check = (
                "the client closed the connection during the handshake (an agent does "
                "when it refuses this edge's certificate: its log says why)"
            )
        self.log.warn(
            "{purpose} TLS handshake from {peer} refused: {check}",
            purpose=self.purpose, peer=record.peer(), check=check or f"TLS {alert}",
            alert=alert,
        )

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:  # noqa: N802
        # Twisted keeps the protocol as the connection's app data (ALPN uses
        # it), so what the callbacks learn is kept beside it.
        self._handshakes[protocol] = _Handshake(protocol)
        return super().serverConnectionForTLS(protocol)

    def _handshake(self, connection: SSL.Connection) -> _Handshake | None:
        try:
            return self._handshakes.get(connection.get_app_data())
        except TypeError:  # app data that cannot be weakly referenced
            return None


class _Handshake:
    """What the callbacks learn about one connection's handshake."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = weakref.ref(protocol)
        self.failure: str | None = None
        self.reported = False

    def peer_left(self) -> bool:
        """Whether the connection under the handshake is already gone."""
        transport = getattr(self.protocol(), "transport", None)
        return bool(getattr(transport, "disconnected", False))

    def peer(self) -> str:
        transport = getattr(self.protocol(), "transport", None)
        address = transport.getPeer() if transport is not None else None
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        return f"{host}:{port}" if host is not None else str(address)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def hardened_context_options(
    certificate: str,
    key: str,
    *,
    client_ca: str = "",
    require_client_certificate: bool = True,
    purpose: str = "TLS",
    acceptable_protocols: list[bytes] | None = None,
) -> HardenedCertificateOptions:
    """
    Server TLS options from PEM files under the hardened policy.  With
    C{client_ca}, clients must present a certificate signed by it (unless
    C{require_client_certificate} is false, when one is verified if sent).
    """
    private = PrivateCertificate.loadPEM(_read(certificate) + b"\n" + _read(key))
    kwargs: dict[str, Any] = {
        "privateKey": private.privateKey.original,
        "certificate": private.original,
        "purpose": purpose,
    }
    if acceptable_protocols:
        kwargs["acceptableProtocols"] = acceptable_protocols
    if client_ca:
        kwargs["trustRoot"] = trustRootFromCertificates(_load_certificates(client_ca))
    options = HardenedCertificateOptions(**kwargs)
    options.require_client_certificate = require_client_certificate
    return options


def agent_link_tls(section: Any) -> HardenedCertificateOptions | None:
    """
    The edge's agent-link TLS from its C{[edge.agent_tls]} section, or None
    for plaintext links.
    """
    if not section.certificate:
        return None
    return hardened_context_options(
        section.certificate,
        section.key,
        client_ca=section.client_ca,
        require_client_certificate=section.require_client_certificate,
        purpose="agent link",
    )


def _load_certificates(path: str) -> list[Certificate]:
    data = _read(path)
    marker = b"-----END CERTIFICATE-----"
    pems = [p + marker for p in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in p]
    if not pems:
        raise ValueError(f"{path}: no PEM certificate found")
    return [Certificate.loadPEM(p) for p in pems]


class EdgeCertificateRefused(Exception):
    """The edge's certificate does not prove the name the agent dialled (or is not trusted)."""


def _names(certificate: X509) -> str:
    """The DNS and IP names a certificate's subjectAltName lists, for a log reader."""
    try:
        san = certificate.to_cryptography().extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except Exception:
        return "(no subjectAltName)"
    names = [*san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "(no DNS or IP subjectAltName)"


@implementer(IOpenSSLClientConnectionCreator)
class EdgeIdentityCheck:
    """
    The agent's TLS client: Twisted's C{optionsForClientTLS} connection (SNI,
    trust roots, our certificate), with the verify callback replaced by one
    that checks the edge's identity with C{service_identity} and fails
    closed.  A refusal aborts the connection with L{EdgeCertificateRefused}
    naming what failed, and is logged.
    """

    log = Logger()

    def __init__(self, hostname: str, connections: IOpenSSLClientConnectionCreator,
                 ca: str = "") -> None:
        self.hostname = hostname
        self._connections = connections
        self._ca = f"the CA in {ca}" if ca else "a CA this system trusts"

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802,N803
        """IOpenSSLClientConnectionCreator.clientConnectionForTLS"""
        connection = self._connections.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(tlsProtocol)
        )
        return connection

    def service_id(self) -> Any:
        """What the edge's certificate must prove: the dialled name (or address)."""
        try:
            ipaddress.ip_address(self.hostname)
        except ValueError:
            return DNS_ID(self.hostname)
        return IPAddress_ID(self.hostname)

    def check(self, certificate: X509) -> str | None:
        """Why C{certificate} does not prove the edge's identity; None when it does."""
        try:
            verify_service_identity(extract_patterns(certificate), [self.service_id()], [])
        except VerificationError:
            return (
                f"hostname mismatch: the certificate is for {_names(certificate)}, "
                f"not {self.hostname!r}"
            )
        except Exception as e:  # an unreadable certificate or name proves nothing
            return (
                f"hostname check failed: the certificate for {_names(certificate)} cannot be "
                f"verified as {self.hostname!r}: {e}"
            )
        return None

    def _verifier(self, tls_protocol: Any) -> Callable[[SSL.Connection, X509, int, int, int], bool]:
        # A weak reference: the connection holds this callback, the protocol
        # holds the connection.
        protocol = weakref.ref(tls_protocol)

        def verify(connection: SSL.Connection, certificate: X509, errno: int, depth: int,
                   ok: int) -> bool:
            try:
                if not ok:
                    subject = certificate.get_subject().CN or "?"
                    self._refuse(
                        protocol(),
                        f"{verify_error_text(errno, self._ca)} (certificate {subject!r}, "
                        f"dialled as {self.hostname!r})",
                    )
                    return False
                if depth != 0:
                    return True  # the chain so far; the identity is the leaf's
                problem = self.check(certificate)
                if problem is None:
                    return True
                self._refuse(protocol(), problem)
            except Exception:
                self.log.failure("checking the edge's certificate failed; refusing it")
            return False

        return verify

    def _refuse(self, tls_protocol: Any, check: str) -> None:
        transport = getattr(tls_protocol, "transport", None)
        address = transport.getPeer() if transport is not None else None
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        self.log.error(
            "refused the edge at {peer}: {check}",
            peer=f"{host}:{port}" if host is not None else str(address),
            hostname=self.hostname, check=check,
        )
        if tls_protocol is not None:
            # As Twisted's own check does: the connection is aborted and this
            # is the reason its protocol hears.  (No alert goes out: OpenSSL
            # would send "internal error", which says less than the edge's
            # "client closed the connection during the handshake".)
            tls_protocol.failVerification(Failure(EdgeCertificateRefused(check)))


def client_tls_for(
    ca: str = "", certificate: str = "", key: str = "", server_hostname: str = ""
) -> Callable[[str], Any]:
    """
    The agent's C{AgentLinkSetup.tls_for}: for the edge's hostname, a client
    connection creator that verifies the edge's certificate (against C{ca}, or
    the platform's roots) and hostname, failing closed (L{EdgeIdentityCheck}),
    and presents this agent's certificate.
    """
    trust = trustRootFromCertificates(_load_certificates(ca)) if ca else None
    client = (
        PrivateCertificate.loadPEM(_read(certificate) + b"\n" + _read(key))
        if certificate else None
    )
    extra = {
        "raiseMinimumTo": TLSVersion.TLSv1_2,
        "acceptableCiphers": AcceptableCiphers.fromOpenSSLCipherString(INTERMEDIATE_CIPHERS),
    }

    def tls_for(hostname: str) -> Any:
        name = server_hostname or hostname
        return EdgeIdentityCheck(
            name, optionsForClientTLS(name, trust, client, extraCertificateOptions=dict(extra)), ca
        )

    return tls_for


# -- agent identity ----------------------------------------------------------------


@dataclass(frozen=True)
class AgentIdentity:
    """Who a client certificate says the agent is, and what it may serve."""

    agent_id: str | None
    patterns: tuple[Any, ...]
    hostnames: tuple[str, ...]

    def permits(self, hostname: str) -> bool:
        """Whether the certificate's DNS-IDs cover C{hostname} (checked with service_identity)."""
        if hostname.startswith("*."):
            # A wildcard tunnel needs the same wildcard in the certificate.
            return hostname.lower() in (h.lower() for h in self.hostnames)
        try:
            verify_service_identity(self.patterns, [DNS_ID(hostname)], [])
        except (VerificationError, ValueError, TypeError):
            return False
        return True

    def is_agent(self, agent_id: str) -> bool:
        """Whether the certificate names agent C{agent_id} (a URI-ID, else a DNS-ID)."""
        try:
            if any(isinstance(p, URIPattern) for p in self.patterns):
                verify_service_identity(
                    self.patterns, [URI_ID(f"{AGENT_URI_SCHEME}://{agent_id}")], []
                )
            else:
                verify_service_identity(self.patterns, [DNS_ID(agent_id)], [])
        except (VerificationError, ValueError, TypeError):
            return False
        return True


def _normalized(pattern: Any) -> Any:
    # service_identity keeps the "//" of scheme://host URIs in the pattern's
    # host but strips it from a URI_ID, so such a SAN would never match.
    if isinstance(pattern, URIPattern) and pattern.dns_pattern.pattern.startswith(b"//"):
        host = pattern.dns_pattern.pattern.lstrip(b"/").rstrip(b"/")
        return URIPattern(
            protocol_pattern=pattern.protocol_pattern, dns_pattern=DNSPattern.from_bytes(host)
        )
    return pattern


def certificate_identity(certificate: X509) -> AgentIdentity:
    """
    Read an agent certificate: its id is the host part of its
    C{tunneld-agent://NAME} URI SAN, or failing that its first DNS SAN; the
    hostnames it may serve are its DNS SANs.
    """
    patterns = tuple(_normalized(p) for p in extract_patterns(certificate))
    agent_id: str | None = None
    hostnames: list[str] = []
    for pattern in patterns:
        if isinstance(pattern, DNSPattern):
            hostnames.append(pattern.pattern.decode("ascii"))
    for pattern in patterns:
        if isinstance(pattern, URIPattern) and pattern.protocol_pattern == AGENT_URI_SCHEME.encode():
            agent_id = pattern.dns_pattern.pattern.decode("ascii")
            break
    if agent_id is None and hostnames:
        agent_id = hostnames[0]
    return AgentIdentity(agent_id, patterns, tuple(hostnames))


def certificate_proves_edge(certificate: X509, name: str) -> str | None:
    """
    Why C{certificate} (already verified against the agent CA) does not prove
    it belongs to edge C{name} of the cluster, or None when its
    C{tunneld-edge://NAME} URI SAN says so (checked with service_identity).
    """
    wanted = f"{EDGE_URI_SCHEME}://{name}"
    try:
        patterns = [_normalized(p) for p in extract_patterns(certificate)]
        verify_service_identity(patterns, [URI_ID(wanted)], [])
    except (VerificationError, ValueError, TypeError):
        return f"the client certificate for {_names(certificate)} does not name edge {wanted}"
    except Exception as e:  # an unreadable certificate proves nothing
        return f"unreadable client certificate: {e}"
    return None


def certificate_file_identity(path: str) -> AgentIdentity:
    """L{certificate_identity} of the first certificate in PEM file C{path}."""
    return certificate_identity(_load_certificates(path)[0].original)


__all__ = [
    "certificate_file_identity",
    "certificate_proves_edge",
    "INTERMEDIATE_CIPHERS",
    "INTERMEDIATE_CURVES",
    "AgentIdentity",
    "EdgeCertificateRefused",
    "EdgeIdentityCheck",
    "HardenedCertificateOptions",
    "certificate_identity",
    "agent_link_tls",
    "client_tls_for",
    "hardened_context_options",
]
