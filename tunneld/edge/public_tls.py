# -*- test-case-name: tests.test_public_h2 -*-
"""
TLS termination for the edge's public listeners.

One pyOpenSSL context per certificate, all with the same policy: TLS 1.2 and
1.3 only, forward-secret AEAD cipher suites only (ECDHE with AES-GCM or
ChaCha20-Poly1305 for TLS 1.2; TLS 1.3's suites are all AEAD), server cipher
preference, no compression, no renegotiation, and ALPN offering C{h2} then
C{http/1.1}.  The client's SNI hostname picks the context: an exact hostname
first, then a C{*.domain} wildcard (one label, as RFC 6125 says), then the
default certificate.

L{PublicTLSFactory} wraps any listener's factory (C{tcp:}, C{unix:},
C{systemd:} endpoints alike), so the policy does not depend on the endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from tunneld.config import PublicTLSSection
from tunneld.errors import ConfigError
from tunneld.speedups.tls_groups import restrict_groups
from tunneld.tls import INTERMEDIATE_CIPHERS, INTERMEDIATE_CURVES

__all__ = ["ALPN_PROTOCOLS", "CIPHERS", "PublicTLSContexts", "PublicTLSFactory", "public_tls_contexts"]

# Offered in this order of preference.
ALPN_PROTOCOLS = (b"h2", b"http/1.1")

# The same hardened policy as the agent links (tunneld.tls): TLS 1.2 with
# ECDHE and AEAD only, TLS 1.3's AEAD suites, and the intermediate curves.
CIPHERS = INTERMEDIATE_CIPHERS
TLS13_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def _alpn_select(connection: SSL.Connection, offered: list[bytes]) -> bytes | Any:
    """Our first preference the client offers; without one, no ALPN at all."""
    for protocol in ALPN_PROTOCOLS:
        if protocol in offered:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _dns_names(path: str) -> list[str]:
    """The DNS names in the SAN extension of the first certificate in C{path}."""
    with open(path, "rb") as f:
        certificate = x509.load_pem_x509_certificates(f.read())[0]
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in san.get_values_for_type(x509.DNSName)]


def _context(certificate: str, private_key: str, where: str, key: str) -> SSL.Context:
    """A server context for one certificate, with the listener's whole policy."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE
    )
    context.set_cipher_list(CIPHERS.encode("ascii"))
    context.set_tls13_ciphersuites(TLS13_CIPHERS.encode("ascii"))
    restrict_groups(context, INTERMEDIATE_CURVES)
    context.set_alpn_select_callback(_alpn_select)
    try:
        context.use_certificate_chain_file(certificate.encode())
    except (OSError, SSL.Error) as e:
        raise ConfigError(where, f"{key}.certificate", f"cannot load {certificate!r}: {e}") from None
    try:
        context.use_privatekey_file(private_key.encode())
        context.check_privatekey()
    except (OSError, SSL.Error) as e:
        raise ConfigError(
            where, f"{key}.private_key", f"cannot load {private_key!r} for {certificate!r}: {e}"
        ) from None
    return context


@dataclass
class PublicTLSContexts:
    """The default context and the SNI table: exact names, then wildcard suffixes."""

    default: SSL.Context
    exact: dict[str, SSL.Context] = field(default_factory=dict)
    wildcard: dict[str, SSL.Context] = field(default_factory=dict)  # "domain" for "*.domain"

    def for_hostname(self, hostname: str) -> SSL.Context:
        """The context to serve for an SNI hostname."""
        hostname = hostname.lower().rstrip(".")
        context = self.exact.get(hostname)
        if context is not None:
            return context
        label, dot, parent = hostname.partition(".")
        if label and dot:
            context = self.wildcard.get(parent)
            if context is not None:
                return context
        return self.default

    def _servername(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if not name:
            return
        try:
            hostname = name.decode("ascii")
        except UnicodeDecodeError:
            return
        context = self.for_hostname(hostname)
        if context is not self.default:
            connection.set_context(context)


def public_tls_contexts(section: PublicTLSSection, where: str) -> PublicTLSContexts:
    """
    Load every certificate of C{[edge.tls]}; a missing or unusable one raises
    L{ConfigError} naming its key.
    """
    if not section.certificate or not section.private_key:
        raise ConfigError(
            where, "edge.tls.certificate",
            "public_tls_listen needs a default certificate and private_key in [edge.tls]",
        )
    contexts = PublicTLSContexts(
        _context(section.certificate, section.private_key, where, "edge.tls")
    )
    for i, entry in enumerate(section.sni):
        key = f"edge.tls.sni[{i}]"
        context = _context(entry.certificate, entry.private_key, where, key)
        hostnames = entry.hostnames or _dns_names(entry.certificate)
        if not hostnames:
            raise ConfigError(
                where, f"{key}.hostnames", f"{entry.certificate!r} names no DNS hostname; list them"
            )
        for hostname in hostnames:
            hostname = hostname.lower().rstrip(".")
            if hostname.startswith("*."):
                contexts.wildcard[hostname[2:]] = context
            else:
                contexts.exact[hostname] = context
    for context in {id(c): c for c in (contexts.default, *contexts.exact.values(),
                                       *contexts.wildcard.values())}.values():
        context.set_tlsext_servername_callback(contexts._servername)
    return contexts


@implementer(IOpenSSLContextFactory)
class _ContextFactory:
    """The old-style context factory L{TLSMemoryBIOFactory} adapts: one shared context."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def getContext(self) -> SSL.Context:  # noqa: N802
        return self._context


class PublicTLSFactory(TLSMemoryBIOFactory):
    """
    TLS around a public listener's factory.  The wrapped protocol reads the
    ALPN result from C{transport.negotiatedProtocol} once data arrives.
    """

    log = Logger()
    noisy = False

    def __init__(self, contexts: PublicTLSContexts, wrapped: Factory) -> None:
        super().__init__(_ContextFactory(contexts.default), False, wrapped)
        self.contexts = contexts

    def logPrefix(self) -> str:  # noqa: N802
        return "public TLS"


